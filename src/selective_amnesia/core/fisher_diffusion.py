"""Diagonal Fisher of a class-conditional DDPM at theta* (paper Section 2.2 / Appendix, diffusion case).

    F_i = E_{c, x ~ p(x|theta*, c), eps_{0..T-1}} [ (d/d theta_i  sum_t ||eps(x_t, t, c) - eps_t||^2)^2 ]

The gradient of the whole sum over all T timesteps is squared per sample. Two estimators:

- ``all_timesteps``: the paper's estimator, exactly: one backward pass through all T timesteps (one
  fresh eps_t each) per sample; T UNet image evaluations per sample, checkpointed in chunks of
  ``timestep_chunk`` so memory stays bounded.
- ``subsampled``: unbiased (up to one small term) at K/T of the cost. Write g_t for the gradient at
  timestep t, with mean m_t and variance v_t over eps. The paper's quantity is
  E[(sum_t g_t)^2] = (sum_t m_t)^2 + sum_t v_t. Per sample we draw two independent stratified sets A, B
  of K/2 timesteps (one t per stratum of width c = T/(K/2), fresh eps each) and take
  S1 = grad sum_{t in A} loss_t, S2 likewise for B. Since A and B are independent,
  E[c^2 S1 S2] = (sum_t m_t)^2, and E[(c/2)(S1 - S2)^2] = c Var(S1) = sum_t v_t + c * (the spread of
  m_t within each stratum, summed over strata), so F_n = c^2 S1 S2 + (c/2)(S1 - S2)^2 overestimates
  only by that spread term. The squared-mean part c^2 S1 S2 can be negative; its mean over samples is
  clamped at 0 (the positive part of an estimate of a square) before the variance part is added.

Strata are the continuous intervals [i c, (i + 1) c) and t = floor(i c + u c), u ~ U[0, 1): when c is
not an integer a boundary timestep is shared between two strata in proportion to its overlap, so every
t keeps total weight exactly 1 with the single factor c (integer strata of unequal width would not).

Randomness: images first (classes and ``model.sample`` from ``torch.Generator().manual_seed(seed)``,
in blocks of ``SAMPLE_BLOCK``), so both estimators see the same samples; then the gradient noise from a
CPU generator seeded ``seed + 1``, per sample in order: ``all_timesteps`` draws eps of shape
(T, 1, C, H, W); ``subsampled`` draws u_A (K/2, float64), eps_A (K/2, C, H, W), u_B, eps_B.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from selective_amnesia import faults
from selective_amnesia.core.fisher import Fisher, PartialSums
from selective_amnesia.core.sampling import effective_sampler
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import state_hash
from selective_amnesia.models.base import ConditionalDiffusionModel

log = logging.getLogger(__name__)

DIFFUSION_ESTIMATORS = ("all_timesteps", "subsampled")
SAMPLE_BLOCK = 64


def _check_args(
    model: ConditionalDiffusionModel,
    num_samples: int,
    labels: list[int],
    estimator: str,
    timesteps_per_sample: int,
    timestep_chunk: int,
) -> None:
    if estimator not in DIFFUSION_ESTIMATORS:
        raise AmnesiaError(
            f"unknown diffusion Fisher estimator {estimator!r}: choose one of {DIFFUSION_ESTIMATORS}"
        )
    if num_samples < 1:
        raise AmnesiaError(f"fisher.num_samples must be >= 1, got {num_samples}")
    if timestep_chunk < 1:
        raise AmnesiaError(f"fisher.timestep_chunk must be >= 1, got {timestep_chunk}")
    if len(labels) == 0:
        raise AmnesiaError("the Fisher needs at least one class to sample")
    n_cls = model.config.num_classes
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < n_cls})
    if bad:
        raise AmnesiaError(f"Fisher labels {bad} are not classes of this model (0..{n_cls - 1})")
    n_t = model.config.num_train_timesteps
    k = timesteps_per_sample
    if estimator == "subsampled" and (k < 2 or k % 2 or k > n_t):
        raise AmnesiaError(
            f"fisher.timesteps_per_sample must be even and in [2, {n_t}] (num_train_timesteps), got {k}: "
            "it is split into two independent halves"
        )


def _draw_samples(
    model: ConditionalDiffusionModel,
    labels: Tensor,
    num_samples: int,
    generator: torch.Generator,
    partial: PartialSums,
    checkpoint: Callable[[], None],
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """num_samples images with classes uniform over ``labels``, drawn in fixed blocks (seed-determined).

    Blocks already drawn by an interrupted call are in ``partial.extra``; each new block is checkpointed.
    """
    xs = [partial.extra["x"]] if "x" in partial.extra else []
    cs = [partial.extra["c"]] if "c" in partial.extra else []
    drawn = sum(len(c) for c in cs)
    with tqdm(total=num_samples, desc="fisher samples", disable=not progress, unit="sample") as bar:
        bar.update(drawn)
        for lo in range(drawn, num_samples, SAMPLE_BLOCK):
            n = min(SAMPLE_BLOCK, num_samples - lo)
            cond = labels[torch.randint(len(labels), (n,), generator=generator)]
            xs.append(model.sample(cond, generator=generator).cpu())
            cs.append(cond)
            bar.update(n)
            faults.point("fisher.draw_block")
            partial.extra = {"x": torch.cat(xs), "c": torch.cat(cs)}
            checkpoint()
    return torch.cat(xs), torch.cat(cs)


def _grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    # a parameter the loss does not reach (e.g. an unused layer) has gradient zero, not None
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _stratified_timesteps(half: int, n_t: int, generator: torch.Generator) -> Tensor:
    """One t per stratum [i c, (i + 1) c), c = n_t / half, as floor(c (i + u)) with u ~ U[0, 1)."""
    u = torch.rand(half, generator=generator, dtype=torch.float64)
    t = torch.floor((torch.arange(half, dtype=torch.float64) + u) * (n_t / half)).long()
    return t.clamp_(0, n_t - 1)  # float rounding at the top edge


def _set_gradient(
    model: ConditionalDiffusionModel,
    x: Tensor,
    cond: Tensor,
    ts: Tensor,
    eps: Tensor,
    params: list[nn.Parameter],
    chunk: int,
) -> list[Tensor]:
    """Gradient of sum_k eps_loss(x, cond, ts[k], eps[k]) for one sample; rows batched in chunks."""
    total: list[Tensor] | None = None
    for lo in range(0, ts.shape[0], chunk):
        t = ts[lo : lo + chunk].to(x.device)
        k = t.shape[0]
        rows = x.expand(k, *x.shape[1:])
        loss = model.eps_loss(rows, cond.expand(k), t, eps[lo : lo + chunk].to(x.device, x.dtype)).sum()
        g = _grads(loss, params)
        total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
    assert total is not None
    return total


def estimate_diffusion_fisher(
    model: ConditionalDiffusionModel,
    *,
    num_samples: int,
    labels: list[int],
    estimator: str = "all_timesteps",
    timesteps_per_sample: int = 16,
    timestep_chunk: int = 250,
    seed: int = 0,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
) -> Fisher:
    """Diagonal Fisher of ``sum_t ||eps(x_t, t, c) - eps_t||^2`` from the model's own samples.

    ``labels`` are the classes c ~ p(c) to sample (all classes in the paper). ``timesteps_per_sample``
    (K) is used by ``subsampled`` only; ``timestep_chunk`` bounds how many timesteps of one sample go
    through the UNet at once. Bad arguments raise ``AmnesiaError``.

    Several processes share the work (``accelerate launch``): process ``rank`` of ``world_size`` takes
    samples rank, rank + world_size, ... and ``reduce`` sums the per-process sums of squared gradients
    (e.g. ``accelerate.utils.reduce(t, "sum")``). Every process draws the same images and noise in the
    same order, so the result equals the one-process estimate up to the order of the summation.

    With ``checkpoint_dir`` (one per process) the drawn images, the partial sums and the RNG states are
    saved after every image block and every ``checkpoint_every`` samples; a later call with the same
    settings resumes and gives the bitwise-identical result. The directory is removed at the end.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a torch.nn.Module")
    if not 0 <= rank < world_size:
        raise AmnesiaError(f"process rank {rank} is not in [0, {world_size})")
    if world_size > 1 and reduce is None:
        raise AmnesiaError("several processes need a reduce function to sum their Fisher parts")
    _check_args(model, num_samples, labels, estimator, timesteps_per_sample, timestep_chunk)
    run = _Estimate(
        model,
        _Settings(
            num_samples, labels, estimator, timesteps_per_sample, timestep_chunk, seed, rank, world_size
        ),
        checkpoint_dir,
        checkpoint_every,
    )
    was_training = model.training
    model.eval()  # no dropout: the Fisher is of the deterministic network at theta*
    try:
        run.accumulate(progress)
    finally:
        model.train(was_training)
    return run.result(reduce)


@dataclass(frozen=True)
class _Settings:
    """``estimate_diffusion_fisher``'s arguments that decide its result (and its checkpoints' key)."""

    num_samples: int
    labels: list[int]
    estimator: str
    timesteps_per_sample: int
    timestep_chunk: int
    seed: int
    rank: int
    world_size: int


class _Estimate:
    """One estimate in progress: the float64 sums, the two generators, the checkpoint it resumes from.

    ``acc`` holds the squared gradients (all_timesteps) or the squared-mean part (subsampled), ``var_acc``
    subsampled's variance part (all_timesteps keeps scalars there, not a second copy of the UNet).
    """

    def __init__(
        self,
        model: ConditionalDiffusionModel,
        settings: _Settings,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
    ) -> None:
        s = settings
        self.model, self.s, self.checkpoint_every = model, s, checkpoint_every
        self.label_t = torch.as_tensor(s.labels, dtype=torch.int64)
        self.n_t = model.config.num_train_timesteps
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        if not self.params:
            raise AmnesiaError("the model has no trainable parameters: nothing to estimate a Fisher for")
        self.acc = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.var_acc = [
            torch.zeros_like(p, dtype=torch.float64)
            if s.estimator == "subsampled"
            else torch.zeros((), dtype=torch.float64)
            for p in self.params
        ]
        self.device = self.params[0].device
        self.sample_gen = torch.Generator().manual_seed(s.seed)
        self.noise_gen = torch.Generator().manual_seed(s.seed + 1)  # CPU: same numbers on any device
        self.sampler = effective_sampler(model)
        self.model_hash = state_hash(model.state_dict())
        # what the labels mean (a text-to-image model's prompt table: index 0 is whatever prompt came
        # first) and which weights are estimated belong in the key too
        table = getattr(model, "prompts", None)
        meaning = [table[i] for i in self.label_t.tolist()] if isinstance(table, list) else None
        key = repr(
            (self.model_hash, s.num_samples, self.label_t.tolist(), meaning, [n for n, _ in self.named])
            + (s.estimator, s.timesteps_per_sample, s.timestep_chunk, s.seed, self.n_t, s.rank, s.world_size)
            + (self.sampler, SAMPLE_BLOCK)
        )
        self.accs = {f"mean.{n}": a for (n, _), a in zip(self.named, self.acc, strict=True)}
        self.accs |= {f"var.{n}": v for (n, _), v in zip(self.named, self.var_acc, strict=True)}
        self.partial = PartialSums(checkpoint_dir, checkpoint_every, key)
        self.done, elapsed = self.partial.resume(self.accs, self.sample_gen, self.noise_gen)
        self.start = time.perf_counter() - elapsed

    def save(self, i: int) -> None:  # every image block; every checkpoint_every samples of gradients
        self.partial.save(
            i, self.accs, self.sample_gen, self.noise_gen, seconds=time.perf_counter() - self.start
        )

    def accumulate(self, progress: bool) -> None:
        """Draw the images, then add each sample's squared gradient (this process's samples only; the
        noise of the others' is drawn and dropped, so every process sees the same noise stream)."""
        s = self.s
        x_all, c_all = _draw_samples(
            self.model,
            self.label_t,
            s.num_samples,
            self.sample_gen,
            self.partial,
            lambda: self.save(0),
            progress,
        )
        x_all, c_all = x_all.to(self.device), c_all.to(self.device)
        mine_total = len(range(s.rank, s.num_samples, s.world_size))
        with tqdm(
            total=mine_total, desc=f"fisher ({s.estimator})", disable=not progress, unit="sample"
        ) as bar:
            bar.update(len(range(s.rank, self.done, s.world_size)))
            for i in range(self.done, s.num_samples):
                x, c = x_all[i : i + 1], c_all[i : i + 1]
                mine = i % s.world_size == s.rank
                if s.estimator == "all_timesteps":
                    self._add_all_timesteps(x, c, mine)
                else:
                    self._add_subsampled(x, c, mine)
                if mine:
                    bar.update(1)
                faults.point("fisher.sample")
                if i + 1 < s.num_samples and i + 1 - self.partial.last >= self.checkpoint_every:
                    self.save(i + 1)

    def _add_all_timesteps(self, x: Tensor, c: Tensor, mine: bool) -> None:
        eps = torch.randn((self.n_t, *x.shape), generator=self.noise_gen, dtype=x.dtype)
        if mine:
            loss = self.model.nelbo_all_timesteps(
                x, c, eps=eps.to(self.device), chunk=self.s.timestep_chunk
            ).sum()
            for a, g in zip(self.acc, _grads(loss, self.params), strict=True):
                a += g.double().pow(2)

    def _add_subsampled(self, x: Tensor, c: Tensor, mine: bool) -> None:
        half = self.s.timesteps_per_sample // 2
        width = self.n_t / max(half, 1)  # c, the stratum width
        draws = []
        for _ in range(2):  # A then B, independent
            ts = _stratified_timesteps(half, self.n_t, self.noise_gen)
            eps = torch.randn((half, *x.shape[1:]), generator=self.noise_gen, dtype=x.dtype)
            draws.append((ts, eps))
        if mine:
            chunk = self.s.timestep_chunk
            sets = [_set_gradient(self.model, x, c, ts, eps, self.params, chunk) for ts, eps in draws]
            for a, v, s1, s2 in zip(self.acc, self.var_acc, *sets, strict=True):
                s1d, s2d = s1.double(), s2.double()
                a += width**2 * s1d * s2d  # estimates (sum_t m_t)^2
                v += (width / 2) * (s1d - s2d).pow(2)  # estimates sum_t v_t, never negative

    def result(self, reduce: Callable[[Tensor], Tensor] | None) -> Fisher:
        """Sum over processes, then the Fisher: the clamped mean part plus the variance part."""
        s = self.s
        acc, var_acc = self.acc, self.var_acc
        if reduce is not None:
            acc = [reduce(a) for a in acc]
            var_acc = [reduce(v) for v in var_acc]
        seconds = time.perf_counter() - self.start
        self.partial.remove()
        values: dict[str, Tensor] = {}
        negative = 0
        for (name, _), a, v in zip(self.named, acc, var_acc, strict=True):
            mean = a / s.num_samples
            negative += int((mean < 0).sum())  # only possible for subsampled's squared-mean part
            # positive part of the squared-mean estimate (it cannot be negative) plus the variance part: a
            # noisy negative estimate no longer zeroes a parameter's protection (it did for 6% at N = 50)
            values[name] = (mean.clamp_min(0) + v.to(mean.device) / s.num_samples).to(torch.float32)
        meta = self._metadata(seconds)
        if s.estimator == "subsampled":
            meta["negative_mean_part_entries_clamped"] = negative
        log.info("diffusion Fisher from %d samples (%s) in %.1fs", s.num_samples, s.estimator, seconds)
        return Fisher(values, meta)

    def _metadata(self, seconds: float) -> dict[str, Any]:
        s = self.s
        meta = {
            "num_samples": s.num_samples,
            "seed": s.seed,
            "estimator": s.estimator,
            "labels": self.label_t.tolist(),
            "model_hash": self.model_hash,
            "seconds": round(seconds, 3),
            "num_train_timesteps": self.n_t,
            # a getattr: the unit tests' analytic toys estimate a Fisher without being whole models
            "loss_entries": getattr(self.model, "loss_entries", "sum"),
            "timestep_chunk": s.timestep_chunk,
            "sampler": self.sampler,  # the samples' sampler
            "unet_image_evaluations": s.num_samples
            * (self.n_t if s.estimator == "all_timesteps" else s.timesteps_per_sample),
        }
        if s.world_size > 1:
            meta["processes"] = s.world_size
        if s.estimator == "subsampled":
            meta["timesteps_per_sample"] = s.timesteps_per_sample
        return meta


def process_share() -> tuple[int, int, Callable[[Tensor], Tensor] | None]:
    """(rank, world size, sum-reduce) of this process: several under ``accelerate launch``, else one."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState
    from accelerate.utils import reduce

    # joins the process group the launcher set up (gloo on a machine without CUDA: torchrun on CPUs)
    state = PartialState(cpu=not torch.cuda.is_available())

    def total(t: Tensor) -> Tensor:
        summed: Tensor = reduce(t.to(state.device), reduction="sum")
        return summed.to(t.device)

    return state.process_index, state.num_processes, total
