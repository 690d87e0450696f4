"""Training loops: the base model theta* (pretraining) and the forgetting fine-tune (paper Eq. 4)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selective_amnesia.config import ForgetConfig, PretrainConfig
from selective_amnesia.data import ImageDataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.fisher import Fisher
from selective_amnesia.objective import EWCPenalty, selective_amnesia_loss
from selective_amnesia.replay import GenerativeReplay, frozen_copy
from selective_amnesia.surrogate import ModelSamples, Surrogate, UniformNoise

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


def _check_finite(values: dict[str, float], step: int, what: str, fix: str) -> None:
    """Stop with a one-line error when a logged loss is NaN or infinite."""
    if not all(math.isfinite(v) for v in values.values()):
        raise AmnesiaError(f"{what} diverged at step {step} ({values}): {fix}")


def pretrain(
    model: nn.Module, data: ImageDataset, cfg: PretrainConfig, *, seed: int, progress: bool = True
) -> History:
    """Fit theta* by minimising the summed NELBO of random mini-batches of the training set."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = data.as_float(), data.labels
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = History()
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(1, cfg.steps + 1), desc="pretrain", disable=not progress):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        loss = model.nelbo(x_all[idx], y_all[idx], generator=generator).sum()  # type: ignore[operator]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.steps:
            values = {"nelbo": float(loss.detach()) / cfg.batch_size}
            _check_finite(values, step, "pretraining", "lower pretrain.lr or check the data")
            history.add(step, values)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def make_surrogate(cfg: ForgetConfig, model: Any, frozen: nn.Module) -> Surrogate:
    """q(x|c_f) for the surrogate objective, or samples of c_f from theta* for the naive one."""
    if cfg.objective == "naive":
        return ModelSamples(frozen, cfg.forget_label)
    return UniformNoise(model.image_shape, 0.0, 1.0)


def forget(
    model: nn.Module,
    fisher: Fisher | None,
    cfg: ForgetConfig,
    *,
    labels: list[int],
    seed: int,
    progress: bool = True,
) -> History:
    """Fine-tune ``model`` in place so that it forgets ``cfg.forget_label`` (paper Eq. 4).

    ``labels`` are all the model's classes; the remembered ones p_r(c) are those except c_f.
    """
    if cfg.forget_label not in labels:
        raise AmnesiaError(f"forget_label {cfg.forget_label} is not one of the model's classes {labels}")
    remembered = [c for c in labels if c != cfg.forget_label]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    frozen = frozen_copy(model)
    ewc = None
    if cfg.ewc_lambda > 0:
        if fisher is None:
            raise AmnesiaError(
                "forget.ewc_lambda > 0 needs a Fisher: run `amnesia fisher` or set ewc_lambda=0"
            )
        fisher.check_matches(model)
        theta_star = {n: p.detach().clone() for n, p in model.named_parameters()}
        ewc = EWCPenalty(fisher.values, theta_star)
    surrogate = make_surrogate(cfg, model, frozen)
    replay = GenerativeReplay(frozen, remembered)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    forget_c = torch.full((cfg.batch_size,), cfg.forget_label, dtype=torch.int64)
    history = History()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="forget", disable=not progress)
    for step in bar:
        forget_x = surrogate.sample(cfg.batch_size, generator)
        replay_x, replay_c = (
            replay.sample(cfg.batch_size, generator) if cfg.replay_weight > 0 else (None, None)
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
        )
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            values = terms.as_floats()
            _check_finite(values, step, "forgetting", "lower forget.lr or raise forget.ewc_lambda")
            history.add(step, values)
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
    model.eval()
    history.seconds = time.perf_counter() - start
    return history
