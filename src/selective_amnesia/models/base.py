"""The one contract every model family satisfies, and the model-directory format.

A model directory holds ``config.json`` (with a ``family`` key) and ``model.safetensors``, the layout
of diffusers' ``save_pretrained``; ``load_model`` dispatches on ``family``. The diffusion families write
diffusers' own layouts (``unet/`` + ``scheduler/``, or a whole pipeline directory).

``ConditionalGenerativeModel`` is what the objective, the Fishers, replay, sampling and evaluation use of
any model; ``ConditionalDiffusionModel`` adds what the diffusion-only code uses (the DDPM and the
text-to-image adapter, both ``models.diffusion.DiffusionModel``). Both are ``runtime_checkable``:
``isinstance`` checks that the members exist, mypy checks their types where a function is annotated with one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

Cond = Tensor  # int64 (B,): class labels (cvae, ddpm) or indices into the prompt table (text_to_image)

_Model = TypeVar("_Model", bound="ConditionalGenerativeModel")


class ModelSettings(Protocol):
    """What the code reads of every family's ``config``."""

    @property
    def num_classes(self) -> int:
        """The number of conditions: classes, or prompts registered in a text-to-image prompt table."""
        ...


class DiffusionSettings(ModelSettings, Protocol):
    """A diffusion family's ``config``: the training schedule's length and the sampler defaults."""

    @property
    def num_train_timesteps(self) -> int: ...

    @property
    def sampler(self) -> str: ...  # "ddim" or "ddpm"

    @property
    def num_inference_steps(self) -> int: ...

    @property
    def guidance_scale(self) -> float: ...


@runtime_checkable
class ConditionalGenerativeModel(Protocol):
    """What the objective, Fisher, replay, sampling and evaluation need from a model.

    ``nelbo`` returns the per-sample negative ELBO, shape (B,), never reduced: the objective applies
    the reduction named in the config. ``noise`` makes the estimate a deterministic function of its
    inputs (the Fisher draws it once and shares it between estimators); ``draw_noise`` makes it.
    ``sample`` takes one generator, or with ``per_image_seeds`` also a list of one per image (so an
    image does not depend on the batch it was drawn in). ``forgetting()`` is the mode the forgetting
    loop trains in: the DDPM's classifier-free-guidance label dropout is off inside it. The rest are the
    ``torch.nn.Module`` methods the code calls on a model (every family is one).
    """

    @property
    def family(self) -> str: ...  # "cvae", "ddpm", "text_to_image"

    @property
    def data_range(self) -> tuple[float, float]: ...  # pixel range of images: (0, 1) VAE, (-1, 1) diffusion

    @property
    def image_shape(self) -> tuple[int, int, int]: ...  # (C, H, W) of x in nelbo/sample (latents for t2i)

    @property
    def config(self) -> ModelSettings: ...

    @property
    def per_image_seeds(self) -> bool: ...

    @property
    def loss_entries(self) -> str: ...  # "sum" or "mean" over the entries of x: sets what lambda means

    def nelbo(
        self, x: Tensor, cond: Cond, *, generator: torch.Generator | None = None, noise: Any = None
    ) -> Tensor: ...

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Any: ...

    def sample(self, cond: Cond, *, generator: torch.Generator | None = None) -> Tensor: ...

    def check_labels(self, cond: Cond) -> None: ...  # ValueError for conditions the model does not have

    def forgetting(self) -> AbstractContextManager[None]: ...

    def to_uint8(self, x: Tensor) -> Tensor: ...

    def from_uint8(self, x: Tensor) -> Tensor: ...

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None: ...

    # ---- the torch.nn.Module methods used of a model ----

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any: ...

    def to(self: _Model, *args: Any, **kwargs: Any) -> _Model: ...  # nn.Module.to's overloads

    def train(self: _Model, mode: bool = True) -> _Model: ...

    def eval(self: _Model) -> _Model: ...

    def requires_grad_(self: _Model, requires_grad: bool = True) -> _Model: ...


@runtime_checkable
class ConditionalDiffusionModel(ConditionalGenerativeModel, Protocol):
    """A diffusion family: the per-timestep loss, the all-timestep ELBO of the paper's Fisher, and the
    paired noise of a forgetting step (both terms share antithetic timesteps)."""

    @property
    def config(self) -> DiffusionSettings: ...

    def eps_loss(self, x: Tensor, cond: Cond, timesteps: Tensor, eps: Tensor) -> Tensor: ...

    def nelbo_all_timesteps(
        self,
        x: Tensor,
        cond: Cond,
        *,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
        chunk: int = 50,
        checkpoint: bool = True,
    ) -> Tensor: ...

    def paired_noise(
        self, forget_x: Tensor, replay_x: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]: ...
