"""Generative replay: samples of the remembered classes from a frozen copy of the original model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel

_Freezable = TypeVar("_Freezable", bound="_Module")


class _Module(Protocol):
    """What ``frozen_copy`` uses: a torch module, or a model seen as ``ConditionalGenerativeModel``."""

    def eval(self: _Freezable) -> _Freezable: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def frozen_copy(model: _Freezable) -> _Freezable:
    """A deep copy with gradients off, in eval mode: theta* as the replay source (as in Avalanche)."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


class Replay(Protocol):
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


class GenerativeReplay:
    """Draws c ~ p_r(c) uniformly over ``labels`` and x ~ p(x|theta*, c), fresh each call."""

    def __init__(self, frozen_model: ConditionalGenerativeModel, labels: list[int]) -> None:
        if not labels:
            raise ValueError("generative replay needs at least one remembered class")
        self.model = frozen_model
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        cond = self.labels[torch.randint(len(self.labels), (n,), generator=generator)]
        return self.model.sample(cond, generator=generator), cond


class StoredReplay:
    """Random mini-batches from a replay set generated once from theta* (the paper's DDPM: 500/class)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
            raise ValueError("the replay set needs at least one image and one label per image")
        self.images, self.labels = images, labels

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        idx = torch.randint(self.images.shape[0], (n,), generator=generator)
        return self.images[idx], self.labels[idx]
