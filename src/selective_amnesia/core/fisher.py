"""Diagonal Fisher of the NELBO at the original weights theta* (paper Section 2.2).

    F_i = E_{c ~ p(c), x ~ p(x|theta*, c)} [ (d NELBO(x|theta, c) / d theta_i)^2 ]      (paper, EWC Fisher)

Samples come from the model itself over all its classes; no training data is used. The gradient is
squared *per sample* (unlike Avalanche, which squares the gradient of a mini-batch mean and so depends
on batch size). Two estimators compute the same quantity:

- ``loop``: one backward pass per sample, the paper's reference procedure.
- ``vmap``: per-sample gradients of a whole chunk at once with ``torch.func.vmap(grad(...))``;
  works for any model; chunks bound the memory (chunk x parameters floats).
- ``batched`` (default): one ordinary backward pass per chunk. For a linear layer y = W a + b and one
  row per sample, the per-sample gradient is g_n a_n^T, so sum_n (g_n a_n^T)^2 = (g^2)^T (a^2): the
  squared per-sample gradients of the whole chunk cost one matmul per layer (the "per-layer
  activation/gradient products" trick). Models with other parameterised layers fall back to ``vmap``.

All three stream into float64 accumulators. Samples are drawn in fixed blocks of ``SAMPLE_BLOCK`` so
the result does not depend on the estimator or the chunk size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import (
    InvalidJSON,
    load_tensors,
    parse_json,
    save_tensors,
    short,
    state_hash,
)
from selective_amnesia.io.checkpoint import load_state, remove_training_state, save_state

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel

log = logging.getLogger(__name__)

ESTIMATORS = ("batched", "vmap", "loop")
FISHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAMPLE_BLOCK = 256


@dataclass
class Fisher:
    """Diagonal Fisher per trainable parameter name, plus how it was estimated."""

    values: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.values, self.metadata)

    @classmethod
    def load(cls, path: str | Path, model: ConditionalGenerativeModel | None = None) -> Fisher:
        """Load a Fisher; with ``model`` check that it belongs to that model (names, shapes, finite)."""
        values, raw = load_tensors(path)
        meta: dict[str, Any] = {}
        for k, v in raw.items():
            try:  # metadata is untrusted JSON: the guarded parser (depth, size, integer limits)
                meta[k] = parse_json(v, f"{path} metadata {short(k)}")
            except InvalidJSON:
                meta[k] = v  # a plain string
        bad = [f"{n} ({t.dtype})" for n, t in values.items() if t.dtype not in FISHER_DTYPES]
        if bad:  # an integer Fisher wraps, a bool one means nothing, float8 has no isfinite
            raise AmnesiaError(
                f"{path}: {bad[0]} is not a float16/bfloat16/float32/float64 tensor: estimate the Fisher "
                "again with `amnesia fisher`"
            )
        fisher = cls(values, meta)
        if model is not None:
            fisher.check_matches(model, source=str(path))
        return fisher

    def check_matches(self, model: ConditionalGenerativeModel, source: str = "Fisher") -> None:
        """The Fisher must name exactly the model's trainable parameters, with their shapes."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(self.values))
        extra = sorted(set(self.values) - set(params))
        if missing or extra:
            raise AmnesiaError(
                f"{source} does not match the model (missing {missing[:3]}, unexpected {extra[:3]}): "
                "estimate it again with `amnesia fisher` on this model"
            )
        # a Fisher of another per-sample loss scale (entries summed vs averaged) gives lambda another meaning;
        # Fishers written before the key existed were of the summed loss
        want, got = model.loss_entries, self.metadata.get("loss_entries", "sum")
        if got != want:
            raise AmnesiaError(
                f"{source} was estimated with the loss's {got} over entries, this model uses their {want} "
                "(the reference's scale): estimate it again with `amnesia fisher`"
            )
        for name, p in params.items():
            v = self.values[name]
            if v.dtype not in FISHER_DTYPES:
                raise AmnesiaError(f"{source}: {name} is {v.dtype}, not floating point; re-estimate it")
            if v.shape != p.shape:
                raise AmnesiaError(
                    f"{source} does not match the model ({name} has shape {tuple(v.shape)}, the model "
                    f"{tuple(p.shape)}): estimate it again with `amnesia fisher` on this model"
                )
            if not torch.isfinite(v).all() or (v < 0).any():
                raise AmnesiaError(f"{source}: {name} has NaN, inf or negative values; re-estimate it")


def _sample_batch(
    model: ConditionalGenerativeModel, labels: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Any]:
    """n samples with classes drawn uniformly from ``labels``, and the NELBO noise for each."""
    idx = torch.randint(len(labels), (n,), generator=generator)
    cond = labels[idx]
    x = model.sample(cond, generator=generator)
    return x, cond, model.draw_noise(x, generator)


def _rows(noise: Any, index: slice | int | None) -> Any:
    """Index the batch dimension of a noise tensor or of every tensor in a tuple (None adds one)."""
    return tree_map(lambda t: t[index], noise)


def _squared_grads_loop(
    model: ConditionalGenerativeModel, x: Tensor, cond: Tensor, noise: Any
) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(x.shape[0]):
        loss = model.nelbo(x[i : i + 1], cond[i : i + 1], noise=_rows(noise, slice(i, i + 1))).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, _), g in zip(params.items(), grads, strict=True):
            acc[n] += g.double().pow(2)
    return acc


class _Nelbo(nn.Module):
    """Lets ``functional_call`` reach ``nelbo`` (it only calls ``forward``)."""

    def __init__(self, model: ConditionalGenerativeModel) -> None:
        super().__init__()
        self.model = model  # a module: registered, so functional_call reaches its parameters

    def forward(self, x: Tensor, cond: Tensor, noise: Any) -> Tensor:
        return self.model.nelbo(x, cond, noise=noise)


def _squared_grads_vmap(
    model: ConditionalGenerativeModel, x: Tensor, cond: Tensor, noise: Any
) -> dict[str, Tensor]:
    wrapper = _Nelbo(model)
    params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
    buffers = dict(wrapper.named_buffers())

    def one(p: dict[str, Tensor], xi: Tensor, ci: Tensor, ni: Any) -> Tensor:
        out: Tensor = functional_call(wrapper, (p, buffers), (xi[None], ci[None], _rows(ni, None)))
        return out.sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, cond, noise)
    return {n.removeprefix("model."): g.double().pow(2).sum(0) for n, g in grads.items()}


def supports_batched(model: nn.Module) -> bool:
    """True if every trainable parameter belongs to an ``nn.Linear`` (the ``batched`` fast path)."""
    owned = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return all(id(p) in owned for p in model.parameters() if p.requires_grad)


def _squared_grads_batched(
    model: ConditionalGenerativeModel, x: Tensor, cond: Tensor, noise: Tensor
) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a torch.nn.Module")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs: dict[str, list[Tensor]] = {n: [] for n in linears}
    outputs: dict[str, list[Tensor]] = {n: [] for n in linears}
    handles = []
    for name, mod in linears.items():

        def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            inputs[name].append(args[0].detach())
            outputs[name].append(out)

        handles.append(mod.register_forward_hook(hook))
    try:
        loss = model.nelbo(x, cond, noise=noise).sum()
    finally:
        for h in handles:
            h.remove()
    for name in linears:
        if len(inputs[name]) != 1 or inputs[name][0].dim() != 2:
            raise RuntimeError(f"{name}: not called exactly once on (B, features) input; use vmap")
    # Per-sample losses are independent rows, so d(sum)/d(out_n) is sample n's own output gradient.
    # Only output gradients are needed: skipping the weight gradients halves the backward pass.
    out_grads = torch.autograd.grad(loss, [outputs[n][0] for n in linears])
    params = dict(model.named_parameters())
    result: dict[str, Tensor] = {}
    for (name, mod), g in zip(linears.items(), out_grads, strict=True):
        g2 = g.pow(2)
        # float32 products of squares (no cancellation), accumulated in float64 by the caller
        result[f"{name}.weight"] = (g2.T @ inputs[name][0].pow(2)).double()
        if mod.bias is not None:
            result[f"{name}.bias"] = g2.double().sum(0)
    return {n: v for n, v in result.items() if n in params and params[n].requires_grad}


def estimate_fisher(
    model: ConditionalGenerativeModel,
    *,
    num_samples: int,
    labels: list[int] | Tensor,
    chunk_size: int = 256,
    estimator: str = "batched",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
) -> Fisher:
    """Estimate the diagonal Fisher at the model's current weights from its own samples.

    ``labels`` are the classes c ~ p(c) to sample (all classes in the paper). The result is the same
    for any ``chunk_size`` and either estimator, up to float rounding.

    With ``checkpoint_dir`` the partial sums and the sampler's RNG state are saved there every
    ``checkpoint_every`` samples (at block boundaries); a later call with the same settings resumes and
    gives the bitwise-identical result. The directory is removed when the estimate is complete.
    """
    label_t = _checked_labels(labels, estimator, num_samples, chunk_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a torch.nn.Module")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    estimator, fn = _squared_grads_fn(model, estimator)
    acc = {
        n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters() if p.requires_grad
    }
    model_hash = state_hash(model.state_dict())
    key = repr(
        (model_hash, num_samples, label_t.tolist(), sorted(acc), estimator, chunk_size, seed, SAMPLE_BLOCK)
    )
    partial = PartialSums(checkpoint_dir, checkpoint_every, key)
    done, elapsed = partial.resume(acc, generator)
    start = time.perf_counter() - elapsed
    with tqdm(total=num_samples, desc=f"fisher ({estimator})", disable=not progress, unit="sample") as bar:
        _accumulate(model, fn, label_t, acc, generator, partial, bar, done, start, num_samples, chunk_size)
    model.train(was_training)
    values = {n: (a / num_samples).to(torch.float32) for n, a in acc.items()}
    meta = {
        "num_samples": num_samples,
        "seed": seed,
        "estimator": estimator,
        "labels": label_t.tolist(),
        "model_hash": model_hash,
        "seconds": round(time.perf_counter() - start, 3),
    }
    partial.remove()
    log.info("Fisher from %d samples (%s) in %.1fs", num_samples, estimator, meta["seconds"])
    return Fisher(values, meta)


def _checked_labels(labels: list[int] | Tensor, estimator: str, num_samples: int, chunk_size: int) -> Tensor:
    """``estimate_fisher``'s settings checked (``AmnesiaError``); returns the labels as an int64 tensor."""
    if estimator not in ESTIMATORS:
        raise AmnesiaError(f"unknown Fisher estimator {estimator!r}: choose one of {ESTIMATORS}")
    if num_samples < 1 or chunk_size < 1:
        raise AmnesiaError("fisher.num_samples and fisher.chunk_size must be >= 1")
    label_t = torch.as_tensor(labels, dtype=torch.int64)
    if label_t.numel() == 0:
        raise AmnesiaError("the Fisher needs at least one class to sample")
    return label_t


_SquaredGrads = Callable[[Any, Tensor, Tensor, Any], dict[str, Tensor]]


def _squared_grads_fn(model: nn.Module, estimator: str) -> tuple[str, _SquaredGrads]:
    """The estimator that runs (``batched`` falls back to ``vmap`` off its fast path) and its function."""
    if estimator == "batched" and not supports_batched(model):
        log.info("model has non-linear parameterised layers: the batched estimator falls back to vmap")
        estimator = "vmap"
    estimators: dict[str, _SquaredGrads] = {
        "batched": _squared_grads_batched,
        "vmap": _squared_grads_vmap,
        "loop": _squared_grads_loop,
    }
    return estimator, estimators[estimator]


def _accumulate(
    model: ConditionalGenerativeModel,
    fn: _SquaredGrads,
    labels: Tensor,
    acc: dict[str, Tensor],
    generator: torch.Generator,
    partial: PartialSums,
    bar: Any,
    done: int,
    start: float,
    num_samples: int,
    chunk_size: int,
) -> None:
    """Add the squared per-sample gradients of samples ``done`` to ``num_samples`` to ``acc``, drawn in
    blocks of ``SAMPLE_BLOCK`` and passed to ``fn`` in chunks; a checkpoint may follow each block."""
    bar.update(done)
    while done < num_samples:
        block = min(SAMPLE_BLOCK, num_samples - done)
        x, cond, noise = _sample_batch(model, labels, block, generator)
        for lo in range(0, block, chunk_size):
            sl = slice(lo, lo + chunk_size)
            for name, sq in fn(model, x[sl], cond[sl], _rows(noise, sl)).items():
                acc[name] += sq
        done += block
        bar.update(block)
        faults.point("fisher.block")
        if done < num_samples:
            partial.maybe_save(done, acc, generator, seconds=time.perf_counter() - start)


class PartialSums:
    """Periodic checkpoints of a Fisher estimate in progress: float64 accumulators, the samples done,
    RNG states and any extra tensors, under the settings ``key`` (another key starts over)."""

    def __init__(self, directory: Path | None, every: int, key: str) -> None:
        self.directory, self.every, self.key = directory, every, key
        self.last = 0
        self.extra: dict[str, Tensor] = {}

    def resume(self, acc: dict[str, Tensor], *generators: torch.Generator) -> tuple[int, float]:
        """Load a matching checkpoint into ``acc`` and the generators: (samples done, seconds spent)."""
        if self.directory is None:
            return 0, 0.0
        loaded = load_state(self.directory, key=self.key)
        if loaded is None:
            return 0, 0.0
        tensors, state = loaded
        try:
            for name, a in acc.items():
                a.copy_(tensors[f"acc.{name}"])
            for i, g in enumerate(generators):
                g.set_state(tensors[f"rng.{i}"])
            self.extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
            done, seconds = int(state["step"]), float(state["seconds"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise AmnesiaError(
                f"Fisher checkpoint in {self.directory} does not fit ({e}); delete that directory"
            ) from None
        log.info("resuming the Fisher from %s after %d samples", self.directory, done)
        self.last = done
        return done, seconds

    def maybe_save(
        self, done: int, acc: dict[str, Tensor], *generators: torch.Generator, seconds: float = 0.0
    ) -> None:
        if done - self.last >= self.every:
            self.save(done, acc, *generators, seconds=seconds)

    def save(self, done: int, acc: dict[str, Tensor], *generators: torch.Generator, seconds: float) -> None:
        if self.directory is None or not self.every:  # every = 0: no checkpoints at all
            return
        tensors = {f"acc.{n}": a for n, a in acc.items()}
        tensors.update({f"rng.{i}": g.get_state() for i, g in enumerate(generators)})
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        save_state(self.directory, tensors, {"step": done, "seconds": seconds}, key=self.key)
        self.last = done

    def remove(self) -> None:
        if self.directory is not None:
            remove_training_state(self.directory)


def online_fisher(previous: Fisher, current: Fisher, alpha: float) -> Fisher:
    """Online EWC's Fisher (Schwarz et al. 2018, progress & compress): F~_k = alpha F~_(k-1) + F(theta_k).

    ``previous`` is F~_(k-1), ``current`` the Fisher at theta_k; alpha in [0, 1] decays the earlier
    steps' importance (1: they count fully, 0: the plain Fisher of theta_k). Summed in float64, stored in
    ``current``'s dtype; the metadata is ``current``'s (its model hash is theta_k's) plus what was summed.
    """
    if not 0 <= alpha <= 1:
        raise AmnesiaError(f"online EWC's alpha must lie in [0, 1], got {alpha}")
    if set(previous.values) != set(current.values) or any(
        previous.values[n].shape != v.shape for n, v in current.values.items()
    ):
        raise AmnesiaError("online EWC: the two Fishers name different parameters or shapes")
    values = {
        n: (alpha * previous.values[n].double() + v.double()).to(v.dtype) for n, v in current.values.items()
    }
    meta = dict(current.metadata)
    meta["online"] = {
        "alpha": alpha,
        "previous_hash": state_hash(previous.values),
        "current_hash": state_hash(current.values),
    }
    return Fisher(values, meta)
