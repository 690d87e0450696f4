"""How a text-to-image pipeline turns prompts into UNet conditioning, one strategy per pipeline class.

``ClipConditioning`` is Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one text encoder, its last
hidden states are ``encoder_hidden_states``. ``DualClipConditioning`` is SDXL (``StableDiffusionXLPipeline``):
the penultimate hidden states of two CLIP encoders concatenated, the second encoder's pooled projection
as ``text_embeds`` and the size/crop ``time_ids``, both passed as ``added_cond_kwargs``. Both compute
exactly what the stock pipeline's ``encode_prompt`` computes (max-length padding, no attention mask).

A prompt's conditioning is an ``Embeds`` dict of tensors without a batch dimension; the model stacks them
per batch and ``unet_kwargs`` turns a stacked dict into the keyword arguments of a UNet call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:  # the concrete module: mypy cannot see through diffusers' lazy top-level namespace
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

# one prompt's (or, stacked, a batch's) conditioning: "encoder_hidden_states" and, for SDXL, the
# added conditions "text_embeds" and "time_ids" under their UNet names
Embeds = dict[str, Tensor]
HIDDEN = "encoder_hidden_states"


def unet_kwargs(embeds: Embeds) -> dict[str, Any]:
    """Keyword arguments of ``UNet2DConditionModel.__call__`` for stacked ``embeds``."""
    added = {k: v for k, v in embeds.items() if k != HIDDEN}
    return {HIDDEN: embeds[HIDDEN], "added_cond_kwargs": added or None}


class TextConditioning:
    """The frozen text encoders and tokenizers of a pipeline (named as in its directory) and how they
    encode prompts. Subclasses set ``pipeline_class`` and implement ``_encode``."""

    pipeline_class: ClassVar[str]

    def __init__(self, encoders: dict[str, tuple[Any, Any]]) -> None:
        # component name ("text_encoder", "text_encoder_2") -> (text encoder, tokenizer), in pipeline order
        self.encoders = encoders
        for encoder, _ in encoders.values():
            encoder.requires_grad_(False)
            encoder.eval()

    @staticmethod
    def tokenizer_name(encoder_name: str) -> str:
        """The tokenizer folder that goes with a text encoder folder (diffusers' naming)."""
        return encoder_name.replace("text_encoder", "tokenizer")

    def index_entries(self) -> dict[str, Any]:
        """What this conditioning adds to ``model_index.json`` besides the encoders and tokenizers."""
        return {}

    def to(self, device: torch.device | str) -> None:
        for encoder, _ in self.encoders.values():
            encoder.to(device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Embeds:
        """Conditioning of ``prompts``, each value (P, ...), float32."""
        return {k: v.float() for k, v in self._encode(prompts).items()}

    def unconditional(self) -> Embeds:
        """The unconditional input of classifier-free guidance (P = 1), as the stock pipeline makes it
        for ``negative_prompt=None``: the embedding of ``""``."""
        return self.encode([""])

    def check_unet(self, unet: UNet2DConditionModel) -> None:
        """A clear error when the UNet expects other conditioning than this pipeline class gives."""
        cfg: Any = unet.config  # diffusers' config attributes are dynamic
        if getattr(cfg, "addition_embed_type", None) is not None:
            raise AmnesiaError(
                f"this UNet has added conditioning ({cfg.addition_embed_type}), which "
                f"{self.pipeline_class} does not provide: is model_index.json's _class_name right?"
            )

    def _tokens(self, tokenizer: Any, prompts: list[str], device: torch.device) -> Tensor:
        ids: Tensor = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)

    def _encode(self, prompts: list[str]) -> Embeds:
        raise NotImplementedError


class ClipConditioning(TextConditioning):
    """Stable Diffusion 1.x/2.x: the (last) hidden states of one text encoder (CLIP, or any transformers
    encoder such as the MNIST world's MiniLM)."""

    pipeline_class = "StableDiffusionPipeline"

    def index_entries(self) -> dict[str, Any]:
        return {"requires_safety_checker": False, "safety_checker": [None, None]}

    def _encode(self, prompts: list[str]) -> Embeds:
        encoder, tokenizer = self.encoders["text_encoder"]
        ids = self._tokens(tokenizer, prompts, next(encoder.parameters()).device)
        return {HIDDEN: encoder(ids)[0]}


class DualClipConditioning(TextConditioning):
    """SDXL: ``StableDiffusionXLPipeline.encode_prompt`` (no ``clip_skip``) and ``_get_add_time_ids``.

    ``pixel_size`` (H, W) is the size images are generated at; the time ids are (original size, crop
    (0, 0), target size) with both sizes equal to it, as the stock pipeline builds them by default.
    ``force_zeros_for_empty_prompt`` (the pipeline's config, true for SDXL base) makes the unconditional
    input of guidance all zeros instead of the embedding of ``""``.
    """

    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(
        self,
        encoders: dict[str, tuple[Any, Any]],
        pixel_size: tuple[int, int],
        *,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__(encoders)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        h, w = pixel_size
        self.time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)

    def index_entries(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}

    def check_unet(self, unet: UNet2DConditionModel) -> None:
        cfg: Any = unet.config  # diffusers' config attributes are dynamic
        if getattr(cfg, "addition_embed_type", None) != "text_time":
            raise AmnesiaError(
                "an SDXL pipeline needs a UNet with addition_embed_type 'text_time'; this one has "
                f"{getattr(cfg, 'addition_embed_type', None)!r}"
            )
        pooled = self.encode([""])["text_embeds"].shape[-1]
        passed = int(cfg.addition_time_embed_dim) * self.time_ids.numel() + pooled
        embedding: Any = unet.add_embedding  # a TimestepEmbedding here; diffusers types it by another branch
        expected = int(embedding.linear_1.in_features)
        if passed != expected:
            raise AmnesiaError(
                f"the UNet's added embedding takes {expected} inputs but the time ids and the pooled text "
                f"embedding give {passed}: text_encoder_2's projection_dim does not fit this UNet"
            )

    def unconditional(self) -> Embeds:
        null = self.encode([""])
        if self.force_zeros_for_empty_prompt:
            null[HIDDEN] = torch.zeros_like(null[HIDDEN])
            null["text_embeds"] = torch.zeros_like(null["text_embeds"])
        return null

    def _encode(self, prompts: list[str]) -> Embeds:
        hidden, pooled = [], None
        for encoder, tokenizer in self.encoders.values():
            ids = self._tokens(tokenizer, prompts, next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            # the stock pipeline takes the first 2-D output[0]: the projection of CLIPTextModelWithProjection
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        if pooled is None:
            raise AmnesiaError(
                "SDXL needs a text encoder with a pooled projection (CLIPTextModelWithProjection) as "
                "text_encoder_2"
            )
        time_ids = self.time_ids.to(pooled.device).expand(len(prompts), -1)
        return {HIDDEN: torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}


# model_index.json's _class_name -> the conditioning of that pipeline
PIPELINE_CLASSES: dict[str, type[TextConditioning]] = {
    c.pipeline_class: c for c in (ClipConditioning, DualClipConditioning)
}
