"""Sampling sets of images that depend only on (seed, label, count), never on batch size.

Models that take one generator per image (``per_image_seeds``: the DDPM) get a generator seeded from
(seed, label, index) for every image; the others draw each label's images from one generator in fixed
blocks. ``cached_samples`` stores each label's set on disk, so a long evaluation or replay generation
resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from selective_amnesia import faults
from selective_amnesia.core.distributed import Share
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import cached_tensor, load_tensors, partial_dir, save_tensors, state_hash

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel

log = logging.getLogger(__name__)

BLOCK = 256  # images drawn per model call; fixed so that a set does not depend on batching
# model.config fields sample() uses (the last two: the DDPM's guidance convention and DDIM eta)
SAMPLER_DEFAULTS = ("sampler", "num_inference_steps", "guidance_scale", "guidance_convention", "eta")


def label_generator(seed: int, label: int) -> torch.Generator:
    """The generator of one label's images: the set for a label is the same whatever else is sampled."""
    return torch.Generator().manual_seed(seed * 1_000_003 + label)


def image_generators(seed: int, label: int, start: int, count: int) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, label, index): image i is the same in any batch."""
    states = [
        np.random.SeedSequence([seed, label, i]).generate_state(1, np.uint64)[0]
        for i in range(start, start + count)
    ]
    return [torch.Generator().manual_seed(int(s)) for s in states]


def effective_sampler(model: ConditionalGenerativeModel, **overrides: Any) -> dict[str, Any]:
    """The sampler settings ``model.sample`` will use: the model's defaults (a diffusion model's config)
    overridden by the non-None ``overrides``; part of every generated set's cache key."""
    defaults = {k: getattr(model.config, k) for k in SAMPLER_DEFAULTS if hasattr(model.config, k)}
    return defaults | {k: v for k, v in overrides.items() if v is not None}


def check_labels(labels: list[int], num_classes: int) -> None:
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise AmnesiaError(f"unknown label(s) {bad}: this model has classes 0..{num_classes - 1}")
    if not labels:
        raise AmnesiaError("no labels given: pass e.g. --labels 0,3")


@torch.no_grad()
def sample_per_label(
    model: ConditionalGenerativeModel,
    labels: list[int],
    num_per_label: int,
    seed: int,
    *,
    batch_size: int = BLOCK,
    progress: bool = False,
    **sample_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``num_per_label`` images of each label (model's float range) and their int64 labels.

    ``sample_kwargs`` go to ``model.sample`` (the DDPM's ``guidance_scale``, ``num_inference_steps``).
    """
    if num_per_label < 1:
        raise AmnesiaError(f"num_per_label must be >= 1, got {num_per_label}")
    if batch_size < 1:
        raise AmnesiaError(f"batch size must be >= 1, got {batch_size}")
    check_labels(labels, model.config.num_classes)
    per_image = model.per_image_seeds
    if not per_image:
        batch_size = BLOCK  # one generator per label: the blocks must stay fixed
    images, out_labels = [], []
    bar = tqdm(total=num_per_label * len(labels), desc="sampling", unit="img", disable=not progress)
    for label in labels:
        gen = None if per_image else label_generator(seed, label)
        for lo in range(0, num_per_label, batch_size):
            n = min(batch_size, num_per_label - lo)
            images.append(_sample_block(model, label, lo, n, seed, gen, sample_kwargs))
            out_labels.append(torch.full((n,), label, dtype=torch.int64))
            bar.update(n)
    bar.close()
    return torch.cat(images), torch.cat(out_labels)


def _sample_block(
    model: ConditionalGenerativeModel,
    label: int,
    lo: int,
    n: int,
    seed: int,
    gen: Any,
    sample_kwargs: dict[str, Any],
) -> Tensor:
    """Images lo..lo+n of a label: per-image generators, or the label's one generator ``gen``."""
    cond = torch.full((n,), label, dtype=torch.int64)
    g: Any = image_generators(seed, label, lo, n) if gen is None else gen
    return model.sample(cond, generator=g, **sample_kwargs).cpu()


def _part_path(parts_dir: Path, lo: int) -> Path:
    return parts_dir / f"{lo:09d}.safetensors"


def blockwise(
    path: Path | None, key: str, total: int, block: int, make: Callable[[int, int], Tensor], name: str
) -> Tensor:
    """``make(lo, n)`` for the blocks of ``total`` items, concatenated and stored at ``path`` under ``key``.

    A stored set with the same key is returned as is. While the set is being made, each finished block
    is kept in ``<path>.partial/`` so an interrupted call resumes at the first missing block.
    """
    parts_dir = partial_dir(path) if path is not None else None

    def build() -> Tensor:
        parts = []
        for lo in range(0, total, block):
            n = min(block, total - lo)
            part_path = _part_path(parts_dir, lo) if parts_dir is not None else None
            # the last block is not kept on its own: the whole set is saved right after it
            part, made = cached_tensor(
                part_path, f"{key} n={n}", name, partial(make, lo, n), save=lo + n < total
            )
            if made:
                faults.point("sampling.block")
            parts.append(part)
        return torch.cat(parts)

    result, made = cached_tensor(path, key, name, build)
    if not made:
        log.info("reusing %s from %s", name, path)
    if parts_dir is not None and parts_dir.is_dir():
        shutil.rmtree(parts_dir)
    return result


@dataclass
class BlockSet:
    """The arguments of one ``blockwise`` call, for ``blockwise_sets``."""

    path: Path | None
    key: str
    total: int
    block: int
    make: Callable[[int, int], Tensor]
    name: str


def _stored(s: BlockSet) -> Tensor | None:
    if s.path is None or not s.path.is_file():
        return None
    stored, meta = load_tensors(s.path)
    return stored[s.name] if meta.get("key") == s.key and s.name in stored else None


def call_groups(sets: list[BlockSet], per_call: int) -> list[list[tuple[int, int, int]]]:
    """The calls that draw the one-block sets not stored yet, ``per_call`` sets a call, as lists of blocks
    ``(set index, 0, n)``: the same calls whatever the number of processes (``blockwise_sets`` with
    ``group=per_call`` gives each call's blocks to one process, which needs every set of the list to be
    one block), so the sets stay bitwise the same."""
    todo = [(i, 0, s.total) for i, s in enumerate(sets) if s.total <= s.block and _stored(s) is None]
    return [todo[j : j + per_call] for j in range(0, len(todo), per_call)]


class SharedCalls:
    """The blocks of several small sets drawn in shared model calls.

    ``maker(i)`` is set i's ``make(lo, n)``: on a miss it draws that block's whole group (``use``d, from
    ``call_groups``; a block in none is drawn alone) through ``draw(blocks)``, which returns their items
    concatenated, and keeps the others until asked. With per-image generators an image does not depend
    on its batch, so only the number of calls changes: prompt sets of 2 images a prompt were drawn 2 at
    a time, ~3x the time per image of a 64-image call (benchmarks/prompt_sets_speed.py).
    """

    def __init__(self, draw: Callable[[list[tuple[int, int, int]]], Tensor]) -> None:
        self.draw = draw
        self.group_of: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        self.made: dict[tuple[int, int, int], Tensor] = {}
        self.given: set[tuple[int, int, int]] = set()

    def use(self, groups: list[list[tuple[int, int, int]]]) -> None:
        self.group_of = {b: g for g in groups for b in g}

    def maker(self, i: int) -> Callable[[int, int], Tensor]:
        return partial(self._make, i)

    def _make(self, i: int, lo: int, n: int) -> Tensor:
        block = (i, lo, n)
        if block not in self.made:
            group = [b for b in self.group_of.get(block, [block]) if b == block or b not in self.given]
            drawn = self.draw(group).split([b[2] for b in group])
            self.made.update(zip(group, drawn, strict=True))
        self.given.add(block)
        return self.made.pop(block)


def _missing(lo: int, n: int) -> Tensor:
    raise AmnesiaError(f"block {lo}..{lo + n} of a shared set is missing: another process failed to write it")


def blockwise_sets(sets: list[BlockSet], share: Share | None = None, group: int = 1) -> list[Tensor]:
    """``blockwise`` for each set, in order; with several processes (``share``) the blocks are shared.

    Shared: the blocks of all the sets, counted together, go round-robin to the processes in runs of
    ``group`` (the blocks one call draws, ``call_groups``); each writes
    its finished blocks into the sets' ``.partial`` folders (which also makes them resumable), all wait,
    then every process reads every block, so each gets the one-process result. Process 0 then stores
    the whole sets and removes the blocks. A set without a path is made by every process in full.
    """
    if share is None or not share.several:
        return [blockwise(s.path, s.key, s.total, s.block, s.make, s.name) for s in sets]
    stored = [_stored(s) for s in sets]
    have = share.agree([t is not None or s.path is None for t, s in zip(stored, sets, strict=True)])
    todo = [s for s, h in zip(sets, have, strict=True) if not h]
    index = 0  # blocks counted across sets, so small sets spread over the processes too
    for s in todo:
        assert s.path is not None
        for lo in range(0, s.total, s.block):
            if share.owns(index // group):
                n = min(s.block, s.total - lo)
                made = cached_tensor(
                    _part_path(partial_dir(s.path), lo), f"{s.key} n={n}", s.name, partial(s.make, lo, n)
                )[1]
                if made:
                    faults.point("sampling.block")
            index += 1
    share.barrier()  # every block is on disk
    results = []
    for s, t, h in zip(sets, stored, have, strict=True):
        if s.path is None:
            t = blockwise(None, s.key, s.total, s.block, s.make, s.name)
        elif h:
            assert t is not None
            log.info("reusing %s from %s", s.name, s.path)
        else:
            parts = []
            for lo in range(0, s.total, s.block):
                n = min(s.block, s.total - lo)
                key = f"{s.key} n={n}"
                parts.append(
                    cached_tensor(_part_path(partial_dir(s.path), lo), key, s.name, partial(_missing, lo, n))[
                        0
                    ]
                )
            t = torch.cat(parts)
        results.append(t)
    share.barrier()  # every process has read the blocks
    if share.main:
        for s, t, h in zip(sets, results, have, strict=True):
            if s.path is None:
                continue
            if not h:
                save_tensors(s.path, {s.name: t.contiguous()}, {"key": s.key})
            if partial_dir(s.path).is_dir():
                shutil.rmtree(partial_dir(s.path))
    return results


def cached_samples(
    model: ConditionalGenerativeModel,
    labels: list[int],
    num_per_label: int,
    seed: int,
    cache_dir: Path | None,
    *,
    progress: bool = False,
    share: Share | None = None,
    **sample_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Like ``sample_per_label`` but as uint8, with each label's set kept in ``cache_dir`` (safetensors).

    A stored set is reused only if it came from the same weights, seed, count and sampler settings.
    Models with per-image seeds (diffusion) keep every finished block, so an interrupted set resumes.
    With several processes (``share``) the blocks are split among them (``blockwise_sets``).
    """
    if num_per_label < 1:
        raise AmnesiaError(f"num_per_label must be >= 1, got {num_per_label}")
    check_labels(labels, model.config.num_classes)
    sampler = effective_sampler(model, **sample_kwargs)
    key = {
        "model_hash": state_hash(model.state_dict()),
        "seed": seed,
        "num": num_per_label,
        "sampler": dict(sorted(sampler.items())),
    }
    per_image = model.per_image_seeds
    bar = tqdm(total=num_per_label * len(labels), desc="sampling", unit="img", disable=not progress)
    sets = []
    for label in labels:
        path = cache_dir / f"label_{label}.safetensors" if cache_dir is not None else None
        gen = None if per_image else label_generator(seed, label)

        def make(lo: int, n: int, label: int = label, gen: Any = gen) -> Tensor:
            xs = []
            for start in range(lo, lo + n, BLOCK):  # the blocks sample_per_label draws
                k = min(BLOCK, lo + n - start)
                xs.append(model.to_uint8(_sample_block(model, label, start, k, seed, gen, sample_kwargs)))
                bar.update(k)
            return torch.cat(xs)

        # one generator per label (the VAE, fast) runs its blocks in order in one go
        sets.append(
            BlockSet(path, repr(key), num_per_label, BLOCK if per_image else num_per_label, make, "images")
        )
    images = blockwise_sets(sets, share)
    bar.close()
    out_labels = [
        torch.full((x.shape[0],), label, dtype=torch.int64) for x, label in zip(images, labels, strict=True)
    ]
    return torch.cat(images), torch.cat(out_labels)
