"""CIFAR-10 from the "python version" batches in a user directory; nothing is downloaded.

Each batch file is a pickle (Python 2, protocol 2) of a dict: ``data`` a uint8 array (N, 3072) whose rows
hold the R, G and B planes of a 32x32 image in row-major order, ``labels`` a list of ints in 0..9, plus
``batch_label`` and ``filenames``. The keys are Python 2 ``str``, so they arrive as ``str`` (latin-1) from
the original files and as ``bytes`` from batches re-written by Python 3; both are accepted. The pickle is
read with ``safe_pickle.SafeUnpickler`` limited to numpy arrays and bytes: a tampered batch cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selective_amnesia.data.locate import find_dataset_dir
from selective_amnesia.data.mnist import ImageDataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.safe_pickle import (
    NUMPY_ARRAY_GLOBALS,
    PY3_PROTOCOL2_BYTES_GLOBALS,
    UnsafePickleError,
    safe_load,
)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_BATCHES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_GLOBALS = NUMPY_ARRAY_GLOBALS | PY3_PROTOCOL2_BYTES_GLOBALS
_EXPECTED = (
    f"expected {CIFAR10_DIRNAME}/data_batch_1..5 and test_batch "
    "(the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html)"
)


def find_cifar10_dir(root: str | Path) -> Path:
    """The directory holding the batch files: ``root/cifar-10-batches-py`` or ``root`` itself."""
    markers = [name for names in CIFAR10_BATCHES.values() for name in names]
    return find_dataset_dir(
        root,
        name="CIFAR-10",
        subdir=CIFAR10_DIRNAME,
        markers=markers,
        archive="cifar-10-python.tar.gz",
        expected=_EXPECTED,
    )


def _key(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = safe_load(f, _CIFAR_GLOBALS, encoding="latin1")
    except OSError as e:
        raise AmnesiaError(f"cannot read CIFAR-10 batch {path}: {e.strerror or e}") from e
    except UnsafePickleError as e:
        raise AmnesiaError(
            f"{path} was refused ({e}): a CIFAR-10 batch holds only arrays and lists, so this file is "
            "damaged or was tampered with; re-extract cifar-10-python.tar.gz from the official site"
        ) from e
    except Exception as e:  # a damaged or hostile pickle can raise almost anything; none of it runs code
        raise AmnesiaError(
            f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
            "re-extract cifar-10-python.tar.gz"
        ) from e
    if not isinstance(raw, dict):
        raise AmnesiaError(f"{path} is not a CIFAR-10 batch: it holds a {type(raw).__name__}, not a dict")
    batch = {_key(k): v for k, v in raw.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if data is None or labels is None:
        raise AmnesiaError(f"{path} is not a CIFAR-10 batch: no 'data' and 'labels' entries (CIFAR-100?)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise AmnesiaError(
            f"{path}: 'data' should be a uint8 array (N, 3072), got {type(data).__name__} {shape}"
        )
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError, OverflowError) as e:
        raise AmnesiaError(f"{path}: 'labels' is not a list of integers ({e})") from e
    if y.size and y.dtype.kind not in "iu":
        raise AmnesiaError(f"{path}: 'labels' is not a list of integers (found {y.dtype} values)")
    y = y.astype(np.int64)
    if y.shape != (data.shape[0],):
        raise AmnesiaError(f"{path}: {data.shape[0]} images but 'labels' has shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise AmnesiaError(f"{path}: labels must be in 0..9, found {int(y.min())}..{int(y.max())}")
    return data.reshape(-1, 3, 32, 32), y


def load_cifar10(root: str | Path, split: str) -> ImageDataset:
    """CIFAR-10 ``split`` ("train": 50k from data_batch_1..5, "test": 10k) as (N, 3, 32, 32) uint8 images.

    ``root`` is the directory containing ``cifar-10-batches-py/`` or that directory itself.
    """
    if split not in CIFAR10_BATCHES:
        raise AmnesiaError(f"unknown split {split!r}: use 'train' or 'test'")
    directory = find_cifar10_dir(root)
    names = CIFAR10_BATCHES[split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise AmnesiaError(
            f"CIFAR-10 in {directory} is incomplete: missing {', '.join(missing)}; {_EXPECTED}"
        )
    parts = [read_cifar_batch(directory / name) for name in names]
    # concatenate (or copy) so the tensor owns writable memory, whatever the pickle produced
    images = np.concatenate([x for x, _ in parts]) if len(parts) > 1 else parts[0][0].copy()
    labels = np.concatenate([y for _, y in parts])
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
