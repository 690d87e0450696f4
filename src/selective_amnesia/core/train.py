"""Training loops: the base model theta* (pretraining) and the forgetting fine-tune (paper Eq. 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from selective_amnesia import faults, tracking
from selective_amnesia.config import ForgetConfig, PretrainConfig
from selective_amnesia.core.distributed import Share, split_batch
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.core.objective import Anchor, EWCPenalty, LossTerms, selective_amnesia_loss
from selective_amnesia.core.replay import GenerativeReplay, Replay, StoredReplay, frozen_copy
from selective_amnesia.core.surrogate import (
    GroupedSurrogate,
    ModelSamples,
    StoredImages,
    Surrogate,
    UniformNoise,
)
from selective_amnesia.data import ImageDataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.checkpoint import load_training_state, remove_training_state, save_training_state
from selective_amnesia.models.base import ConditionalDiffusionModel, ConditionalGenerativeModel

log = logging.getLogger(__name__)


@dataclass
class History:
    """Loss terms logged every few steps, for the report's plot."""

    steps: list[int] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, step: int, values: dict[str, float]) -> None:
        self.steps.append(step)
        for k, v in values.items():
            self.terms.setdefault(k, []).append(v)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "terms": self.terms, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(list(d["steps"]), {k: list(v) for k, v in d["terms"].items()}, float(d["seconds"]))


def make_optimizer(
    params: list[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0, eps: float = 1e-8
) -> torch.optim.Optimizer:
    """Adam, AdamW, or bitsandbytes' 8-bit AdamW (a quarter of Adam's state memory: 2 bytes a weight)."""
    # fused kernels on CUDA (one launch for all weights); the CPU keeps the default, bitwise-stable path
    fused = True if params and params[0].is_cuda else None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, eps=eps)
    if name == "adamw8bit":
        try:
            from bitsandbytes.optim.adamw import AdamW8bit
        except ImportError:
            raise AmnesiaError(
                "optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (or use adamw)"
            ) from None
        # typed local: without bitsandbytes installed, mypy sees AdamW8bit as Any
        optimizer: torch.optim.Optimizer = AdamW8bit(params, lr=lr, weight_decay=weight_decay, eps=eps)
        return optimizer
    raise AmnesiaError(f"optimizer must be adam, adamw or adamw8bit, got {name!r}")


def make_ema(params: list[nn.Parameter], decay: float, *, warmup: bool) -> Any:
    """diffusers' ``EMAModel``; without ``warmup`` its decay is ``decay`` from the first step, as the
    reference's ``EMAHelper`` (diffusers ramps it up from 0, so step 1 replaces theta* entirely)."""
    from diffusers.training_utils import EMAModel

    if warmup:
        return EMAModel(params, decay=decay)

    class ConstantDecayEMA(EMAModel):
        def get_decay(self, optimization_step: int = 0) -> float:
            return float(self.decay)

    return ConstantDecayEMA(params, decay=decay)


def make_running_mean(params: list[nn.Parameter], start: int) -> Any:
    """diffusers' ``EMAModel`` as the uniform mean of the weights after steps ``start``..k: decay 0 up to
    step ``start`` (the copy follows the weights), then j/(j+1) at step start + j, so each of the j + 1
    steps weighs the same. It checkpoints, resumes and swaps in for snapshots as an EMA does."""
    from diffusers.training_utils import EMAModel

    class RunningMean(EMAModel):
        def get_decay(self, optimization_step: int = 0) -> float:
            j = optimization_step - start  # EMAModel.step counts this trainer's updates from 1
            return j / (j + 1) if j > 0 else 0.0

    return RunningMean(params, decay=1.0)


class Trainer:
    """What the two loops share: the optimizer, optional EMA (diffusers ``EMAModel``) or running mean
    from step ``average_from``, gradient clipping, resumable checkpoints in ``checkpoint_dir`` (keyed by
    the settings hash ``key``), and the history."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        ema_decay: float,
        grad_clip: float | None,
        generator: torch.Generator,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
        key: str,
        what: str = "training",
        fix: str = "lower the learning rate",
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        ema_warmup: bool = True,
        average_from: int = 0,
    ) -> None:
        self.model, self.generator, self.grad_clip = model, generator, grad_clip
        self.what, self.fix = what, fix  # the divergence error's subject and advice
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, optimizer, lr, weight_decay, adam_eps)
        self.ema: Any = None
        if average_from > 0:
            self.ema = make_running_mean(self.params, average_from)
        elif ema_decay > 0:
            self.ema = make_ema(self.params, ema_decay, warmup=ema_warmup)
        self.checkpoint_dir, self.checkpoint_every, self.key = checkpoint_dir, checkpoint_every, key
        self.history = History()
        # float16 autocast needs loss scaling (bfloat16 does not); set by the caller
        self.scaler: Any = None
        # the learning rate of a step, set before its update (None: lr throughout); a function of the step
        # alone, so a resumed run needs no scheduler state
        self.lr_at: Callable[[int], float] | None = None
        self.start_step = 1
        self.saved_step = 0  # the step of the last checkpoint on disk (0: none)
        self.elapsed = 0.0
        if checkpoint_dir is not None:
            state = load_training_state(
                checkpoint_dir, model=model, optimizer=self.opt, generator=generator, ema=self.ema, key=key
            )
            if state is not None:
                self.history = History.from_dict(state["extra"]["history"])
                self.elapsed = self.history.seconds
                self.start_step = int(state["step"]) + 1
                self.saved_step = int(state["step"])
                log.info("resuming from %s at step %d", checkpoint_dir, self.start_step)
        self._t0 = time.perf_counter()

    def step(self, loss: torch.Tensor, step: int = 0) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.backward(loss)
        self.update(step)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients (call several times before ``update`` for gradient accumulation)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, step: int = 0) -> None:
        """Clip, take the optimizer step, update the EMA, clear the gradients.

        Without loss scaling a non-finite gradient (a finite loss can still have one) stops training
        before it reaches the weights; with fp16 loss scaling the scaler skips such steps itself.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                self._diverged(step, "gradient norm is not finite")
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.lr_at is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self._t0

    def maybe_checkpoint(self, step: int, last: int) -> None:
        if self.checkpoint_dir is None or not self.checkpoint_every or step == last:
            return
        if step % self.checkpoint_every == 0:
            if not all(torch.isfinite(p).all() for p in self.params):  # never checkpoint a bad state
                self._diverged(step, "weights are not finite")
            self.history.seconds = self.seconds()
            save_training_state(
                self.checkpoint_dir,
                step=step,
                model=self.model,
                optimizer=self.opt,
                generator=self.generator,
                ema=self.ema,
                extra={"history": self.history.to_dict()},
                key=self.key,
            )
            self.saved_step = step

    def snapshot(self, step: int, every: int, write: Callable[[int], None] | None) -> None:
        """Every ``every`` steps, ``write(step)`` the model as training would end now: with the EMA
        weights swapped in for the call when there is an EMA, the trained weights restored after."""
        if write is None or not every or step % every:
            return
        if self.ema is None:
            write(step)
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            write(step)
        finally:
            self.ema.restore(self.params)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Keep the loss terms for the report and send them to the tracker, if one is on."""
        self.history.add(step, values)
        tracking.log(self.what, step, values)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Divergence guard: a NaN/inf loss stops training before it reaches the weights; the last
        checkpoint (written only from finite steps) stays on disk and the error says where."""
        value = float(loss.detach())
        if not math.isfinite(value):
            self._diverged(step, f"loss {value}")

    def _diverged(self, step: int, why: str) -> None:
        if self.checkpoint_dir is not None and self.saved_step:
            kept = f"the last good checkpoint (step {self.saved_step}) is kept in {self.checkpoint_dir}"
        else:
            kept = "no checkpoint had been written yet"
        raise AmnesiaError(f"{self.what} diverged at step {step} ({why}); {kept}; {self.fix}, then rerun")

    def finish(self) -> History:
        """Put the EMA weights (if any) into the model, eval mode; drop the checkpoint."""
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self.model.eval()
        self.history.seconds = self.seconds()
        if self.checkpoint_dir is not None:
            remove_training_state(self.checkpoint_dir)
        return self.history


def pretrain(
    model: ConditionalGenerativeModel,
    data: ImageDataset,
    cfg: PretrainConfig,
    *,
    seed: int,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    key: str = "",
) -> History:
    """Fit theta* by minimising the summed NELBO of random mini-batches of the training set.

    With ``checkpoint_dir``, a checkpoint made with the same ``key`` is resumed, and the result is the
    same as an uninterrupted run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a torch.nn.Module")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = model.from_uint8(data.images), data.labels
    device = next(model.parameters()).device
    trainer = Trainer(
        model,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        grad_clip=cfg.grad_clip,
        generator=generator,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every,
        key=key,
        what="pretraining",
        fix="lower pretrain.lr or check the data",
    )
    model.train()
    bar = tqdm(range(trainer.start_step, cfg.steps + 1), desc="pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        loss = model.nelbo(x, y, generator=generator).sum()
        trainer.check_finite(loss, step)
        trainer.step(loss, step)
        faults.point("train.step")
        if step % 100 == 0 or step == cfg.steps:
            values = {"nelbo": float(loss.detach()) / cfg.batch_size}
            trainer.log(step, values)
            bar.set_postfix(values)
        trainer.maybe_checkpoint(step, cfg.steps)
    return trainer.finish()


def make_surrogate(
    cfg: ForgetConfig,
    model: ConditionalGenerativeModel,
    frozen: ConditionalGenerativeModel | None,
    surrogate_images: Tensor | None = None,
) -> Surrogate:
    """q(x|c_f) for the surrogate objective, or samples of c_f from theta* (``frozen``) for the naive one.

    "uniform" is per-pixel noise over the model's pixel range (U[0,1] for the VAE, U[-1,1] for the DDPM,
    as in the paper); "class" and "folder" draw from ``surrogate_images`` (model range), prepared by
    the pipeline from theta*'s samples of ``surrogate_label`` or from ``surrogate_path``.
    """
    if cfg.objective == "naive":
        assert frozen is not None  # theta_star_sampler keeps theta* for the naive objective
        (label,) = cfg.forget_labels()  # the naive objective forgets one class (config checks it)
        return ModelSamples(frozen, label)
    if cfg.surrogate == "uniform":
        low, high = model.data_range
        return UniformNoise(model.image_shape, low, high)
    if surrogate_images is None:
        raise AmnesiaError(f"forget.surrogate={cfg.surrogate} needs its images; none were prepared")
    return StoredImages(surrogate_images)


class Concept:
    """The concept to forget as forget batches (x, c): x ~ q(x|c_f) from ``surrogate``, each c one of
    ``conditions`` (uniform over them), or with a ``GroupedSurrogate`` the condition of the concept that
    each image was drawn for. ``add`` appends conditions while training (an adversary's)."""

    def __init__(self, surrogate: Surrogate, conditions: Sequence[int]) -> None:
        if not conditions:
            raise AmnesiaError("nothing to forget: no forget condition was given")
        self.surrogate = surrogate
        self.conditions = torch.tensor(list(conditions), dtype=torch.int64)

    def add(self, conditions: Sequence[int]) -> None:
        self.conditions = torch.cat([self.conditions, torch.tensor(list(conditions), dtype=torch.int64)])

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(self.surrogate, GroupedSurrogate):  # several concepts, each fitted to its own images
            return self.surrogate.sample_with_conditions(n, self.conditions, generator)
        x = self.surrogate.sample(n, generator)
        if len(self.conditions) == 1:
            return x, self.conditions.expand(n)
        return x, self.conditions[torch.randint(len(self.conditions), (n,), generator=generator)]


def theta_star_sampler(
    cfg: ForgetConfig, model: ConditionalGenerativeModel
) -> ConditionalGenerativeModel | None:
    """theta* as a frozen copy of ``model`` when something samples from it while training (fresh replay,
    the naive objective), else None: a stored set needs none (a whole UNet saved, 3.2 GiB for SD). Taken
    before training, so before a checkpoint may overwrite the weights."""
    if cfg.objective == "naive" or (cfg.replay == "fresh" and cfg.replay_weight > 0):
        return frozen_copy(model)
    return None


def make_replay(
    cfg: ForgetConfig,
    frozen: ConditionalGenerativeModel | None,
    remembered: list[int],
    replay_set: tuple[Tensor, Tensor] | None = None,
) -> Replay | None:
    """Eq. 4b's source: theta*'s fresh samples of the ``remembered`` conditions (``frozen``), or batches of
    ``replay_set`` (images in model range, labels) with forget.replay=stored; None when gamma is 0."""
    if not cfg.replay_weight > 0:
        return None
    if cfg.replay == "stored":
        if replay_set is None:
            raise AmnesiaError("forget.replay=stored needs the replay set; none was generated")
        return StoredReplay(*replay_set)
    assert frozen is not None  # theta_star_sampler keeps theta* for fresh replay
    return GenerativeReplay(frozen, remembered)


def class_forgetting(
    cfg: ForgetConfig,
    model: ConditionalGenerativeModel,
    labels: list[int],
    *,
    replay_set: tuple[Tensor, Tensor] | None = None,
    surrogate_images: Tensor | None = None,
) -> tuple[Concept, Replay | None]:
    """The forget batches and the replay of a class-conditional run: ``cfg.forget_labels()`` fitted to
    the surrogate (``make_surrogate``), the rest of ``labels`` (the model's classes) replayed
    (``make_replay``). Made before training: theta* is ``model`` as it is now."""
    forget_labels = cfg.forget_labels()
    bad = [c for c in forget_labels if c not in labels]
    if bad:
        raise AmnesiaError(f"forget label(s) {bad} are not one of the model's classes {labels}")
    frozen = theta_star_sampler(cfg, model)
    remembered = [c for c in labels if c not in forget_labels]
    concept = Concept(make_surrogate(cfg, model, frozen, surrogate_images), forget_labels)
    return concept, make_replay(cfg, frozen, remembered, replay_set)


def trained_weights(model: ConditionalGenerativeModel) -> dict[str, Tensor]:
    """The weights training changes (``requires_grad``), detached: theta* of an anchor."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def ewc_anchor(cfg: ForgetConfig, fisher: Fisher, theta_star: Mapping[str, Tensor]) -> EWCPenalty:
    """Eq. 4c at ``theta_star`` with lambda = ``forget.ewc_lambda``; F and theta* are stored in
    ``forget.anchor_dtype``, on theta*'s device."""
    dtype = torch.bfloat16 if cfg.anchor_dtype == "bfloat16" else torch.float32
    device = next(iter(theta_star.values())).device
    return EWCPenalty(fisher.values, theta_star, dtype=dtype, weight=cfg.ewc_lambda).to(device)


def model_anchor(
    cfg: ForgetConfig, fisher: Fisher | None, model: ConditionalGenerativeModel
) -> EWCPenalty | None:
    """The anchor at ``model``'s trained weights as they are now, with ``fisher`` (checked against the
    model); None when ``forget.ewc_lambda`` is 0."""
    if not cfg.ewc_lambda > 0:
        return None
    if fisher is None:
        raise AmnesiaError("forget.ewc_lambda > 0 needs a Fisher: run `amnesia fisher` or set ewc_lambda=0")
    fisher.check_matches(model)
    return ewc_anchor(cfg, fisher, trained_weights(model))


@dataclass(frozen=True)
class Loop:
    """How ``forget`` trains: ``forget`` (steps, batch size per term, optimizer, EMA, clipping, checkpoint
    and log intervals, and the loss's gamma, reduction and objective), the ``seed`` of its one generator,
    ``mixed_precision`` ("no"; "bf16"/"fp16": the loss under autocast, float32 master weights) and
    ``accumulation`` (> 1 sums the gradients of that many batches per optimizer step)."""

    forget: ForgetConfig
    seed: int
    mixed_precision: str = "no"
    accumulation: int = 1

    def __post_init__(self) -> None:
        if self.accumulation < 1:
            raise AmnesiaError(f"gradient accumulation must be >= 1, got {self.accumulation}")


class Adversary(Protocol):
    """Finds forget conditions while training (``defences.Adversary``): on resume, those found before
    ``start_step``; after each step, that step's. Both return the new conditions' indices."""

    def resume(self, model: ConditionalGenerativeModel, start_step: int) -> list[int]: ...

    def __call__(self, step: int, model: ConditionalGenerativeModel) -> list[int]: ...


# a further loss term of the model being trained, drawn from the loop's generator (``forget``'s extra)
ExtraTerm = Callable[[ConditionalGenerativeModel, torch.Generator], Tensor]


def forget(
    model: ConditionalGenerativeModel,
    concept: Concept,
    replay: Replay | None,
    anchor: Anchor | None,
    loop: Loop,
    *,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    key: str = "",
    share: Share | None = None,
    adversary: Adversary | None = None,
    extra: ExtraTerm | None = None,
    snapshot: Callable[[int], None] | None = None,
) -> History:
    """Fine-tune ``model`` in place so that it forgets ``concept`` (paper Eq. 4): every step fits a batch
    of ``concept`` (4a), replays a batch of ``replay`` weighted by gamma (4b; None when gamma is 0) and adds
    ``anchor`` (4c, lambda inside; None when lambda is 0). Only parameters with ``requires_grad`` train,
    inside ``model.forgetting()`` (the DDPM: no label dropout); a diffusion model's two terms share
    antithetic timesteps (``paired_noise``), as the reference code. With ``checkpoint_dir``, a checkpoint
    made with the same ``key`` is resumed: the result is that of an uninterrupted run.
    ``share`` (``core.distributed``): each process takes its slice of every batch, DDP averages the
    gradients; process 0 writes. One process only: ``adversary`` adds forget conditions while training,
    ``extra`` a loss term to the forget term (ConceptAblation). ``snapshot(step)`` writes the model every
    ``forget.snapshot_every`` steps, before that step's checkpoint (a resume keeps every snapshot)."""
    cfg, share, module = loop.forget, share if share is not None else Share(), _module(model)
    part = share.batch_slice(cfg.batch_size, "forget.batch_size") if share.several else None
    if (adversary is not None or extra is not None) and share.several:
        raise AmnesiaError("the adversary and the concept ablation need one process: drop the launcher")
    torch.manual_seed(loop.seed)
    generator = torch.Generator().manual_seed(loop.seed)
    trainer = _forget_trainer(module, loop, generator, checkpoint_dir, key, share)
    if adversary is not None:
        concept.add(adversary.resume(model, trainer.start_step))
    with model.forgetting():
        module.train()
        # DDP for several processes, made after every process loaded the checkpoint
        wrapped = share.wrap(module, all_used=anchor is not None)
        batch_terms = ForgetStep(
            model, concept, replay, anchor, cfg, generator, loop.mixed_precision, wrapped, part, extra
        )
        bar = tqdm(
            range(trainer.start_step, cfg.steps + 1), desc="forget", disable=not progress or not share.main
        )
        try:
            for step in bar:
                terms = _accumulate(batch_terms, trainer, share, wrapped, loop.accumulation, step)
                trainer.update(step)
                faults.point("train.step")
                if adversary is not None and (found := adversary(step, model)):
                    concept.add(found)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    values = _logged(terms, share)
                    trainer.log(step, values)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
                trainer.snapshot(step, cfg.snapshot_every, snapshot if share.main else None)
                trainer.maybe_checkpoint(step, cfg.steps)
        finally:
            share.release()
    return trainer.finish()


def _accumulate(
    batch_terms: ForgetStep, trainer: Trainer, share: Share, wrapped: nn.Module, accumulation: int, step: int
) -> LossTerms:
    """The gradients of one step: ``accumulation`` batches, each checked finite and backpropagated at
    1/accumulation of its weight. Returns the last batch's terms (what is logged)."""
    for i in range(accumulation):
        # DDP averages the gradients in a step's last backward only
        with share.no_sync(wrapped, skip=i + 1 < accumulation):
            terms = batch_terms()
            # summed over the processes: a NaN in any one stops them all
            trainer.check_finite(share.reduce(terms.total.detach()), step)
            trainer.backward(terms.total / accumulation)
    return terms


def _module(model: ConditionalGenerativeModel) -> nn.Module:
    """The model as the torch module every family is (the optimizer, checkpoints and DDP need one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a torch.nn.Module")
    return model


def _forget_trainer(
    model: nn.Module,
    loop: Loop,
    generator: torch.Generator,
    checkpoint_dir: Path | None,
    key: str,
    share: Share,
) -> Trainer:
    """The forgetting loop's optimizer, EMA, clipping and checkpoints (resumed from ``checkpoint_dir`` when
    it holds a checkpoint of ``key``); fp16 autocast gets a loss scaler."""
    cfg = loop.forget
    trainer = Trainer(
        model,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        average_from=cfg.average_from,
        grad_clip=cfg.grad_clip,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        adam_eps=cfg.adam_eps,
        generator=generator,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every,
        key=key,
        what="forgetting",
        fix="lower forget.lr or raise forget.ewc_lambda",
    )
    if cfg.lr_decay_steps:
        trainer.lr_at = cfg.lr_at
    if not share.main:  # process 0 writes (and at the end removes) the checkpoint all resumed from
        trainer.checkpoint_dir = None
    if loop.mixed_precision == "fp16":
        trainer.scaler = torch.amp.GradScaler(next(model.parameters()).device.type)
    return trainer


def _logged(terms: LossTerms, share: Share) -> dict[str, float]:
    """The loss terms to log; with several processes the whole batch's (each process's slice scaled to
    it, averaged)."""
    values = terms.as_floats()
    if share.several:
        mean = share.reduce(torch.tensor(list(values.values()), dtype=torch.float64), "mean")
        values = dict(zip(values, mean.tolist(), strict=True))
    return values


def _autocast(mixed_precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    if mixed_precision == "no":
        return contextlib.nullcontext
    if mixed_precision not in ("bf16", "fp16"):
        raise AmnesiaError(f"mixed precision must be no, bf16 or fp16, got {mixed_precision!r}")
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Batch:
    """One step's rows of each term and their NELBO noise (None: ``nelbo`` draws it)."""

    forget_x: Tensor
    forget_c: Tensor
    replay_x: Tensor | None = None
    replay_c: Tensor | None = None
    forget_noise: Any = None
    replay_noise: Any = None


class ForgetStep:
    """One batch of Eq. 4's terms (the loss, not yet backpropagated) per call: ``draw`` then ``loss``.

    With ``wrapped`` (``Share.wrap(model)``) the loss is computed inside its forward: DDP's, with several
    processes. With ``part`` the whole batch and its noise are drawn, and the loss is that of the rows
    ``part`` (this process's slice), scaled so that DDP's average over the processes is the whole batch's.
    """

    def __init__(
        self,
        model: ConditionalGenerativeModel,
        concept: Concept,
        replay: Replay | None,
        anchor: Anchor | None,
        cfg: ForgetConfig,
        generator: torch.Generator,
        mixed_precision: str = "no",
        wrapped: nn.Module | None = None,
        part: slice | None = None,
        extra: ExtraTerm | None = None,
    ) -> None:
        if cfg.replay_weight > 0 and replay is None:
            raise AmnesiaError("forget.replay_weight > 0 needs replay samples; none were given")
        self.model, self.concept, self.replay, self.anchor, self.cfg = model, concept, replay, anchor, cfg
        self.generator, self.wrapped, self.part, self.extra = generator, wrapped, part, extra
        self.device = next(model.parameters()).device
        self.autocast = _autocast(mixed_precision, self.device)

    def __call__(self) -> LossTerms:
        batch = self.draw()
        if self.wrapped is None:
            return self.loss(self.model, batch)
        found: list[LossTerms] = []

        def compute(m: ConditionalGenerativeModel) -> tuple[Tensor]:
            found.append(self.loss(m, batch))
            return (found[0].total,)  # DDP finds the used weights from the outputs: total reaches them all

        self.wrapped(compute)
        return found[0]

    def draw(self) -> Batch:
        """``batch_size`` rows of the concept, as many of replay (gamma > 0), and a diffusion model's
        paired noise (both terms share antithetic timesteps); with ``part``, this process's rows."""
        n, g, device = self.cfg.batch_size, self.generator, self.device
        forget_x, forget_c = (t.to(device) for t in self.concept.sample(n, g))
        replay_x, replay_c = None, None
        if self.cfg.replay_weight > 0:
            assert self.replay is not None  # checked in __init__
            replay_x, replay_c = (t.to(device) for t in self.replay.sample(n, g))
        noise: tuple[Any, Any] = (None, None)
        if isinstance(self.model, ConditionalDiffusionModel):
            noise = self.model.paired_noise(forget_x, replay_x, g)
        if self.part is not None:
            rows = (forget_x, forget_c, replay_x, replay_c)
            (forget_x, forget_c, replay_x, replay_c), noise = split_batch(
                self.model, self.part, g, device, rows, noise
            )
        return Batch(forget_x, forget_c, replay_x, replay_c, *noise)

    def loss(self, model: ConditionalGenerativeModel, b: Batch) -> LossTerms:
        cfg = self.cfg
        with self.autocast():
            terms = selective_amnesia_loss(
                model,
                forget_x=b.forget_x,
                forget_c=b.forget_c,
                replay_x=b.replay_x,
                replay_c=b.replay_c,
                anchor=self.anchor,
                replay_weight=cfg.replay_weight,
                reduction=cfg.reduction,
                objective=cfg.objective,
                generator=self.generator,
                forget_noise=b.forget_noise,
                replay_noise=b.replay_noise,
            )
            if self.extra is not None:  # logged with the forget term
                more = self.extra(model, self.generator)
                terms = dataclasses.replace(terms, total=terms.total + more, forget=terms.forget + more)
        if self.part is not None and cfg.reduction == "sum":
            # a slice's sum times the number of slices averages (DDP) to the whole batch's sum; the EWC
            # term is whole in every process, so its average counts it once
            slices = cfg.batch_size // (self.part.stop - self.part.start)
            extra = (slices - 1) * (terms.forget + terms.replay)
            terms = dataclasses.replace(
                terms, total=terms.total + extra, forget=terms.forget * slices, replay=terms.replay * slices
            )
        return terms
