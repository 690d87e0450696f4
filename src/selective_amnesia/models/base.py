"""The one contract every model family satisfies, and the model-directory format.

A model directory holds ``config.json`` (with a ``family`` key) and ``model.safetensors``, the layout
of diffusers' ``save_pretrained``; ``load_model`` dispatches on ``family``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Cond = Tensor  # class labels (B,) int64 for the class-conditional families


@runtime_checkable
class ConditionalGenerativeModel(Protocol):
    """What the objective, Fisher, replay and evaluation need from a model.

    ``nelbo`` returns the per-sample negative ELBO, shape (B,), never reduced: the objective applies
    the reduction named in the config. ``noise`` makes the estimate a deterministic function of its
    inputs (the Fisher draws it once and shares it between estimators); ``draw_noise`` makes it.
    """

    family: str
    data_range: tuple[float, float]  # the pixel range of x in nelbo/sample: (0, 1) VAE, (-1, 1) DDPM

    def nelbo(
        self, x: Tensor, cond: Cond, *, generator: torch.Generator | None = None, noise: Any = None
    ) -> Tensor: ...

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Any: ...

    def sample(self, cond: Cond, *, generator: torch.Generator | None = None) -> Tensor: ...

    def to_uint8(self, x: Tensor) -> Tensor: ...

    def from_uint8(self, x: Tensor) -> Tensor: ...

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Any: ...
