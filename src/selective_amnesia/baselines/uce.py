"""UCE: "Unified Concept Editing in Diffusion Models" (Gandikota, Orgad, Belinkov, Materzynska, Bau;
WACV 2024).

Every cross-attention key and value projection W (``attn2.to_k``, ``attn2.to_v``) reads the text
encoder's output tokens. UCE replaces it by the minimiser of

    lam ||W - W*||^2 + s_e sum_i ||W c_i - W* c*_i||^2 + s_p sum_j ||W c_j - W* c_j||^2

(c_i: the concept's token embeddings, c*_i: the target's, c_j: the kept prompts'), in closed form, their
Eq. 7:

    W = (lam W* + s_e sum_i W* c*_i c_i^T + s_p sum_j W* c_j c_j^T)
        (lam I  + s_e sum_i c_i c_i^T      + s_p sum_j c_j c_j^T)^-1

computed here in float64 with a linear solve instead of an inverse. Which rows of the encoder output
are the c_i follows the authors' ``train_erase.py`` (``tokens: tail``: the concept's last word token and
every token after it, aligned with the target's rows from its own last word on; every row of each kept
prompt; "" always kept) or their later ``uce_sd_erase.py`` (``tokens: last``: the last word token only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selective_amnesia.config import UceConfig
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.conditioning import HIDDEN
from selective_amnesia.models.text_to_image import TextToImageModel

log = logging.getLogger(__name__)


def closed_form_edit(
    w_old: Tensor,
    edit_inputs: Tensor,
    edit_values: Tensor,
    keep_inputs: Tensor,
    *,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> Tensor:
    """UCE's Eq. 7 for one projection ``w_old`` (out, in), in float64.

    ``edit_inputs`` (n, in) are the c_i, ``edit_values`` (n, out) the values W* c*_i they should give,
    ``keep_inputs`` (m, in) the c_j whose values W* c_j stay. Returns W (out, in), float64."""
    w = w_old.to(torch.float64)
    c_e, v_e, c_p = (t.to(torch.float64) for t in (edit_inputs, edit_values, keep_inputs))
    d = w.shape[1]
    # mat1 = lam W* + s_e sum_i v*_i c_i^T + s_p sum_j (W* c_j) c_j^T
    mat1 = lamb * w + erase_scale * v_e.T @ c_e + preserve_scale * (c_p @ w.T).T @ c_p
    # mat2 = lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T   (symmetric)
    mat2 = lamb * torch.eye(d, dtype=torch.float64, device=w.device)
    mat2 = mat2 + erase_scale * c_e.T @ c_e + preserve_scale * c_p.T @ c_p
    # lam > 0 makes mat2 positive definite; without it the prompts' rows must span the input space
    if lamb == 0 and int(torch.linalg.matrix_rank(mat2)) < d:
        raise AmnesiaError(
            "UCE's matrix (sum c c^T) is singular (uce.lamb=0): set uce.lamb > 0 or keep more prompts"
        )
    # W = mat1 mat2^-1  <=>  mat2 W^T = mat1^T (mat2 symmetric)
    w_new: Tensor = torch.linalg.solve(mat2, mat1.T).T
    return w_new


def last_word_index(model: TextToImageModel, prompt: str) -> int:
    """The position of the prompt's last word token: the attention mask's length minus the end token
    (the authors' ``attention_mask.sum() - 2``; for "" it is the start token)."""
    tok = model.tokenizer(
        [prompt], padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True
    )
    return max(int(sum(tok["attention_mask"][0])) - 2, 0)


def edit_rows(model: TextToImageModel, concept: str, target: str, tokens: str) -> tuple[Tensor, Tensor]:
    """The encoder output rows (c_i, c*_i) of one concept prompt and its target, paired row by row."""
    hidden = model.encode_prompts([concept, target])[HIDDEN].to(torch.float64)
    i_old, i_new = last_word_index(model, concept), last_word_index(model, target)
    if tokens == "last":
        return hidden[0, i_old : i_old + 1], hidden[1, i_new : i_new + 1]
    # "tail": from each last word to the end, cut so both have the same length (train_erase.py)
    length = hidden.shape[1]
    far = max(i_old, i_new)
    return hidden[0, i_old : length - (far - i_old)], hidden[1, i_new : length - (far - i_new)]


def keep_rows(model: TextToImageModel, prompts: list[str], tokens: str) -> Tensor:
    """The rows c_j of the kept prompts: every row ("tail", as train_erase.py) or the last word's."""
    if not prompts:
        return torch.zeros(0, model.encode_prompts([""])[HIDDEN].shape[-1], dtype=torch.float64)
    hidden = model.encode_prompts(prompts)[HIDDEN].to(torch.float64)
    if tokens == "tail":
        return hidden.flatten(0, 1)
    return torch.stack([hidden[k, last_word_index(model, p)] for k, p in enumerate(prompts)])


def projections(model: TextToImageModel, edit_keys: bool) -> dict[str, nn.Linear]:
    """The cross-attention value (and key) projections of the UNet, by name."""
    unet: Any = model.unet
    out = {}
    for name, module in unet.named_modules():
        is_projection = name.endswith(".to_v") or (edit_keys and name.endswith(".to_k"))
        if ".attn2." in f".{name}." and isinstance(module, nn.Linear) and is_projection:
            out[name] = module
    if not out:
        raise AmnesiaError("this UNet has no cross-attention (attn2.to_k/to_v) projection for UCE to edit")
    return out


@dataclass
class UceResult:
    """What the edit did, for the report."""

    modules: int
    concept_rows: int
    kept_rows: int
    preserve_scale: float
    # mean over modules of ||W c_i - W* c*_i|| / ||W* c*_i|| (concept) and ||W c_j - W* c_j|| / ||W* c_j||
    concept_residual: float
    kept_residual: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def uce_edit(
    model: TextToImageModel,
    concepts: list[str],
    target: str,
    kept: list[str],
    cfg: UceConfig,
) -> UceResult:
    """Edit ``model``'s cross-attention key/value projections in place so that every prompt of
    ``concepts`` gives the values of ``target`` while the prompts ``kept`` (and "") keep theirs."""
    if not concepts:
        raise AmnesiaError("UCE needs the concept's prompts (t2i.forget_prompts)")
    kept = list(dict.fromkeys(["", *(p for p in kept if p not in concepts)]))
    pairs = [edit_rows(model, c, target, cfg.tokens) for c in concepts]
    c_edit = torch.cat([p[0] for p in pairs])
    c_target = torch.cat([p[1] for p in pairs])
    c_keep = keep_rows(model, kept, cfg.tokens)
    s_p = cfg.preserve_scale if cfg.preserve_scale is not None else max(0.1, 1 / len(kept))
    mods = projections(model, cfg.edit_keys)
    res_e, res_p = [], []
    for module in mods.values():
        w_old = module.weight.detach().to(torch.float64)
        dev = w_old.device
        e, tg, kp = c_edit.to(dev), c_target.to(dev), c_keep.to(dev)
        v_target = tg @ w_old.T  # v*_i = W* c*_i
        w_new = closed_form_edit(
            w_old, e, v_target, kp, lamb=cfg.lamb, erase_scale=cfg.erase_scale, preserve_scale=s_p
        )
        res_e.append(
            float(((e @ w_new.T - v_target).norm(dim=1) / v_target.norm(dim=1).clamp_min(1e-12)).mean())
        )
        if kp.shape[0]:
            v_keep = kp @ w_old.T
            res_p.append(
                float(((kp @ w_new.T - v_keep).norm(dim=1) / v_keep.norm(dim=1).clamp_min(1e-12)).mean())
            )
        module.weight.copy_(w_new.to(module.weight.dtype))
    result = UceResult(
        modules=len(mods),
        concept_rows=int(c_edit.shape[0]),
        kept_rows=int(c_keep.shape[0]),
        preserve_scale=float(s_p),
        concept_residual=sum(res_e) / len(res_e),
        kept_residual=sum(res_p) / len(res_p) if res_p else 0.0,
    )
    log.info("UCE edited %d projections: %s", len(mods), result)
    return result
