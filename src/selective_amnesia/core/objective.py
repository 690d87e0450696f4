"""The Selective Amnesia objective (paper Eq. 4) and the naive ablation (Eq. 3).

    L(theta) = E_{x~q(x|c_f)} NELBO(x|theta,c_f)                          (4a) forget / surrogate term
             + gamma  * E_{c~p_r(c), x~p(x|theta*,c)} NELBO(x|theta,c)     (4b) generative replay
             + lambda * sum_i F_i (theta_i - theta*_i)^2                   (4c) EWC anchor

Naive (Eq. 3): (4a) becomes -NELBO(x|theta,c_f) on samples of c_f from the original model, i.e.
raise the bound of the concept directly instead of fitting a surrogate.

The reduction of per-sample NELBOs over the batch ("sum" in the paper's VAE, "mean" for diffusion)
is explicit because it changes the scale of (4a)/(4b) relative to (4c), i.e. what lambda means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel


def reduce_nelbo(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class _Anchor(torch.autograd.Function):
    """sum_i F_i (theta_i - theta*_i)^2 with the gradient 2 F (theta - theta*) written directly.

    Autograd through ``(theta - theta*)^2`` would keep a float32 copy of every difference until backward
    (3.4 GB for SD's UNet); this node keeps nothing but references to the parameters and computes each
    parameter's term, then its gradient, one at a time (docs/sd_memory_plan.md).
    """

    @staticmethod
    def forward(ctx: Any, penalty: EWCPenalty, *params: Tensor) -> Tensor:
        ctx.penalty = penalty
        ctx.save_for_backward(*params)
        total = torch.zeros((), device=params[0].device, dtype=torch.float32)
        for p, f, star in zip(params, penalty.fishers(), penalty.anchors(), strict=True):
            total += (f.float() * (p.detach().float() - star.float()).pow(2)).sum()
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        penalty: EWCPenalty = ctx.penalty
        grads = [
            (2 * grad * f.float() * (p.detach().float() - star.float())).to(p.dtype)
            for p, f, star in zip(ctx.saved_tensors, penalty.fishers(), penalty.anchors(), strict=True)
        ]
        return (None, *grads)


# torch leaves autograd.Function.apply unannotated; _Anchor's returns forward's Tensor
_anchor_apply: Callable[..., Tensor] = _Anchor.apply


class Anchor(nn.Module):
    """Eq. 4c, lambda * sum_i F_i (theta_i - theta*_i)^2: ``weight`` (lambda) times ``penalty`` (the sum).

    Called with the model's named parameters. ``weight`` is a plain attribute, not in the state dict: an
    anchor's state is F and theta* alone.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        """sum_i F_i (theta_i - theta*_i)^2 without lambda."""
        raise NotImplementedError

    def forward(self, params: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = self.weight * self.penalty(params)
        return out


class EWCPenalty(Anchor):
    """lambda * sum_i F_i (theta_i - theta*_i)^2 over the named parameters (Eq. 4c), lambda = ``weight``.

    F and theta* are stored in ``dtype`` (float32, or bfloat16 to halve their memory); the sum and the
    gradient are computed in float32.
    """

    def __init__(
        self,
        fisher: Mapping[str, Tensor],
        theta_star: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if set(fisher) != set(theta_star):
            raise ValueError("Fisher and theta* must name the same parameters")
        self.names = sorted(fisher)
        for i, n in enumerate(self.names):
            f, star = fisher[n].detach(), theta_star[n].detach()
            # F is never written, so it shares the Fisher's storage (no second copy of the model's size)
            self.register_buffer(f"fisher_{i}", f.to(dtype or f.dtype))
            self.register_buffer(f"theta_star_{i}", star.to(dtype or star.dtype, copy=True))

    def fishers(self) -> list[Tensor]:
        return [getattr(self, f"fisher_{i}") for i in range(len(self.names))]

    def anchors(self) -> list[Tensor]:
        return [getattr(self, f"theta_star_{i}") for i in range(len(self.names))]

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        return _anchor_apply(self, *(params[n] for n in self.names))


@dataclass
class LossTerms:
    """Each term separately (already weighted) and their sum; ``total`` is what is minimised."""

    total: Tensor
    forget: Tensor
    replay: Tensor
    ewc: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "forget", "replay", "ewc")}


def selective_amnesia_loss(
    model: ConditionalGenerativeModel,
    *,
    forget_x: Tensor,
    forget_c: Tensor,
    replay_x: Tensor | None,
    replay_c: Tensor | None,
    anchor: Anchor | None,
    replay_weight: float,
    reduction: str,
    objective: str = "surrogate",
    generator: torch.Generator | None = None,
    forget_noise: Any = None,
    replay_noise: Any = None,
) -> LossTerms:
    """Eq. 4 (``objective="surrogate"``; ``forget_x`` ~ q(x|c_f)) or Eq. 3 (``"naive"``; ``forget_x``
    ~ p(x|theta*, c_f)). Terms with weight 0 are not computed; ``anchor`` (4c, lambda inside) is None when
    lambda is 0. ``*_noise`` fix each term's NELBO noise (the DDPM shares timesteps between the terms);
    otherwise it is drawn from ``generator``."""
    nelbo = model.nelbo
    forget_term = reduce_nelbo(
        nelbo(forget_x, forget_c, generator=generator, noise=forget_noise), reduction
    )  # (4a)
    if objective == "naive":
        forget_term = -forget_term  # Eq. 3: minimise the likelihood (bound) of the concept itself
    elif objective != "surrogate":
        raise ValueError(f"objective must be 'surrogate' or 'naive', got {objective!r}")
    zero = torch.zeros((), device=forget_term.device)
    replay_term = zero
    if replay_weight > 0:
        if replay_x is None or replay_c is None:
            raise ValueError("replay_weight > 0 needs replay samples")
        replay_term = replay_weight * reduce_nelbo(
            nelbo(replay_x, replay_c, generator=generator, noise=replay_noise), reduction
        )  # (4b)
    ewc_term = zero if anchor is None else anchor(dict(model.named_parameters()))  # (4c)
    return LossTerms(forget_term + replay_term + ewc_term, forget_term, replay_term, ewc_term)


class LoraEWCPenalty(Anchor):
    """Eq. 4c on the *effective* weights of LoRA-adapted linear layers, lambda = ``weight``.

    A LoRA layer computes with W = W* + s B A (W* frozen at theta*), so W - W* = s B A and the anchor is
    lambda sum_layers sum_ij F_ij (s (B A)_ij)^2, with F the Fisher of the base weight W*. ``layers`` maps
    each base-weight name (the Fisher's key) to its (lora_A weight name, lora_B weight name, scaling s).
    """

    def __init__(
        self, fisher: Mapping[str, Tensor], layers: Mapping[str, tuple[str, str, float]], weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        missing = sorted(set(layers) - set(fisher))
        if missing:
            raise ValueError(f"the Fisher has no entry for the adapted weight(s) {missing[:3]}")
        self.names = sorted(layers)
        self.lora = [layers[n] for n in self.names]
        for i, n in enumerate(self.names):
            self.register_buffer(f"fisher_{i}", fisher[n].detach().clone())

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        total = torch.zeros((), device=next(iter(params.values())).device)
        for i, (a_name, b_name, scale) in enumerate(self.lora):
            delta = scale * (params[b_name] @ params[a_name])  # (out, r) @ (r, in) = W - W*
            total = total + (getattr(self, f"fisher_{i}") * delta.pow(2)).sum()
        return total
