"""Which UNet weights a text-to-image forgetting run trains: a named subset, or a LoRA adapter.

Choices (``t2i.train``): ``all``; ``cross_attention`` (the ``attn2`` blocks, where the text enters);
``non_cross_attention`` (the reference's ``noxattn``, the paper's choice for nudity, a concept not tied to
one word: everything but cross-attention, the time embedding and the output layers); ``regex``
(``t2i.train_patterns``, matched with ``re.search`` against parameter names, as peft's
``target_modules``). A LoRA adapter (peft, the way diffusers' LoRA training script adds it)
trains low-rank updates of the selected linear layers instead, and its EWC anchor is on the effective
weights (``LoraEWCPenalty``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from selective_amnesia.errors import AmnesiaError

TRAIN_CHOICES = ("all", "cross_attention", "non_cross_attention", "regex")
ADAPTER = "default"  # peft's adapter name


# what the reference's ``noxattn`` leaves frozen besides cross-attention (``attn2``): its ``out.*`` and
# ``time_embed.*``, which diffusers names ``conv_norm_out``/``conv_out`` and ``time_embedding``
NOXATTN_FROZEN = re.compile(r"\.attn2\.|(^|\.)(conv_norm_out|conv_out|time_embedding)\.")


def _wanted(name: str, train: str, patterns: list[str]) -> bool:
    if train == "all":
        return True
    if train == "cross_attention":
        return ".attn2." in name
    if train == "non_cross_attention":
        return NOXATTN_FROZEN.search(name) is None
    return any(re.search(p, name) for p in patterns)


def select_trainable(model: nn.Module, train: str, patterns: list[str] | None = None) -> list[str]:
    """Set ``requires_grad`` on the chosen parameters only; return their names (a clear error if none)."""
    if train not in TRAIN_CHOICES:
        raise AmnesiaError(f"t2i.train must be one of {TRAIN_CHOICES}, got {train!r}")
    patterns = list(patterns or [])
    if train == "regex":
        if not patterns:
            raise AmnesiaError("t2i.train=regex needs t2i.train_patterns (regular expressions)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise AmnesiaError(
                    f"t2i.train_patterns: {pattern!r} is not a regular expression ({e})"
                ) from None
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(_wanted(name, train, patterns))
        if param.requires_grad:
            chosen.append(name)
    if not chosen:
        raise AmnesiaError(f"t2i.train={train} {patterns or ''} selects no parameter of this UNet")
    return chosen


def lora_target_modules(model: nn.Module, train: str, patterns: list[str], targets: list[str]) -> list[str]:
    """Full names (relative to ``model.unet``) of the linear layers a LoRA adapter wraps: those whose
    name ends with one of ``targets`` (peft convention) and whose weight the ``train`` choice selects."""
    unet: Any = model.unet
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            if _wanted(f"unet.{name}.weight", train, patterns):
                names.append(name)
    if not names:
        raise AmnesiaError(
            f"no linear layer named {targets} is selected by t2i.train={train}: nothing to adapt"
        )
    return names


def add_lora(
    model: nn.Module, modules: list[str], rank: int, alpha: float
) -> dict[str, tuple[str, str, float]]:
    """Add a peft LoRA adapter to ``model.unet`` on ``modules``; only its weights train afterwards.

    Returns, per adapted base weight (``unet.<module>.weight``, the Fisher's key), the names of its
    lora_A/lora_B weights in ``model`` and its scaling, for ``LoraEWCPenalty``.
    """
    from peft import LoraConfig

    unet: Any = model.unet
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        init_lora_weights="gaussian",
        target_modules=modules,
    )
    unet.add_adapter(config)
    layers = {}
    for name in modules:
        layer = unet.get_submodule(name)
        layers[f"unet.{name}.weight"] = (
            f"unet.{name}.lora_A.{ADAPTER}.weight",
            f"unet.{name}.lora_B.{ADAPTER}.weight",
            float(layer.scaling[ADAPTER]),
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for pair in layers.values() for n in pair[:2]}
    if trainable != expected:  # a peft/diffusers version that names things differently must fail loudly
        raise AmnesiaError(f"unexpected LoRA parameter names: {sorted(trainable ^ expected)[:3]}")
    return layers


def save_lora(model: nn.Module, path: str | Path) -> None:
    """Write the adapter the way diffusers' LoRA training script does: ``load_lora_weights`` loads it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet: Any = model.unet
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        str(path),
        unet_lora_layers=layers,
        safe_serialization=True,
        # rank and alpha travel with the weights: without them the loader assumes alpha = rank
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )


def merge_lora(model: nn.Module) -> None:
    """Fold the adapter into the UNet weights (W* + s B A) and put back a plain UNet, e.g. to save a
    full pipeline: peft merges; the merged base weights are copied into a fresh UNet of the same config."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet: Any = model.unet
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain = type(unet).from_config(unet.config).to(next(unet.parameters()).device)
    plain.load_state_dict(state)
    plain.requires_grad_(False)
    model.unet = plain
