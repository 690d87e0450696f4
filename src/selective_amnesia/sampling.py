"""Sampling sets of images that depend only on (seed, label, count), never on batch size."""

from __future__ import annotations

import torch
from torch import Tensor

from selective_amnesia.errors import AmnesiaError

BLOCK = 256  # images drawn per generator call; fixed so that a set does not depend on batching


def label_generator(seed: int, label: int) -> torch.Generator:
    """The generator of one label's images: the set for a label is the same whatever else is sampled."""
    return torch.Generator().manual_seed(seed * 1_000_003 + label)


def check_labels(labels: list[int], num_classes: int) -> None:
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise AmnesiaError(f"unknown label(s) {bad}: this model has classes 0..{num_classes - 1}")
    if not labels:
        raise AmnesiaError("no labels given: pass e.g. --labels 0,3")


@torch.no_grad()
def sample_per_label(
    model: object, labels: list[int], num_per_label: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``num_per_label`` images of each label (model's float range) and their int64 labels."""
    if num_per_label < 1:
        raise AmnesiaError(f"num_per_label must be >= 1, got {num_per_label}")
    check_labels(labels, model.config.num_classes)  # type: ignore[attr-defined]
    images, out_labels = [], []
    for label in labels:
        gen = label_generator(seed, label)
        for lo in range(0, num_per_label, BLOCK):
            n = min(BLOCK, num_per_label - lo)
            cond = torch.full((n,), label, dtype=torch.int64)
            images.append(model.sample(cond, generator=gen))  # type: ignore[attr-defined]
            out_labels.append(cond)
    return torch.cat(images), torch.cat(out_labels)
