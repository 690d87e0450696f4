"""Artifacts: safetensors + JSON, written to a temporary name and renamed into place.

Nothing here uses pickle. Readers turn missing or corrupt files into ``AmnesiaError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        faults.point("io.before_rename")  # the data is written, not yet visible under its name
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def partial_dir(out: str | Path) -> Path:
    """Where the resumable work towards the output file ``out`` is kept until ``out`` is written."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AmnesiaError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AmnesiaError(f"{path} is not valid JSON ({e}); the file is corrupt, recreate it") from None


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Save tensors as safetensors; metadata values are stored as JSON strings."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=meta)
        except SafetensorError as e:  # an I/O failure (full disk...) surfaces as OSError with its errno
            found = re.search(r"os error (\d+)", str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata (as strings); corrupt files raise ``AmnesiaError``."""
    path = Path(path)
    if not path.is_file():
        raise AmnesiaError(f"{path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise AmnesiaError(f"{path} is not a readable safetensors file ({e}); recreate it") from None


def cached_tensor(
    path: Path | None, key: str, name: str, make: Callable[[], torch.Tensor], *, save: bool = True
) -> tuple[torch.Tensor, bool]:
    """The tensor ``name`` stored at ``path`` under ``key``, else ``make()`` (stored there when ``save``).

    Returns the tensor and whether it was made now. A file saved under another key is replaced.
    """
    if path is not None and path.is_file():
        stored, meta = load_tensors(path)
        if meta.get("key") == key and name in stored:
            return stored[name], False
    tensor = make()
    if path is not None and save:
        save_tensors(path, {name: tensor.contiguous()}, {"key": key})
    return tensor, True


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def environment() -> dict[str, str]:
    """Package versions written into every output."""
    import numpy
    import safetensors

    import selective_amnesia

    return {
        "selective_amnesia": selective_amnesia.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
