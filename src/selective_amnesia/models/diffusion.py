"""The diffusion core both diffusion adapters share: the class-conditional DDPM (``models/ddpm.py``) and
the latent text-to-image model (``models/text_to_image.py``).

``DiffusionModel`` holds what does not depend on how a condition reaches the UNet: the noise schedule
(diffusers' ``DDPMScheduler`` and its abar_t as buffers), the denoising loss (eps or v target), the noise
draws, the per-sample NELBO, the all-timestep ELBO of the paper's Fisher, the reference code's antithetic
timesteps and paired noise, the samplers and the classifier-free-guided sampling loop. An adapter says how
the UNet sees a condition (``predict`` for the loss, ``_guided_pair`` for sampling) and checks its inputs;
the DDPM adds its label dropout through ``draw_noise`` and ``_drop_labels``.

diffusers is imported lazily, so importing ``selective_amnesia.models`` stays fast for the VAE.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.base import DiffusionSettings

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

SAMPLERS = ("ddim", "ddpm")
GUIDANCE_CONVENTIONS = ("diffusers", "reference")
# what the UNet is trained to predict (the scheduler's prediction_type); "sample" (x0) is not supported
PREDICTION_TYPES = ("epsilon", "v_prediction")

# the conditional and the unconditional output of one UNet call on a doubled batch, at (x_t, t)
GuidedPair = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# an adapter's config and UNet (the DDPM: ``DDPMConfig`` and diffusers' ``UNet2DModel``)
ConfigT = TypeVar("ConfigT", bound=DiffusionSettings)
UNetT = TypeVar("UNetT", bound=nn.Module)


def guide(eps_c: Tensor, eps_null: Tensor, w: float, convention: str = "diffusers") -> Tensor:
    """Classifier-free guidance. "diffusers": eps_null + w (eps_c - eps_null) (the stock pipelines);
    "reference": (1 + w) eps_c - w eps_null (the paper's DDPM code), i.e. diffusers' w + 1."""
    if convention == "reference":
        w = w + 1.0
    elif convention != "diffusers":
        raise ValueError(f"guidance_convention must be one of {GUIDANCE_CONVENTIONS}, got {convention!r}")
    return eps_null + w * (eps_c - eps_null)


def check_sampler_settings(config: DiffusionSettings) -> None:
    """``ValueError`` unless ``config``'s sampler, num_inference_steps (in [1, num_train_timesteps]) and
    guidance_scale are valid: the sampler settings of both adapters' configs."""
    if config.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {config.sampler!r}")
    if not 1 <= config.num_inference_steps <= config.num_train_timesteps:
        raise ValueError("num_inference_steps must lie in [1, num_train_timesteps]")
    if not math.isfinite(config.guidance_scale) or config.guidance_scale < 0:
        raise ValueError("guidance_scale must be a finite number >= 0")


def draw_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    """Draw where the generator lives (a CPU generator gives the same numbers for a model on any device)."""
    return generator.device if generator is not None else x.device


class DDPMNoise(NamedTuple):
    """The randomness of one L_simple estimate: a timestep and eps per sample, and the label-dropout draw
    (the DDPM's; None for a model without label dropout)."""

    timesteps: Tensor  # int64 (B,)
    eps: Tensor  # like x
    drop: Tensor | None = None  # float (B,) uniform in [0, 1); label dropped where < class_dropout_prob


class DiffusionModel(nn.Module, Generic[ConfigT, UNetT]):
    """The shared diffusion machinery; subclasses set ``config`` (with ``num_train_timesteps``, ``sampler``,
    ``num_inference_steps``, ``guidance_scale``) and ``unet``, call ``_set_schedule`` in ``__init__``, and
    provide ``image_shape``, ``predict``, ``_guided_pair``, ``check_labels`` and ``_check_cond``. The type
    parameters are the types of ``config`` and ``unet``."""

    config: ConfigT
    unet: UNetT
    scheduler: DDPMScheduler
    scheduler_config: dict[str, Any]
    prediction_type: str
    sqrt_abar: Tensor
    sqrt_one_minus_abar: Tensor
    # how the per-sample loss reduces over entries ("sum" or "mean"); it sets the scale of lambda
    loss_entries = "sum"
    data_range = (-1.0, 1.0)
    per_image_seeds = True  # sample() accepts one generator per image: a set does not depend on batching
    clamp_samples = True  # samples are clamped to data_range (False: latents, left as the sampler gives them)
    x_name = "images"  # what x is, for error messages

    # ---- what an adapter provides ----------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """The UNet's output (eps, or v for a v-prediction schedule) at noisy ``x_t`` for ``cond``."""
        raise NotImplementedError

    def _guided_pair(self, cond: Tensor, device: torch.device, dtype: torch.dtype) -> GuidedPair:
        """A function of (x_t doubled, t) giving (conditional, unconditional) outputs for ``cond`` from one
        UNet call; what it needs of ``cond`` is computed once per ``sample``."""
        raise NotImplementedError

    def check_labels(self, cond: Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_cond(cond: Tensor) -> None:
        raise NotImplementedError

    def _drop_labels(
        self, cond: Tensor, drop: Tensor | None, x: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """The conditions a training loss sees (the DDPM drops labels for classifier-free guidance)."""
        return cond

    @property
    def guidance_convention(self) -> str:
        return "diffusers"

    @property
    def ddim_eta(self) -> float:
        return 0.0

    def forgetting(self) -> contextlib.AbstractContextManager[None]:
        """The model as forgetting trains it (the DDPM: no label dropout); nothing changes here."""
        return contextlib.nullcontext()

    # ---- schedule --------------------------------------------------------------------------------

    def _set_schedule(self, scheduler_config: dict[str, Any]) -> None:
        """The training noise: a ``DDPMScheduler`` on ``scheduler_config`` (a stock pipeline's may name
        another scheduler; the betas are the same), and its abar_t for x_t = sqrt(abar_t) x_0 +
        sqrt(1 - abar_t) eps, kept as buffers so they follow .to(device) and the loss is plain tensor
        indexing (vmap/grad friendly); not in the state dict."""
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        self.scheduler_config = dict(scheduler_config)
        scheduler: Any = DDPMScheduler.from_config(self.scheduler_config)
        self.scheduler = scheduler
        self.prediction_type = str(scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise AmnesiaError(
                f"the scheduler's prediction_type is {self.prediction_type!r}; supported: {PREDICTION_TYPES}"
            )
        abar = scheduler.alphas_cumprod.to(torch.float64)
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1 - abar).sqrt().float(), persistent=False)

    def sampling_scheduler(self, sampler: str | None = None) -> Any:
        """A fresh diffusers scheduler (``config.sampler`` unless given) on this model's noise schedule:
        a ``DDIMScheduler`` or ``DDPMScheduler`` (Any: their ``step`` signatures differ, DDIM's has eta)."""
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        return cls.from_config(self.scheduler_config)

    # ---- inputs ----------------------------------------------------------------------------------

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected {self.x_name} of shape (B, {self.image_shape}), got {tuple(x.shape)}")

    # ---- the loss --------------------------------------------------------------------------------

    def eps_loss(self, x: Tensor, cond: Tensor, timesteps: Tensor, eps: Tensor) -> Tensor:
        """||model(x_t, t, c) - target||^2 per sample (B,), x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps.

        The target is eps, or for v-prediction v = sqrt(abar_t) eps - sqrt(1 - abar_t) x
        (``DDPMScheduler.get_velocity``). ``loss_entries`` "sum" sums over entries in the model's dtype (the
        reference DDPM code); "mean" averages them in float32 (the reference SD code's ``p_losses`` and
        diffusers' training script). Labels may include a null class; no label dropout here.
        """
        x_t, target = self.noised(x, timesteps, eps)
        pred = self.predict(x_t, timesteps, cond)
        if self.loss_entries == "mean":
            return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        return (pred - target).pow(2).flatten(1).sum(dim=1)

    def noised(self, x: Tensor, timesteps: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps and the training target (eps, or v), in x's dtype."""
        s = self.sqrt_abar[timesteps].to(x.dtype).view(-1, 1, 1, 1)
        s1 = self.sqrt_one_minus_abar[timesteps].to(x.dtype).view(-1, 1, 1, 1)
        return s * x + s1 * eps, eps if self.prediction_type == "epsilon" else s * eps - s1 * x

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> DDPMNoise:
        """Timesteps uniform in [0, T) and eps ~ N(0, I) like x, in that order."""
        b, dev = x.shape[0], draw_device(generator, x)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=dev)
        eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
        return DDPMNoise(t.to(x.device), eps.to(x.device))

    def nelbo(
        self, x: Tensor, cond: Tensor, *, generator: torch.Generator | None = None, noise: Any = None
    ) -> Tensor:
        """Per-sample denoising loss (``eps_loss``) at one timestep per sample; shape (B,).

        ``noise`` is a ``DDPMNoise`` (or a ``(timesteps, eps)`` pair); with it the result is a deterministic
        function of the inputs (a DDPM in train mode with label dropout and no drop in ``noise`` draws it
        from ``generator``). Without it the noise is ``draw_noise(x, generator)``.
        """
        self._check_images(x)
        self._check_cond(cond)
        if noise is None:
            noise = self.draw_noise(x, generator)
        timesteps, eps, *rest = noise
        cond = self._drop_labels(cond, rest[0] if rest else None, x, generator)
        return self.eps_loss(x, cond, timesteps.to(x.device), eps)

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
                            x.shape, generator=generator, device=draw_device(generator, x), dtype=x.dtype
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

    # ---- sampling --------------------------------------------------------------------------------

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
        """Classifier-free-guided samples, shape (B, *image_shape), clamped to ``data_range`` when
        ``clamp_samples``.

        out = out(x_t, t, null) + w (out(x_t, t, c) - out(x_t, t, null)), w = ``guidance_scale`` (config
        default), or the reference's (1 + w) out(c) - w out(null) under the "reference"
        ``guidance_convention``; the conditional and null passes share one UNet call, and the scheduler
        (``config.sampler``, DDIM with ``ddim_eta``) turns the guided output (eps or v) into the next x.
        The initial noise (and the DDPM sampler's noise) come from ``generator``, which may live on the CPU
        whatever the device; a list gives one generator per image (diffusers' convention), so an image does
        not depend on which batch it was drawn in.
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
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(steps, device=device)
        x: Tensor = randn_tensor(
            (cond.shape[0], *self.image_shape), generator=generator, device=device, dtype=dtype
        )
        x = x * scheduler.init_noise_sigma
        guided_pair = self._guided_pair(cond.to(device), device, dtype)
        eta = self.ddim_eta
        step_kw = {"eta": eta} if eta and self.config.sampler == "ddim" else {}
        for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
            out_c, out_null = guided_pair(scheduler.scale_model_input(torch.cat([x, x]), t), t)
            out = guide(out_c, out_null, w, self.guidance_convention)
            # a generator list works at run time (the step draws its noise through randn_tensor)
            x = scheduler.step(out, t, x, generator=generator, return_dict=False, **step_kw)[0]
        return x.clamp(*self.data_range) if self.clamp_samples else x
