"""Training loops: the base model theta* (pretraining) and the forgetting fine-tune (paper Eq. 4)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selective_amnesia.checkpoint import load_training_state, remove_training_state, save_training_state
from selective_amnesia.config import ForgetConfig, PretrainConfig
from selective_amnesia.data import ImageDataset
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


class Trainer:
    """What the two loops share: Adam, optional EMA (diffusers ``EMAModel``) and gradient clipping,
    resumable checkpoints in ``checkpoint_dir`` (keyed by the settings hash ``key``), and the history."""

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
    ) -> None:
        self.model, self.generator, self.grad_clip = model, generator, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.ema: Any = None
        if ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=ema_decay)
        self.checkpoint_dir, self.checkpoint_every, self.key = checkpoint_dir, checkpoint_every, key
        self.history = History()
        self.start_step = 1
        self.elapsed = 0.0
        if checkpoint_dir is not None:
            state = load_training_state(
                checkpoint_dir, model=model, optimizer=self.opt, generator=generator, ema=self.ema, key=key
            )
            if state is not None:
                self.history = History.from_dict(state["extra"]["history"])
                self.elapsed = self.history.seconds
                self.start_step = int(state["step"]) + 1
                log.info("resuming from %s at step %d", checkpoint_dir, self.start_step)
        self._t0 = time.perf_counter()

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.step(self.params)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self._t0

    def maybe_checkpoint(self, step: int, last: int) -> None:
        if self.checkpoint_dir is None or not self.checkpoint_every or step == last:
            return
        if step % self.checkpoint_every == 0:
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

    def finish(self) -> History:
        """Put the EMA weights (if any) into the model, eval mode; drop the checkpoint."""
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self.model.eval()
        self.history.seconds = self.seconds()
        if self.checkpoint_dir is not None:
            remove_training_state(self.checkpoint_dir)
        return self.history


def _check_finite(values: dict[str, float], step: int, what: str, fix: str) -> None:
    """Stop with a one-line error when a logged loss is NaN or infinite."""
    if not all(math.isfinite(v) for v in values.values()):
        raise AmnesiaError(f"{what} diverged at step {step} ({values}): {fix}")


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
    )
    model.train()
    bar = tqdm(range(trainer.start_step, cfg.steps + 1), desc="pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        loss = model.nelbo(x, y, generator=generator).sum()  # type: ignore[operator]
        trainer.step(loss)
        if step % 100 == 0 or step == cfg.steps:
            values = {"nelbo": float(loss.detach()) / cfg.batch_size}
            _check_finite(values, step, "pretraining", "lower pretrain.lr or check the data")
            trainer.history.add(step, values)
            bar.set_postfix(values)
        trainer.maybe_checkpoint(step, cfg.steps)
    return trainer.finish()


def make_surrogate(
    cfg: ForgetConfig, model: Any, frozen: nn.Module, surrogate_images: torch.Tensor | None = None
) -> Surrogate:
    """q(x|c_f) for the surrogate objective, or samples of c_f from theta* for the naive one.

    "uniform" is per-pixel noise over the model's pixel range (U[0,1] for the VAE, U[-1,1] for the DDPM,
    as in the paper); "class" and "folder" draw from ``surrogate_images`` (model range), prepared by
    the pipeline from theta*'s samples of ``surrogate_label`` or from ``surrogate_path``.
    """
    if cfg.objective == "naive":
        return ModelSamples(frozen, cfg.forget_label)
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
) -> History:
    """Fine-tune ``model`` in place so that it forgets ``cfg.forget_label`` (paper Eq. 4).

    ``labels`` are all the model's classes; the remembered ones p_r(c) are those except c_f. Replay
    draws fresh samples of theta* every step, or from ``replay_set`` (images in model range, labels)
    when ``cfg.replay`` is "stored". Diffusion models get the reference code's details: no label
    dropout, and both terms of a step share antithetic timesteps (``paired_noise``).
    """
    if cfg.forget_label not in labels:
        raise AmnesiaError(f"forget_label {cfg.forget_label} is not one of the model's classes {labels}")
    remembered = [c for c in labels if c != cfg.forget_label]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # theta* (frozen replay source and EWC anchor) before a checkpoint may overwrite the weights
    frozen = frozen_copy(model)
    ewc = None
    if cfg.ewc_lambda > 0:
        if fisher is None:
            raise AmnesiaError(
                "forget.ewc_lambda > 0 needs a Fisher: run `amnesia fisher` or set ewc_lambda=0"
            )
        fisher.check_matches(model)
        theta_star = {n: p.detach().clone() for n, p in model.named_parameters()}
        ewc = EWCPenalty(fisher.values, theta_star).to(device)
    surrogate = make_surrogate(cfg, model, frozen, surrogate_images)
    replay: Replay
    if cfg.replay == "stored":
        if replay_set is None:
            raise AmnesiaError("forget.replay=stored needs the replay set; none was generated")
        replay = StoredReplay(*replay_set)
    else:
        replay = GenerativeReplay(frozen, remembered)
    trainer = Trainer(
        model,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        grad_clip=None,
        generator=generator,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every,
        key=key,
    )
    forget_c = torch.full((cfg.batch_size,), cfg.forget_label, dtype=torch.int64, device=device)
    switch: Any = model  # the DDPM's class_dropout flag; other families have none
    had_dropout = getattr(switch, "class_dropout", None)
    if had_dropout is not None:
        switch.class_dropout = False  # the reference forgetting code never drops the label
    model.train()
    bar = tqdm(range(trainer.start_step, cfg.steps + 1), desc="forget", disable=not progress)
    try:
        for step in bar:
            forget_x = surrogate.sample(cfg.batch_size, generator).to(device)
            replay_x, replay_c = None, None
            if cfg.replay_weight > 0:
                replay_x, replay_c = (t.to(device) for t in replay.sample(cfg.batch_size, generator))
            noise_f, noise_r = (
                model.paired_noise(forget_x, replay_x, generator)  # type: ignore[operator]
                if hasattr(model, "paired_noise")
                else (None, None)
            )
            terms = selective_amnesia_loss(
                model,
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
            trainer.step(terms.total)
            if step % cfg.log_every == 0 or step == cfg.steps:
                values = terms.as_floats()
                _check_finite(values, step, "forgetting", "lower forget.lr or raise forget.ewc_lambda")
                trainer.history.add(step, values)
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            trainer.maybe_checkpoint(step, cfg.steps)
    finally:
        if had_dropout is not None:
            switch.class_dropout = had_dropout
    return trainer.finish()
