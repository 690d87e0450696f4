"""Generative replay: samples of the remembered classes from a frozen copy of the original model."""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor, nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off, in eval mode: theta* as the replay source (as in Avalanche)."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


class Replay(Protocol):
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


class GenerativeReplay:
    """Draws c ~ p_r(c) uniformly over ``labels`` and x ~ p(x|theta*, c), fresh each call."""

    def __init__(self, frozen_model: nn.Module, labels: list[int]) -> None:
        if not labels:
            raise ValueError("generative replay needs at least one remembered class")
        self.model = frozen_model
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        cond = self.labels[torch.randint(len(self.labels), (n,), generator=generator)]
        return self.model.sample(cond, generator=generator), cond  # type: ignore[operator]


class StoredReplay:
    """Random mini-batches from a replay set generated once from theta* (the paper's DDPM: 500/class)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
            raise ValueError("the replay set needs at least one image and one label per image")
        self.images, self.labels = images, labels

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        idx = torch.randint(self.images.shape[0], (n,), generator=generator)
        return self.images[idx], self.labels[idx]
