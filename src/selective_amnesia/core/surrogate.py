"""Where the forget batches come from: the surrogate q(x|c_f) of the concept to forget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel


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

    def __init__(self, model: ConditionalGenerativeModel, label: int) -> None:
        self.model, self.label = model, label

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        cond = torch.full((n,), self.label, dtype=torch.int64)
        return self.model.sample(cond, generator=generator)


class StoredImages:
    """Random mini-batches of given images: q(x|c_f) as another class's samples or a user's image folder."""

    def __init__(self, images: Tensor) -> None:
        if images.shape[0] == 0:
            raise ValueError("the surrogate needs at least one image")
        self.images = images

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.images[torch.randint(self.images.shape[0], (n,), generator=generator)]


class GroupedSurrogate:
    """Several concepts forgotten in one run, each with its own q(x|c_f) (text-to-image ``t2i.concepts``).

    ``groups`` holds each concept's condition indices and its surrogate images. A forget sample picks a
    concept uniformly, one of its conditions uniformly and one of its own surrogate images, so every
    concept is fitted to its own surrogate. The forgetting loop calls ``sample_with_conditions``.
    """

    def __init__(self, groups: list[tuple[list[int], Tensor]]) -> None:
        if not groups or any(not ids or images.shape[0] == 0 for ids, images in groups):
            raise ValueError("every concept needs at least one condition and one surrogate image")
        self.ids = [torch.as_tensor(ids, dtype=torch.int64) for ids, _ in groups]
        self.images = [images for _, images in groups]
        self.all_ids = torch.cat(self.ids)

    def sample_with_conditions(
        self, n: int, forget_ids: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` surrogate images and the forget condition each one is fitted to."""
        if not bool(torch.isin(forget_ids.cpu(), self.all_ids).all()):
            raise ValueError("a forget condition belongs to no concept of the grouped surrogate")
        group = torch.randint(len(self.ids), (n,), generator=generator)
        cond = torch.empty(n, dtype=torch.int64)
        x: Tensor | None = None
        for g, (ids, images) in enumerate(zip(self.ids, self.images, strict=True)):
            rows = (group == g).nonzero().squeeze(1)
            if not len(rows):
                continue
            cond[rows] = ids[torch.randint(len(ids), (len(rows),), generator=generator)]
            picked = images[torch.randint(images.shape[0], (len(rows),), generator=generator)]
            if x is None:
                x = picked.new_empty((n, *picked.shape[1:]))
            x[rows] = picked
        assert x is not None
        return x, cond

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_with_conditions(n, self.all_ids, generator)[0]
