"""Class-conditional DDPM on diffusers components, the paper's CIFAR10/STL10 model (Section 4.1).

A diffusers ``UNet2DModel`` predicts the noise eps(x_t, t, c); the class enters through
``num_class_embeds = num_classes + 1`` embeddings added to the time embedding (FiLM in every residual
block), and index ``num_classes`` is the learned "null" class of classifier-free guidance. The noise
schedule and the samplers are diffusers schedulers; nothing of theirs is reimplemented.

Images live in [-1, 1], shape (B, C, H, W). diffusers is imported lazily, so importing
``selective_amnesia.models`` stays fast for the families that do not need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, read_json, write_json
from selective_amnesia.models.diffusion import (
    GUIDANCE_CONVENTIONS,
    DDPMNoise,
    DiffusionModel,
    GuidedPair,
    check_sampler_settings,
    draw_device,
)

if TYPE_CHECKING:  # the concrete modules: mypy cannot see through diffusers' lazy top-level namespace
    from diffusers.models.unets.unet_2d import UNet2DModel

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DDPMConfig:
    """Architecture, noise schedule and sampler of a class-conditional DDPM.

    ``attention_levels[i]`` says whether down block i (and its mirror up block) has self-attention;
    the defaults are Ho et al.'s CIFAR10 UNet (attention at 16x16, one head: ``attention_head_dim=None``
    means one head per block). ``class_dropout_prob`` is the classifier-free-guidance label dropout used
    in training; ``guidance_scale`` is w in eps = eps_null + w (eps_c - eps_null) under the "diffusers"
    ``guidance_convention``, or in eps = (1 + w) eps_c - w eps_null under the paper code's "reference" one.
    ``eta`` is DDIM's noise scale (0: deterministic; the reference samples with 1 over 1000 steps).
    """

    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: int = 2
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, False, False])
    attention_head_dim: int | None = None
    dropout: float = 0.1
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    class_dropout_prob: float = 0.1
    sampler: str = "ddim"
    num_inference_steps: int = 100
    guidance_scale: float = 2.0
    guidance_convention: str = "diffusers"
    eta: float = 0.0

    def __post_init__(self) -> None:
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        self.attention_levels = [bool(a) for a in self.attention_levels]
        if self.image_size < 1 or self.channels < 1 or self.num_classes < 2 or self.layers_per_block < 1:
            raise ValueError("image_size, channels, layers_per_block must be >= 1 and num_classes >= 2")
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError("block_out_channels must be a non-empty list of positive widths")
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but there are "
                f"{len(self.block_out_channels)} blocks (block_out_channels)"
            )
        downsamplings = len(self.block_out_channels) - 1
        if self.image_size % 2**downsamplings:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{downsamplings} "
                f"({len(self.block_out_channels)} UNet levels)"
            )
        if self.norm_num_groups < 1 or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}"
            )
        if self.attention_head_dim is not None and (
            self.attention_head_dim < 1
            or any(
                c % self.attention_head_dim
                for c, a in zip(self.block_out_channels, self.attention_levels, strict=True)
                if a
            )
        ):
            raise ValueError("attention_head_dim must divide the width of every attention block")
        if not 0 <= self.dropout < 1 or not 0 <= self.class_dropout_prob < 1:
            raise ValueError("dropout and class_dropout_prob must lie in [0, 1)")
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be >= 1")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        check_sampler_settings(self)
        if self.guidance_convention not in GUIDANCE_CONVENTIONS:
            raise ValueError(
                f"guidance_convention must be one of {GUIDANCE_CONVENTIONS}, got {self.guidance_convention!r}"
            )
        if not 0 <= self.eta <= 1:
            raise ValueError("eta must lie in [0, 1]")


def _unet_kwargs(c: DDPMConfig) -> dict[str, Any]:
    """``UNet2DModel`` arguments of a config: the class enters through num_classes + 1 embeddings."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)]
    return {
        "sample_size": c.image_size,
        "in_channels": c.channels,
        "out_channels": c.channels,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "block_out_channels": tuple(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "attention_head_dim": c.attention_head_dim,
        "dropout": c.dropout,
        "norm_num_groups": c.norm_num_groups,
        "num_class_embeds": c.num_classes + 1,
    }


class ConditionalDDPM(DiffusionModel[DDPMConfig, "UNet2DModel"]):
    """Satisfies ``ConditionalGenerativeModel``; images are in [-1, 1], shape (B, C, H, W).

    ``nelbo`` is the paper's per-sample diffusion loss ||eps(x_t, t, c) - eps||^2 (summed over pixels)
    at one random timestep; ``nelbo_all_timesteps`` sums it over all T timesteps, the paper's
    ELBO(x|theta, c) = sum_t ||eps(x_t, t, c|theta) - eps||^2 used by the Fisher. In train mode with
    ``class_dropout`` on (off inside ``forgetting()``), each label of ``nelbo`` is replaced by the null
    class with probability ``class_dropout_prob`` (classifier-free guidance). The loss, noise and samplers
    are the diffusion core's (``models/diffusion.py``).
    """

    family = "ddpm"
    loss_entries = "sum"  # over pixels, as the reference DDPM code (``losses.py``) sums them

    def __init__(self, config: DDPMConfig | None = None) -> None:
        super().__init__()
        from diffusers.models.unets.unet_2d import UNet2DModel

        self.config = config or DDPMConfig()
        self.unet: UNet2DModel = UNet2DModel(**_unet_kwargs(self.config))
        self._set_schedule(self._schedule_kwargs())
        # forgetting switches label dropout off; training (in train mode) keeps it on
        self.class_dropout = True

    # ---- helpers ---------------------------------------------------------------------------------

    def _schedule_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "num_train_timesteps": c.num_train_timesteps,
            "beta_start": c.beta_start,
            "beta_end": c.beta_end,
            "beta_schedule": c.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": True,
        }

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def null_class(self) -> int:
        """The label index of the unconditional ("null") embedding used by classifier-free guidance."""
        return self.config.num_classes

    @property
    def guidance_convention(self) -> str:
        return str(self.config.guidance_convention)

    @property
    def ddim_eta(self) -> float:
        return float(self.config.eta)

    @staticmethod
    def _check_cond(cond: Tensor) -> None:
        # dtype and shape only: no .item(), so nelbo runs under torch.func.vmap (the Fisher's per-sample
        # gradients); a label out of range still fails inside the class embedding
        if cond.dtype != torch.int64 or cond.dim() != 1:
            raise ValueError(f"cond must be int64 labels of shape (B,), got {cond.dtype} {tuple(cond.shape)}")

    def check_labels(self, cond: Tensor) -> None:
        """Raise ``ValueError`` for anything but int64 labels (B,) in [0, num_classes)."""
        self._check_cond(cond)
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.config.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.config.num_classes}), got {cond.unique().tolist()}"
            )

    # ---- the UNet --------------------------------------------------------------------------------

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """eps(x_t, t, c); labels may include the null class."""
        eps: Tensor = self.unet(x_t, timesteps, class_labels=cond).sample
        return eps

    def _guided_pair(self, cond: Tensor, device: torch.device, dtype: torch.dtype) -> GuidedPair:
        labels = torch.cat([cond, torch.full_like(cond, self.null_class)])

        def both(x2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            eps_c, eps_null = self.unet(x2, t, class_labels=labels).sample.chunk(2)
            return eps_c, eps_null

        return both

    # ---- label dropout ---------------------------------------------------------------------------

    @staticmethod
    def _draw_drop(x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(x.shape[0], generator=generator, device=draw_device(generator, x)).to(x.device)

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> DDPMNoise:
        """Timesteps uniform in [0, T), eps ~ N(0, I) like x, and the label-dropout draw, in that order."""
        timesteps, eps, _ = super().draw_noise(x, generator)
        return DDPMNoise(timesteps, eps, self._draw_drop(x, generator))

    def _dropout_active(self) -> bool:
        return self.training and self.class_dropout and self.config.class_dropout_prob > 0

    def _drop_labels(
        self, cond: Tensor, drop: Tensor | None, x: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        if not self._dropout_active():
            return cond
        if drop is None:
            drop = self._draw_drop(x, generator)
        return torch.where(drop < self.config.class_dropout_prob, self.null_class, cond)

    @contextlib.contextmanager
    def forgetting(self) -> Iterator[None]:
        """No label dropout inside (the reference forgetting code never drops the label); restored after."""
        had, self.class_dropout = self.class_dropout, False
        try:
            yield
        finally:
            self.class_dropout = had

    @staticmethod
    def to_uint8(x: Tensor) -> Tensor:
        """[-1, 1] -> uint8 [0, 255]."""
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @staticmethod
    def from_uint8(x: Tensor) -> Tensor:
        """uint8 [0, 255] -> float [-1, 1], the model's pixel range."""
        return x.float() / 127.5 - 1.0

    # ---- model directory -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``unet/`` and ``scheduler/`` (stock diffusers layout), then ``config.json`` last.

        ``config.json`` (family, the ``DDPMConfig`` fields, environment, ``extra``) marks the directory
        complete. ``UNet2DModel.from_pretrained(path / "unet")`` and
        ``DDPMScheduler.from_pretrained(path / "scheduler")`` load the parts without this package.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        done = path / "config.json"
        if done.exists():
            done.unlink()  # an interrupted overwrite must not leave a directory that looks complete
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        faults.point("model.weights_written")
        write_json(
            done,
            {"family": self.family, **asdict(self.config), "environment": environment(), **(extra or {})},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ConditionalDDPM:
        """Rebuild from a directory written by ``save_pretrained``; bad directories raise ``AmnesiaError``.

        ``config.json`` decides the architecture; the UNet weights come from ``unet/`` (safetensors only)
        and must match it exactly. The returned model is in eval mode.
        """
        from diffusers.models.unets.unet_2d import UNet2DModel

        path = Path(path)
        meta = read_json(path / "config.json")
        if not isinstance(meta, dict) or meta.get("family") != cls.family:
            raise AmnesiaError(f"{path}/config.json is not a {cls.family} model directory")
        names = set(DDPMConfig.__dataclass_fields__)
        try:
            model = cls(DDPMConfig(**{k: v for k, v in meta.items() if k in names}))
        except (TypeError, ValueError) as e:
            raise AmnesiaError(f"{path}: bad {cls.family} model settings in config.json: {e}") from None
        unet_dir = path / "unet"
        if not unet_dir.is_dir():
            raise AmnesiaError(f"{unet_dir} not found")
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AmnesiaError(
                f"{path}: cannot load the UNet weights ({first}); recreate the model"
            ) from None
        try:
            model.unet.load_state_dict(unet.state_dict())
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise AmnesiaError(f"{path}: UNet weights do not match config.json ({detail})") from None
        model.eval()
        return model


# bounds on the UNet's structure: counting its weights builds it (on the meta device, nothing allocated),
# which loops once per block and layer
MAX_LEVELS, MAX_LAYERS_PER_BLOCK = 8, 32


def unet_parameters(config: DDPMConfig) -> int:
    """The number of values in ``ConditionalDDPM(config)``'s UNet state dict, without allocating it."""
    from diffusers.models.unets.unet_2d import UNet2DModel

    if len(config.block_out_channels) > MAX_LEVELS or config.layers_per_block > MAX_LAYERS_PER_BLOCK:
        raise AmnesiaError(
            f"a UNet of {len(config.block_out_channels)} levels of {config.layers_per_block} layers: at most "
            f"{MAX_LEVELS} levels of {MAX_LAYERS_PER_BLOCK} layers are supported"
        )
    with torch.device("meta"):
        unet = UNet2DModel(**_unet_kwargs(config))
    return sum(t.numel() for t in unet.state_dict().values())
