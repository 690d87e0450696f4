"""Reading the reference code's legacy files (torch zip, legacy torch format, plain pickles)
without running their code: only the globals a pickled tensor needs are ever resolved."""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import load_tensors
from selective_amnesia.io.safe_pickle import (
    NUMPY_ARRAY_GLOBALS,
    PY3_PROTOCOL2_BYTES_GLOBALS,
    ReadableFile,
    SafeUnpickler,
)

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
    tensor: Tensor = torch._utils._rebuild_tensor_v2(
        storage, offset, size, stride, requires_grad, collections.OrderedDict(), metadata
    )
    return tensor


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
