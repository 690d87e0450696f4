"""Where the forget batches come from: the surrogate q(x|c_f) of the concept to forget."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Surrogate(Protocol):
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


class UniformNoise:
    """Per-pixel Uniform[low, high] noise, fresh every call (the paper's choice: the model's pixel range)."""

    def __init__(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> None:
        if not high > low:
            raise ValueError("UniformNoise needs high > low")
        self.shape, self.low, self.high = tuple(shape), low, high

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.low + (self.high - self.low) * torch.rand(n, *self.shape, generator=generator)


class ModelSamples:
    """Samples of one class from a frozen model: the naive objective's x ~ p(x|theta*, c_f)."""

    def __init__(self, model: object, label: int) -> None:
        self.model, self.label = model, label

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        cond = torch.full((n,), self.label, dtype=torch.int64)
        return self.model.sample(cond, generator=generator)  # type: ignore[attr-defined]


class StoredImages:
    """Random mini-batches of given images: q(x|c_f) as another class's samples or a user's image folder."""

    def __init__(self, images: Tensor) -> None:
        if images.shape[0] == 0:
            raise ValueError("the surrogate needs at least one image")
        self.images = images

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.images[torch.randint(self.images.shape[0], (n,), generator=generator)]
