"""The stages of ``amnesia run`` as functions, and the whole pipeline that chains them.

A stage whose output already exists in the run directory, made from the same settings, is reused
(its settings' hash is stored beside it); anything else is recomputed, never silently mixed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selective_amnesia.config import RunConfig, to_dict
from selective_amnesia.data import load_dataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate.assess import assess_model, real_features
from selective_amnesia.evaluate.classifier import ClassifierRecipe, MNISTClassifier, load_or_train_classifier
from selective_amnesia.evaluate.report import image_grid, plot_losses, save_png, write_html_report
from selective_amnesia.fisher import Fisher, estimate_fisher
from selective_amnesia.io import environment, read_json, state_hash, write_json
from selective_amnesia.models import build_model, load_model
from selective_amnesia.sampling import sample_per_label
from selective_amnesia.train import forget, pretrain

log = logging.getLogger(__name__)


def settings_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_labels(model: Any) -> list[int]:
    return list(range(model.config.num_classes))


def checked_labels(cfg: RunConfig, model: Any) -> list[int]:
    """The model's classes, after checking that ``forget.forget_label`` is one of them."""
    labels = model_labels(model)
    if cfg.forget.forget_label not in labels:
        raise AmnesiaError(
            f"forget.forget_label {cfg.forget.forget_label} is not a class of the model {labels}"
        )
    return labels


def evaluate_with_config(
    cfg: RunConfig,
    model: Any,
    classifiers: list[MNISTClassifier],
    test: Any,
    real_feats: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``assess_model`` with the ``forget``/``evaluate`` settings and the run's evaluation seed."""
    return assess_model(
        model,
        classifiers,
        test,
        forget_label=cfg.forget.forget_label,
        labels=checked_labels(cfg, model),
        cfg=cfg.evaluate,
        seed=cfg.seed + 1,
        real_feats=real_feats,
    )


def _reusable(path: Path, key: str) -> bool:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return False
    meta = read_json(cfg_file)
    return isinstance(meta, dict) and meta.get("settings_hash") == key


def stage_base(cfg: RunConfig, model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """theta*: the model named by ``pretrain.model_path``, or one trained here into ``model_dir``."""
    if cfg.pretrain.model_path:
        return load_model(cfg.pretrain.model_path), {"source": cfg.pretrain.model_path, "seconds": 0.0}
    key = settings_hash(cfg.seed, to_dict(cfg.data), to_dict(cfg.model), to_dict(cfg.pretrain))
    if _reusable(model_dir, key):
        log.info("reusing base model in %s", model_dir)
        return load_model(model_dir), {"source": str(model_dir), "reused": True, "seconds": 0.0}
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone, not on earlier stages
    model = build_model(cfg.model.family, hidden_dims=cfg.model.hidden_dims, latent_dim=cfg.model.latent_dim)
    train = load_dataset(cfg.data.dataset, "train", cfg.data.root)
    history = pretrain(model, train, cfg.pretrain, seed=cfg.seed, progress=cfg.progress)
    extra = {"settings_hash": key, "run_config": to_dict(cfg), "pretrain_history": history.to_dict()}
    model.save_pretrained(model_dir, extra=extra)
    return model, {"source": str(model_dir), "seconds": history.seconds}


def stage_fisher(cfg: RunConfig, model: Any, out: Path) -> Fisher:
    """The Fisher at theta*: ``fisher.path``, a matching ``out/fisher.safetensors``, or estimated now."""
    if cfg.fisher.path:
        return Fisher.load(cfg.fisher.path, model)
    path = out / "fisher.safetensors"
    if path.is_file():
        cached = Fisher.load(path, model)
        same = (
            cached.metadata.get("model_hash") == state_hash(model.state_dict())
            and cached.metadata.get("num_samples") == cfg.fisher.num_samples
            and cached.metadata.get("seed") == cfg.seed
        )
        if same:
            log.info("reusing Fisher %s", path)
            return cached
    fisher = fisher_from_config(cfg, model)
    fisher.save(path)
    return fisher


def fisher_from_config(cfg: RunConfig, model: Any) -> Fisher:
    """Estimate the Fisher of ``model`` over all its classes with the ``fisher.*`` settings."""
    return estimate_fisher(
        model,
        num_samples=cfg.fisher.num_samples,
        labels=model_labels(model),
        chunk_size=cfg.fisher.chunk_size,
        estimator=cfg.fisher.estimator,
        seed=cfg.seed,
        progress=cfg.progress,
    )


def stage_forget(cfg: RunConfig, base: Any, fisher: Fisher | None, out: Path) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of theta* to forget ``forget.forget_label``; saved to ``out/forget``."""
    model = copy.deepcopy(base)  # theta* itself stays untouched: it is the replay source and the baseline
    history = forget(
        model,
        fisher if cfg.forget.ewc_lambda > 0 else None,
        cfg.forget,
        labels=model_labels(model),
        seed=cfg.seed,
        progress=cfg.progress,
    )
    model.save_pretrained(
        out / "forget",
        extra={
            "run_config": to_dict(cfg),
            "history": history.to_dict(),
            "forget_label": cfg.forget.forget_label,
        },
    )
    return model, history.to_dict()


def load_classifiers(cfg: RunConfig) -> tuple[list[MNISTClassifier], list[dict[str, Any]]]:
    c = cfg.classifier
    recipe = ClassifierRecipe(**{k: v for k, v in to_dict(c).items() if k not in ("seeds", "cache_dir")})
    models, infos = [], []
    for seed in c.seeds:
        m, info = load_or_train_classifier(
            recipe, Path(c.cache_dir), seed, cfg.data.dataset, cfg.data.root, progress=cfg.progress
        )
        models.append(m)
        infos.append(info)
    return models, infos


def sample_grid(model: Any, labels: list[int], per_class: int, seed: int) -> np.ndarray:
    """Rows = classes, columns = samples: the report's before/after picture."""
    x, _ = sample_per_label(model, labels, per_class, seed)
    return image_grid(model.to_uint8(x), nrow=per_class)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 12) -> np.ndarray:
    spacer = np.full((left.shape[0], gap, left.shape[2]), 255, dtype=left.dtype)
    return np.concatenate([left, spacer, right], axis=1)


def run_pipeline(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Base model, classifiers, Fisher, forgetting, evaluation and report, in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    classifiers, classifier_info = load_classifiers(cfg)
    # one-time cost (cached afterwards), kept out of total_s
    timings["classifier_training_s"] = sum(i["train_seconds"] for i in classifier_info if not i["cached"])
    excluded = time.perf_counter() - t

    t = time.perf_counter()
    base, base_info = stage_base(cfg, out / "base")
    timings["pretrain_s"] = time.perf_counter() - t
    labels = checked_labels(cfg, base)  # before the Fisher, which would be wasted otherwise

    t = time.perf_counter()
    fisher = stage_fisher(cfg, base, out) if cfg.forget.ewc_lambda > 0 else None
    timings["fisher_s"] = time.perf_counter() - t

    t = time.perf_counter()
    forgotten, history = stage_forget(cfg, base, fisher, out)
    timings["forget_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test = load_dataset(cfg.data.dataset, "test", cfg.data.root)
    metrics: dict[str, Any] = {}
    grids: dict[str, np.ndarray] = {}
    remembered = [c for c in labels if c != cfg.forget.forget_label]
    real_feats = real_features(classifiers[0], test, remembered)
    for name, model in (("base", base), ("forget", forgotten)):
        metrics[name] = evaluate_with_config(cfg, model, classifiers, test, real_feats)
        grids[name] = sample_grid(model, labels, cfg.evaluate.grid_per_class, cfg.seed + 2)
        save_png(grids[name], out / f"samples_{name}.png")
    save_png(side_by_side(grids["base"], grids["forget"]), out / "before_after.png")
    plot_losses(history["terms"], history["steps"], out / "losses.png")
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0 - excluded

    report = {
        "title": f"Selective Amnesia: {cfg.name}, forgetting class {cfg.forget.forget_label}",
        "forget_label": cfg.forget.forget_label,
        "metrics": metrics,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "base_model": base_info,
        "fisher": fisher.metadata if fisher is not None else None,
        "classifiers": classifier_info,
        "loss_history": history,
        "config": to_dict(cfg),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "report.json", report)
    write_html_report(
        out,
        report,
        {
            "Samples before (base model), one row per class": "samples_base.png",
            "Samples after forgetting, one row per class": "samples_forget.png",
            "Loss terms over forgetting steps": "losses.png",
        },
    )
    return report
