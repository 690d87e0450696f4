"""The reference code's checkpoints and Fisher dicts to safetensors, our CVAE directory or our Fisher:
selecting the tensors, renaming them, writing them with their source's sha256."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import save_tensors, state_hash
from selective_amnesia.io.convert.safe_load import _Inert, file_sha256, load_legacy

# Reference OneHotCVAE layer -> our ConditionalVAE module (encoder/decoder are nn.Sequential with ReLUs
# at the odd indices, hence 0/2/4).
REFERENCE_VAE_NAMES: dict[str, str] = {
    "fc1": "encoder.0.0",
    "fc2": "encoder.0.2",
    "fc31": "to_mu",
    "fc32": "to_logvar",
    "fc4": "decoder.0",
    "fc5": "decoder.2",
    "fc6": "decoder.4",
}

# ------------------------------------------------------------------------------------- selecting tensors


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            if isinstance(k, type) and issubclass(k, _Inert):
                k = k.marker
            out.append((str(k), v))
        return out
    if isinstance(obj, list | tuple):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


def select(obj: Any, key: str | None) -> tuple[Any, str]:
    """The part of a loaded file to convert and its dotted path ("" for all).

    ``key=None`` picks ``state_dict`` or ``model`` of a dict (Lightning, reference VAE), element 0 of a
    list whose first item is a state dict (reference DDPM), else everything; ``"all"`` is everything.
    """
    if key == "all":
        return obj, ""
    if key is None:
        if isinstance(obj, Mapping):
            for k in ("state_dict", "model"):
                if _is_tensor_dict(obj.get(k)):
                    return obj[k], k
        if isinstance(obj, list | tuple) and obj and _is_tensor_dict(obj[0]):
            return obj[0], "0"
        return obj, ""
    node = obj
    for i, part in enumerate(key.split(".")):
        kids = dict(_children(node) or [])
        if part not in kids:
            where = ".".join(key.split(".")[:i]) or "the top level"
            raise AmnesiaError(
                f"--key {key}: no {part!r} under {where} (there: {sorted(kids)[:10]}); pass one of those"
            )
        node = kids[part]
    return node, key


def flatten_tensors(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], list[str]]:
    """Tensors (and numeric numpy arrays) of a nested dict/list under dotted names, and the paths skipped
    because they hold something else (ints, strings, config objects)."""
    import numpy as np

    tensors: dict[str, Tensor] = {}
    skipped: list[str] = []

    def visit(node: Any, name: str) -> None:
        if isinstance(node, np.ndarray) and node.dtype.kind in "biuf":
            node = torch.from_numpy(node.copy())
        if isinstance(node, Tensor):
            if node.layout != torch.strided or node.is_quantized or node.is_meta:
                raise AmnesiaError(f"{name} is a {node.layout} tensor: only dense tensors convert")
            if name in tensors:
                raise AmnesiaError(f"two tensors would both be named {name!r}: pick one part with --key")
            tensors[name] = node.detach()
            return
        kids = _children(node)
        if kids is None:
            skipped.append(name)
            return
        for k, v in kids:
            visit(v, f"{name}.{k}" if name else k)

    visit(obj, prefix)
    return tensors, skipped


def strip_data_parallel(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix ``nn.DataParallel`` puts on every name (only if all names have it)."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory (views, tied weights): copy those, keep the rest as is
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[k] = t if whole and ptr not in seen and t.numel() else t.clone()
        seen.add(ptr)
    return out


def _to_plain(obj: Any) -> Any:
    """Namespace/dict/list config -> JSON-ready plain values (for metadata)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj if isinstance(obj, str | int | float | bool | type(None)) else str(obj)


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class Converted:
    """What one conversion wrote."""

    out: Path
    num_tensors: int
    source_sha256: str
    key: str
    kind: str


def check_paths(src: Path, out: Path, force: bool, suffix: str | None = ".safetensors") -> None:
    if suffix and out.suffix != suffix:
        raise AmnesiaError(f"--out {out} must end in {suffix}")
    if suffix and out.is_dir():
        raise AmnesiaError(f"--out {out} is a directory: name the {suffix} file to write")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise AmnesiaError(
            f"--out {out} is the input file: choose another output (the input is never changed)"
        )
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise AmnesiaError(f"{out} exists: pass --force to overwrite it, or choose another --out")


def _source_metadata(src: Path, digest: str, key: str) -> dict[str, Any]:
    import selective_amnesia

    return {
        "format": "pt",  # transformers/diffusers readers expect it on torch safetensors
        "converted_by": f"amnesia convert (selective_amnesia {selective_amnesia.__version__})",
        "source_file": src.name,
        "source_sha256": digest,
        "source_key": key or "(all)",
    }


def load_selected(src: Path, key: str | None) -> tuple[dict[str, Tensor], list[str], str, str, Any]:
    digest = file_sha256(src)  # before loading, so the metadata names exactly the bytes that were read
    loaded = load_legacy(src)
    part, chosen = select(loaded, key)
    tensors, skipped = flatten_tensors(part)
    if not tensors:
        top = sorted(k for k, _ in _children(loaded) or [])[:10]
        raise AmnesiaError(
            f"{src}: no tensors under {chosen or 'the file'} (top-level keys {top}); use --key"
        )
    config = loaded.get("config") if isinstance(loaded, Mapping) else None
    return strip_data_parallel(tensors), skipped, digest, chosen, config


def convert_to_safetensors(
    src: str | Path, out: str | Path, *, key: str | None = None, force: bool = False
) -> Converted:
    """Generic conversion: the selected tensors of ``src`` to one ``.safetensors`` file (atomic write)."""
    src, out = Path(src), Path(out)
    check_paths(src, out, force)
    tensors, skipped, digest, chosen, config = load_selected(src, key)
    meta = _source_metadata(src, digest, chosen)
    if skipped:
        meta["skipped_non_tensors"] = skipped[:50]
    if config is not None:
        meta["reference_config"] = _to_plain(config)
    save_tensors(out, unshare(tensors), meta)
    return Converted(out, len(tensors), digest, chosen, "tensors")


def map_reference_vae(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a reference ``OneHotCVAE`` state dict (``fc1``..``fc6``) to ``ConditionalVAE`` names."""
    expected = {f"{r}.{p}" for r in REFERENCE_VAE_NAMES for p in ("weight", "bias")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AmnesiaError(
            f"not a reference MNIST VAE state dict (missing {missing[:3]}, unexpected {extra[:3]}): "
            "--to cvae/fisher map only vae/model.py's OneHotCVAE; use --to safetensors for other models"
        )
    out = {}
    for name, t in tensors.items():
        layer, param = name.split(".")
        out[f"{REFERENCE_VAE_NAMES[layer]}.{param}"] = t
    return out


def reference_vae_config(tensors: Mapping[str, Tensor]) -> Any:
    """Our ``CVAEConfig`` for a reference VAE state dict (names checked), read from its weight shapes."""
    from selective_amnesia.models.cvae import CVAEConfig

    bad = [n for n, t in tensors.items() if t.dim() != (2 if n.endswith(".weight") else 1)]
    if bad:
        raise AmnesiaError(f"reference VAE tensor {bad[0]} has the wrong number of dimensions: not a VAE")
    h1, in1 = tensors["fc1.weight"].shape
    h2 = tensors["fc2.weight"].shape[0]
    z = tensors["fc31.weight"].shape[0]
    x_dim = tensors["fc6.weight"].shape[0]
    side = math.isqrt(x_dim)
    if side * side != x_dim:
        raise AmnesiaError(f"reference VAE with x_dim={x_dim}: only square one-channel images convert")
    try:
        return CVAEConfig(
            image_size=side, channels=1, num_classes=in1 - x_dim, hidden_dims=[h1, h2], latent_dim=z
        )
    except ValueError as e:
        raise AmnesiaError(f"reference VAE shapes do not describe a conditional VAE: {e}") from None


def convert_to_cvae(
    src: str | Path, out: str | Path, *, key: str | None = None, force: bool = False
) -> Converted:
    """A reference MNIST VAE ``ckpt.pt`` to our model directory (``save_pretrained``), weights renamed.

    The layers, input order (``[x, onehot(c)]``, ``[z, onehot(c)]``) and sigmoid output match
    ``ConditionalVAE``; ``load_state_dict(strict=True)`` checks every name and shape.
    """
    from selective_amnesia.models.cvae import ConditionalVAE

    src, out = Path(src), Path(out)
    check_paths(src, out, force, suffix=None)
    if out.is_file():
        raise AmnesiaError(f"--out {out} is a file: --to cvae writes a model directory")
    tensors, _, digest, chosen, config = load_selected(src, key)
    renamed = map_reference_vae(tensors)  # checks the names before the shapes are read
    model = ConditionalVAE(reference_vae_config(tensors))
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise AmnesiaError(f"{src}: weights do not fit the inferred architecture ({first})") from None
    source = _source_metadata(src, digest, chosen)
    if config is not None:
        source["reference_config"] = _to_plain(config)
    model.save_pretrained(out, extra={"converted_from": source})
    return Converted(out, len(tensors), digest, chosen, "cvae model")


def convert_fisher(
    src: str | Path,
    out: str | Path,
    model_dir: str | Path,
    *,
    key: str | None = None,
    force: bool = False,
) -> Converted:
    """A reference Fisher dict to our ``Fisher`` file for the model in ``model_dir``.

    Names are the model's own (kept as they are) or the reference VAE's ``fc*`` (renamed); other
    reference names (DDPM ``temb.*``, SD ``diffusion_model.*``) have no exact counterpart and are refused.
    The Fisher must have been computed at the model's weights; the file cannot show that.
    """
    from selective_amnesia.core.fisher import Fisher
    from selective_amnesia.models import load_model

    src, out = Path(src), Path(out)
    check_paths(src, out, force)
    model = load_model(model_dir)
    tensors, _, digest, chosen, _ = load_selected(src, key)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) == params:
        values = dict(tensors)
    elif any(k.split(".")[0] in REFERENCE_VAE_NAMES for k in tensors):
        values = map_reference_vae(tensors)
    else:
        sample = sorted(set(tensors) - params)[:3]
        hint = (
            "the reference DDPM/Stable Diffusion UNet has no exact counterpart in our diffusers models"
            if any(k.startswith(("temb.", "diffusion_model.", "model.diffusion_model.")) for k in tensors)
            else f"names like {sample} are neither the model's nor the reference VAE's"
        )
        raise AmnesiaError(
            f"{src} cannot be mapped onto {model_dir}: {hint}; estimate the Fisher with `amnesia fisher`"
        )
    fisher = Fisher(
        {k: v.to(torch.float32) for k, v in values.items()},
        {
            **_source_metadata(src, digest, chosen),
            "estimator": "converted",
            "model_hash": state_hash(model.state_dict()),
        },
    )
    fisher.check_matches(model, source=str(src))
    fisher.save(out)
    return Converted(out, len(values), digest, chosen, "Fisher values")
