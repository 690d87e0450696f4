"""Soft-prompt attacks (white box): find a conditioning under which the forgotten model still denoises
images of the concept well, then sample with it.

Both modes minimise the model's own training loss on target latents x_0 of the concept, with the UNet
frozen and gradients only to the conditioning c:

    c* = argmin_c  E_{x_0, t, eps} || eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c) - eps ||^2

(v instead of eps for a v-prediction model; averaged over latent entries as ``eps_loss``).

- ``sequence``: c is the whole ``encoder_hidden_states`` sequence (and SDXL's pooled ``text_embeds``),
  initialised from a prompt's embedding: the strongest white-box attack, as in the soft-prompt attacks of
  AdvUnlearn / UnlearnDiffAtk's continuous variant.
- ``token``: concept inversion (Pham et al. 2023, "Circumventing concept erasure methods for
  text-to-image generative models"): textual inversion (Gal et al. 2022) on the erased model, one new
  token embedding v* in the text encoder's input table, the prompt ``template`` with v* in place of
  ``{}`` passed through the frozen text encoder(s): c = E_text(template(v*)).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from selective_amnesia.attacks.common import (
    FIXED_KEYS,
    AttackOutput,
    NoiseDraw,
    TokenSlots,
    batched,
    eval_draws,
    fixed_loss,
    unet_weight,
)
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.conditioning import Embeds
from selective_amnesia.models.text_to_image import TextToImageModel

HISTORY_EVERY = 10  # steps between the losses kept in attack.json


def _check(targets: Tensor, steps: int, lr: float, batch_size: int) -> None:
    if targets.dim() != 4 or targets.shape[0] < 1:
        raise AmnesiaError(f"targets must be latents (N >= 1, C, h, w), got {tuple(targets.shape)}")
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise AmnesiaError(f"need steps >= 0, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")


def adam_on_conditioning(
    model: TextToImageModel,
    targets: Tensor,
    params: list[Tensor],
    embeds_of: Callable[[], Embeds],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "soft prompt",
) -> list[float]:
    """Adam on the leaf tensors ``params`` (nothing else): each step draws targets, timesteps and noise
    from ``generator`` and follows the gradient of the denoising loss of ``embeds_of()`` (batch 1).

    Gradients come from ``torch.autograd.grad`` with respect to ``params`` only, so the UNet's weights,
    their ``.grad`` and ``requires_grad`` flags and its train/eval mode are left as they are. Returns the
    loss of every ``HISTORY_EVERY``-th step."""
    opt = torch.optim.Adam(params, lr=lr)
    history: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
    with torch.enable_grad():
        for step in bar:
            draw = NoiseDraw.draw(model, targets, batch_size, generator)
            loss = draw.loss(model, targets, embeds_of())
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if step % HISTORY_EVERY == 0 or step == steps - 1:
                history.append(round(float(loss.item()), 6))
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


def optimise_sequence(
    model: TextToImageModel,
    targets: Tensor,
    init: Embeds,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[Embeds, list[float]]:
    """``invert_sequence`` with a progress bar and the loss history."""
    _check(targets, steps, lr, batch_size)
    device = unet_weight(model).device
    free = {
        k: v.detach().float().to(device).clone().requires_grad_(True)
        for k, v in init.items()
        if k not in FIXED_KEYS
    }
    fixed = {k: v.detach().float().to(device) for k, v in init.items() if k in FIXED_KEYS}
    history = adam_on_conditioning(
        model,
        targets,
        list(free.values()),
        lambda: batched({**free, **fixed}),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
    )
    both = {**free, **fixed}
    return {k: both[k].detach().to(init[k].device, init[k].dtype) for k in init}, history


def invert_sequence(
    model: TextToImageModel,
    targets: Tensor,
    init: dict[str, Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Optimise a whole conditioning (no batch dimension, the keys of ``model.encode_prompts``' values:
    ``encoder_hidden_states`` (L, D) and for SDXL ``text_embeds``, ``time_ids``) so that ``model``
    denoises ``targets`` (latents (N, C, h, w)) well: ``steps`` Adam steps at ``lr`` on batches of
    ``batch_size`` targets, timesteps and noise drawn from ``generator``. SDXL's ``time_ids`` stay fixed.

    The model is only read: its weights, their ``requires_grad`` flags and ``.grad``, and its train/eval
    mode are as before (it may be in train mode with trainable weights, as inside the forgetting loop).
    Returns detached tensors on ``init``'s devices and dtypes; register one for sampling with
    ``model.register_embeds("<name>", result)``."""
    out, _ = optimise_sequence(
        model, targets, init, steps=steps, lr=lr, batch_size=batch_size, generator=generator
    )
    return out


@dataclass
class TokenInversion:
    """A learned token: one vector per text encoder (D_e,), the template it was learned in, the
    placeholder string standing for it there, and the conditioning of the template with it."""

    vectors: list[Tensor]
    template: str
    placeholder: str
    conditioning: Embeds  # no batch dimension
    history: list[float]


def token_slots(model: TextToImageModel, template: str) -> TokenSlots:
    if template.count("{}") != 1:
        raise AmnesiaError(f"--template must hold {{}} once, where the learned token goes; got {template!r}")
    return TokenSlots(model, lambda ph: template.replace("{}", ph), 1)


def word_vectors(model: TextToImageModel, word: str) -> list[Tensor]:
    """Each encoder's input embedding of ``word`` (the mean over its tokens), (D_e,)."""
    out = []
    for encoder, tokenizer in model.conditioning.encoders.values():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise AmnesiaError(f"--init-word {word!r} gives no token: choose a word")
        table = encoder.get_input_embeddings().weight
        out.append(table[torch.tensor(ids, device=table.device)].detach().float().mean(0))
    return out


def invert_token(
    model: TextToImageModel,
    targets: Tensor,
    template: str,
    init_word: str,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
) -> TokenInversion:
    """Concept inversion: one new token (one vector per text encoder, initialised from ``init_word``'s
    embedding) in ``template`` (holding ``{}``), optimised like ``invert_sequence`` through the frozen
    text encoder(s)."""
    _check(targets, steps, lr, batch_size)
    slots = token_slots(model, template)
    params = [v.clone().unsqueeze(0).requires_grad_(True) for v in word_vectors(model, init_word)]
    history = adam_on_conditioning(
        model,
        targets,
        params,
        lambda: slots.encode(params),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
        desc="concept inversion",
    )
    with torch.no_grad():
        cond = {k: v[0].detach() for k, v in slots.encode([p.detach() for p in params]).items()}
    return TokenInversion([p.detach()[0] for p in params], template, slots.placeholder, cond, history)


def textual_inversion_file(model: TextToImageModel, vectors: list[Tensor], token: str) -> dict[str, Tensor]:
    """The learned token in the file layout diffusers' ``load_textual_inversion`` reads: {token: v} for one
    text encoder; SDXL's {"clip_l": v1, "clip_g": v2}, loaded once per encoder."""
    if len(vectors) == 1:
        return {token: vectors[0].detach().cpu()}
    names = ("clip_l", "clip_g")
    return {n: v.detach().cpu() for n, v in zip(names, vectors, strict=True)}


SOFT_PROMPT = "<soft-prompt>"
SOFT_TOKEN = "<soft-token>"


def soft_prompt_attack(
    model: TextToImageModel,
    targets: Tensor,
    *,
    mode: str,
    prompt: str,
    template: str,
    init_word: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    baseline: bool = True,
    progress: bool = False,
) -> AttackOutput:
    """Run one mode and return what ``common.finish`` samples and writes: the found conditioning
    registered in the model's prompt table, and the prompt it started from as the baseline."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    draws = eval_draws(model, targets, seed)
    opt = {"steps": steps, "lr": lr, "batch_size": batch_size, "generator": gen, "progress": progress}
    if mode == "sequence":
        got = _sequence_mode(model, targets, prompt, **opt)
    elif mode == "token":
        got = _token_mode(model, targets, template, init_word, **opt)
    else:
        raise AmnesiaError(f"--mode must be sequence or token, got {mode!r}")
    optimise_s = time.perf_counter() - start
    model.register_embeds(got.name, got.found)
    loss_start = fixed_loss(model, targets, batched(got.start_cond), draws)
    loss_found = fixed_loss(model, targets, batched(got.found), draws)
    return AttackOutput(
        attack=f"soft-prompt/{mode}",
        conditions=[got.name] + ([got.start_text] if baseline else []),
        roles=["attack"] + (["baseline"] if baseline else []),
        settings={
            "mode": mode,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "num_targets": int(targets.shape[0]),
            **got.settings,
        },
        prompts=got.prompts,
        tensors={k: v.detach().float().cpu().contiguous() for k, v in got.tensors.items()},
        extra_files=got.extra,
        info={
            "loss": {
                "start": loss_start,
                "found": loss_found,
                "eval_draws": sum(d.index.numel() for d in draws),
            },
            "loss_history": got.history,
            "history_every": HISTORY_EVERY,
            "seconds": {"optimise": round(optimise_s, 2)},
        },
    )


@dataclass
class _Found:
    """One mode's result: the found conditioning registered as ``name``, the prompt and conditioning it
    started from (the baseline), and what attack.json, prompts.json and the tensor files hold of it."""

    found: Embeds
    history: list[float]
    name: str
    start_text: str
    start_cond: Embeds
    tensors: dict[str, Tensor]
    prompts: dict[str, Any]
    extra: dict[str, dict[str, Tensor]]
    settings: dict[str, Any]


def _sequence_mode(model: TextToImageModel, targets: Tensor, prompt: str, **opt: Any) -> _Found:
    """The whole conditioning sequence, initialised from ``prompt``'s."""
    init = {k: v[0] for k, v in model.encode_prompts([prompt]).items()}
    found, history = optimise_sequence(model, targets, init, **opt)
    return _Found(
        found=found,
        history=history,
        name=SOFT_PROMPT,
        start_text=prompt,
        start_cond=init,
        tensors={**found, **{f"init.{k}": v for k, v in init.items()}},
        prompts={"init_prompt": prompt},
        extra={},
        settings={"init_prompt": prompt},
    )


def _token_mode(
    model: TextToImageModel, targets: Tensor, template: str, init_word: str, **opt: Any
) -> _Found:
    """One learned token in ``template``, initialised from ``init_word``'s embedding."""
    inv = invert_token(model, targets, template, init_word, **opt)
    start_text = template.replace("{}", init_word)
    return _Found(
        found=inv.conditioning,
        history=inv.history,
        name=SOFT_TOKEN,
        start_text=start_text,
        start_cond={k: v[0] for k, v in model.encode_prompts([start_text]).items()},
        tensors={**inv.conditioning, **{f"token.{i}": v for i, v in enumerate(inv.vectors)}},
        prompts={
            "template": template,
            "init_word": init_word,
            "placeholder": inv.placeholder,
            "token": SOFT_TOKEN,
        },
        extra={"learned_embeds.safetensors": textual_inversion_file(model, inv.vectors, SOFT_TOKEN)},
        settings={"template": template, "init_word": init_word},
    )
