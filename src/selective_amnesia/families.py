"""The model families: one ``Family`` entry each, the one place that knows what differs between them.

``cvae`` (a conditional VAE), ``ddpm`` (a class-conditional DDPM) and ``text_to_image`` (a diffusers
Stable Diffusion pipeline). Code that behaves differently per family looks its entry up
(``get_family(cfg.model.family)``, ``get_family(model.family)``) and reads an attribute or calls one of
its functions; it never compares family names. Adding a family is its model module plus one entry in
``FAMILIES`` (docs/architecture.md, "Families").

Nothing heavy is imported here: the config and the command-line parser read this module, and
``amnesia --help`` must not import torch. Every function below imports its implementation when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:
    from selective_amnesia.config import ModelConfig, RunConfig
    from selective_amnesia.core.fisher import Fisher
    from selective_amnesia.models.base import ConditionalDiffusionModel, ConditionalGenerativeModel
    from selective_amnesia.models.text_to_image import TextToImageModel


def _no_settings(cfg: RunConfig, model: ConditionalGenerativeModel) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """What the package asks a model family. Functions take what they need and import lazily."""

    name: str  # model.family, the "family" of a model's config.json, a loaded model's ``.family``
    title: str  # how messages name its models ("a text-to-image model")
    load: Callable[
        [Path], ConditionalGenerativeModel
    ]  # a checked, complete model directory -> the model (``load_model``)
    fisher_estimators: Callable[[], tuple[str, ...]]  # the fisher.estimator values that apply to it
    # the Fisher of a loaded model with a run's fisher.* settings, resumable from a checkpoint folder
    # (``amnesia fisher``; every pipeline's Fisher stage, ``pipeline.classes.stage_fisher``): (cfg, model,
    # checkpoint_dir) -> Fisher, whose metadata holds what ``fisher_settings`` names
    fisher: Callable[[RunConfig, ConditionalGenerativeModel, Path | None], Fisher]
    # conditioned on text prompts: run by pipeline.t2i (run and forget write a run directory), sampled with
    # --prompt, evaluated by prompt metrics, erasable by the baselines (method esd/uce); else on class
    # labels 0..9 and run by the class pipeline (pipeline.run_pipeline), sampled with --labels
    prompted: bool = False
    diffusion: bool = False  # sampled by a diffusion sampler: --guidance-scale and --steps apply
    fisher_checkpoint_every: int = 10  # fisher.checkpoint_every=null means this many samples
    # a pipeline under several processes: one Fisher estimate shared by all of them (each keeps its
    # own checkpoint folder); False: each process estimates its own, process 0 alone checkpoints
    fisher_shared: bool = True
    # what a stored Fisher must also have been made with to be reused, beyond the model's hash, the
    # number of samples and the seed: (cfg, model) -> settings
    fisher_settings: Callable[[RunConfig, ConditionalGenerativeModel], dict[str, Any]] = _no_settings
    # a file whose presence names the family of a model directory (a diffusers pipeline's
    # model_index.json); None: the directory's config.json says {"family": name}
    marker: str | None = None
    # (model class, config class) of a model built here from a run config; None: never trained here
    # (``amnesia pretrain`` refuses it)
    classes: Callable[[], tuple[type, type]] | None = None
    # a run config's model section -> the keyword arguments of the config class (build and size check)
    settings: Callable[[ModelConfig], dict[str, Any]] | None = None
    settings_key: str = ""  # where those settings are in a run config, for messages
    # (settings, source) -> (parameters, extra bytes) of the model they describe, computed without
    # building it; None when they do not make a config (its construction reports why); raises on
    # settings too large to build. None: no size check
    size: Callable[[Mapping[str, Any], str], tuple[int, int] | None] | None = None
    weights_file: str | None = None  # the weights in a model directory, checked against ``size``
    # the sampler settings a run config gives its base model (they do not change the weights)
    sampler_defaults: Callable[[ModelConfig], dict[str, Any]] | None = None
    # (dataset, image size) of the evaluation judges, when they are not the run's data.* ones
    judges: tuple[str, int | None] | None = None
    # ``evaluate --relearn`` fine-tunes its models on real images of a class (the paper's relearning test)
    relearnable: bool = False

    @property
    def trainable(self) -> bool:
        """Built from a run config and trained here (``amnesia pretrain``, the pipeline's base stage)."""
        return self.classes is not None and self.settings is not None


# ---- cvae ---------------------------------------------------------------------------------------


def _cvae_classes() -> tuple[type, type]:
    from selective_amnesia.models.cvae import ConditionalVAE, CVAEConfig

    return ConditionalVAE, CVAEConfig


def _cvae_settings(model: ModelConfig) -> dict[str, Any]:
    return {"hidden_dims": model.hidden_dims, "latent_dim": model.latent_dim}


def _config_or_none(config_cls: Any, fields: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls)}
    try:
        return config_cls(**{k: v for k, v in fields.items() if k in names})
    except (TypeError, ValueError):  # reported, with its reason, where the model is built
        return None


def _cvae_size(fields: Mapping[str, Any], source: str) -> tuple[int, int] | None:
    from selective_amnesia.models.cvae import CVAEConfig, num_parameters

    config = _config_or_none(CVAEConfig, fields)
    return None if config is None else (num_parameters(config), 0)


def _cvae_load(path: Path) -> ConditionalGenerativeModel:
    from selective_amnesia.models import load_weights_directory

    return load_weights_directory(path, "cvae")


def _vae_estimators() -> tuple[str, ...]:
    from selective_amnesia.core.fisher import ESTIMATORS

    return ESTIMATORS


def _class_fisher_settings(
    cfg: RunConfig,
    model: ConditionalGenerativeModel,
    checkpoint_dir: Path | None,
    labels: list[int] | None = None,
) -> dict[str, Any]:
    """The Fisher settings every estimator takes; its samples' conditions are ``labels``, by default
    all the classes of a class-conditional model."""
    from selective_amnesia.pipeline.classes import model_labels

    f = cfg.fisher
    return {
        "num_samples": f.num_samples,
        "labels": model_labels(model) if labels is None else labels,
        "estimator": f.estimator,
        "seed": cfg.seed,
        "progress": cfg.progress,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": f.checkpoint_interval(model.family),
    }


def _vae_fisher(cfg: RunConfig, model: ConditionalGenerativeModel, checkpoint_dir: Path | None) -> Fisher:
    from selective_amnesia.core.fisher import estimate_fisher

    common = _class_fisher_settings(cfg, model, checkpoint_dir)
    return estimate_fisher(model, chunk_size=cfg.fisher.chunk_size, **common)


# ---- ddpm ---------------------------------------------------------------------------------------


def _ddpm_classes() -> tuple[type, type]:
    from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig

    return ConditionalDDPM, DDPMConfig


def _ddpm_settings(model: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(model.ddpm)


def _ddpm_size(fields: Mapping[str, Any], source: str) -> tuple[int, int] | None:
    from selective_amnesia.io.artifacts import MAX_TIMESTEPS, _is_int
    from selective_amnesia.models.ddpm import DDPMConfig, unet_parameters

    steps = fields.get("num_train_timesteps", 1000)
    if _is_int(steps) and steps > MAX_TIMESTEPS:
        raise AmnesiaError(f"{source}: num_train_timesteps {steps:,} is more than {MAX_TIMESTEPS:,}")
    extra = 64 * steps if _is_int(steps) else 0  # the schedule's float buffers
    config = _config_or_none(DDPMConfig, fields)
    return None if config is None else (unet_parameters(config), extra)


def _ddpm_load(path: Path) -> ConditionalGenerativeModel:
    from selective_amnesia.models.ddpm import ConditionalDDPM

    return ConditionalDDPM.from_pretrained(path)


def _ddpm_sampler_defaults(model: ModelConfig) -> dict[str, Any]:
    from selective_amnesia.core.sampling import SAMPLER_DEFAULTS

    return {name: getattr(model.ddpm, name) for name in SAMPLER_DEFAULTS}


def _diffusion_estimators() -> tuple[str, ...]:
    from selective_amnesia.core.fisher_diffusion import DIFFUSION_ESTIMATORS

    return DIFFUSION_ESTIMATORS


def _ddpm_fisher_settings(cfg: RunConfig, model: ConditionalGenerativeModel) -> dict[str, Any]:
    from selective_amnesia.core.sampling import SAMPLER_DEFAULTS

    f = cfg.fisher
    settings: dict[str, Any] = {"estimator": f.estimator}
    settings["sampler"] = {k: getattr(model.config, k) for k in SAMPLER_DEFAULTS}  # draws its samples
    if f.estimator == "subsampled":
        settings["timesteps_per_sample"] = f.timesteps_per_sample
    return settings


def _diffusion_fisher(
    cfg: RunConfig,
    model: ConditionalDiffusionModel,
    checkpoint_dir: Path | None,
    labels: list[int] | None = None,
) -> Fisher:
    """The diffusion Fisher over ``labels`` (default: every class), shared by the processes under
    ``accelerate launch`` (each keeps its own checkpoint folder)."""
    from selective_amnesia.core.distributed import remove_if_empty
    from selective_amnesia.core.fisher_diffusion import estimate_diffusion_fisher, process_share

    f = cfg.fisher
    common = _class_fisher_settings(cfg, model, checkpoint_dir, labels)
    rank, world, reduce = process_share()  # several processes under `accelerate launch`
    common["progress"] = cfg.progress and rank == 0
    if checkpoint_dir is not None and world > 1:
        common["checkpoint_dir"] = checkpoint_dir / f"rank{rank}"
    fisher = estimate_diffusion_fisher(
        model,
        timesteps_per_sample=f.timesteps_per_sample,
        timestep_chunk=f.timestep_chunk,
        rank=rank,
        world_size=world,
        reduce=reduce,
        **common,
    )
    if checkpoint_dir is not None and world > 1:
        remove_if_empty(checkpoint_dir)  # each process removed its own folder; the last one out, this
    return fisher


def _ddpm_fisher(cfg: RunConfig, model: ConditionalGenerativeModel, checkpoint_dir: Path | None) -> Fisher:
    from selective_amnesia.models.ddpm import ConditionalDDPM

    if not isinstance(model, ConditionalDDPM):
        raise TypeError(f"the ddpm Fisher needs a ConditionalDDPM, got {type(model).__name__}")
    return _diffusion_fisher(cfg, model, checkpoint_dir)


# ---- text_to_image ------------------------------------------------------------------------------


def _t2i_load(path: Path) -> ConditionalGenerativeModel:
    from selective_amnesia.models.text_to_image import TextToImageModel

    # from_pretrained picks SD 1.x/2.x or SDXL conditioning by model_index.json's _class_name (there, so
    # that pipeline.t2i's direct call gets it too)
    return TextToImageModel.from_pretrained(path)


def _text_to_image(model: ConditionalGenerativeModel) -> TextToImageModel:
    from selective_amnesia.models.text_to_image import TextToImageModel

    if not isinstance(model, TextToImageModel):
        raise TypeError(f"a text_to_image family function got a {type(model).__name__}")
    return model


def _t2i_fisher_settings(cfg: RunConfig, model: ConditionalGenerativeModel) -> dict[str, Any]:
    """The diffusion estimator's settings, the loss's scale, the prompts the Fisher is over (the run's
    forget and replay prompts) and which weights it is of (the hash of the selected weights' names)."""
    from selective_amnesia.core.cache_keys import settings_hash
    from selective_amnesia.core.sampling import effective_sampler
    from selective_amnesia.pipeline.t2i import register_prompts

    f = cfg.fisher
    model = _text_to_image(model)
    forget_ids, _, replay_ids = register_prompts(cfg, model)
    settings: dict[str, Any] = {
        "estimator": f.estimator,
        "sampler": effective_sampler(model),  # draws its samples
        "loss_entries": model.loss_entries,  # a Fisher of the summed loss (before it was averaged) is redone
        "prompts": [model.prompts[i] for i in forget_ids + replay_ids],
        "parameters": settings_hash(sorted(n for n, p in model.named_parameters() if p.requires_grad)),
    }
    if f.estimator == "subsampled":
        settings["timesteps_per_sample"] = f.timesteps_per_sample
    return settings


def _t2i_fisher(cfg: RunConfig, model: ConditionalGenerativeModel, checkpoint_dir: Path | None) -> Fisher:
    """Over the run's forget and replay prompts, for the selected weights (``t2i.train``; with LoRA, the
    base weights of the adapted modules); its metadata holds ``_t2i_fisher_settings``."""
    from selective_amnesia.pipeline.t2i import register_prompts, select_weights

    if not cfg.t2i.forget_prompts:
        raise AmnesiaError("t2i.forget_prompts: name the concept to forget (a list of prompts)")
    model = _text_to_image(model)
    forget_ids, _, replay_ids = register_prompts(cfg, model)
    select_weights(cfg, model)
    fisher = _diffusion_fisher(cfg, model, checkpoint_dir, forget_ids + replay_ids)
    for name, value in _t2i_fisher_settings(cfg, model).items():  # the prompts and the weights' names
        fisher.metadata.setdefault(name, value)
    return fisher


# ---- the registry -------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    "cvae": Family(
        name="cvae",
        title="conditional VAE",
        load=_cvae_load,
        fisher_estimators=_vae_estimators,
        fisher=_vae_fisher,
        # its whole Fisher takes seconds: a checkpoint would double that
        fisher_checkpoint_every=0,
        fisher_shared=False,
        classes=_cvae_classes,
        settings=_cvae_settings,
        settings_key="model.hidden_dims/latent_dim",
        size=_cvae_size,
        weights_file="model.safetensors",
        relearnable=True,
    ),
    "ddpm": Family(
        name="ddpm",
        title="class-conditional DDPM",
        load=_ddpm_load,
        fisher_estimators=_diffusion_estimators,
        fisher=_ddpm_fisher,
        diffusion=True,
        fisher_settings=_ddpm_fisher_settings,
        classes=_ddpm_classes,
        settings=_ddpm_settings,
        settings_key="model.ddpm",
        size=_ddpm_size,
        weights_file="unet/diffusion_pytorch_model.safetensors",
        sampler_defaults=_ddpm_sampler_defaults,
    ),
    "text_to_image": Family(
        name="text_to_image",
        title="text-to-image",
        load=_t2i_load,
        fisher_estimators=_diffusion_estimators,
        fisher=_t2i_fisher,
        fisher_settings=_t2i_fisher_settings,
        prompted=True,
        diffusion=True,
        marker="model_index.json",
        # the MNIST world's digits, judged by the 16 px judges (attacks.detectors.digit_judges,
        # benchmarks/t2i_mnist_result.py)
        judges=("mnist", 16),
    ),
}


def family_names() -> tuple[str, ...]:
    """Every registered family's name, in registration order."""
    return tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The registered family ``name``; an unknown one raises ``AmnesiaError`` naming the known ones."""
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise AmnesiaError(f"unknown model family {name!r}: choose one of {sorted(FAMILIES)}")
    return family


def all_fisher_estimators() -> tuple[str, ...]:
    """Every family's fisher.estimator values, each once, in registration order."""
    return tuple(dict.fromkeys(e for family in FAMILIES.values() for e in family.fisher_estimators()))


def marked_family(path: str | Path) -> Family | None:
    """The family whose marker file ``path`` holds (a diffusers pipeline directory), else None."""
    return next(
        (f for f in FAMILIES.values() if f.marker is not None and (Path(path) / f.marker).is_file()), None
    )


def markers() -> list[str]:
    """The marker files that name a family, in registration order."""
    return [f.marker for f in FAMILIES.values() if f.marker is not None]


def declared_family(name: Any) -> Family | None:
    """The family a model's config.json names with {"family": name}: a registered one that has no marker
    file (a marker family's directory is not described by a config.json); else None."""
    family = FAMILIES.get(name) if isinstance(name, str) else None
    return family if family is not None and family.marker is None else None
