"""Stable Diffusion between its single-file (CompVis/A1111) and diffusers layouts, checked both ways
with diffusers' own converters."""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import save_tensors, state_hash
from selective_amnesia.io.convert.legacy import Converted, check_paths, load_selected, unshare
from selective_amnesia.io.convert.safe_load import file_sha256

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import PreTrainedModel

# ------------------------------------------------------------------------- Stable Diffusion single files
#
# A "single file" is the original CompVis/Stability (LDM) checkpoint layout that A1111 and ComfyUI read:
# one state dict with the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and
# the text encoder under ``cond_stage_model.transformer.`` (OpenAI CLIP, SD 1.x),
# ``cond_stage_model.model.`` (OpenCLIP, SD 2.x) or ``conditioner.embedders.{0,1}.`` (SDXL). Reading one
# is diffusers' ``from_single_file``. Writing one is the inverse of diffusers' own converters
# (``diffusers/loaders/single_file_utils.py``: ``convert_ldm_unet_checkpoint``,
# ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``),
# and every export is checked by running those converters on it: they must give back the original
# diffusers state dicts exactly, or nothing is written.

SINGLE_FILE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer."  # + text_model.* (transformers' CLIPTextModel names)
LDM_OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's "text_time" embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split(rest: str) -> tuple[str, str]:
    """``"norm1.weight"`` -> ``("norm1", "weight")``; the module path may itself hold dots."""
    module, _, param = rest.rpartition(".")
    return module, param


def _not_ldm(component: str, key: str) -> AmnesiaError:
    return AmnesiaError(
        f"{component} parameter {key} has no place in the original (LDM) layout: only Stable Diffusion "
        "1.x/2.x/XL pipelines export to a single file"
    )


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict under LDM ``openaimodel.UNetModel`` names
    (without the ``model.diffusion_model.`` prefix)."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise AmnesiaError("a UNet with a different layers_per_block per level has no single-file layout")
    per_level = lpb + 1  # LDM: layers_per_block resnets (+ attentions), then one down/up sampler
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, param = _split(key)
        parts = key.split(".")
        if module in _UNET_FIXED:
            out[f"{_UNET_FIXED[module]}.{param}"] = tensor
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            side, level, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            index = 1 + level * per_level + layer if side == "down" else level * per_level + layer
            where = "input_blocks" if side == "down" else "output_blocks"
            if kind == "attentions":  # the transformer's inner names are the same in both layouts
                out[f"{where}.{index}.1.{rest}"] = tensor
                continue
            inner, p = _split(rest)
            if inner not in _UNET_RESNET:
                raise _not_ldm("UNet", key)
            out[f"{where}.{index}.0.{_UNET_RESNET[inner]}.{p}"] = tensor
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            out[f"input_blocks.{1 + int(m[1]) * per_level + lpb}.0.op.{m[2]}"] = tensor
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            level = int(m[1])
            slot = 2 if up_attention[level] else 1  # after the resnet (and the transformer, if any)
            out[f"output_blocks.{level * per_level + lpb}.{slot}.conv.{m[2]}"] = tensor
            continue
        if parts[:2] == ["mid_block", "resnets"]:
            inner, p = _split(".".join(parts[3:]))
            if inner not in _UNET_RESNET:
                raise _not_ldm("UNet", key)
            out[f"middle_block.{2 * int(parts[2])}.{_UNET_RESNET[inner]}.{p}"] = tensor
            continue
        if parts[:3] == ["mid_block", "attentions", "0"]:
            out[f"middle_block.1.{'.'.join(parts[3:])}"] = tensor
            continue
        raise _not_ldm("UNet", key)
    return out


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under LDM ``AutoencoderKL`` names (no prefix). The
    mid-block attention is 1x1 convolutions there, linear layers here: weights gain two unit dims."""
    levels = len(config["up_block_types"])
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, param = _split(key)
        side, _, inner = module.partition(".")
        if module in ("quant_conv", "post_quant_conv"):
            out[key] = tensor
        elif side in ("encoder", "decoder") and inner in _VAE_FIXED:
            out[f"{side}.{_VAE_FIXED[inner]}.{param}"] = tensor
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2)", module
        ):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}.{param}"] = tensor
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            if m[2] not in _VAE_ATTENTION:
                raise _not_ldm("VAE", key)
            conv = m[2] != "group_norm" and param == "weight" and tensor.dim() == 2
            out[f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{param}"] = (
                tensor[:, :, None, None] if conv else tensor
            )
        elif m := re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            if m[4] not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
                raise _not_ldm("VAE", key)
            # LDM numbers decoder levels from the lowest resolution up, diffusers from the top down
            level = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
            name = "nin_shortcut" if m[4] == "conv_shortcut" else m[4]
            out[f"{m[1]}.{level}.block.{m[3]}.{name}.{param}"] = tensor
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            out[f"encoder.down.{m[1]}.downsample.conv.{param}"] = tensor
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            out[f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{param}"] = tensor
        else:
            raise _not_ldm("VAE", key)
    return out


def _text_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the LDM layout has it
    return {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
        for k, v in state.items()
    }


def clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): stored under transformers' own names."""
    return _text_names(state)


def open_clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An OpenCLIP text tower (SD 2.x, SDXL's second encoder) under open_clip's names: fused q/k/v
    (``attn.in_proj_*``), ``resblocks``, and ``text_projection`` stored transposed (x @ P)."""
    state = _text_names(state)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = collections.defaultdict(dict)
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, tensor in state.items():
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            raise _not_ldm("text encoder", key)
        layer, module, param = m[1], m[2], m[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv[(layer, param)][module[-6]] = tensor
        elif module in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        else:
            raise _not_ldm("text encoder", key)
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise AmnesiaError(f"text encoder layer {layer} lacks one of q/k/v_proj.{param}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    return out


@dataclass
class SDComponents:
    """What a diffusers SD directory holds, read without pickle (safetensors weights only)."""

    kind: str  # a SINGLE_FILE_PIPELINES entry
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[PreTrainedModel]  # one (SD 1.x/2.x) or two (SDXL)


def _read_pipeline_index(directory: Path, flag: str) -> dict[str, Any]:
    from selective_amnesia.io.artifacts import read_json

    if not (directory / "model_index.json").is_file():
        raise AmnesiaError(f"{flag} {directory} is not a diffusers pipeline directory (no model_index.json)")
    index: dict[str, Any] = read_json(directory / "model_index.json")
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if kind not in SINGLE_FILE_PIPELINES:
        raise AmnesiaError(
            f"{flag} {directory} holds a {kind}: only {' and '.join(SINGLE_FILE_PIPELINES)} have a "
            "single-file layout"
        )
    return index


_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
# where each component lives in a single file (SD 1.x/2.x prefixes first, then SDXL's)
_FILE_PREFIXES = {
    "vae": (LDM_VAE, "vae."),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}


def _component(directory: Path, index: Mapping[str, Any], name: str) -> Any:
    """One model of a pipeline directory, from safetensors weights only."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if name in ("unet", "vae"):
        cls: Any = UNet2DConditionModel if name == "unet" else AutoencoderKL
    else:
        library, cls_name = (list(index.get(name) or []) + [None, None])[:2]
        if library != "transformers" or cls_name not in _TEXT_ENCODERS:
            raise AmnesiaError(
                f"{directory}: {name} is {cls_name}; only CLIP text encoders have a single-file layout"
            )
        cls = getattr(transformers, cls_name)
    try:
        return cls.from_pretrained(directory / name, use_safetensors=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AmnesiaError(
            f"{directory / name} cannot be read as a {cls.__name__} with safetensors weights ({first})"
        ) from None


def _text_encoder_names(kind: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if kind == "StableDiffusionXLPipeline" else ["text_encoder"]


def _load_pipeline(directory: Path) -> SDComponents:
    index = _read_pipeline_index(directory, "the source")
    kind = str(index["_class_name"])
    text = [_component(directory, index, name) for name in _text_encoder_names(kind)]
    unet, vae = _component(directory, index, "unet"), _component(directory, index, "vae")
    return SDComponents(kind, unet, vae, text)


def pipeline_to_ldm(pipe: SDComponents) -> dict[str, Tensor]:
    """The single-file state dict of a loaded SD 1.x/2.x/XL pipeline (UNet, VAE, text encoder(s))."""
    out = {LDM_UNET + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    out.update({LDM_VAE + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    if pipe.kind == "StableDiffusionXLPipeline":
        first, second = pipe.text_encoders
        out.update({SDXL_CLIP + k: v for k, v in clip_to_ldm(first.state_dict()).items()})
        out.update({SDXL_OPEN_CLIP + k: v for k, v in open_clip_to_ldm(second.state_dict()).items()})
        return out
    (encoder,) = pipe.text_encoders
    # OpenCLIP (SD 2.x) uses gelu, OpenAI CLIP (SD 1.x) quick_gelu: the layout follows the text tower
    if encoder.config.hidden_act == "gelu":
        out.update({LDM_OPEN_CLIP + k: v for k, v in open_clip_to_ldm(encoder.state_dict()).items()})
    else:
        out.update({LDM_CLIP + k: v for k, v in clip_to_ldm(encoder.state_dict()).items()})
    return out


def _diffusers_reading(
    ckpt: Mapping[str, Tensor], pipe: SDComponents
) -> list[tuple[str, dict[str, Tensor], nn.Module]]:
    """What diffusers' own single-file converters make of ``ckpt``, per component, next to the model."""
    from diffusers.loaders import single_file_utils as sfu

    def text(model: object, converted: dict[str, Tensor]) -> dict[str, Tensor]:
        if not hasattr(model, "text_model"):  # the loader drops the level for flattened models too
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        return converted

    got: list[tuple[str, dict[str, Tensor], nn.Module]] = [
        ("UNet", sfu.convert_ldm_unet_checkpoint(dict(ckpt), dict(pipe.unet.config)), pipe.unet),
        ("VAE", sfu.convert_ldm_vae_checkpoint(dict(ckpt), dict(pipe.vae.config)), pipe.vae),
    ]
    if pipe.kind == "StableDiffusionXLPipeline":
        first, second = pipe.text_encoders
        got.append(("text encoder", text(first, sfu.convert_ldm_clip_checkpoint(dict(ckpt))), first))
        converted = sfu.convert_open_clip_checkpoint(second, dict(ckpt), prefix=SDXL_OPEN_CLIP)
        got.append(("text encoder 2", text(second, converted), second))
    elif sfu.is_open_clip_model(ckpt):
        (encoder,) = pipe.text_encoders
        converted = sfu.convert_open_clip_checkpoint(encoder, dict(ckpt), prefix=LDM_OPEN_CLIP)
        got.append(("text encoder", text(encoder, converted), encoder))
    else:
        (encoder,) = pipe.text_encoders
        got.append(("text encoder", text(encoder, sfu.convert_ldm_clip_checkpoint(dict(ckpt))), encoder))
    return got


def check_single_file(ckpt: Mapping[str, Tensor], pipe: SDComponents) -> None:
    """Raise unless diffusers' converters turn ``ckpt`` back into exactly the pipeline's weights."""
    for name, converted, model in _diffusers_reading(ckpt, pipe):
        expected = model.state_dict()
        missing, extra = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
        bad = [k for k in expected if k in converted and not torch.equal(converted[k], expected[k])]
        if missing or extra or bad:
            raise AmnesiaError(
                f"the exported {name} would not read back (missing {missing[:2]}, unexpected {extra[:2]}, "
                f"different {bad[:2]}): this pipeline's layout has no exact single-file form"
            )


def export_single_file(src: str | Path, out: str | Path, *, force: bool = False) -> Converted:
    """A diffusers SD 1.x/2.x/XL pipeline directory as one original-layout ``.safetensors`` file.

    Holds the UNet, VAE and text encoder(s) under LDM names, in their stored dtype; the scheduler and
    tokenizer are not part of the format (readers bring their own). Checked with diffusers' converters
    before it is written (see ``check_single_file``).
    """
    import selective_amnesia

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise AmnesiaError(
            f"{src} is not a directory: --to single-file exports a diffusers pipeline directory"
        )
    check_paths(src, out, force)
    pipe = _load_pipeline(src)
    ckpt = pipeline_to_ldm(pipe)
    check_single_file(ckpt, pipe)
    meta = {
        "format": "pt",
        "converted_by": f"amnesia convert (selective_amnesia {selective_amnesia.__version__})",
        "source_dir": src.name,
        "source_pipeline": pipe.kind,
        "source_state_hash": state_hash(ckpt),
    }
    save_tensors(out, unshare(ckpt), meta)
    return Converted(out, len(ckpt), "", "", "tensors in the original SD layout")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # the safetensors reader raises its own error types
        raise AmnesiaError(f"{path} is not a readable safetensors file ({e}); copy it again") from None


def convert_single_file_to_diffusers(
    src: str | Path,
    out: str | Path,
    *,
    config: str | Path,
    key: str | None = None,
    force: bool = False,
) -> Converted:
    """A CompVis/A1111 single-file SD checkpoint (``.safetensors``, or ``.ckpt`` read weights-only) as a
    stock diffusers directory, through diffusers' ``from_single_file`` with ``config`` (a local diffusers
    directory of the same architecture) for the component configs, tokenizer(s) and scheduler.

    Components absent from the file (e.g. a UNet-only checkpoint's VAE) are taken from ``config``;
    ``Converted.kind`` names them.
    """
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    src, out, config = Path(src), Path(out), Path(config)
    _check_diffusers_paths(src, out, config, force)
    index = _read_pipeline_index(config, "--config")
    cls = (
        StableDiffusionXLPipeline
        if index["_class_name"] == "StableDiffusionXLPipeline"
        else StableDiffusionPipeline
    )
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise AmnesiaError(f"--out {out} is a directory that holds no pipeline: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        names, path, chosen, digest = _as_safetensors(src, key, work)
        # a component the file lacks (a UNet-only fine-tune) comes from --config, said in the summary
        parts = ["vae", *_text_encoder_names(str(index["_class_name"]))]
        absent = [p for p in parts if not any(n.startswith(_FILE_PREFIXES[p]) for n in names)]
        given = {p: _component(config, index, p) for p in absent}
        pipe = _from_single_file(cls, src, path, config, given)
        staged = _save_staged(pipe, config, work / "pipeline")
        if out.exists():  # --force, or an empty directory
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kind = "tensors into a diffusers pipeline"
    if absent:
        kind += f" ({', '.join(absent)} taken from --config: not in the file)"
    return Converted(out, len(names), digest, chosen, kind)


def _check_diffusers_paths(src: Path, out: Path, config: Path, force: bool) -> None:
    """What can be refused before --config is read: a missing source, an --out that is a file or
    --config itself (and what ``check_paths`` refuses)."""
    if not src.is_file():
        raise AmnesiaError(f"{src} not found: pass the single-file .safetensors or .ckpt checkpoint")
    check_paths(src, out, force, suffix=None)
    if out.is_file():
        raise AmnesiaError(f"--out {out} is a file: --to diffusers writes a pipeline directory")
    if out.exists() and config.exists() and out.resolve() == config.resolve():
        raise AmnesiaError("--out is the --config directory: write the pipeline somewhere else")


def _as_safetensors(src: Path, key: str | None, work: Path) -> tuple[list[str], Path, str, str]:
    """The checkpoint as a safetensors file diffusers may read: (tensor names, path, chosen key, sha256).

    A .safetensors file is used as it is; a .ckpt is never handed to diffusers: it is read here
    weights-only and written to ``work`` as safetensors. Refused unless it holds UNet weights.
    """
    if _is_safetensors(src):
        if key is not None:
            raise AmnesiaError("--key selects part of a .ckpt; a .safetensors file is read whole")
        names, path, chosen, digest = _safetensors_keys(src), src, "", file_sha256(src)
    else:
        tensors, _, digest, chosen, _ = load_selected(src, key)
        path = work / "checkpoint.safetensors"
        save_tensors(path, unshare(tensors), {"format": "pt"})
        names = list(tensors)
    if not any(n.startswith(LDM_UNET) for n in names):
        raise AmnesiaError(
            f"{src} holds no {LDM_UNET}* weights: not a single-file Stable Diffusion checkpoint "
            "(a diffusers directory is used as it is; other files convert with --to safetensors)"
        )
    return names, path, chosen, digest


def _from_single_file(cls: Any, src: Path, path: Path, config: Path, given: dict[str, Any]) -> Any:
    """diffusers' ``from_single_file``, its errors as one ``AmnesiaError``; refused when a weight of the
    --config architecture was left unfilled (on the meta device)."""
    try:
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, **given)
    except AmnesiaError:
        raise
    except Exception as e:  # diffusers reports a mismatch as ValueError, RuntimeError, KeyError...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AmnesiaError(
            f"{src} does not fit the architecture of --config {config} ({type(e).__name__}: {first}); "
            "pass a diffusers directory of the same model family (SD 1.x, 2.x or XL)"
        ) from None
    empty = [
        n
        for part in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, part, None) is not None
        for n, p in getattr(pipe, part).state_dict().items()
        if p.is_meta
    ]
    if empty:
        raise AmnesiaError(
            f"{src} lacks weights the --config architecture has (e.g. {empty[0]}): "
            "it is of another model family or incomplete"
        )
    return pipe


def _save_staged(pipe: DiffusionPipeline, config: Path, staged: Path) -> Path:
    """Save the pipeline to ``staged``, with the tokenizer files of --config that it does not write."""
    import shutil

    pipe.save_pretrained(staged, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # keep the stock files transformers 5 no longer writes
        if (config / name).is_dir() and (staged / name).is_dir():
            for f in (config / name).iterdir():
                if f.is_file() and not (staged / name / f.name).exists():
                    shutil.copyfile(f, staged / name / f.name)
    return staged
