"""The stages of ``amnesia run`` as functions, and the whole pipeline that chains them.

A stage whose output already exists in the run directory, made from the same settings, is reused
(its settings' hash is stored beside it); anything else is recomputed, never silently mixed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from selective_amnesia.config import FORGET_KEYS_ADDED, RunConfig, resolve_device, to_dict
from selective_amnesia.core import sampling as sampling_module
from selective_amnesia.core.cache_keys import finished, settings_hash
from selective_amnesia.core.distributed import current_share
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.core.sampling import SAMPLER_DEFAULTS, cached_samples, sample_per_label
from selective_amnesia.core.train import forget, pretrain
from selective_amnesia.data import ImageDataset, load_dataset, load_image_folder
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate.assess import assess_model, real_features
from selective_amnesia.evaluate.classifier import ClassifierRecipe, MNISTClassifier, load_or_train_classifier
from selective_amnesia.evaluate.report import image_grid, plot_losses, save_png, write_html_report
from selective_amnesia.families import get_family
from selective_amnesia.io.artifacts import (
    InvalidJSON,
    environment,
    load_tensors,
    parse_json,
    partial_dir,
    read_json,
    state_hash,
    write_json,
)
from selective_amnesia.models import build_model_from_config, load_model
from selective_amnesia.progress import bar_name, stage

if TYPE_CHECKING:
    from selective_amnesia.core.distributed import Share
    from selective_amnesia.core.objective import EWCPenalty
    from selective_amnesia.core.replay import Replay
    from selective_amnesia.core.train import History
    from selective_amnesia.models.base import ConditionalGenerativeModel
    from selective_amnesia.pipeline.sequence import SequenceResult

log = logging.getLogger(__name__)


def model_labels(model: ConditionalGenerativeModel) -> list[int]:
    return list(range(model.config.num_classes))


def forgotten_classes(cfg: RunConfig) -> list[int]:
    """Every class the run forgets: ``forget.forget_label``'s, or all of ``forget.sequence``'s in order."""
    return [c for step in cfg.forget.steps_labels() for c in step]


def checked_labels(cfg: RunConfig, model: ConditionalGenerativeModel) -> list[int]:
    """The model's classes, after checking that every class to forget is one of them and one is kept."""
    labels = model_labels(model)
    concepts = forgotten_classes(cfg)
    bad = [c for c in concepts if c not in labels]
    if bad:
        what = "forget.sequence" if cfg.forget.sequence is not None else "forget.forget_label"
        shown = cfg.forget.forget_label if cfg.forget.sequence is None else bad[0]
        raise AmnesiaError(f"{what} {shown} is not a class of the model {labels}")
    if all(c in concepts for c in labels):
        raise AmnesiaError(f"forgetting {concepts} leaves no class of the model {labels} to keep")
    return labels


def evaluate_with_config(
    cfg: RunConfig,
    model: ConditionalGenerativeModel,
    classifiers: list[MNISTClassifier],
    test: ImageDataset,
    real_feats: torch.Tensor | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """``assess_model`` with the ``forget``/``evaluate`` settings and the run's evaluation seed;
    ``cache_dir`` keeps the samples so an interrupted evaluation resumes."""
    return assess_model(
        model,
        classifiers,
        test,
        forget_label=_as_label(forgotten_classes(cfg)),
        labels=checked_labels(cfg, model),
        cfg=cfg.evaluate,
        seed=cfg.seed + 1,
        real_feats=real_feats,
        cache_dir=cache_dir,
        progress=cfg.progress,
    )


def _as_label(classes: list[int]) -> int | list[int]:
    return classes[0] if len(classes) == 1 else classes


def check_inputs(cfg: RunConfig, splits: tuple[str, ...] = ()) -> None:
    """Read every file and folder the config names (and the dataset ``splits`` it will use), before
    anything is written: bad input must fail before a command marks its output directory as running."""
    f, t = cfg.forget, cfg.t2i
    folder = f.surrogate_path if f.objective == "surrogate" and f.surrogate == "folder" else None
    if get_family(cfg.model.family).prompted:
        from selective_amnesia.pipeline.t2i import read_prompts

        if cfg.method == "sa":
            t.check_ready()
        else:  # ESD has no surrogate; each baseline checks what it needs
            from selective_amnesia.baselines.run import check_baseline

            check_baseline(cfg)
        if not (Path(t.model) / "model_index.json").is_file():
            raise AmnesiaError(
                f"t2i.model {t.model} is not a diffusers pipeline directory (no model_index.json)"
            )
        read_prompts(t.replay_prompts)
        folder = t.surrogate_path
    else:
        if cfg.pretrain.model_path:
            load_model(cfg.pretrain.model_path)
        for split in splits:  # a missing or damaged dataset is bad input too
            load_dataset(cfg.data.dataset, split, cfg.data.root, cfg.data.image_size)
    if folder:
        load_image_folder(folder, image_size=4)  # every image opens (they are resized later anyway)
    if cfg.fisher.path:
        load_tensors(cfg.fisher.path)


def load_model_data(cfg: RunConfig, split: str, model: ConditionalGenerativeModel) -> ImageDataset:
    """The dataset at the model's resolution (``data.image_size``), checked against the model's shape."""
    data = load_dataset(cfg.data.dataset, split, cfg.data.root, cfg.data.image_size)
    shape = tuple(model.image_shape)
    if tuple(data.images.shape[1:]) != shape:
        raise AmnesiaError(
            f"{cfg.data.dataset} images are {tuple(data.images.shape[1:])} after data.image_size="
            f"{cfg.data.image_size} but the model takes {shape}: make them agree"
        )
    return data


def without_labels(data: ImageDataset, labels: list[int]) -> ImageDataset:
    """``data`` less every image of ``labels`` (``pretrain.exclude_labels``)."""
    if not labels:
        return data
    present = set(data.labels.unique().tolist())
    missing = [c for c in labels if c not in present]
    if missing:
        raise AmnesiaError(f"pretrain.exclude_labels: the training set has no class {missing[0]}")
    keep = ~torch.isin(data.labels, torch.tensor(labels, dtype=data.labels.dtype))
    if not bool(keep.any()):
        raise AmnesiaError("pretrain.exclude_labels leaves out every class: keep at least one")
    log.info("pretraining without classes %s (%d of %d images left)", labels, int(keep.sum()), len(data))
    return dataclasses.replace(data, images=data.images[keep], labels=data.labels[keep])


def _pretrain_settings(cfg: RunConfig) -> dict[str, Any]:
    settings = to_dict(cfg.pretrain)
    settings.pop("checkpoint_every")  # changes nothing in the result
    if not settings["exclude_labels"]:  # absent when unused: the hashes of existing runs stay the same
        settings.pop("exclude_labels")
    return settings


def _model_settings(cfg: RunConfig) -> dict[str, Any]:
    settings = to_dict(cfg.model)
    for name in SAMPLER_DEFAULTS:
        settings["ddpm"].pop(name)
    return settings


def _apply_sampler_defaults(
    cfg: RunConfig, model: ConditionalGenerativeModel, model_dir: Path, *, write: bool = True
) -> None:
    """A reused diffusion base takes the config's sampler defaults (they do not change the weights);
    its config.json is updated (when ``write``) so that ``amnesia sample`` on the directory uses them too."""
    defaults = get_family(model.family).sampler_defaults
    if defaults is None:
        return
    wanted = defaults(cfg.model)
    if all(getattr(model.config, k) == v for k, v in wanted.items()):
        return
    for k, v in wanted.items():
        setattr(model.config, k, v)
    if not write:
        return
    meta = read_json(model_dir / "config.json")
    meta.update(wanted)
    write_json(model_dir / "config.json", meta)
    log.info("base model sampler defaults set to %s", wanted)


def stage_base(cfg: RunConfig, model_dir: Path) -> tuple[ConditionalGenerativeModel, dict[str, Any]]:
    """theta*: the model named by ``pretrain.model_path``, or one trained here into ``model_dir``.

    Training resumes from ``model_dir/checkpoint`` when one with the same settings exists. With several
    processes, process 0 trains and writes it while the others wait, then they load it.
    """
    share = current_share(resolve_device(cfg.device))
    device = share.device or resolve_device(cfg.device)
    if cfg.pretrain.model_path:
        model = load_model(cfg.pretrain.model_path).to(device)
        return model, {"source": cfg.pretrain.model_path, "seconds": 0.0}
    key = settings_hash(cfg.seed, to_dict(cfg.data), _model_settings(cfg), _pretrain_settings(cfg))
    # every process decides before process 0 may write (agree is a collective)
    done = finished(model_dir, key, share)
    if done is not None:
        log.info("reusing base model in %s", model_dir)
        seconds = done.get("pretrain_history", {}).get("seconds", 0.0)
        model = load_model(model_dir, check_state=False).to(device)  # we are its writer
        _apply_sampler_defaults(cfg, model, model_dir, write=share.main)
        return model, {"source": str(model_dir), "reused": True, "seconds": seconds}
    if not share.main:
        share.barrier()  # process 0 trains theta* alone
        model = load_model(model_dir, check_state=False).to(device)
        seconds = read_json(model_dir / "config.json")["pretrain_history"]["seconds"]
        return model, {"source": str(model_dir), "seconds": seconds}
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone, not on earlier stages
    model = build_model_from_config(cfg.model).to(device)
    train = without_labels(load_model_data(cfg, "train", model), cfg.pretrain.exclude_labels)
    history = pretrain(
        model,
        train,
        cfg.pretrain,
        seed=cfg.seed,
        progress=cfg.progress,
        checkpoint_dir=model_dir / "checkpoint",
        key=key,
    )
    extra = {"settings_hash": key, "run_config": to_dict(cfg), "pretrain_history": history.to_dict()}
    model.save_pretrained(model_dir, extra=extra)
    share.barrier()
    return model, {"source": str(model_dir), "seconds": history.seconds}


def _fisher_settings(cfg: RunConfig, model: ConditionalGenerativeModel) -> dict[str, Any]:
    """What a stored Fisher must have been made with to be reused: the model's hash, the number of
    samples, the seed, and what its family adds (the diffusion estimator's settings; a text-to-image
    model's prompts and selected weights)."""
    f = cfg.fisher
    settings = {"model_hash": state_hash(model.state_dict()), "num_samples": f.num_samples, "seed": cfg.seed}
    settings.update(get_family(model.family).fisher_settings(cfg, model))  # e.g. the diffusion estimator's
    return settings


def as_read_back(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` as ``Fisher.load`` reads it back from the file ``Fisher.save`` writes (each value as
    JSON; a string that is JSON text, e.g. a hash of digits only, comes back as its value): a Fisher
    estimated now and the same Fisher read back by a rerun give every key made from it the same value."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        raw = v if isinstance(v, str) else json.dumps(v)
        try:
            out[k] = parse_json(raw, f"Fisher metadata {k}")
        except InvalidJSON:
            out[k] = raw
    return out


def stage_fisher(cfg: RunConfig, model: ConditionalGenerativeModel, out: Path) -> Fisher:
    """The Fisher of ``model`` at its current weights, for every family: ``fisher.path``, else
    ``out/fisher.safetensors`` when it was made with the same settings (``_fisher_settings``, compared
    by their settings hash), else estimated now by the family's estimator and written there (its settings
    are in its metadata). An interrupted estimate resumes from ``out/fisher.safetensors.partial``."""
    if cfg.fisher.path:
        return Fisher.load(cfg.fisher.path, model)
    share = current_share(resolve_device(cfg.device))
    path = out / "fisher.safetensors"
    wanted = _fisher_settings(cfg, model)
    cached = Fisher.load(path) if path.is_file() else None
    made_with = {k: cached.metadata.get(k) for k in wanted} if cached is not None else None
    fits = made_with is not None and settings_hash(made_with) == settings_hash(wanted)
    if share.agree([fits])[0]:  # every process decides before process 0 may write
        assert cached is not None
        cached.check_matches(model, str(path))
        log.info("reusing Fisher %s", path)
        return cached
    # the diffusion Fisher is shared by the processes (each keeps its own checkpoint folder); the
    # VAE's, seconds long, is estimated by each, checkpointed by process 0 only
    shared = get_family(model.family).fisher_shared
    fisher = fisher_from_config(cfg, model, partial_dir(path) if shared or share.main else None)
    fisher.metadata = as_read_back(fisher.metadata)
    if share.main:
        fisher.save(path)
    return fisher


def fisher_from_config(
    cfg: RunConfig, model: ConditionalGenerativeModel, checkpoint_dir: Path | None = None
) -> Fisher:
    """Estimate the Fisher of ``model`` with the ``fisher.*`` settings, by its family's estimator (a
    class-conditional model's: over all its classes); ``checkpoint_dir`` keeps its progress so an
    interrupted estimate resumes."""
    return get_family(model.family).fisher(cfg, model, checkpoint_dir)


def stage_replay(
    cfg: RunConfig, base: ConditionalGenerativeModel, out: Path, remembered: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored replay set (``forget.replay=stored``): replay_per_class samples of each remembered
    class (``remembered``, else all but the ones to forget) from theta*, generated once into
    ``out/replay`` (one file per class, so it resumes); several processes share its blocks."""
    if cfg.forget.replay != "stored" or cfg.forget.replay_weight == 0:
        return None
    share = current_share(resolve_device(cfg.device))
    if remembered is None:
        remembered = [c for c in model_labels(base) if c not in cfg.forget.forget_labels()]
    images, labels = cached_samples(
        base,
        remembered,
        cfg.forget.replay_per_class,
        cfg.seed + 3,
        out / "replay",
        progress=cfg.progress and share.main,
        share=share,
    )
    return base.from_uint8(images), labels


def surrogate_images(cfg: RunConfig, base: ConditionalGenerativeModel, out: Path) -> torch.Tensor | None:
    """q(x|c_f)'s images for ``forget.surrogate`` "class" (theta*'s samples) or "folder"; else None."""
    f = cfg.forget
    if f.objective != "surrogate" or f.surrogate == "uniform":
        return None
    if f.surrogate == "class":
        assert f.surrogate_label is not None  # checked by ForgetConfig
        if f.surrogate_label not in model_labels(base):
            raise AmnesiaError(f"forget.surrogate_label {f.surrogate_label} is not a class of the model")
        share = current_share(resolve_device(cfg.device))
        images, _ = cached_samples(
            base,
            [f.surrogate_label],
            f.replay_per_class,
            cfg.seed + 4,
            out / "surrogate",
            progress=cfg.progress and share.main,
            share=share,
        )
        return base.from_uint8(images)
    assert f.surrogate_path is not None
    channels, size, _ = base.image_shape
    folder = load_image_folder(f.surrogate_path, image_size=size, channels=channels)
    return base.from_uint8(folder.images)


# forget settings added with sequences: left out of the settings hash at their defaults, so that a
# single-concept run made before them is still reused
_SEQUENCE_DEFAULTS = {
    "sequence": None,
    "anchor": "original",
    "online_alpha": 1.0,
    "replay_forgotten": "surrogate",
}
_ADDED_DEFAULTS = {**_SEQUENCE_DEFAULTS, **FORGET_KEYS_ADDED}  # every forget key added since the first runs


def _forget_settings(cfg: RunConfig) -> dict[str, Any]:
    settings = to_dict(cfg.forget)
    settings.pop("checkpoint_every")
    settings.pop("log_every")
    settings.pop("snapshot_every")
    settings.pop("replay_model")  # decides steps >= 2 only (in their sequence key), never a single run
    for name, default in _ADDED_DEFAULTS.items():
        if settings[name] == default:
            settings.pop(name)
    return settings


def stage_forget(
    cfg: RunConfig,
    base: ConditionalGenerativeModel,
    fisher: Fisher | None,
    out: Path,
    replay_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    target: Path | None = None,
    *,
    replay: Replay | None = None,
    anchor: EWCPenalty | None = None,
    surrogate_x: torch.Tensor | None = None,
    sequence_key: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[ConditionalGenerativeModel, dict[str, Any]]:
    """Fine-tune a copy of theta* to forget ``forget.forget_label`` (one class or several together);
    saved to ``target`` (``out/forget``).

    A finished ``target`` made from the same settings is reused; an interrupted one resumes from
    ``target/checkpoint``. A class surrogate's samples are kept in ``out/surrogate``. Several processes
    share each step's batch; process 0 writes the model. A later step of a sequence (``selective_amnesia.
    sequence``) passes its own ``replay``, surrogate images, ``sequence_key`` (what else decides the
    result) and ``extra`` metadata, and with forget.anchor=original theta_0's ``anchor``; otherwise the
    anchor is ``fisher`` at the step's starting weights.
    """
    share = current_share(resolve_device(cfg.device))
    target = target if target is not None else out / "forget"
    key = _forget_key(cfg, base, fisher, replay_set, sequence_key, anchor)
    done = finished(target, key, share)
    if done is not None:
        log.info("reusing forgotten model in %s", target)
        reused = load_model(target, check_state=False)  # we are its writer
        return reused.to(next(base.parameters()).device), done["history"]
    model = copy.deepcopy(base)  # theta* itself stays untouched: it is the baseline
    images = surrogate_x if surrogate_x is not None else surrogate_images(cfg, base, out)
    history = _forget_copy(
        cfg,
        model,
        fisher,
        key,
        target,
        share,
        replay_set,
        replay,
        anchor,
        images,
        later=sequence_key is not None,
    )
    if share.main:
        model.save_pretrained(
            target,
            extra={
                "settings_hash": key,
                "run_config": to_dict(cfg),
                "history": history.to_dict(),
                "forget_label": cfg.forget.forget_label,
                **(extra or {}),
            },
        )
    share.barrier()
    return model, history.to_dict()


def _forget_key(
    cfg: RunConfig,
    base: ConditionalGenerativeModel,
    fisher: Fisher | None,
    replay_set: tuple[torch.Tensor, torch.Tensor] | None,
    sequence_key: dict[str, Any] | None,
    anchor: EWCPenalty | None,
) -> str:
    """The settings hash of ``stage_forget``'s result (its parts and their order are those of every
    finished run: changing them would redo them all)."""
    parts: list[Any] = [
        cfg.seed,
        _forget_settings(cfg),
        state_hash(base.state_dict()),
        fisher.metadata if fisher is not None else None,
        state_hash({"x": replay_set[0], "c": replay_set[1]}) if replay_set is not None else None,
    ]
    if sequence_key is not None:
        parts.append(sequence_key)
    if anchor is not None:
        parts.append(state_hash(anchor.state_dict()))
    return settings_hash(*parts)


def _forget_copy(
    cfg: RunConfig,
    model: ConditionalGenerativeModel,
    fisher: Fisher | None,
    key: str,
    target: Path,
    share: Share,
    replay_set: tuple[torch.Tensor, torch.Tensor] | None,
    replay: Replay | None,
    anchor: EWCPenalty | None,
    images: torch.Tensor | None,
    *,
    later: bool,
) -> History:
    """Fine-tune ``model`` (theta*'s copy) with ``train.forget``; returns its loss history. A single
    run (a sequence's first step is one) replays theta*; a ``later`` step of a sequence brings its
    ``replay``. The anchor is ``anchor``, else the Fisher at the model's starting weights."""
    from selective_amnesia.core.train import Concept, Loop, class_forgetting, make_surrogate, model_anchor

    f = cfg.forget
    if not later:  # a single run (a sequence's first step is one): replay of theta*
        concept, replay = class_forgetting(
            f, model, model_labels(model), replay_set=replay_set, surrogate_images=images
        )
    else:  # a later step of a sequence brings its replay
        concept = Concept(make_surrogate(f, model, None, images), f.forget_labels())
    history = forget(
        model,
        concept,
        replay,
        anchor if anchor is not None else model_anchor(f, fisher, model),
        Loop(f, cfg.seed),
        progress=cfg.progress,
        checkpoint_dir=target / "checkpoint",
        key=key,
        share=share,
        snapshot=_snapshot_writer(cfg, model, target.parent / "snapshots", key),
    )
    return history


def _snapshot_writer(
    cfg: RunConfig, model: ConditionalGenerativeModel, where: Path, key: str
) -> Callable[[int], None] | None:
    """``forget.snapshot_every``'s writer: the model at a step to ``where/step-NNNNN`` (None: off)."""
    if not cfg.forget.snapshot_every:
        return None
    meta = {"settings_hash": key, "run_config": to_dict(cfg)}

    def write(step: int) -> None:
        model.save_pretrained(where / f"step-{step:05d}", extra=meta | {"snapshot_step": step})

    return write


def load_classifiers(cfg: RunConfig) -> tuple[list[MNISTClassifier], list[dict[str, Any]]]:
    """The evaluation classifiers, one per ``classifier.seeds``: from the user cache, else shipped with the
    package, else trained on first use (``load_or_train_classifier``)."""
    from selective_amnesia.evaluate.cache import announce, resolve_cache_dir
    from selective_amnesia.progress import note

    c = cfg.classifier
    recipe = ClassifierRecipe(**{k: v for k, v in to_dict(c).items() if k not in ("seeds", "cache_dir")})
    cache = resolve_cache_dir(c.cache_dir)
    if announce(cache):
        note(f"classifier cache: {cache} (classifier.cache_dir or $SELECTIVE_AMNESIA_CACHE moves it)")
    models, infos = [], []
    for seed in c.seeds:
        m, info = load_or_train_classifier(
            recipe,
            cache,
            seed,
            cfg.data.dataset,
            cfg.data.root,
            progress=cfg.progress,
            image_size=cfg.data.image_size,
        )
        models.append(m)
        infos.append(info)
    return models, infos


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def rerun_plan(cfg: RunConfig, out: Path) -> dict[str, list[str]] | None:
    """For a *finished* run in ``out`` made with other settings: {"changed": ["key: old -> new"],
    "reused": [stage], "redone": [stage]}; None when ``out`` holds no finished run or the same settings.
    Settings that change no result (progress, device, checkpoint intervals) do not count. The stages'
    own reuse checks (settings hashes) decide in the end; this says in advance what they will decide."""
    if not (out / "report.json").is_file() or not (out / "config.json").is_file():
        return None
    try:
        old = _flat(read_json(out / "config.json"))
    except AmnesiaError:
        return None
    # a run made before these keys had their defaults
    for name, default in _ADDED_DEFAULTS.items():
        old.setdefault(f"forget.{name}", default)
    new = _flat(to_dict(cfg))
    ignored = ("progress", "device", "name", "classifier.cache_dir")
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k)
        and not k.startswith(ignored)
        and not k.endswith(("checkpoint_every", "log_every", "snapshot_every"))
    )
    if not changed:
        return None

    def touched(*prefixes: str) -> bool:
        return any(k == p or k.startswith(p + ".") for k in changed for p in prefixes)

    base = touched("seed", "data", "model", "pretrain")
    fisher = base or touched("fisher")
    replay = base or touched(
        "forget.replay", "forget.replay_per_class", "forget.forget_label", "forget.sequence"
    )
    stages = {
        "base model": base,
        "Fisher": fisher,
        "replay set": replay,
        "forgetting": fisher or replay or touched("forget"),
        "evaluation": True,  # the report is rewritten with the new settings
    }
    if cfg.forget.ewc_lambda == 0:
        stages.pop("Fisher")
    if cfg.forget.replay != "stored":
        stages.pop("replay set")
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    return {
        "changed": shown,
        "reused": [s for s, redo in stages.items() if not redo],
        "redone": [s for s, redo in stages.items() if redo],
    }


def sample_grid(
    model: ConditionalGenerativeModel, labels: list[int], per_class: int, seed: int
) -> np.ndarray:
    """Rows = classes, columns = samples: the report's before/after picture."""
    x, _ = sample_per_label(model, labels, per_class, seed)
    return image_grid(model.to_uint8(x), nrow=per_class)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 12) -> np.ndarray:
    spacer = np.full((left.shape[0], gap, left.shape[2]), 255, dtype=left.dtype)
    return np.concatenate([left, spacer, right], axis=1)


def run_pipeline(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Base model, classifiers, Fisher, forgetting, evaluation and report, in ``out``.

    Under ``accelerate launch``/``torchrun`` the processes share the Fisher, the generated sets and
    each forgetting step's batch (``selective_amnesia.core.distributed``); process 0 alone trains a missing
    base model, evaluates and writes the report, which the others read back and return.
    """
    share = current_share(resolve_device(cfg.device))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if share.main:
        write_json(out / "config.json", to_dict(cfg))
    run = _PipelineRun(cfg, out, share, t0=time.perf_counter())
    classifiers, classifier_info = _run_classifiers(run)
    base, base_info = _run_base(run)
    labels = checked_labels(cfg, base)  # before the Fisher, which would be wasted otherwise
    fisher = _run_fisher(run, base)
    replay_set = _run_replay(run, base)
    t = time.perf_counter()
    forgotten, history, sequence_result = _run_forgetting(run, base, fisher, replay_set)
    run.timings["forget_s"] = time.perf_counter() - t
    if not share.main:
        share.barrier()  # process 0 evaluates and writes the report
        report: dict[str, Any] = read_json(out / "report.json")
        return report

    t = time.perf_counter()
    metrics, figures, sequence_report = _run_evaluation(
        run, base, forgotten, history, labels, classifiers, sequence_result
    )
    run.timings["evaluate_s"] = time.perf_counter() - t
    run.finish_timings()
    report = _pipeline_report(run, metrics, base_info, fisher, classifier_info, history, sequence_report)
    write_json(out / "report.json", report)
    write_html_report(out, report, figures)
    share.barrier()
    return report


@dataclasses.dataclass
class _PipelineRun:
    """What the stages of one ``run_pipeline`` share: its config, directory, processes and timings."""

    cfg: RunConfig
    out: Path
    share: Share
    t0: float
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    excluded: float = 0.0  # seconds kept out of wall_s (classifier loading or training)

    @property
    def sequential(self) -> bool:
        return self.cfg.forget.sequence is not None

    @property
    def n(self) -> int:
        """The number of stages: a sequence makes each step's replay set itself (from the latest model)."""
        f = self.cfg.forget
        return 6 if f.replay == "stored" and f.replay_weight > 0 and not self.sequential else 5

    def stage(self, k: int, title: str) -> None:
        if self.share.main:
            stage(k, self.n, title)

    def finish_timings(self) -> None:
        timings = self.timings
        # the stages' own times: a base model trained by an earlier, interrupted call counts with its
        # recorded training time, so total_s is the cost of the whole pipeline however it was run
        timings["total_s"] = sum(v for k, v in timings.items() if k != "classifier_training_s")
        timings["wall_s"] = time.perf_counter() - self.t0 - self.excluded
        # what the person actually waited, classifier training and every reused stage's load included
        timings["wall_with_waits_s"] = time.perf_counter() - self.t0


def _run_classifiers(run: _PipelineRun) -> tuple[list[MNISTClassifier], list[dict[str, Any]]]:
    """Stage 1: the evaluation classifiers (process 0 only)."""
    cfg, main = run.cfg, run.share.main
    t = time.perf_counter()
    run.stage(
        1, f"evaluation classifiers ({len(cfg.classifier.seeds)} seeds: cached, packaged or trained once)"
    )
    classifiers, classifier_info = load_classifiers(cfg) if main else ([], [])
    # one-time cost (cached afterwards), kept out of total_s
    run.timings["classifier_training_s"] = sum(i["train_seconds"] for i in classifier_info if not i["cached"])
    run.excluded = time.perf_counter() - t
    return classifiers, classifier_info


def _run_base(run: _PipelineRun) -> tuple[ConditionalGenerativeModel, dict[str, Any]]:
    """Stage 2: theta*."""
    cfg = run.cfg
    t = time.perf_counter()
    what = cfg.pretrain.model_path or f"{cfg.model.family}, {cfg.pretrain.steps:,} steps"
    run.stage(2, f"base model theta* ({what})")
    base, base_info = stage_base(cfg, run.out / "base")
    run.timings["pretrain_s"] = base_info["seconds"] if base_info.get("reused") else time.perf_counter() - t
    return base, base_info


def _run_fisher(run: _PipelineRun, base: ConditionalGenerativeModel) -> Fisher | None:
    """Stage 3: F(theta*), none with forget.ewc_lambda=0."""
    cfg = run.cfg
    t = time.perf_counter()
    skip = " (skipped: forget.ewc_lambda=0)" if cfg.forget.ewc_lambda == 0 else ""
    run.stage(3, f"Fisher ({cfg.fisher.num_samples:,} samples){skip}")
    fisher = stage_fisher(cfg, base, run.out) if cfg.forget.ewc_lambda > 0 else None
    run.timings["fisher_s"] = time.perf_counter() - t
    return fisher


def _run_replay(
    run: _PipelineRun, base: ConditionalGenerativeModel
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stage 4 (of 6): the stored replay set of a single run."""
    cfg = run.cfg
    t = time.perf_counter()
    if run.n == 6:
        run.stage(4, f"replay set ({cfg.forget.replay_per_class:,} samples per remembered class)")
    with bar_name(sampling_module, "replay set: sampling theta*'s remembered classes"):
        replay_set = stage_replay(cfg, base, run.out) if not run.sequential else None
    run.timings["replay_generation_s"] = time.perf_counter() - t
    return replay_set


def _run_forgetting(
    run: _PipelineRun,
    base: ConditionalGenerativeModel,
    fisher: Fisher | None,
    replay_set: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[ConditionalGenerativeModel, dict[str, Any], SequenceResult | None]:
    """The forgetting stage: one fine-tune, or a sequence's steps (``pipeline.sequence``)."""
    cfg, f, n = run.cfg, run.cfg.forget, run.n
    if not run.sequential:
        run.stage(n - 1, f"forgetting class {f.forget_label} ({f.steps:,} steps, lambda {f.ewc_lambda:g})")
        forgotten, history = stage_forget(cfg, base, fisher, run.out, replay_set)
        return forgotten, history, None
    from selective_amnesia.pipeline.sequence import run_sequence

    def announce(k: int, total: int, step: list[int]) -> None:
        run.stage(
            n - 1,
            f"forgetting step {k}/{total}: class {_as_label(step)} ({f.steps:,} steps, "
            f"lambda {f.ewc_lambda:g}, anchor {f.anchor})",
        )

    result = run_sequence(cfg, base, fisher, run.out, progress_stage=announce)
    return result.models[-1], result.histories[-1], result


def _run_evaluation(
    run: _PipelineRun,
    base: ConditionalGenerativeModel,
    forgotten: ConditionalGenerativeModel,
    history: dict[str, Any],
    labels: list[int],
    classifiers: list[MNISTClassifier],
    sequence_result: SequenceResult | None,
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any] | None]:
    """The last stage (process 0): metrics of theta* and the forgotten model, the pictures, and a
    sequence's table; returns the metrics, the report's figures and the sequence's report section."""
    cfg, out = run.cfg, run.out
    test = load_model_data(cfg, "test", base)
    metrics: dict[str, Any] = {}
    grids: dict[str, np.ndarray] = {}
    remembered = [c for c in labels if c not in forgotten_classes(cfg)]
    real_feats = real_features(classifiers[0], test, remembered)
    stage(
        run.n,
        run.n,
        f"evaluation (base and forgotten model, {cfg.evaluate.num_forget_samples:,} samples of c_f each)",
    )
    for name, model in (("base", base), ("forget", forgotten)):
        with bar_name(
            sampling_module, f"evaluate: sampling the {'base' if name == 'base' else 'forgotten'} model"
        ):
            metrics[name] = evaluate_with_config(
                cfg, model, classifiers, test, real_feats, out / "samples" / name
            )
        grids[name] = sample_grid(model, labels, cfg.evaluate.grid_per_class, cfg.seed + 2)
        save_png(grids[name], out / f"samples_{name}.png")
    save_png(side_by_side(grids["base"], grids["forget"]), out / "before_after.png")
    plot_losses(history["terms"], history["steps"], out / "losses.png")
    figures = {
        "Samples before (base model), one row per class": "samples_base.png",
        "Samples after forgetting, one row per class": "samples_forget.png",
        "Loss terms over forgetting steps": "losses.png",
    }
    if sequence_result is None:
        return metrics, figures, None
    sequence_report = _sequence_report(cfg, out, sequence_result, classifiers, test, labels)
    figures["Each step: forgotten classes drawn as themselves, kept classes drawn correctly"] = "sequence.png"
    return metrics, figures, sequence_report


def _sequence_report(
    cfg: RunConfig,
    out: Path,
    result: SequenceResult,
    classifiers: list[MNISTClassifier],
    test: ImageDataset,
    labels: list[int],
) -> dict[str, Any]:
    """A sequence's table (every model theta_0 .. theta_K on every class) and ``out/sequence.png``."""
    from selective_amnesia.evaluate.concepts import sequence_table
    from selective_amnesia.evaluate.report import plot_sequence

    sequence_report = sequence_table(
        result.models,
        result.steps,
        classifiers,
        test,
        labels,
        num_per_class=cfg.evaluate.num_per_class,
        seed=cfg.seed + 1,
        cache_root=out / "samples" / "steps",
        progress=cfg.progress,
    )
    sequence_report.update(result.info)
    plot_sequence(sequence_report, out / "sequence.png")
    return sequence_report


def _pipeline_report(
    run: _PipelineRun,
    metrics: dict[str, Any],
    base_info: dict[str, Any],
    fisher: Fisher | None,
    classifier_info: list[dict[str, Any]],
    history: dict[str, Any],
    sequence_report: dict[str, Any] | None,
) -> dict[str, Any]:
    """report.json's content."""
    cfg = run.cfg
    concepts = _as_label(forgotten_classes(cfg))
    what = f"class {concepts}" if not run.sequential else f"classes {concepts} one step after another"
    report: dict[str, Any] = {
        "title": f"Selective Amnesia: {cfg.name}, forgetting {what}",
        "forget_label": concepts,
        "metrics": metrics,
        "timings": {k: round(v, 2) for k, v in run.timings.items()},
        "base_model": base_info,
        "fisher": fisher.metadata if fisher is not None else None,
        "classifiers": classifier_info,
        "loss_history": history,
        "config": to_dict(cfg),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
    }
    if sequence_report is not None:
        report["sequence"] = sequence_report
    return report
