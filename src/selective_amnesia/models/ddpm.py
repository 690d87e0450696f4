"""Class-conditional DDPM on diffusers components, the paper's CIFAR10/STL10 model (Section 4.1).

A diffusers ``UNet2DModel`` predicts the noise eps(x_t, t, c); the class enters through
``num_class_embeds = num_classes + 1`` embeddings added to the time embedding (FiLM in every residual
block), and index ``num_classes`` is the learned "null" class of classifier-free guidance. The noise
schedule and the samplers are diffusers schedulers; nothing of theirs is reimplemented.

Images live in [-1, 1], shape (B, C, H, W). diffusers is imported lazily, so importing
``selective_amnesia.models`` stays fast for the families that do not need it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.utils.checkpoint
from safetensors import SafetensorError
from torch import Tensor, nn

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io import environment, read_json, write_json

if TYPE_CHECKING:  # the concrete modules: mypy cannot see through diffusers' lazy top-level namespace
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SAMPLERS = ("ddim", "ddpm")
GUIDANCE_CONVENTIONS = ("diffusers", "reference")


def guide(eps_c: Tensor, eps_null: Tensor, w: float, convention: str = "diffusers") -> Tensor:
    """Classifier-free guidance. "diffusers": eps_null + w (eps_c - eps_null) (the stock pipelines);
    "reference": (1 + w) eps_c - w eps_null (the paper's DDPM code), i.e. diffusers' w + 1."""
    if convention == "reference":
        w = w + 1.0
    elif convention != "diffusers":
        raise ValueError(f"guidance_convention must be one of {GUIDANCE_CONVENTIONS}, got {convention!r}")
    return eps_null + w * (eps_c - eps_null)


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
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError("num_inference_steps must lie in [1, num_train_timesteps]")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError("guidance_scale must be a finite number >= 0")
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


def _draw_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    """Draw where the generator lives (a CPU generator gives the same numbers for a model on any device)."""
    return generator.device if generator is not None else x.device


class DDPMNoise(NamedTuple):
    """The randomness of one L_simple estimate: a timestep and eps per sample, and the label-dropout draw."""

    timesteps: Tensor  # int64 (B,)
    eps: Tensor  # like x
    drop: Tensor | None = None  # float (B,) uniform in [0, 1); label dropped where < class_dropout_prob


class EpsilonDiffusion(nn.Module):
    """What the epsilon-prediction families share (class-conditional DDPM, latent text-to-image): the
    reference code's antithetic timesteps, the paired noise of a forgetting step and the all-timestep
    ELBO of the paper's Fisher. Subclasses provide ``config.num_train_timesteps``, ``eps_loss`` and the
    input checks ``_check_images`` / ``_check_cond``."""

    config: Any
    # how the per-sample loss reduces over entries ("sum" or "mean"); it sets the scale of lambda
    loss_entries = "sum"

    def eps_loss(self, x: Tensor, cond: Tensor, timesteps: Tensor, eps: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_images(self, x: Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_cond(cond: Tensor) -> None:
        raise NotImplementedError

    def antithetic_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n timesteps in antithetic pairs (t, T-1-t), as the reference training code draws them."""
        half = torch.randint(0, self.config.num_train_timesteps, (n // 2 + 1,), generator=generator)
        return torch.cat([half, self.config.num_train_timesteps - 1 - half])[:n]

    def paired_noise(
        self, forget_x: Tensor, replay_x: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[DDPMNoise, DDPMNoise | None]:
        """Noise for the forget and replay terms of one step: both use the same antithetic timesteps
        (the reference forgetting code), each its own eps; no label-dropout draw (off while forgetting)."""
        n = forget_x.shape[0] if replay_x is None else max(forget_x.shape[0], replay_x.shape[0])
        t = self.antithetic_timesteps(n, generator).to(forget_x.device)
        eps_f = torch.randn(forget_x.shape, generator=generator, dtype=forget_x.dtype).to(forget_x.device)
        noise_f = DDPMNoise(t[: forget_x.shape[0]], eps_f)
        if replay_x is None:
            return noise_f, None
        eps_r = torch.randn(replay_x.shape, generator=generator, dtype=replay_x.dtype).to(replay_x.device)
        return noise_f, DDPMNoise(t[: replay_x.shape[0]], eps_r)

    def nelbo_all_timesteps(
        self,
        x: Tensor,
        cond: Tensor,
        *,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
        chunk: int = 50,
        checkpoint: bool = True,
    ) -> Tensor:
        """sum_{t=0}^{T-1} ||eps(x_t, t, c) - eps_t||^2 per sample, shape (B,): the paper's ELBO(x|theta,c).

        One fresh eps_t ~ N(0, I) per timestep, drawn from ``generator`` in order t = 0, 1, ... (so the
        value does not depend on ``chunk``), or given as ``eps`` of shape (T, *x.shape). The UNet sees
        ``chunk`` timesteps (chunk * B images) per call. When gradients are on and ``checkpoint`` is true,
        each chunk is recomputed in backward, so memory stays bounded by one chunk. No label dropout.
        """
        self._check_images(x)
        self._check_cond(cond)
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        n_t, b = self.config.num_train_timesteps, x.shape[0]
        if eps is not None and tuple(eps.shape) != (n_t, *x.shape):
            raise ValueError(f"eps must have shape {(n_t, *x.shape)}, got {tuple(eps.shape)}")

        def chunk_loss(ts: Tensor, e: Tensor) -> Tensor:
            k = ts.shape[0]
            xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
            cs = cond.unsqueeze(0).expand(k, b).reshape(k * b)
            tt = ts.repeat_interleave(b)
            return self.eps_loss(xs, cs, tt, e.reshape(k * b, *x.shape[1:])).view(k, b).sum(dim=0)

        use_ckpt = checkpoint and torch.is_grad_enabled()
        total = x.new_zeros(b)
        for start in range(0, n_t, chunk):
            ts = torch.arange(start, min(start + chunk, n_t), device=x.device)
            if eps is None:
                e = torch.stack(
                    [
                        torch.randn(
                            x.shape, generator=generator, device=_draw_device(generator, x), dtype=x.dtype
                        )
                        for _ in range(ts.shape[0])
                    ]
                ).to(x.device)
            else:
                e = eps[start : start + ts.shape[0]].to(device=x.device, dtype=x.dtype)
            if use_ckpt:
                part = torch.utils.checkpoint.checkpoint(chunk_loss, ts, e, use_reentrant=False)
            else:
                part = chunk_loss(ts, e)
            total = total + part
        return total


class ConditionalDDPM(EpsilonDiffusion):
    """Satisfies ``ConditionalGenerativeModel``; images are in [-1, 1], shape (B, C, H, W).

    ``nelbo`` is the paper's per-sample diffusion loss ||eps(x_t, t, c) - eps||^2 (summed over pixels)
    at one random timestep; ``nelbo_all_timesteps`` sums it over all T timesteps, the paper's
    ELBO(x|theta, c) = sum_t ||eps(x_t, t, c|theta) - eps||^2 used by the Fisher.
    """

    family = "ddpm"
    loss_entries = "sum"  # over pixels, as the reference DDPM code (``losses.py``) sums them
    data_range = (-1.0, 1.0)
    per_image_seeds = True  # sample() accepts one generator per image: a set does not depend on batching

    def __init__(self, config: DDPMConfig | None = None) -> None:
        super().__init__()
        from diffusers.models.unets.unet_2d import UNet2DModel
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        self.config = config or DDPMConfig()
        self.unet: UNet2DModel = UNet2DModel(**_unet_kwargs(self.config))
        self.scheduler: DDPMScheduler = DDPMScheduler(**self._schedule_kwargs())
        # eq. (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps): the scheduler's abar_t, kept as a buffer so
        # it follows .to(device) and the loss is plain tensor indexing (vmap/grad friendly)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self.sqrt_abar: Tensor
        self.sqrt_one_minus_abar: Tensor
        self.register_buffer("sqrt_abar", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1 - alphas_cumprod).sqrt().float(), persistent=False)
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

    def sampling_scheduler(self, sampler: str | None = None) -> DDIMScheduler | DDPMScheduler:
        """A fresh diffusers scheduler (``config.sampler`` unless given) on this model's noise schedule."""
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        return cls(**self._schedule_kwargs())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def null_class(self) -> int:
        """The label index of the unconditional ("null") embedding used by classifier-free guidance."""
        return self.config.num_classes

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

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (B, {self.image_shape}), got {tuple(x.shape)}")

    def eps_loss(self, x: Tensor, cond: Tensor, timesteps: Tensor, eps: Tensor) -> Tensor:
        """||eps(x_t, t, c) - eps||^2 summed over pixels, shape (B,); labels may include the null class."""
        s = self.sqrt_abar[timesteps].to(x.dtype).view(-1, 1, 1, 1)
        s1 = self.sqrt_one_minus_abar[timesteps].to(x.dtype).view(-1, 1, 1, 1)
        x_t = s * x + s1 * eps
        pred = self.unet(x_t, timesteps, class_labels=cond).sample
        return (pred - eps).pow(2).flatten(1).sum(dim=1)

    # ---- the contract ----------------------------------------------------------------------------

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> DDPMNoise:
        """Timesteps uniform in [0, T), eps ~ N(0, I) like x, and the label-dropout draw, in that order."""
        b, dev = x.shape[0], _draw_device(generator, x)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=dev)
        eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
        drop = torch.rand(b, generator=generator, device=dev)
        return DDPMNoise(t.to(x.device), eps.to(x.device), drop.to(x.device))

    def _dropout_active(self) -> bool:
        return self.training and self.class_dropout and self.config.class_dropout_prob > 0

    def nelbo(
        self, x: Tensor, cond: Tensor, *, generator: torch.Generator | None = None, noise: Any = None
    ) -> Tensor:
        """Per-sample L_simple = ||eps(x_t, t, c) - eps||^2 at one timestep per sample; shape (B,).

        ``noise`` is a ``DDPMNoise`` (or a ``(timesteps, eps)`` pair); with it the result is a
        deterministic function of the inputs. In train mode with ``self.class_dropout`` on, each label is
        replaced by the null class with probability ``class_dropout_prob`` (classifier-free guidance).
        """
        self._check_images(x)
        self._check_cond(cond)
        if noise is None:
            noise = self.draw_noise(x, generator)
        timesteps, eps, *rest = noise
        drop = rest[0] if rest else None
        if self._dropout_active():
            if drop is None:
                drop = torch.rand(x.shape[0], generator=generator, device=_draw_device(generator, x))
                drop = drop.to(x.device)
            cond = torch.where(drop < self.config.class_dropout_prob, self.null_class, cond)
        return self.eps_loss(x, cond, timesteps.to(x.device), eps)

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Classifier-free-guided samples in [-1, 1], shape (B, C, H, W).

        eps = eps(x_t, t, null) + w (eps(x_t, t, c) - eps(x_t, t, null)), w = ``guidance_scale``
        (config default), or the reference's (1 + w) eps(x_t, t, c) - w eps(x_t, t, null) when
        ``config.guidance_convention`` is "reference"; the conditional and null passes share one UNet call.
        The DDIM sampler uses ``config.eta``. The initial noise (and the
        DDPM sampler's noise) come from ``generator``, which may live on the CPU whatever the device; a
        list gives one generator per image (diffusers' convention), so an image does not depend on which
        batch it was drawn in.
        """
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        self.check_labels(cond)
        w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.config.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ValueError("num_inference_steps must lie in [1, num_train_timesteps]")
        weight = next(self.unet.parameters())
        device, dtype = weight.device, weight.dtype
        cond = cond.to(device)
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(steps, device=device)
        b = cond.shape[0]
        x = randn_tensor((b, *self.image_shape), generator=generator, device=device, dtype=dtype)
        x = x * scheduler.init_noise_sigma
        labels = torch.cat([cond, torch.full_like(cond, self.null_class)])
        step_kw = {"eta": self.config.eta} if self.config.eta and self.config.sampler == "ddim" else {}
        for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
            out = self.unet(torch.cat([x, x]), t, class_labels=labels).sample
            eps_c, eps_null = out.chunk(2)
            eps = guide(eps_c, eps_null, w, self.config.guidance_convention)
            # a generator list works at run time (the step draws its noise through randn_tensor)
            x = scheduler.step(eps, t, x, generator=generator, return_dict=False, **step_kw)[0]  # type: ignore[arg-type]
        return x.clamp(-1, 1)

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
