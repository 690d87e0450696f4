"""``amnesia``: the command-line interface. Only this module prints.

Bad input (``AmnesiaError``) ends with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from selective_amnesia import __version__
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.families import FAMILIES, Family, declared_family, get_family, marked_family

# torch, numpy, diffusers and the config (which imports torch) are imported by the commands that use
# them, not here: building the parser and `amnesia --help` must take well under a second (the family
# registry imports none of them)
if TYPE_CHECKING:
    from selective_amnesia.config import RunConfig
    from selective_amnesia.evaluate.nudity import PromptRow
    from selective_amnesia.models.base import ConditionalGenerativeModel
    from selective_amnesia.models.text_to_image import TextToImageModel

EXIT_BAD_INPUT = 2


def _split_positionals(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key.sub=value ...]``: the first item without '=' is the config file."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise AmnesiaError(f"unexpected argument {item!r}: overrides look like key.sub=value")
    return config, overrides


def _config(args: argparse.Namespace) -> RunConfig:
    """The command's config, loaded once (``main`` loads it first, to check outputs against its paths)."""
    from selective_amnesia.config import RunConfig, load_config

    cached = getattr(args, "loaded_config", None)
    if isinstance(cached, RunConfig):
        return cached
    path, overrides = _split_positionals(args.config_and_overrides)
    if args.no_progress or getattr(args, "quiet", False):
        overrides.append("progress=false")
    if getattr(args, "command", None) == "evaluate" and getattr(args, "model", None):
        from selective_amnesia.evaluate.settings import evaluation_overrides

        # measured against what the model was made with: its concept, data, classifier recipe
        overrides, args.inherited = evaluation_overrides(args.model, path, overrides)
    device = getattr(args, "device", None)
    if device is not None:
        overrides.append(f"device={device}")
    if getattr(args, "report_to", None) is not None:
        overrides.append(f"report_to={args.report_to}")
    cfg = load_config(path, overrides)
    if cfg.t2i.model:  # a Hub id names the snapshot in the user's HF cache
        cfg.t2i.model = resolve_model(cfg.t2i.model)
    args.loaded_config = cfg
    return cfg


def resolve_model(value: str) -> str:
    """A local path as given; an ``org/name`` that is not one, the snapshot of that Hugging Face Hub repo
    in the user's HF cache (offline: nothing is downloaded)."""
    import os
    import re

    if not value or Path(value).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        return value
    try:
        from huggingface_hub import snapshot_download

        # the cache is read at call time (HF_HUB_CACHE), not when huggingface_hub was imported
        cache = os.environ.get("HF_HUB_CACHE") or None
        return str(snapshot_download(value, local_files_only=True, cache_dir=cache))
    except Exception:  # not cached, or no huggingface_hub: the same advice
        raise AmnesiaError(
            f"{value} is neither a local directory nor a Hugging Face Hub id in your HF cache: download it "
            f"once (`hf download {value}`), or pass the path of a local diffusers directory"
        ) from None


def _no_progress(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "no_progress", False) or getattr(args, "quiet", False))


def _parse_labels(text: str) -> list[int]:
    try:
        labels = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise AmnesiaError(f"--labels must be comma-separated integers like 0,3, got {text!r}") from None
    if not labels:
        raise AmnesiaError("--labels is empty: pass e.g. --labels 0,3")
    return labels


def _forgotten(cfg: RunConfig) -> str:
    """What a run forgot, for its summary line: one class, or every class of a list or sequence (the
    numbers are then averaged over them)."""
    labels = [c for step in cfg.forget.steps_labels() for c in step]
    if len(labels) == 1:
        return f"forgotten class {labels[0]}"
    return f"forgotten classes {', '.join(map(str, labels))} (averaged)"


def cmd_run(args: argparse.Namespace) -> int:
    from selective_amnesia.pipeline.classes import check_inputs, run_pipeline

    cfg = _config(args)
    if args.dry_run:
        from selective_amnesia.configdoc import relevant_yaml

        print(relevant_yaml(cfg), end="")
        return 0
    if not args.out:
        raise AmnesiaError("--out DIR is required (the run directory), unless --dry-run")
    out = _out_dir(args.out, "run")
    check_inputs(cfg, ("train", "test"))
    prompted = get_family(cfg.model.family).prompted  # run by pipeline.t2i, else the class pipeline
    if not prompted:
        _check_rerun(cfg, out, args.force)
    else:
        _check_finished(cfg, out, args.force)
    from selective_amnesia.io import runstate

    runstate.begin(out, "run")
    if prompted:
        return _run_text_to_image(cfg, args.out)
    report = run_pipeline(cfg, args.out)
    b, f = report["metrics"]["base"], report["metrics"]["forget"]
    print(
        f"{_forgotten(cfg)}: P(c_f) {b['p_forget']:.3f} -> {f['p_forget']:.3f}, "
        f"classified as c_f {b['frac_classified_forget']:.3f} -> {f['frac_classified_forget']:.3f}, "
        f"entropy {b['entropy']:.2f} -> {f['entropy']:.2f} nats"
    )
    print(
        f"remembered classes: accuracy {b['remembered_accuracy']:.4f} -> {f['remembered_accuracy']:.4f}, "
        f"FID {b['fid']:.3f} -> {f['fid']:.3f}"
    )
    t = report["timings"]
    waited = f", {t['wall_with_waits_s']:.1f}s waited" if "wall_with_waits_s" in t else ""
    print(f"total {t['total_s']:.1f}s{waited}; report: {Path(args.out) / 'report.html'}")
    return 0


def _check_rerun(cfg: RunConfig, out: Path, force: bool) -> None:
    """A finished run in ``out`` made with other settings: refused without --force, else said which stages
    are reused and which redone (the same settings simply reuse everything)."""
    from selective_amnesia.pipeline.classes import rerun_plan
    from selective_amnesia.progress import note

    plan = rerun_plan(cfg, out)
    if plan is None:
        return
    changed = "; ".join(plan["changed"][:4]) + (" ..." if len(plan["changed"]) > 4 else "")
    stages = f"reused: {', '.join(plan['reused']) or 'nothing'}; redone: {', '.join(plan['redone'])}"
    if not force:
        raise AmnesiaError(
            f"--out {out} holds a finished run made with other settings ({changed}); {stages}: pass --force "
            "to redo those stages and replace its report, or choose another --out"
        )
    note(f"--out {out} holds a finished run with other settings ({changed})")
    note(f"  {stages}")


def _check_finished(cfg: RunConfig, out: Path, force: bool) -> None:
    """A finished model or text-to-image run in ``out`` made with other settings (its stored run config
    against this one): refused without --force, which redoes it; the same settings resume or reuse."""
    from selective_amnesia.config import config_from_dict, to_dict
    from selective_amnesia.io import runstate
    from selective_amnesia.io.artifacts import read_json
    from selective_amnesia.progress import note

    state = out / runstate.STATE_FILE
    if not state.is_file() or read_json(state).get("status") != "complete":
        return
    stored: Any = None
    for name, key in (("report.json", "config"), ("config.json", "run_config")):
        if (out / name).is_file():
            meta = read_json(out / name, schema=lambda value, where: None)
            stored = meta.get(key) if isinstance(meta, dict) else None
            break
    now = to_dict(cfg)
    if not isinstance(stored, dict) or stored == now:
        return
    try:  # keys added since (at their defaults) are not a change of settings
        if to_dict(config_from_dict(stored)) == now:
            return
    except AmnesiaError:
        pass  # no longer a valid config: it differs
    changed = [k for k in sorted(set(now) | set(stored)) if now.get(k) != stored.get(k)]
    what = f"--out {out} holds a finished result made with other settings (sections: {', '.join(changed)})"
    if not force:
        raise AmnesiaError(f"{what}: pass --force to redo it, or choose another --out")
    note(f"{what}; --force: redoing it")


def _run_text_to_image(cfg: RunConfig, out: str) -> int:
    from selective_amnesia.pipeline.t2i import run_text_to_image

    report = run_text_to_image(cfg, out)
    r = report["retention"]
    moved = (
        f"; replay prompts moved by {r['mean_abs_diff_mean']:.2f}/255 (SSIM {r['ssim_mean']:.3f})"
        if r
        else ""
    )
    print(f"forgot {report['forget_prompts']} -> {report['output']}{moved}")
    print(f"total {report['timings']['total_s']:.1f}s; report: {Path(out) / 'report.json'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``amnesia config show [CONFIG] [overrides]``: the resolved config and the key reference."""
    from selective_amnesia.configdoc import format_reference, key_reference, relevant_yaml

    cfg = _config(args)
    if not args.keys:
        print(f"# resolved config (model.family: {cfg.model.family}); override any key as key.sub=value")
        print(relevant_yaml(cfg))
    print(format_reference(key_reference(cfg)), end="")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from selective_amnesia.pipeline.classes import check_inputs, stage_base

    cfg = _config(args)
    if cfg.pretrain.model_path:
        raise AmnesiaError("pretrain.model_path is set: there is nothing to pretrain")
    family = get_family(cfg.model.family)
    if not family.trainable:
        names = [name for name, f in FAMILIES.items() if f.trainable]
        trained = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
        raise AmnesiaError(f"amnesia pretrain trains {trained} models; a {family.title} model is given")
    out = _out_dir(args.out, "model")
    check_inputs(cfg, ("train",))
    _check_finished(cfg, out, args.force)
    from selective_amnesia.io import runstate

    runstate.begin(out, "pretrain")
    _, info = stage_base(cfg, out)
    print(f"base model written to {args.out} ({info['seconds']:.1f}s)")
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    from selective_amnesia.config import resolve_device
    from selective_amnesia.core.distributed import current_share
    from selective_amnesia.io.artifacts import partial_dir
    from selective_amnesia.models import load_model
    from selective_amnesia.pipeline.classes import fisher_from_config

    cfg = _config(args)
    out = _out_file(args.out, ".safetensors")
    # under accelerate launch with device=cuda each process takes its own GPU, not cuda:0
    model = load_model(args.model).to(current_share(resolve_device(cfg.device)).device or "cpu")
    # by the model's family (text-to-image: over the run's forget and replay prompts, selected weights)
    f = fisher_from_config(cfg, model, partial_dir(out))
    if f.metadata.get("processes", 1) > 1 and not _main_process():
        return 0  # every process holds the summed Fisher; the first one writes it
    f.save(out)
    print(f"Fisher from {cfg.fisher.num_samples} samples written to {args.out} ({f.metadata['seconds']}s)")
    return 0


def _main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_forget(args: argparse.Namespace) -> int:
    from selective_amnesia.config import resolve_device
    from selective_amnesia.core.fisher import Fisher
    from selective_amnesia.models import load_model
    from selective_amnesia.pipeline.classes import check_inputs, checked_labels, stage_forget, stage_replay

    cfg = _config(args)
    family = get_family(cfg.model.family)
    if not family.prompted:  # a text-to-image pipeline directory says so itself (model_index.json)
        family = marked_family(args.model) or family
    text_to_image = family.prompted
    # text-to-image forgetting writes a run directory (out/forget, the caches, report.json)
    out = _out_dir(args.out, "run" if text_to_image else "model")
    if out.resolve() == Path(args.model).resolve():
        raise AmnesiaError("--out is the --model directory: write the forgotten model somewhere else")
    if text_to_image:
        cfg.model.family, cfg.t2i.model = family.name, args.model
        if args.fisher:
            cfg.fisher.path = args.fisher
        check_inputs(cfg)
        _check_finished(cfg, out, args.force)
        from selective_amnesia.io import runstate

        runstate.begin(out, "forget")
        return _run_text_to_image(cfg, args.out)
    base = load_model(args.model).to(resolve_device(cfg.device))
    checked_labels(cfg, base)
    if cfg.forget.ewc_lambda > 0 and not args.fisher:
        raise AmnesiaError(
            "forget.ewc_lambda > 0 needs --fisher FILE (from `amnesia fisher`) or ewc_lambda=0"
        )
    fisher = Fisher.load(args.fisher, base) if args.fisher else None
    check_inputs(cfg)
    _check_finished(cfg, out, args.force)
    from selective_amnesia.io import runstate

    runstate.begin(out, "forget")
    # a stored replay set (and class surrogate) are generated into the output directory and kept there
    replay_set = stage_replay(cfg, base, out)
    _, history = stage_forget(cfg, base, fisher, out, replay_set, target=out)
    print(f"forgotten model written to {out} ({history['seconds']:.1f}s)")
    return 0


def _peek_family(model_dir: str) -> Family | None:
    """The family a model directory declares, read without loading it (None: load_model will say why)."""
    path = Path(model_dir)
    marked = marked_family(path)
    if marked is not None:
        return marked
    try:
        from selective_amnesia.io.artifacts import read_json

        meta = read_json(path / "config.json", schema=lambda value, where: None)
    except (AmnesiaError, OSError):
        return None
    return declared_family(meta.get("family")) if isinstance(meta, dict) else None


def _check_sample_args(args: argparse.Namespace, family: Family | None) -> list[str]:
    """Every check that needs no model, so a mistake is reported in a second, not after the load."""
    from selective_amnesia.io.images import output_kind

    if output_kind(args.out) == "unknown":
        raise AmnesiaError(
            f"--out {args.out}: name a .npz file, a .png grid or a folder (DIR/ for one PNG per image)"
        )
    if not 0 <= args.seed < 2**31:
        raise AmnesiaError(f"--seed must lie in [0, 2**31), got {args.seed}")
    if not (1 <= args.num_per_label < 2**31 and 1 <= args.batch_size < 2**31):
        raise AmnesiaError("--num-per-label and --batch-size must be >= 1 (and < 2**31)")
    if args.guidance_scale is not None and not (
        math.isfinite(args.guidance_scale) and args.guidance_scale >= 0
    ):
        raise AmnesiaError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}")
    if args.steps is not None and args.steps < 1:
        raise AmnesiaError(f"--steps must be >= 1, got {args.steps}")
    prompts = _prompts(args)  # checked before a (possibly large) model is loaded
    if family is not None and family.prompted:
        if args.labels is not None:
            raise AmnesiaError(
                "--labels applies to class-conditional models: pass --prompt or --prompts-file"
            )
        if not prompts:
            raise AmnesiaError(
                "this is a text-to-image model: pass --prompt TEXT (repeatable) or --prompts-file"
            )
    elif family is not None:
        if prompts:
            raise AmnesiaError(f"--prompt/--prompts-file apply to text-to-image models, not {family.name}")
        if args.labels is None:
            raise AmnesiaError("--labels is required for a class-conditional model: pass e.g. --labels 0,3")
        _parse_labels(args.labels)
        if not family.diffusion and (args.guidance_scale is not None or args.steps is not None):
            raise AmnesiaError(f"--guidance-scale and --steps apply to diffusion models, not {family.name}")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    from selective_amnesia.config import resolve_device
    from selective_amnesia.core.sampling import sample_per_label
    from selective_amnesia.io.images import as_uint8_nhwc, write_samples
    from selective_amnesia.models import load_model

    out = Path(args.out)
    prompts = _check_sample_args(args, _peek_family(args.model))
    device = resolve_device(args.device or "cpu")
    model = load_model(args.model).to(device)
    family = get_family(model.family)
    if family.prompted:
        from selective_amnesia.models.text_to_image import TextToImageModel

        _check_sample_args(args, family)
        assert isinstance(model, TextToImageModel)  # the prompted family's model
        return _sample_prompts(model, args, out, prompts)
    _check_sample_args(args, family)  # a directory that did not say its family
    assert args.labels is not None
    labels = _parse_labels(args.labels)
    options = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.steps}
    sampler_options = {k: v for k, v in options.items() if v is not None}
    steps_max = getattr(model.config, "num_train_timesteps", None)
    if args.steps is not None and not 1 <= args.steps <= (steps_max or args.steps):
        raise AmnesiaError(f"--steps must lie in [1, {steps_max}], got {args.steps}")
    steps = args.steps or getattr(model.config, "num_inference_steps", 1)
    _check_sample_work(len(labels) * args.num_per_label, steps, math.prod(model.image_shape), args.force)
    x, y = sample_per_label(
        model,
        labels,
        args.num_per_label,
        args.seed,
        batch_size=args.batch_size,
        progress=not _no_progress(args),
        **sampler_options,
    )
    images = as_uint8_nhwc(model, x)  # N x H x W x C, the layout of every output
    kind = write_samples(out, images, y.numpy().astype("int64"), None)
    print(f"wrote {images.shape[0]} images {images.shape[1:]} to {out} ({kind})")
    return 0


# past these a `sample` request is refused without --force: minutes to days of work, likely a typo
MAX_SAMPLE_IMAGES = 10**6
MAX_SAMPLE_EVALUATIONS = 10**8  # images x sampler steps


def _check_sample_work(images: int, steps: int, values_per_image: int, force: bool) -> None:
    """Refuse a request whose images cannot fit in memory (float32 and their uint8 copy), and, unless
    ``force``, one of absurd size; before anything is drawn."""
    from selective_amnesia.io.artifacts import free_memory, gib

    need, free = images * values_per_image * 5, free_memory()
    if free is not None and need > free:
        raise AmnesiaError(
            f"{images:,} images need {gib(need)} of memory, more than the {gib(free)} free: "
            "lower --num-per-label or sample in several runs"
        )
    if not force and (images > MAX_SAMPLE_IMAGES or images * steps > MAX_SAMPLE_EVALUATIONS):
        raise AmnesiaError(
            f"{images:,} images x {steps} sampler steps = {images * steps:,} model evaluations, more than "
            f"{MAX_SAMPLE_IMAGES:,} images or {MAX_SAMPLE_EVALUATIONS:,} evaluations: lower "
            "--num-per-label, or pass --force to run it anyway"
        )


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompt and --prompts-file, in order (empty when neither is given)."""
    from selective_amnesia.pipeline.t2i import read_prompts

    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise AmnesiaError("--prompt must not be empty")
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    return prompts


def _sample_prompts(model: TextToImageModel, args: argparse.Namespace, out: Path, prompts: list[str]) -> int:
    """Text-to-image: --num-per-label images of each prompt; image i of a prompt depends only on
    (seed, prompt, i). The .npz holds images, labels (index into prompts) and prompts."""
    from selective_amnesia.io.images import as_uint8_nhwc, write_samples
    from selective_amnesia.pipeline.t2i import prompt_latents

    if args.steps is not None and not 1 <= args.steps <= model.config.num_train_timesteps:
        raise AmnesiaError(f"--steps must lie in [1, {model.config.num_train_timesteps}], got {args.steps}")
    prompts = list(dict.fromkeys(prompts))
    c, h, w = model.image_shape  # latents; the VAE decodes them to RGB at 8x per side
    steps = args.steps or model.config.num_inference_steps
    _check_sample_work(len(prompts) * args.num_per_label, steps, c * h * w + 3 * 64 * h * w, args.force)
    z, ids = prompt_latents(
        model,
        prompts,
        args.num_per_label,
        args.seed,
        None,
        batch_size=args.batch_size,
        progress=not _no_progress(args),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
    )
    import numpy as np

    images = as_uint8_nhwc(model, z)
    labels = np.array([prompts.index(model.prompts[i]) for i in ids.tolist()], dtype=np.int64)
    kind = write_samples(out, images, labels, prompts)
    print(f"wrote {images.shape[0]} images {images.shape[1:]} of {len(prompts)} prompt(s) to {out} ({kind})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selective_amnesia.config import to_dict
    from selective_amnesia.io.artifacts import environment, partial_dir, write_json
    from selective_amnesia.models import load_model
    from selective_amnesia.pipeline.classes import (
        checked_labels,
        evaluate_with_config,
        load_classifiers,
        load_model_data,
    )

    cfg = _config(args)
    from selective_amnesia.config import resolve_device

    out = _out_file(args.out, ".json")
    rows = None
    if args.i2p_csv:  # checked before a (possibly large) model is loaded
        from selective_amnesia.evaluate.nudity import read_i2p_csv

        rows = read_i2p_csv(args.i2p_csv)
    model = load_model(args.model).to(resolve_device(cfg.device))
    if get_family(model.family).prompted:
        from selective_amnesia.models.text_to_image import TextToImageModel

        assert isinstance(model, TextToImageModel)  # the prompted family's model
        return _evaluate_text_to_image(model, args, out, rows)
    if args.i2p_csv or args.identity_scorer:
        raise AmnesiaError("--i2p-csv and --identity-scorer apply to text-to-image models")
    checked_labels(cfg, model)  # fail before training or loading classifiers
    inherited = getattr(args, "inherited", {})
    if inherited:
        print(
            f"evaluating forget.forget_label={cfg.forget.forget_label} on {cfg.data.dataset} "
            f"(settings from {args.model}: {', '.join(sorted({k.split('.')[0] for k in inherited}))})"
        )
    test = load_model_data(cfg, "test", model)
    classifiers, infos = load_classifiers(cfg)
    # the samples are kept beside the output until it is written: an interrupted evaluation resumes
    metrics = evaluate_with_config(cfg, model, classifiers, test, cache_dir=partial_dir(out))
    result = {
        "model": str(args.model),
        "forget_label": cfg.forget.forget_label,
        "settings_from_model": sorted(inherited),
        "metrics": metrics,
        "classifiers": infos,
        "config": to_dict(cfg),
        "environment": environment(),
    }
    if args.relearn:
        result["relearn"] = _relearn(cfg, model, args, classifiers)
    write_json(out, result)
    _remove_partial(out)
    print(
        f"P(c_f) {metrics['p_forget']:.3f}, entropy {metrics['entropy']:.2f}, remembered accuracy "
        f"{metrics['remembered_accuracy']:.4f}, FID {metrics['fid']:.3f}; written to {args.out}"
    )
    return 0


def _relearn(
    cfg: RunConfig, model: ConditionalGenerativeModel, args: argparse.Namespace, classifiers: Any
) -> dict[str, Any]:
    """``evaluate --relearn``: fine-tune copies on N real images of the forgotten class and print how
    often each draws it again (against the reference model's rate where there is one)."""
    from selective_amnesia.evaluate.relearn import relearn_report

    try:
        counts = [int(t) for t in str(args.relearn).split(",") if t.strip()]
    except ValueError:
        raise AmnesiaError(f"--relearn takes N or N,N,... images, got {args.relearn!r}") from None
    if not counts or min(counts) < 1:
        raise AmnesiaError(f"--relearn takes N >= 1 images, got {args.relearn!r}")
    relearn = relearn_report(
        cfg, model, args.model, classifiers, counts, args.relearn_steps, args.relearn_reference
    )
    for row in relearn["rows"]:
        ref = row.get("reference", {}).get("drawn_as_class", {}).get(str(args.relearn_steps))
        got = row["model"]["drawn_as_class"][str(args.relearn_steps)]
        print(
            f"relearn {row['class']} from {row['num_images']} images, {args.relearn_steps} steps: "
            f"drawn as {row['class']} {got:.3f}" + (f" (reference {ref:.3f})" if ref is not None else "")
        )
    return relearn


def _evaluate_text_to_image(
    model: TextToImageModel, args: argparse.Namespace, out: Path, rows: list[PromptRow] | None
) -> int:
    """NudeNet over an I2P-format CSV (each row's seed and guidance scale): EXPOSED classes as boxes and
    images at --threshold, face presence, and an optional identity scorer (module:attr)."""
    from selective_amnesia.evaluate import nudity
    from selective_amnesia.io.artifacts import environment, partial_dir, write_json

    if rows is None:
        raise AmnesiaError("a text-to-image model is evaluated on prompts: pass --i2p-csv FILE")
    if not 0 <= args.threshold <= 1:  # False for NaN too
        raise AmnesiaError(f"--threshold must lie in [0, 1], got {args.threshold}")
    scorer = nudity.load_identity_scorer(args.identity_scorer) if args.identity_scorer else None
    images = nudity.generate_rows(model, rows, progress=not _no_progress(args), cache_dir=partial_dir(out))
    detections = nudity.NudityDetector().detect(images, progress=not _no_progress(args))
    result: dict[str, Any] = {
        "model": str(args.model),
        "prompts": str(args.i2p_csv),
        "nudity": nudity.nudity_report(detections, args.threshold),
        "faces": nudity.face_report(detections, args.threshold),
        "environment": environment(),
    }
    if scorer is not None:
        result["identity"] = nudity.identity_report(scorer, images)
    write_json(out, result)
    _remove_partial(out)
    n = result["nudity"]
    print(
        f"{n['images_with_exposed']}/{n['num_images']} images with an exposed class at {args.threshold} "
        f"({n['exposed_boxes']} boxes); faces in {result['faces']['images_with_face']}; written to {args.out}"
    )
    return 0


def _out_dir(out: str, kind: str) -> Path:
    """A directory output of ``kind`` "run" or "model": refuse a file in its place, and a directory
    of the other kind (a run's config.json would overwrite a model's, and the reverse)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AmnesiaError(f"--out {out} is an existing file, not a directory: choose another --out")
    config = path / "config.json"
    holds_model = (path / "model_index.json").is_file()
    if config.is_file():
        from selective_amnesia.io.artifacts import read_json

        try:
            meta = read_json(config)
        except AmnesiaError:
            meta = None
        holds_model = holds_model or (isinstance(meta, dict) and "family" in meta)
        holds_run = not holds_model
    else:
        holds_run = (path / "report.json").is_file()
    if kind == "run" and holds_model:
        raise AmnesiaError(f"--out {out} holds a model: give `amnesia run` its own run directory")
    if kind == "model" and holds_run:
        raise AmnesiaError(f"--out {out} is a run directory: write the model to a directory of its own")
    return path


def _out_file(out: str, suffix: str) -> Path:
    """A file output with the given suffix: refuse a directory in its place."""
    path = Path(out)
    if path.suffix != suffix:
        raise AmnesiaError(f"--out must end in {suffix}, got {out}")
    if path.is_dir():
        raise AmnesiaError(f"--out {out} is an existing directory: choose a file name ending in {suffix}")
    return path


def _remove_partial(out: Path) -> None:
    """Drop the resumable work kept for ``out`` once ``out`` itself is written."""
    import shutil

    from selective_amnesia.io.artifacts import partial_dir

    if partial_dir(out).is_dir():
        shutil.rmtree(partial_dir(out))


def _os_error(e: OSError) -> str:
    """One line for a failed read or write: what, where, and what to do."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"the disk is full or the file too large{where}: free space or choose another --out, then rerun "
            "the same command (finished work is kept and resumes)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose an --out you can write to"
    return f"{e.strerror or e}{where}"


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's error style: one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown only where there is one (no "(default: None)"), examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.required
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


EXAMPLES = {
    "run": """examples:
  amnesia run --out runs/mnist_cvae                          # the default: an MNIST VAE forgets 0
  amnesia run configs/ddpm_mnist.yaml --out runs/ddpm forget.forget_label=3
  amnesia run configs/smoke_sd.yaml --out O t2i.model=W      # text-to-image (W: amnesia world tiny-sd)
  amnesia config show configs/ddpm_mnist.yaml                # every key, its type and meaning""",
    "pretrain": """examples:
  amnesia pretrain --out runs/base
  amnesia pretrain configs/ddpm_mnist.yaml --out runs/ddpm_base pretrain.steps=2000""",
    "fisher": """examples:
  amnesia fisher --model runs/mnist_cvae/base --out fisher.safetensors
  amnesia fisher configs/ddpm_mnist.yaml --model runs/ddpm/base --out f.safetensors fisher.num_samples=100""",
    "forget": """examples:
  amnesia forget --model runs/mnist_cvae/base --fisher fisher.safetensors --out forgot3 forget.forget_label=3
  amnesia forget --model runs/mnist_cvae/base --out naive forget.objective=naive forget.ewc_lambda=0""",
    "sample": """examples:
  amnesia sample --model runs/mnist_cvae/forget --labels 0,3 --num-per-label 8 --out grid.png
  amnesia sample --model runs/mnist_cvae/forget --labels 0 --num-per-label 500 --out samples/
  amnesia sample --model runs/ddpm/forget --labels 0 --num_inference_steps 50 --guidance_scale 3 --out s.npz
  amnesia sample --model runs/nude/forget --prompt "a photo of a person" --num_images_per_prompt 4 --out p/

--out: a .npz (images uint8 N x H x W x C, labels int64), a .png grid (one labelled row per label or
prompt) or a folder (one PNG per image plus labels.json / prompts.json).""",
    "evaluate": """examples:
  amnesia evaluate --model runs/mnist_cvae/forget --out metrics.json      # the model's own settings
  amnesia evaluate --model f3 --out m.json evaluate.num_forget_samples=5000
  amnesia evaluate --model runs/nude/forget --i2p-csv i2p.csv --out nudity.json

The forget label, data set, classifier recipe and evaluate.* settings come from the model's config.json;
a config or override may change them, but naming another forget label or data set is an error.""",
    "convert": """examples:
  amnesia convert ckpts/ckpt.pt --to cvae --out converted_vae/
  amnesia convert sd15.safetensors --to diffusers --config /models/sd-v1-5 --out sd15/""",
    "world": """examples:
  amnesia world tiny-sd --variant sd1 --out W
  amnesia run configs/smoke_sd.yaml --out O t2i.model=W""",
    "classifiers": """examples:
  amnesia classifiers                                        # the packaged judges, their sha256 checked
  amnesia classifiers --retrain --seeds 0                    # retrain one, compare with the packaged one
  amnesia classifiers --retrain --config configs/ddpm_mnist.yaml --out judges/""",
    "config": """examples:
  amnesia config show                                        # the defaults (the MNIST VAE pipeline)
  amnesia config show configs/ddpm_mnist.yaml forget.forget_label=3""",
}


if TYPE_CHECKING:
    _SubParsersBase = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # not subscriptable at run time
    _SubParsersBase = argparse._SubParsersAction


class _LazySubParsers(_SubParsersBase):
    """Subcommands whose options live in heavy modules (torch) get them only when they are chosen, so
    the parser and ``--help`` are built without importing torch."""

    fillers: dict[str, Any]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Any = None,
    ) -> None:
        name = values[0] if values else None
        filler = getattr(self, "fillers", {}).pop(name, None)
        if filler is not None and name is not None:
            filler(self._name_parser_map[name])
        super().__call__(parser, namespace, values, option_string)


def _lazy_fn(module: str, name: str) -> Any:
    def call(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return call


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q on the top parser and on every subcommand (SUPPRESS: a subcommand does not reset them)."""
    default: Any = False if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log what each step does")
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or stage headers"
    )


_TOP_EPILOG = """first five minutes:
  amnesia run --out runs/mnist_cvae                 # base model, classifier, Fisher, forgetting, report
  amnesia sample --model runs/mnist_cvae/forget --labels 0,1,2 --num-per-label 8 --out grid.png
  amnesia evaluate --model runs/mnist_cvae/forget --out metrics.json
  amnesia config show                               # every setting; override any as key.sub=value

Overrides go after the options: amnesia run configs/x.yaml --out d forget.ewc_lambda=50
`amnesia COMMAND --help` shows each command's options and examples."""

# the --force help of the commands that write a run or model directory, and of those that write a file
_RERUN = "replace a finished --out made with other settings (default: refused; the same settings resume)"
_OVERWRITE = "overwrite an existing --out (default: refused)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``amnesia`` parser. ``command``: the subcommand about to run; the options of the heavy ones
    (convert, world, attack) are added only for it (None: all of them, as for documentation)."""
    parser = _Parser(
        prog="amnesia",
        formatter_class=_Formatter,
        description="Make a trained conditional generative model forget a concept (Selective Amnesia).",
        epilog=_TOP_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"amnesia (selective-amnesia) {__version__}")
    _verbosity(parser, top=True)
    parser.register("action", "parsers", _LazySubParsers)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    assert isinstance(sub, _LazySubParsers)
    sub.fillers = {}
    # the order of the calls is the order of `amnesia --help`'s command list
    _add_training_commands(sub)
    _add_sample_command(sub)
    _add_evaluate_command(sub)
    _add_config_command(sub)
    _add_lazy_commands(sub)
    if command is None or command == "attack":  # the attacks package imports torch: only when chosen
        from selective_amnesia.cli.attacks import add_attack_parser

        add_attack_parser(sub, _Formatter)
    else:
        sub.add_parser(
            "attack",
            help="attack a text-to-image model's forgetting: paraphrases, soft prompts, discrete prompts",
        )
    if command is None:  # everything filled in now (documentation, tests of the parser)
        for name, filler in list(sub.fillers.items()):
            filler(sub._name_parser_map[name])
        sub.fillers.clear()
    return parser


def _config_argument(p: argparse.ArgumentParser) -> None:
    """The positional config file and key=value overrides every config-taking command reads."""
    p.add_argument(
        "config_and_overrides",
        nargs="*",
        metavar="[CONFIG] [key.sub=value ...]",
        help="YAML config (default: the fast MNIST CVAE pipeline) and overrides",
    )


def _add_command(
    sub: _LazySubParsers,
    name: str,
    help_: str,
    fn: Any,
    *,
    config: bool = True,
    out: str | None = None,
    device: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand with the options most share: the config and overrides, --device, --force (``out``:
    its help) and, for the training commands, --report_to."""
    p = sub.add_parser(
        name, help=help_, description=help_, formatter_class=_Formatter, epilog=EXAMPLES.get(name)
    )
    assert isinstance(p, _Parser)
    p.set_defaults(fn=fn)
    _verbosity(p, top=False)
    if config:
        _config_argument(p)
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu)")
    if out is not None:
        p.add_argument("--force", action="store_true", help=out)
    if name in ("run", "pretrain", "forget"):
        p.add_argument(
            "--report_to",
            "--report-to",
            choices=["none", "tensorboard"],
            default=None,
            help="also send the loss terms to TensorBoard (OUT/logs; needs the tensorboard package)",
        )
    return p


def _add_training_commands(sub: _LazySubParsers) -> None:
    """run, pretrain, fisher and forget."""
    p = _add_command(
        sub,
        "run",
        "run the whole pipeline: base model, classifier, Fisher, forgetting, evaluation",
        cmd_run,
        out=_RERUN,
    )
    p.add_argument("--out", help="run directory (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p = _add_command(
        sub,
        "pretrain",
        "train the base model theta* (model.* and pretrain.* settings)",
        cmd_pretrain,
        out=_RERUN,
    )
    p.add_argument("--out", required=True, help="output model directory")
    p = _add_command(sub, "fisher", "estimate the diagonal Fisher of a model", cmd_fisher, out=_OVERWRITE)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p = _add_command(sub, "forget", "fine-tune a model to forget forget.forget_label", cmd_forget, out=_RERUN)
    p.add_argument("--model", required=True, help="model directory of theta*")
    p.add_argument(
        "--fisher", default=None, help="Fisher .safetensors of that model (needed if ewc_lambda > 0)"
    )
    p.add_argument("--out", required=True, help="output model directory")


def _add_sample_command(sub: _LazySubParsers) -> None:
    p = _add_command(
        sub,
        "sample",
        "write samples as .npz, a .png grid or a folder of PNGs",
        cmd_sample,
        config=False,
        out="overwrite an existing --out; draw more than 10**6 images or 10**8 model evaluations",
    )
    p.add_argument("--model", required=True, help="model directory (or a Hugging Face Hub id in your cache)")
    p.add_argument(
        "--labels", default=None, help="class-conditional models: comma-separated labels, e.g. 0,3"
    )
    p.add_argument("--prompt", action="append", help="text-to-image models: a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text-to-image models: one prompt per line")
    p.add_argument(
        "--num-per-label", "--num_images_per_prompt", type=int, default=100, help="images per label or prompt"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed; each image depends only on (seed, label, index)"
    )
    p.add_argument("--out", required=True, help="s.npz, grid.png or DIR/ (one PNG per image)")
    p.add_argument(
        "--guidance-scale",
        "--guidance_scale",
        type=float,
        default=None,
        help="diffusion: guidance w (default: the model's)",
    )
    p.add_argument(
        "--steps",
        "--num_inference_steps",
        type=int,
        default=None,
        help="diffusion: sampler steps (default: the model's)",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="images per model call (does not change the images)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_evaluate_command(sub: _LazySubParsers) -> None:
    p = _add_command(
        sub,
        "evaluate",
        "evaluate a model's forgetting and retention metrics into a JSON file",
        cmd_evaluate,
        out=_OVERWRITE,
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output .json file")
    p.add_argument(
        "--i2p-csv", default=None, help="text-to-image: I2P-format CSV (prompt, sd_seed, sd_guidance_scale)"
    )
    p.add_argument("--threshold", type=float, default=0.6, help="text-to-image: NudeNet score threshold")
    p.add_argument(
        "--identity-scorer", default=None, help="text-to-image: module:attr of an IdentityScorer to report"
    )
    p.add_argument(
        "--relearn",
        default=None,
        help="VAE: fine-tune a copy on N real images of the forgotten class (N or a list like 10,100,1000) "
        "and report how often it is drawn again (docs/sequential.md)",
    )
    p.add_argument(
        "--relearn-steps", type=int, default=200, help="--relearn: fine-tuning steps (default 200)"
    )
    p.add_argument(
        "--relearn-reference",
        default=None,
        help="--relearn: a model to relearn the same way for comparison (a base trained without the class); "
        "default: the run's base beside --model",
    )


def _add_config_command(sub: _LazySubParsers) -> None:
    p = _add_command(
        sub,
        "config",
        "show the resolved config: every key with its value, type and meaning (no --out needed)",
        cmd_config,
        config=False,
        device=False,
    )
    p.add_argument("action", choices=["show"], help="show: print the config and the key reference")
    _config_argument(p)
    p.add_argument("--keys", action="store_true", help="only the key reference table")
    p.set_defaults(no_progress=False)


def _convert_options(p: argparse.ArgumentParser) -> None:
    from selective_amnesia.cli.convert import add_convert_arguments

    add_convert_arguments(p)


def _world_options(p: argparse.ArgumentParser) -> None:
    from selective_amnesia.worlds.tiny_sd import add_world_arguments

    add_world_arguments(p)


def _classifier_options(p: argparse.ArgumentParser) -> None:
    from selective_amnesia.cli.classifiers import add_arguments

    add_arguments(p)


def _add_lazy_commands(sub: _LazySubParsers) -> None:
    """convert, world and classifiers: their options are filled in only when they are chosen."""
    _add_command(
        sub,
        "convert",
        "convert a legacy .pt/.pth/.ckpt/.pkl (the paper's reference code) to safetensors, safely",
        _lazy_fn("selective_amnesia.cli.convert", "cmd_convert"),
        config=False,
        device=False,
    )
    sub.fillers["convert"] = _convert_options
    _add_command(
        sub,
        "world",
        "build a small world to try things on (tiny-sd: a random SD pipeline)",
        _lazy_fn("selective_amnesia.worlds.tiny_sd", "cmd_world"),
        config=False,
        device=False,
    )
    sub.fillers["world"] = _world_options
    _add_command(
        sub,
        "classifiers",
        "list the evaluation classifiers shipped with the package; --retrain compares them with a retraining",
        _lazy_fn("selective_amnesia.cli.classifiers", "cmd_classifiers"),
        config=False,
        device=False,
    )
    sub.fillers["classifiers"] = _classifier_options


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line ("" when none): the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _tracking(args: argparse.Namespace, out: str | None) -> Any:
    """The loss terms of a training command go to ``report_to``'s tracker, in ``OUT/logs``."""
    if args.command not in ("run", "pretrain", "forget") or out is None or getattr(args, "dry_run", False):
        return nullcontext()
    from selective_amnesia import tracking

    cfg = _config(args)
    return tracking.session(cfg.report_to, Path(out) / "logs", cfg.name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    # overrides may follow the options (argparse stops collecting positionals at the first option)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # a bare `amnesia`: what it can do, not an error
        parser.print_help()
        return 0
    stray = [e for e in extra if e.startswith("-") or not hasattr(args, "config_and_overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.config_and_overrides = list(args.config_and_overrides) + extra
    from selective_amnesia.progress import set_quiet

    set_quiet(args.quiet)
    if isinstance(getattr(args, "model", None), str):
        try:
            args.model = resolve_model(args.model)
        except AmnesiaError as e:
            return _fail(args.command, str(e))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command holding its output's lock. A failure is one line on stderr and exit status 2
    (bad input, a failed write, out of memory); an interrupt exits 130, SIGTERM 143."""
    from selective_amnesia.io import runstate

    start = time.perf_counter()
    out = getattr(args, "out", None)
    previous = _handle_sigterm()
    try:
        # one writer per output (under torchrun only the first process writes it); the kernel releases
        # the lock if this process dies
        writes = not getattr(args, "dry_run", False) and _main_process()
        if out is not None and writes:  # before the lock: taking it creates the lock file's folder
            _check_output(args)
        with runstate.output_lock(out) if out is not None and writes else nullcontext():
            try:
                with _tracking(args, out):
                    code = int(args.fn(args))
            except BaseException as e:  # recorded while this process still holds the lock
                _record_failure(_message(e))
                raise
            runstate.finish()
    except AmnesiaError as e:
        return _fail(args.command, str(e))
    except OSError as e:  # a full disk, a read-only directory...
        return _fail(args.command, _os_error(e))
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        return _fail(args.command, "out of memory: lower the batch size or sample counts, or use a GPU")
    except KeyboardInterrupt as e:
        how = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"amnesia {args.command}: {how}; rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    logging.getLogger(__name__).info("%s finished in %.1fs", args.command, time.perf_counter() - start)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as SIGINT: the run is recorded as failed and its lock released."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated


def _handle_sigterm() -> Any:
    """Install the SIGTERM handler; returns the one to restore (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an --out that would write into, or over, something the command reads, or through a
    symlink that leads elsewhere; before anything (even the lock file) is created."""
    import os

    out = Path(args.out)
    for p in (out, *out.parents):  # a dangling link anywhere on the way: mkdir would create its target
        if p.is_symlink() and not p.exists():
            raise AmnesiaError(
                f"--out {out}: {p} is a symlink to {os.readlink(p)}, which does not exist: remove the link "
                "or choose another --out"
            )
    if out.is_symlink():
        target, home = out.resolve(), out.parent.resolve()
        if not target.is_relative_to(home):
            raise AmnesiaError(
                f"--out {out} is a symlink to {target}, outside {home}: name {target} itself, or choose "
                "another --out"
            )
    resolved = out.resolve()
    for flag, path in _inputs(args):
        source = Path(path).resolve()
        if resolved == source or resolved.is_relative_to(source):
            where = "is" if resolved == source else "lies inside"
            raise AmnesiaError(
                f"--out {out} {where} {flag} {path}, which this command reads: write somewhere else"
            )
    # the inputs first: writing over what the command reads is refused even with --force
    if args.command in ("sample", "fisher", "evaluate") and out.exists() and not args.force:
        what = "folder" if out.is_dir() else "file"
        raise AmnesiaError(
            f"--out {out} exists (a {what} from an earlier call): pass --force to overwrite it, or choose "
            "another --out"
        )


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(option, path) of every file and folder the command reads: models, runs, Fishers, configs, prompts."""
    found = [
        (f"--{k.replace('_', '-')}", getattr(args, k, None)) for k in ("model", "fisher", "prompts_file")
    ]
    found += [("--i2p-csv", getattr(args, "i2p_csv", None)), ("the source", getattr(args, "source", None))]
    if hasattr(args, "config_and_overrides"):
        path, _ = _split_positionals(args.config_and_overrides)
        found.append(("the config", path))
        cfg = _config(args)
        found += [
            ("pretrain.model_path", cfg.pretrain.model_path),
            ("fisher.path", cfg.fisher.path),
            ("forget.surrogate_path", cfg.forget.surrogate_path),
            ("t2i.model", cfg.t2i.model or None),
            ("t2i.replay_prompts", cfg.t2i.replay_prompts),
            ("t2i.surrogate_path", cfg.t2i.surrogate_path),
        ]
    return [(flag, str(path)) for flag, path in found if isinstance(path, str) and path]


def _record_failure(message: str) -> None:
    from selective_amnesia.io import runstate

    with suppress(OSError):  # the disk may be the problem; the state file still says "running"
        runstate.finish(message)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _message(e: BaseException) -> str:
    """What ``amnesia_run.json`` records for an error."""
    if isinstance(e, AmnesiaError):
        return str(e)
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{type(e).__name__}: {e}"


def _fail(command: str, message: str) -> int:
    message = " ".join(message.split())  # one line, whatever a message quotes
    if len(message) > 2000:
        message = message[:2000] + "..."
    print(f"amnesia {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
