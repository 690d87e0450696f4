"""``amnesia run`` for ``method: esd | uce``: the baselines in the same harness as Selective Amnesia.

Loads theta* (``t2i.model``), erases the concept named by ``t2i.forget_prompts`` with ESD or UCE, and
writes what the SA path writes: ``out/forget`` (a stock diffusers pipeline directory that ``amnesia
sample``/``evaluate`` and ``StableDiffusionPipeline.from_pretrained`` load) and ``out/report.json`` (timings,
settings, and the retention report on the replay prompts: how far their images moved, same seeds).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from selective_amnesia.config import RunConfig, resolve_device, to_dict
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, write_json
from selective_amnesia.models.text_to_image import TextToImageModel


def check_baseline(cfg: RunConfig) -> None:
    """What a baseline run needs, and the SA settings it cannot honour (a clear error, not a silent skip)."""
    t = cfg.t2i
    if not t.model:
        raise AmnesiaError("t2i.model: set it to a local diffusers pipeline directory")
    if not t.forget_prompts:
        raise AmnesiaError("t2i.forget_prompts: name the concept to erase (a list of prompts)")
    if t.output != "pipeline" or t.lora_rank > 0:
        raise AmnesiaError(
            f"method={cfg.method} writes a full pipeline: t2i.output=lora, t2i.lora_rank are for method=sa"
        )
    if cfg.method == "uce" and t.surrogate_prompt is None and t.surrogate_path is not None:
        raise AmnesiaError(
            "method=uce maps the concept to a prompt's text: set t2i.surrogate_prompt (or neither it nor "
            "t2i.surrogate_path, for the empty prompt), not t2i.surrogate_path (images)"
        )
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AmnesiaError(f"method={cfg.method} runs in one process: start it without accelerate/torchrun")


def run_baseline(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Erase ``t2i.forget_prompts`` from ``t2i.model`` with ``cfg.method`` (esd or uce); write
    ``out/forget`` and ``out/report.json``; return the report."""
    from selective_amnesia.pipeline.t2i import register_prompts, retention_on_prompts

    if cfg.method not in ("esd", "uce"):
        raise AmnesiaError(f"run_baseline runs method esd or uce, got {cfg.method!r}")
    check_baseline(cfg)
    t = cfg.t2i
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = TextToImageModel.from_pretrained(t.model).to(device)
    base.set_sampler(t.sampler, t.num_inference_steps, t.guidance_scale)  # None: the pipeline's own
    base.requires_grad_(False)
    _, kept_prompts, _ = register_prompts(cfg, base)  # the replay prompts, the concept's removed
    model = copy.deepcopy(base)  # shares the frozen VAE and text encoder
    variant, settings, result = _erase(cfg, model, base, kept_prompts, timings)
    trained = _changed_tensors(model, base)
    target_dir = out / "forget"
    extra = {
        "run_config": to_dict(cfg),
        "method": variant,
        "forget_prompts": t.forget_prompts,
        **result,
    }
    model.save_pretrained(target_dir, extra=extra, reference_text_encoder=True)

    t1 = time.perf_counter()
    retention = retention_on_prompts(base, model, kept_prompts, t.retention_per_prompt, cfg.seed + 5)
    timings["retention_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "name": cfg.name,
        "method": variant,
        "output": str(target_dir),
        "forget_prompts": t.forget_prompts,
        "settings": settings,
        "replay_prompts": len(kept_prompts),
        "changed_tensors": len(trained),
        "changed_parameters": sum(p.numel() for n, p in model.named_parameters() if n in set(trained)),
        **result,
        "retention": retention,
        "timings": timings,
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "config": to_dict(cfg),
    }
    write_json(out / "report.json", report)
    return report


def _erase(
    cfg: RunConfig,
    model: TextToImageModel,
    base: TextToImageModel,
    kept_prompts: list[str],
    timings: dict[str, float],
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Erase the concept from ``model`` (in place) with ESD or UCE, its seconds in ``timings``; returns
    (the method's name in the report, its settings, its own record: ESD's history or UCE's edit)."""
    t = cfg.t2i
    t1 = time.perf_counter()
    if cfg.method == "esd":
        from selective_amnesia.baselines.esd import train_esd

        history = train_esd(model, base, t.forget_prompts, cfg.esd, seed=cfg.seed, progress=cfg.progress)
        timings["esd_s"] = time.perf_counter() - t1
        return f"esd-{cfg.esd.variant}", {"esd": to_dict(cfg.esd)}, {"history": history.to_dict()}
    from selective_amnesia.baselines.uce import uce_edit

    target = t.surrogate_prompt or ""
    edit = uce_edit(model, t.forget_prompts, target, kept_prompts, cfg.uce)
    timings["uce_s"] = time.perf_counter() - t1
    settings = {"uce": to_dict(cfg.uce), "target": target, "kept_prompts": len(kept_prompts) + 1}
    return "uce", settings, {"edit": edit.to_dict()}


def _changed_tensors(model: TextToImageModel, base: TextToImageModel) -> list[str]:
    """The names of the parameters the method changed, sorted."""
    return sorted(
        n
        for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
        if not p.equal(q)
    )
