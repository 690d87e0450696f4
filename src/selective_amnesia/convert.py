"""``amnesia convert``: turn a legacy checkpoint of the paper's reference code into safetensors, safely.

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

TARGETS = ("safetensors", "fisher", "cvae")

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


# ------------------------------------------------------------------------------------------------- CLI


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``amnesia convert``."""
    p.add_argument(
        "source", help="legacy file of the reference code: ckpt.pt / ckpt.pth / .ckpt / fisher .pkl"
    )
    p.add_argument(
        "-o", "--out", required=True, help="output .safetensors file (a model directory with --to cvae)"
    )
    p.add_argument(
        "--to",
        choices=TARGETS,
        default="safetensors",
        help="safetensors: the tensors as they are; cvae: a reference MNIST VAE as our model directory; "
        "fisher: a reference Fisher dict as our Fisher for --model",
    )
    p.add_argument(
        "--key",
        default=None,
        help="dotted path of the part to convert, e.g. state_dict, model, 0 or 3 (the DDPM EMA weights); "
        "'all' for the whole file; default: state_dict/model/first list item if present, else all",
    )
    p.add_argument("--model", default=None, help="model directory the Fisher belongs to (--to fisher)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def cmd_convert(args: argparse.Namespace) -> int:
    """Run the conversion ``args.to`` names and print one summary line."""
    if args.to == "fisher":
        if not args.model:
            raise AmnesiaError("--to fisher needs --model DIR, the model the Fisher belongs to")
        done = convert_fisher(args.source, args.out, args.model, key=args.key, force=args.force)
    elif args.model:
        raise AmnesiaError("--model only applies to --to fisher")
    elif args.to == "cvae":
        done = convert_to_cvae(args.source, args.out, key=args.key, force=args.force)
    else:
        done = convert_to_safetensors(args.source, args.out, key=args.key, force=args.force)
    part = f" [{done.key}]" if done.key else ""
    print(
        f"converted {Path(args.source).name}{part} (sha256 {done.source_sha256[:12]}) -> {done.out}: "
        f"{done.num_tensors} {done.kind}"
    )
    return 0


__all__ = [
    "REFERENCE_VAE_NAMES",
    "Converted",
    "add_convert_arguments",
    "cmd_convert",
    "convert_fisher",
    "convert_to_cvae",
    "convert_to_safetensors",
    "file_sha256",
    "flatten_tensors",
    "load_legacy",
    "map_reference_vae",
    "reference_vae_config",
    "select",
    "strip_data_parallel",
]
