"""STL-10 from the binary files in a user directory; nothing is downloaded.

``{train,test}_X.bin`` hold raw uint8 images of 96x96x3 with no header: per image the R, G and B planes of
96*96 bytes each, every plane in column-major order (the layout of the original MATLAB arrays), so a plane
read row-major is the transposed image. ``{train,test}_y.bin`` hold one uint8 label per image, 1..10, which
become 0..9 here (index into ``STL10_CLASSES``, the order of ``class_names.txt``). Images stay 96x96:
resizing belongs to the model's config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selective_amnesia.data.locate import find_dataset_dir
from selective_amnesia.data.mnist import ImageDataset
from selective_amnesia.errors import AmnesiaError

STL10_CLASSES: tuple[str, ...] = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)

STL10_DIRNAME = "stl10_binary"
STL10_SIZE = 96
_IMAGE_BYTES = 3 * STL10_SIZE * STL10_SIZE
_EXPECTED = (
    f"expected {STL10_DIRNAME}/train_X.bin, train_y.bin, test_X.bin and test_y.bin "
    "(the binary version from https://cs.stanford.edu/~acoates/stl10/)"
)


def find_stl10_dir(root: str | Path) -> Path:
    """The directory holding the .bin files: ``root/stl10_binary`` or ``root`` itself."""
    markers = [f"{split}_{part}.bin" for split in ("train", "test") for part in "Xy"]
    return find_dataset_dir(
        root,
        name="STL-10",
        subdir=STL10_DIRNAME,
        markers=markers,
        archive="stl10_binary.tar.gz",
        expected=_EXPECTED,
    )


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise AmnesiaError(f"cannot read STL-10 {what} {path}: {e.strerror or e}") from e


def read_stl10_images(path: str | Path) -> np.ndarray:
    """An ``*_X.bin`` file as uint8 images (N, 3, 96, 96) in row-major (C, H, W) order."""
    path = Path(path)
    raw = _read_bytes(path, "images")
    if raw.size == 0 or raw.size % _IMAGE_BYTES:
        raise AmnesiaError(
            f"{path} is truncated or not STL-10: {raw.size} bytes is not a whole number of "
            f"96x96x3 images ({_IMAGE_BYTES} bytes each); re-extract stl10_binary.tar.gz"
        )
    # each plane is stored column-major: read as (C, W, H) and swap the last two axes
    planes = raw.reshape(-1, 3, STL10_SIZE, STL10_SIZE)
    return np.ascontiguousarray(planes.transpose(0, 1, 3, 2))


def read_stl10_labels(path: str | Path) -> np.ndarray:
    """A ``*_y.bin`` file (uint8 labels 1..10) as int64 labels 0..9."""
    path = Path(path)
    raw = _read_bytes(path, "labels")
    if raw.size and (raw.min() < 1 or raw.max() > len(STL10_CLASSES)):
        raise AmnesiaError(
            f"{path}: STL-10 labels must be 1..10, found {int(raw.min())}..{int(raw.max())} "
            "(is this an *_X.bin file?)"
        )
    return raw.astype(np.int64) - 1


def load_stl10(root: str | Path, split: str) -> ImageDataset:
    """STL-10 labelled ``split`` ("train": 5000, "test": 8000) as (N, 3, 96, 96) uint8 images, labels 0..9.

    ``root`` is the directory containing ``stl10_binary/`` or that directory itself.
    """
    if split not in ("train", "test"):
        raise AmnesiaError(f"unknown split {split!r}: use 'train' or 'test'")
    directory = find_stl10_dir(root)
    x_path, y_path = directory / f"{split}_X.bin", directory / f"{split}_y.bin"
    missing = [p.name for p in (x_path, y_path) if not p.is_file()]
    if missing:
        raise AmnesiaError(f"STL-10 in {directory} is incomplete: missing {', '.join(missing)}; {_EXPECTED}")
    labels = read_stl10_labels(y_path)
    images = read_stl10_images(x_path)
    if labels.shape[0] != images.shape[0]:
        raise AmnesiaError(
            f"STL-10 {split} files disagree: {x_path.name} has {images.shape[0]} images, "
            f"{y_path.name} has {labels.shape[0]} labels (a truncated download?)"
        )
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels))
