"""Training loops: the base model theta* (pretraining) and the forgetting fine-tune (paper Eq. 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selective_amnesia import faults, tracking
from selective_amnesia.checkpoint import load_training_state, remove_training_state, save_training_state
from selective_amnesia.config import ForgetConfig, PretrainConfig
from selective_amnesia.data import ImageDataset
from selective_amnesia.distributed import Share, split_batch
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.fisher import Fisher
from selective_amnesia.objective import EWCPenalty, selective_amnesia_loss
from selective_amnesia.replay import GenerativeReplay, Replay, StoredReplay, frozen_copy
from selective_amnesia.surrogate import ModelSamples, StoredImages, Surrogate, UniformNoise

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
            import bitsandbytes as bnb
        except ImportError:
            raise AmnesiaError(
                "optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (or use adamw)"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, eps=eps)
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


class Trainer:
    """What the two loops share: the optimizer, optional EMA (diffusers ``EMAModel``) and gradient
    clipping, resumable checkpoints in ``checkpoint_dir`` (keyed by the settings hash ``key``), and the
    history."""

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
    ) -> None:
        self.model, self.generator, self.grad_clip = model, generator, grad_clip
        self.what, self.fix = what, fix  # the divergence error's subject and advice
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, optimizer, lr, weight_decay, adam_eps)
        self.ema: Any = make_ema(self.params, ema_decay, warmup=ema_warmup) if ema_decay > 0 else None
        self.checkpoint_dir, self.checkpoint_every, self.key = checkpoint_dir, checkpoint_every, key
        self.history = History()
        # float16 autocast needs loss scaling (bfloat16 does not); set by the caller
        self.scaler: Any = None
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
    model: nn.Module,
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
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = model.from_uint8(data.images), data.labels  # type: ignore[operator]
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
        loss = model.nelbo(x, y, generator=generator).sum()  # type: ignore[operator]
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
    cfg: ForgetConfig, model: Any, frozen: nn.Module | None, surrogate_images: torch.Tensor | None = None
) -> Surrogate:
    """q(x|c_f) for the surrogate objective, or samples of c_f from theta* for the naive one.

    "uniform" is per-pixel noise over the model's pixel range (U[0,1] for the VAE, U[-1,1] for the DDPM,
    as in the paper); "class" and "folder" draw from ``surrogate_images`` (model range), prepared by
    the pipeline from theta*'s samples of ``surrogate_label`` or from ``surrogate_path``.
    """
    if cfg.objective == "naive":
        assert frozen is not None  # forget() keeps theta* for the naive objective
        (label,) = cfg.forget_labels()  # the naive objective forgets one class (config checks it)
        return ModelSamples(frozen, label)
    if cfg.surrogate == "uniform":
        low, high = model.data_range
        return UniformNoise(model.image_shape, low, high)
    if surrogate_images is None:
        raise AmnesiaError(f"forget.surrogate={cfg.surrogate} needs its images; none were prepared")
    return StoredImages(surrogate_images)


def forget(
    model: nn.Module,
    fisher: Fisher | None,
    cfg: ForgetConfig,
    *,
    labels: list[int],
    seed: int,
    progress: bool = True,
    replay_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    surrogate_images: torch.Tensor | None = None,
    checkpoint_dir: Path | None = None,
    key: str = "",
    forget_labels: list[int] | None = None,
    surrogate: Surrogate | None = None,
    ewc: nn.Module | None = None,
    mixed_precision: str = "no",
    accumulation: int = 1,
    share: Share | None = None,
    adversary: Any = None,
    replay: Replay | None = None,
) -> History:
    """Fine-tune ``model`` in place so that it forgets ``cfg.forget_label`` (paper Eq. 4).

    ``labels`` are all the model's classes; the remembered ones p_r(c) are those except c_f. Replay
    draws fresh samples of theta* every step, or from ``replay_set`` (images in model range, labels)
    when ``cfg.replay`` is "stored". Diffusion models get the reference code's details: no label
    dropout, and both terms of a step share antithetic timesteps (``paired_noise``).

    Text-to-image forgetting passes ``forget_labels`` (the indices of several forget prompts, drawn
    uniformly per sample), a prepared ``surrogate`` and, for a LoRA adapter, its own ``ewc`` penalty
    (on the effective weights); only parameters with ``requires_grad`` are trained and anchored.
    ``mixed_precision`` ("bf16"/"fp16") runs the loss under autocast with float32 master weights;
    ``accumulation`` > 1 sums the gradients of that many batches per optimizer step.

    ``share`` (several processes, ``selective_amnesia.distributed``): every process draws each whole
    batch, takes its contiguous slice, and DDP averages the gradients, so the weights are the
    one-process weights up to float rounding; process 0 writes the checkpoints.

    ``adversary`` (``defences.Adversary``, one process only) adds forget conditions while training:
    called after every step with the model, it returns the indices of new ones.

    ``replay`` replaces the replay built from ``cfg.replay`` (a sequence of forgetting steps replays the
    classes forgotten earlier as their surrogate: ``selective_amnesia.sequence``).
    """
    if accumulation < 1:
        raise AmnesiaError(f"gradient accumulation must be >= 1, got {accumulation}")
    share = share if share is not None else Share()
    part = share.batch_slice(cfg.batch_size, "forget.batch_size") if share.several else None
    forget_labels = cfg.forget_labels() if forget_labels is None else list(forget_labels)
    bad = [c for c in forget_labels if c not in labels]
    if bad or not forget_labels:
        raise AmnesiaError(
            f"forget label(s) {bad or forget_labels} are not one of the model's classes {labels}"
        )
    remembered = [c for c in labels if c not in forget_labels]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # theta* as a frozen replay source, taken before a checkpoint may overwrite the weights; only fresh
    # replay and the naive objective sample from it (stored sets do not: a whole UNet saved, 3.2 GiB for SD)
    frozen = frozen_copy(model) if cfg.replay != "stored" or cfg.objective == "naive" else None
    if cfg.ewc_lambda > 0 and ewc is None:
        if fisher is None:
            raise AmnesiaError(
                "forget.ewc_lambda > 0 needs a Fisher: run `amnesia fisher` or set ewc_lambda=0"
            )
        fisher.check_matches(model)
        theta_star = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        dtype = torch.bfloat16 if cfg.anchor_dtype == "bfloat16" else torch.float32
        ewc = EWCPenalty(fisher.values, theta_star, dtype=dtype).to(device)
    if surrogate is None:
        surrogate = make_surrogate(cfg, model, frozen, surrogate_images)
    if replay is not None:
        pass
    elif cfg.replay == "stored":
        if replay_set is None:
            raise AmnesiaError("forget.replay=stored needs the replay set; none was generated")
        replay = StoredReplay(*replay_set)
    else:
        assert frozen is not None
        replay = GenerativeReplay(frozen, remembered)
    trainer = Trainer(
        model,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
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
    if not share.main:  # process 0 writes (and at the end removes) the checkpoint all resumed from
        trainer.checkpoint_dir = None
    forget_ids = torch.tensor(forget_labels, dtype=torch.int64)
    if adversary is not None:
        if share.several:
            raise AmnesiaError("adversarial forget conditions run in one process only: drop the launcher")
        forget_ids = torch.cat([forget_ids, torch.tensor(adversary.resume(model, trainer.start_step))]).long()
    autocast = _autocast(mixed_precision, device)
    if mixed_precision == "fp16":
        trainer.scaler = torch.amp.GradScaler(device.type)
    switch: Any = model  # the DDPM's class_dropout flag; other families have none
    had_dropout = getattr(switch, "class_dropout", None)
    if had_dropout is not None:
        switch.class_dropout = False  # the reference forgetting code never drops the label
    model.train()
    # DDP for several processes, made after every process loaded the checkpoint
    wrapped = share.wrap(model, all_used=ewc is not None and cfg.ewc_lambda > 0)
    bar = tqdm(
        range(trainer.start_step, cfg.steps + 1), desc="forget", disable=not progress or not share.main
    )
    try:
        for step in bar:
            for i in range(accumulation):
                # DDP averages the gradients in a step's last backward only
                with share.no_sync(wrapped, skip=i + 1 < accumulation):
                    terms = _forget_terms(
                        model,
                        cfg,
                        surrogate,
                        replay,
                        forget_ids,
                        ewc,
                        generator,
                        device,
                        autocast,
                        wrapped=wrapped,
                        part=part,
                    )
                    # summed over the processes: a NaN in any one stops them all
                    trainer.check_finite(share.reduce(terms.total.detach()), step)
                    trainer.backward(terms.total / accumulation)
            trainer.update(step)
            faults.point("train.step")
            if adversary is not None and (found := adversary(step, model)):
                forget_ids = torch.cat([forget_ids, torch.tensor(found, dtype=torch.int64)])
            if step % cfg.log_every == 0 or step == cfg.steps:
                values = terms.as_floats()
                if share.several:  # the whole batch's terms: each process's slice scaled to it, averaged
                    mean = share.reduce(torch.tensor(list(values.values()), dtype=torch.float64), "mean")
                    values = dict(zip(values, mean.tolist(), strict=True))
                trainer.log(step, values)
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            trainer.maybe_checkpoint(step, cfg.steps)
    finally:
        if had_dropout is not None:
            switch.class_dropout = had_dropout
        share.release()
    return trainer.finish()


def _autocast(mixed_precision: str, device: torch.device) -> Any:
    if mixed_precision == "no":
        return contextlib.nullcontext
    if mixed_precision not in ("bf16", "fp16"):
        raise AmnesiaError(f"mixed precision must be no, bf16 or fp16, got {mixed_precision!r}")
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _forget_terms(
    model: nn.Module,
    cfg: ForgetConfig,
    surrogate: Surrogate,
    replay: Replay,
    forget_ids: torch.Tensor,
    ewc: nn.Module | None,
    generator: torch.Generator,
    device: torch.device,
    autocast: Any,
    *,
    wrapped: nn.Module | None = None,
    part: slice | None = None,
) -> Any:
    """One batch of Eq. 4's terms (the loss, not yet backpropagated).

    With ``wrapped`` (``Share.wrap(model)``) the loss is computed inside its forward: DDP's, with several
    processes. With ``part`` the whole batch and its noise are drawn, and the loss is that of the rows
    ``part`` (this process's slice), scaled so that DDP's average over the processes is the whole batch's.
    """
    if hasattr(surrogate, "sample_with_conditions"):  # several concepts, each fitted to its own surrogate
        forget_x, forget_c = surrogate.sample_with_conditions(cfg.batch_size, forget_ids, generator)
        forget_x, forget_c = forget_x.to(device), forget_c.to(device)
    elif len(forget_ids) == 1:
        forget_x = surrogate.sample(cfg.batch_size, generator).to(device)
        forget_c = forget_ids.expand(cfg.batch_size).to(device)
    else:  # several forget prompts: each sample names one, uniformly
        forget_x = surrogate.sample(cfg.batch_size, generator).to(device)
        forget_c = forget_ids[torch.randint(len(forget_ids), (cfg.batch_size,), generator=generator)]
        forget_c = forget_c.to(device)
    replay_x, replay_c = None, None
    if cfg.replay_weight > 0:
        replay_x, replay_c = (t.to(device) for t in replay.sample(cfg.batch_size, generator))
    noise_f, noise_r = (
        model.paired_noise(forget_x, replay_x, generator)  # type: ignore[operator]
        if hasattr(model, "paired_noise")
        else (None, None)
    )
    if part is not None:
        (forget_x, forget_c, replay_x, replay_c), (noise_f, noise_r) = split_batch(
            model, part, generator, device, (forget_x, forget_c, replay_x, replay_c), (noise_f, noise_r)
        )
        slices = cfg.batch_size // (part.stop - part.start)  # the number of processes
    found: list[Any] = []

    def compute(m: nn.Module) -> tuple[torch.Tensor]:
        with autocast():
            terms = selective_amnesia_loss(
                m,
                forget_x=forget_x,
                forget_c=forget_c,
                replay_x=replay_x,
                replay_c=replay_c,
                ewc=ewc,
                ewc_lambda=cfg.ewc_lambda,
                replay_weight=cfg.replay_weight,
                reduction=cfg.reduction,
                objective=cfg.objective,
                generator=generator,
                forget_noise=noise_f,
                replay_noise=noise_r,
            )
        if part is not None and cfg.reduction == "sum":
            # a slice's sum times the number of slices averages (DDP) to the whole batch's sum; the EWC
            # term is whole in every process, so its average counts it once
            extra = (slices - 1) * (terms.forget + terms.replay)
            terms = dataclasses.replace(
                terms, total=terms.total + extra, forget=terms.forget * slices, replay=terms.replay * slices
            )
        found.append(terms)
        return (terms.total,)  # DDP finds the used weights from the outputs: total reaches them all

    if wrapped is None:
        compute(model)
    else:
        wrapped(compute)
    return found[0]
