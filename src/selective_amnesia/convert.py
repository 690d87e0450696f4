"""``amnesia convert``: legacy checkpoints of the paper's reference code to safetensors, safely, and Stable
Diffusion between its single-file (CompVis/A1111) and diffusers layouts.

The reference code (github clear-nus/selective-amnesia) writes these files; what each holds was read from
its sources (paths relative to that repository):

* MNIST VAE, ``vae/train_cvae.py`` and ``vae/train_forget.py``: ``torch.save({"model": state_dict,
  "config": argparse.Namespace}, "ckpts/ckpt.pt")``. The state dict is ``OneHotCVAE`` (``vae/model.py``):
  ``fc1 fc2 fc31 fc32 fc4 fc5 fc6`` ``.weight/.bias``; the Namespace holds ``x_dim h_dim1 h_dim2 z_dim``,
  ``dataset`` and its run directories.
* VAE Fisher, ``vae/calculate_fim.py``: ``pickle.dump(fisher_dict)`` (plain pickle, not ``torch.save``)
  of ``{parameter name: tensor}`` to ``fisher_dict.pkl``, per-sample squared gradients averaged.
* DDPM, ``ddpm/runners/diffusion.py``: ``torch.save([model.state_dict(), optimizer.state_dict(), step,
  (ema_helper.state_dict())], "ckpts/ckpt.pth")``, every name prefixed ``module.`` (``DataParallel``);
  its ``fisher_dict.pkl`` is again a plain pickle with ``module.`` names.
* Stable Diffusion, ``sd/main_forget.py`` (PyTorch Lightning 1.4.2, ``sd/environment.yaml``): a Lightning
  ``.ckpt`` with the CompVis weights under ``"state_dict"``; ``sd/ldm/models/diffusion/ddpm_fim.py`` and
  ``sd/combine_fisher_dict.py`` write ``full_fisher_dict.pkl`` (plain pickle, highest protocol) keyed by
  ``diffusion_model.*``.

What is supported:

* ``--to safetensors`` (every format above): the chosen state dict (``--key``; by default ``state_dict``
  or ``model`` of a dict, element 0 of the DDPM list, else everything) flattened to dotted names, a
  ``module.`` prefix common to all names dropped, written as one ``.safetensors`` whose metadata names the
  source file and its sha256. A converted CompVis ``.ckpt`` can go to diffusers' ``from_single_file``.
* ``--to cvae``: a reference MNIST VAE checkpoint to our model directory. The architectures are the same
  (``models/cvae.py`` concatenates ``[x, onehot]`` and ``[z, onehot]`` in the same order and ends in a
  sigmoid), so the mapping is a renaming, checked by loading with ``strict=True``.
* ``--to fisher --model DIR``: a reference VAE Fisher onto our CVAE parameter names, or any Fisher whose
  names already are the model's; checked with ``Fisher.check_matches``.

* ``--to diffusers --config DIR``: a CompVis/A1111 single-file Stable Diffusion 1.x/2.x/XL checkpoint
  (``.safetensors``, or a ``.ckpt`` read here weights-only and handed on as safetensors) to a stock
  diffusers directory through diffusers' ``from_single_file``; ``DIR`` is a local diffusers directory of
  the same architecture that supplies the component configs, tokenizer(s) and scheduler, so nothing is
  downloaded. Components the file lacks come from ``DIR`` and the summary says so.
* ``--to single-file``: a diffusers SD 1.x/2.x/XL pipeline directory to one original-layout
  ``.safetensors`` (UNet, VAE, text encoder(s) under LDM names), the inverse of diffusers' converters and
  checked with them before it is written (section "Stable Diffusion single files" below).

Not supported: the reference DDPM UNet cannot be mapped onto our diffusers ``UNet2DModel``. It projects
``concat(silu(t_emb), silu(c_emb))`` in every residual block where diffusers adds the class embedding to
the time embedding before one projection, so its weights (and Fisher) have no exact counterpart; convert
them with ``--to safetensors`` only. Likewise the Stable Diffusion Fisher is not renamed to diffusers
names. Nothing here trains or evaluates; a converted Fisher must belong to the converted weights.

Safety: files are read only by ``torch.load(..., weights_only=True)`` (zip or legacy torch format) or, for
plain pickles, by an unpickler that resolves exactly the globals a pickled tensor needs (see
``_TensorUnpickler``). No other global is ever resolved; a file naming one is refused.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import math
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selective_amnesia.data.safe_pickle import (
    NUMPY_ARRAY_GLOBALS,
    PY3_PROTOCOL2_BYTES_GLOBALS,
    ReadableFile,
    SafeUnpickler,
)
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io import load_tensors, save_tensors, state_hash

TARGETS = ("safetensors", "fisher", "cvae", "diffusers", "single-file")

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

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format starts with a pickled magic number (0x1950a86a20f9469cfc6c) at protocol 2.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


class _Inert:
    """Stand-in for a class a checkpoint only names (Lightning 1.4 keys callback states by class)."""

    marker = ""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass  # the state is dropped: nothing of it is needed to convert weights


def _inert(full_name: str) -> type[_Inert]:
    return type(full_name.rsplit(".", 1)[-1], (_Inert,), {"marker": full_name})


# Globals beyond torch's weights_only defaults that the reference files name. argparse.Namespace only
# stores attributes (the VAE config); the Lightning callback classes are replaced by inert stand-ins.
_TORCH_EXTRA_GLOBALS: list[Any] = [
    argparse.Namespace,
    *(
        (_inert(name), name)
        for name in (
            "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
            "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
        )
    ),
]


# ---------------------------------------------------------------------------------------------- loading


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _storage_from_bytes(data: object) -> Any:
    # Plain pickle stores a storage as torch.save bytes (legacy format) passed to
    # torch.storage._load_from_bytes, which would load them with weights_only=False.
    if type(data) is not bytes:
        raise _RefusedGlobal("torch.storage._load_from_bytes (called with a non-bytes argument)")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _RefusedGlobal("torch.storage._load_from_bytes (the bytes hold no tensor storage)")
    return storage


def _rebuild_tensor(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
) -> Tensor:
    # Check every argument so a crafted pickle cannot smuggle hooks (callables) or odd objects through.
    def ints(v: object) -> bool:
        return isinstance(v, tuple) and all(type(i) is int for i in v)

    if (
        not isinstance(storage, torch.storage.TypedStorage)
        or type(offset) is not int
        or not (ints(size) and ints(stride))
        or type(requires_grad) is not bool
        or not (isinstance(hooks, dict) and not hooks)
        or not (metadata is None or isinstance(metadata, dict))
    ):
        raise _RefusedGlobal("torch._utils._rebuild_tensor_v2 (called with unexpected arguments)")
    return torch._utils._rebuild_tensor_v2(
        storage, offset, size, stride, requires_grad, collections.OrderedDict(), metadata
    )


_TENSOR_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _TensorUnpickler(SafeUnpickler):
    """Plain pickles of tensors (``pickle.dump`` of a dict of tensors).

    A tensor pickles as ``torch._utils._rebuild_tensor_v2(torch.storage._load_from_bytes(b), ...)`` with
    an empty ``collections.OrderedDict`` of hooks. Those three resolve to checked functions here;
    ``_load_from_bytes`` reads ``b`` with ``torch.load(weights_only=True)``. ``SafeUnpickler`` adds numpy
    arrays and protocol-2 ``bytes``; every other global is refused.
    """

    def __init__(self, file: ReadableFile) -> None:
        super().__init__(file, allowed=NUMPY_ARRAY_GLOBALS | PY3_PROTOCOL2_BYTES_GLOBALS, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[(module, name)]
        try:
            return super().find_class(module, name)
        except pickle.UnpicklingError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _refusal(path: Path, name: str) -> AmnesiaError:
    return AmnesiaError(
        f"{path} names Python global {name}: refusing to load (it could run code). If you trust the file, "
        "convert it where it was made with safetensors.torch.save_file(state_dict, 'out.safetensors')"
    )


def _unsafe_globals_in_zip(path: Path, error: Exception) -> list[str]:
    """The globals torch refused, listed without running the pickle (or parsed from the error)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a broken archive: fall back to the message
        return re.findall(r"GLOBAL (\S+)", str(error)) or re.findall(r"Unsupported class (\S+)", str(error))


def load_legacy(path: str | Path) -> Any:
    """Load a torch checkpoint (zip or legacy format), a plain pickle of tensors, or a safetensors file.

    Torch files go through ``torch.load(map_location="cpu", weights_only=True)``; plain pickles through
    ``_TensorUnpickler``. Unsafe, truncated or unrecognised files raise ``AmnesiaError``.
    """
    path = Path(path)
    if not path.is_file():
        raise AmnesiaError(f"{path} not found: pass the legacy .pt/.pth/.ckpt/.pkl file to convert")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return load_tensors(path)[0]  # already safetensors (e.g. a generic conversion fed to --to fisher)
    # A hostile or damaged file can make an unpickler raise nearly anything; every failure while loading
    # is about the file, so each becomes an AmnesiaError (never a traceback).
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        try:
            with torch.serialization.safe_globals(_TORCH_EXTRA_GLOBALS):
                return torch.load(
                    path, map_location="cpu", weights_only=True, mmap=head.startswith(_ZIP_MAGIC)
                )
        except pickle.UnpicklingError as e:
            with torch.serialization.safe_globals(_TORCH_EXTRA_GLOBALS):  # list only what torch refused
                names = _unsafe_globals_in_zip(path, e) if head.startswith(_ZIP_MAGIC) else []
            names = names or re.findall(r"GLOBAL (\S+)", str(e))
            if names:
                raise _refusal(path, ", ".join(names)) from None
            raise _damaged(path, e) from None
        except Exception as e:
            raise _damaged(path, e) from None
    if head[:1] == b"\x80":  # pickle protocol >= 2
        try:
            with open(path, "rb") as f:
                return _TensorUnpickler(f).load()
        except _RefusedGlobal as e:
            raise _refusal(path, e.name) from None
        except Exception as e:
            raise _damaged(path, e) from None
    raise AmnesiaError(
        f"{path} is not a PyTorch checkpoint, a pickle (protocol >= 2) or a safetensors file: "
        "pass the .pt/.pth/.ckpt/.pkl file the reference code wrote"
    )


def _damaged(path: Path, error: Exception) -> AmnesiaError:
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return AmnesiaError(
        f"{path} cannot be read ({type(error).__name__}: {first}): the file is truncated, corrupt or "
        "holds unsupported objects; copy it again from its source"
    )


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


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
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


def _check_paths(src: Path, out: Path, force: bool, suffix: str | None = ".safetensors") -> None:
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


def _load_selected(src: Path, key: str | None) -> tuple[dict[str, Tensor], list[str], str, str, Any]:
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
    _check_paths(src, out, force)
    tensors, skipped, digest, chosen, config = _load_selected(src, key)
    meta = _source_metadata(src, digest, chosen)
    if skipped:
        meta["skipped_non_tensors"] = skipped[:50]
    if config is not None:
        meta["reference_config"] = _to_plain(config)
    save_tensors(out, _unshare(tensors), meta)
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
    _check_paths(src, out, force, suffix=None)
    if out.is_file():
        raise AmnesiaError(f"--out {out} is a file: --to cvae writes a model directory")
    tensors, _, digest, chosen, config = _load_selected(src, key)
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
    from selective_amnesia.fisher import Fisher
    from selective_amnesia.models import load_model

    src, out = Path(src), Path(out)
    _check_paths(src, out, force)
    model = load_model(model_dir)
    tensors, _, digest, chosen, _ = _load_selected(src, key)
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
    unet: Any
    vae: Any
    text_encoders: list[Any]  # one (SD 1.x/2.x) or two (SDXL)


def _read_pipeline_index(directory: Path, flag: str) -> dict[str, Any]:
    from selective_amnesia.io import read_json

    if not (directory / "model_index.json").is_file():
        raise AmnesiaError(f"{flag} {directory} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json(directory / "model_index.json")
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
) -> list[tuple[str, dict[str, Tensor], Any]]:
    """What diffusers' own single-file converters make of ``ckpt``, per component, next to the model."""
    from diffusers.loaders import single_file_utils as sfu

    def text(model: Any, converted: dict[str, Tensor]) -> dict[str, Tensor]:
        if not hasattr(model, "text_model"):  # the loader drops the level for flattened models too
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        return converted

    got = [
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
    _check_paths(src, out, force)
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
    save_tensors(out, _unshare(ckpt), meta)
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
    if not src.is_file():
        raise AmnesiaError(f"{src} not found: pass the single-file .safetensors or .ckpt checkpoint")
    _check_paths(src, out, force, suffix=None)
    if out.is_file():
        raise AmnesiaError(f"--out {out} is a file: --to diffusers writes a pipeline directory")
    if out.exists() and config.exists() and out.resolve() == config.resolve():
        raise AmnesiaError("--out is the --config directory: write the pipeline somewhere else")
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
        if _is_safetensors(src):
            if key is not None:
                raise AmnesiaError("--key selects part of a .ckpt; a .safetensors file is read whole")
            names, path, chosen, digest = _safetensors_keys(src), src, "", file_sha256(src)
        else:  # never handed to diffusers: read here weights-only, passed on as safetensors
            tensors, _, digest, chosen, _ = _load_selected(src, key)
            path = work / "checkpoint.safetensors"
            save_tensors(path, _unshare(tensors), {"format": "pt"})
            names = list(tensors)
        if not any(n.startswith(LDM_UNET) for n in names):
            raise AmnesiaError(
                f"{src} holds no {LDM_UNET}* weights: not a single-file Stable Diffusion checkpoint "
                "(a diffusers directory is used as it is; other files convert with --to safetensors)"
            )
        # a component the file lacks (a UNet-only fine-tune) comes from --config, said in the summary
        parts = ["vae", *_text_encoder_names(str(index["_class_name"]))]
        absent = [p for p in parts if not any(n.startswith(_FILE_PREFIXES[p]) for n in names)]
        given = {p: _component(config, index, p) for p in absent}
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
        staged = work / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):  # keep the stock files transformers 5 no longer writes
            if (config / name).is_dir() and (staged / name).is_dir():
                for f in (config / name).iterdir():
                    if f.is_file() and not (staged / name / f.name).exists():
                        shutil.copyfile(f, staged / name / f.name)
        if out.exists():  # --force, or an empty directory
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kind = "tensors into a diffusers pipeline"
    if absent:
        kind += f" ({', '.join(absent)} taken from --config: not in the file)"
    return Converted(out, len(names), digest, chosen, kind)


# ------------------------------------------------------------------------------------------------- CLI


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``amnesia convert``."""
    p.add_argument(
        "source",
        help="legacy file of the reference code: ckpt.pt / ckpt.pth / .ckpt / fisher .pkl; a single-file "
        "SD checkpoint .safetensors/.ckpt (--to diffusers); a diffusers SD directory (--to single-file)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="output .safetensors file (a model directory with --to cvae, a pipeline directory with "
        "--to diffusers)",
    )
    p.add_argument(
        "--to",
        choices=TARGETS,
        default="safetensors",
        help="safetensors: the tensors as they are; cvae: a reference MNIST VAE as our model directory; "
        "fisher: a reference Fisher dict as our Fisher for --model; diffusers: a CompVis/A1111 single-file "
        "SD 1.x/2.x/XL checkpoint as a diffusers pipeline directory (needs --config); single-file: a "
        "diffusers SD 1.x/2.x/XL pipeline directory as one original-layout .safetensors",
    )
    p.add_argument(
        "--key",
        default=None,
        help="dotted path of the part to convert, e.g. state_dict, model, 0 or 3 (the DDPM EMA weights); "
        "'all' for the whole file; default: state_dict/model/first list item if present, else all",
    )
    p.add_argument("--model", default=None, help="model directory the Fisher belongs to (--to fisher)")
    p.add_argument(
        "--config",
        default=None,
        help="--to diffusers: a local diffusers directory of the same architecture; its component "
        "configs, tokenizer(s) and scheduler go with the file's weights (nothing is downloaded)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def cmd_convert(args: argparse.Namespace) -> int:
    """Run the conversion ``args.to`` names and print one summary line."""
    if args.to == "fisher":
        if not args.model:
            raise AmnesiaError("--to fisher needs --model DIR, the model the Fisher belongs to")
        done = convert_fisher(args.source, args.out, args.model, key=args.key, force=args.force)
    elif args.model:
        raise AmnesiaError("--model only applies to --to fisher")
    elif args.config and args.to != "diffusers":
        raise AmnesiaError("--config only applies to --to diffusers")
    elif args.to == "diffusers":
        if not args.config:
            raise AmnesiaError(
                "--to diffusers needs --config DIR, a local diffusers directory of the same architecture "
                "(e.g. from `amnesia world tiny-sd` or the model's own diffusers release)"
            )
        done = convert_single_file_to_diffusers(
            args.source, args.out, config=args.config, key=args.key, force=args.force
        )
    elif args.to == "single-file":
        if args.key is not None:
            raise AmnesiaError("--key does not apply to --to single-file: the whole pipeline is exported")
        done = export_single_file(args.source, args.out, force=args.force)
    elif args.to == "cvae":
        done = convert_to_cvae(args.source, args.out, key=args.key, force=args.force)
    else:
        done = convert_to_safetensors(args.source, args.out, key=args.key, force=args.force)
    part = f" [{done.key}]" if done.key else ""
    digest = f" (sha256 {done.source_sha256[:12]})" if done.source_sha256 else ""
    print(f"converted {Path(args.source).name}{part}{digest} -> {done.out}: {done.num_tensors} {done.kind}")
    return 0


__all__ = [
    "REFERENCE_VAE_NAMES",
    "Converted",
    "SDComponents",
    "add_convert_arguments",
    "cmd_convert",
    "check_single_file",
    "clip_to_ldm",
    "convert_fisher",
    "convert_single_file_to_diffusers",
    "convert_to_cvae",
    "convert_to_safetensors",
    "export_single_file",
    "file_sha256",
    "flatten_tensors",
    "load_legacy",
    "map_reference_vae",
    "open_clip_to_ldm",
    "pipeline_to_ldm",
    "reference_vae_config",
    "select",
    "strip_data_parallel",
    "unet_to_ldm",
    "vae_to_ldm",
]
