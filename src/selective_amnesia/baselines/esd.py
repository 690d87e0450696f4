"""ESD: "Erasing Concepts from Diffusion Models" (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023).

The fine-tuned model's conditional prediction for the concept c is trained to follow the frozen model's
prediction guided *away* from c (their Eq. 2, the negatively guided score, and Eq. 3, the objective):

    target = eps*(x_t, t) - eta (eps*(x_t, c, t) - eps*(x_t, t))          (Eq. 2, eps* = frozen theta*)
    loss   = || eps_theta(x_t, c, t) - target ||^2                           (Eq. 3)

with x_t made the way the authors' ``train-esd.py`` makes it: DDIM sampling (eta 0, classifier-free
guidance ``start_guidance``) from pure noise with the model *being trained*, under the concept's prompt,
for a random number of the ``ddim_steps`` steps; the loss is then taken at a DDPM timestep drawn inside
the DDIM step's interval. ``esd-x`` trains the cross-attention weights (``attn2``), ``esd-u`` the
reference's ``noxattn`` set (``selective_amnesia.core.trainable``). For a v-prediction UNet the same affine
combination is applied to its v outputs, which is the same target (v is affine in eps at fixed x_t, t and
the weights 1 + eta and -eta sum to 1).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from selective_amnesia.config import EsdConfig
from selective_amnesia.core.trainable import select_trainable
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.conditioning import Embeds, unet_kwargs
from selective_amnesia.models.text_to_image import TextToImageModel

log = logging.getLogger(__name__)

# esd.variant -> the selection of selective_amnesia.core.trainable: "x" = the authors' ESD-x (``xattn``),
# "u" = ESD-u (``noxattn``: all but cross-attention, the time embedding and the output layers)
VARIANT_TRAIN = {"x": "cross_attention", "u": "non_cross_attention"}


@dataclass
class EsdHistory:
    """Per logged step: the loss, the DDIM steps sampled before it and the loss's timestep."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ddim_steps_done: list[int] = field(default_factory=list)
    timestep: list[int] = field(default_factory=list)
    prompt: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.__dict__.items()}

    def record(self, step: int, loss: float, ddim_steps_done: int, timestep: int, prompt: str) -> None:
        self.step.append(step)
        self.loss.append(loss)
        self.ddim_steps_done.append(ddim_steps_done)
        self.timestep.append(timestep)
        self.prompt.append(prompt)


def esd_target(e_null: Tensor, e_concept: Tensor, negative_guidance: float) -> Tensor:
    """ESD's Eq. 2: eps*(x_t, t) - eta (eps*(x_t, c, t) - eps*(x_t, t)), from the frozen model's outputs."""
    return e_null - negative_guidance * (e_concept - e_null)


def select_esd_weights(model: TextToImageModel, variant: str) -> list[str]:
    """Mark the weights ESD-x (``x``) or ESD-u (``u``) trains; everything else is frozen."""
    if variant not in VARIANT_TRAIN:
        raise AmnesiaError(f"esd.variant must be one of {sorted(VARIANT_TRAIN)}, got {variant!r}")
    return select_trainable(model, VARIANT_TRAIN[variant])


def _batch(embeds: Embeds, b: int, like: Tensor) -> Embeds:
    return {k: v.to(like.device, like.dtype).expand(b, *v.shape[1:]) for k, v in embeds.items()}


def _pair(first: Embeds, second: Embeds, b: int, like: Tensor) -> Embeds:
    """Two conditionings, each broadcast to ``b``, stacked for one UNet call on a doubled batch."""
    one, two = _batch(first, b, like), _batch(second, b, like)
    return {k: torch.cat([one[k], two[k]]) for k in one}


def _unet(model: TextToImageModel, x: Tensor, t: Tensor | int, embeds: Embeds) -> Tensor:
    out: Tensor = model.unet(x, t, **unet_kwargs(embeds)).sample
    return out


def timestep_interval(k: int, n_steps: int, n_train: int) -> tuple[int, int]:
    """The DDPM timesteps [lo, hi) that the k-th of ``n_steps`` DDIM steps stands for (k = 0: the least
    noisy), as the authors' ``t_enc_ddpm`` is drawn."""
    lo = round(k / n_steps * n_train)
    hi = max(round((k + 1) / n_steps * n_train), lo + 1)
    return lo, min(hi, n_train)


@torch.no_grad()
def sample_until(
    model: TextToImageModel,
    concept: Embeds,
    steps_done: int,
    n_steps: int,
    guidance: float,
    start: Tensor,
) -> Tensor:
    """x after ``steps_done`` of ``n_steps`` DDIM steps (eta 0) from the noise ``start``, with classifier-free
    guidance ``guidance`` between the model's prediction for ``concept`` and for the empty prompt (the
    authors' ``quick_sample_till_t``; 0 steps: the noise itself)."""
    scheduler = model.sampling_scheduler("ddim")
    scheduler.set_timesteps(n_steps, device=start.device)
    b = start.shape[0]
    x: Tensor = start * scheduler.init_noise_sigma
    both = _pair(model.null_embeds, concept, b, x)
    for t in scheduler.timesteps[:steps_done]:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out_null, out_c = _unet(model, inp, t, both).chunk(2)
        out = out_null + guidance * (out_c - out_null)
        x = scheduler.step(out, t, x, eta=0.0, return_dict=False)[0]
    return x


def esd_loss(
    model: TextToImageModel,
    frozen: TextToImageModel,
    x_t: Tensor,
    t: int,
    concept: Embeds,
    negative_guidance: float,
) -> Tensor:
    """ESD's Eq. 3 at (x_t, t): the mean squared distance between the trained model's prediction for the
    concept and the target of Eq. 2 from the frozen model (torch's MSELoss, as the authors')."""
    b = x_t.shape[0]
    ts = torch.full((b,), t, device=x_t.device, dtype=torch.int64)
    with torch.no_grad():  # theta*'s unconditional and conditional outputs, in one call
        both = _pair(frozen.null_embeds, concept, b, x_t)
        e_null, e_concept = _unet(frozen, torch.cat([x_t, x_t]), torch.cat([ts, ts]), both).chunk(2)
        target = esd_target(e_null.float(), e_concept.float(), negative_guidance)
    pred = _unet(model, x_t, ts, _batch(concept, b, x_t))
    return (pred.float() - target).pow(2).mean()


def train_esd(
    model: TextToImageModel,
    frozen: TextToImageModel,
    prompts: list[str],
    cfg: EsdConfig,
    *,
    seed: int = 0,
    progress: bool = False,
) -> EsdHistory:
    """Fine-tune ``model`` (in place) with ESD so that it erases the concept named by ``prompts`` (one
    drawn per step, as the authors draw one of their ``words``); ``frozen`` is theta*, unchanged.

    Trains the weights of ``cfg.variant`` with Adam at ``cfg.lr`` for ``cfg.iterations`` steps of
    ``cfg.batch_size`` samples (one prompt and one timestep per step). Every random draw comes from
    ``seed``, so a run is reproducible on the same device.
    """
    if not prompts:
        raise AmnesiaError("ESD needs the concept's prompts (t2i.forget_prompts)")
    names = select_esd_weights(model, cfg.variant)
    frozen.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    log.info("ESD-%s trains %d tensors, %d weights", cfg.variant, len(names), sum(p.numel() for p in params))
    opt = torch.optim.Adam(params, lr=cfg.lr)
    concept = {p: model.encode_prompts([p]) for p in prompts}
    weight = next(model.unet.parameters())
    device, dtype = weight.device, weight.dtype
    n_train = model.config.num_train_timesteps
    draw = random.Random(seed)  # prompts and DDIM step counts
    gen = torch.Generator().manual_seed(seed)  # noise and timesteps
    history = EsdHistory()
    model.unet.train()
    bar = tqdm(range(cfg.iterations), desc="ESD", disable=not progress)
    try:
        for i in bar:
            prompt = draw.choice(prompts)
            k = draw.randrange(cfg.ddim_steps)  # the DDIM step whose noise level x_t has (0: least noisy)
            steps_done = cfg.ddim_steps - 1 - k
            lo, hi = timestep_interval(k, cfg.ddim_steps, n_train)
            t = int(torch.randint(lo, hi, (1,), generator=gen))
            start = torch.randn((cfg.batch_size, *model.image_shape), generator=gen).to(device, dtype)
            c = concept[prompt]
            x_t = sample_until(model, c, steps_done, cfg.ddim_steps, cfg.start_guidance, start)
            loss = esd_loss(model, frozen, x_t, t, c, cfg.negative_guidance)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise AmnesiaError(f"ESD loss is {value} at step {i + 1}: lower esd.lr")
            _update(opt, loss, params, cfg.grad_clip)
            if (i + 1) % cfg.log_every == 0 or i == 0 or i + 1 == cfg.iterations:
                history.record(i + 1, value, steps_done, t, prompt)
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        model.unet.eval()
        model.requires_grad_(False)
    return history


def _update(
    opt: torch.optim.Optimizer, loss: Tensor, params: list[torch.nn.Parameter], grad_clip: float | None
) -> None:
    """One optimiser step on ``loss``, the gradient's global norm clipped at ``grad_clip`` if set."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
