"""A directory of PNG / JPEG images as an ImageDataset.

Two layouts: class subdirectories named by integer label (``root/0/*.png``, ``root/7/*.jpg``), whose names
become the labels, or a flat folder of images, all labelled -1 (unlabelled). Hidden entries and files with
other extensions are skipped. Images are converted to L (``channels=1``) or RGB (``channels=3``; alpha is
dropped) after applying any EXIF rotation. With ``image_size`` each image is centre-cropped to a square and
resized (bicubic, antialiased) to ``image_size`` x ``image_size``; without it all images must share one size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from selective_amnesia.data.mnist import ImageDataset
from selective_amnesia.errors import AmnesiaError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
UNLABELLED = -1
_MODES = {1: "L", 3: "RGB"}


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_image_folder(root: str | Path) -> list[tuple[Path, int]]:
    """(file, label) pairs in a stable order: by label, then by file name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AmnesiaError(f"image folder {root} does not exist or is not a directory")
    subdirs = sorted((p for p in root.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)
    top_level = _images_in(root)
    if not subdirs:
        entries = [(p, UNLABELLED) for p in top_level]
    else:
        if top_level:
            raise AmnesiaError(
                f"{root} mixes images ({top_level[0].name}, ...) with subdirectories "
                f"({subdirs[0].name}, ...): use either class subdirectories named 0, 1, ... "
                "or a flat folder of images"
            )
        bad = [p.name for p in subdirs if not (p.name.isascii() and p.name.isdigit())]
        if bad:
            raise AmnesiaError(
                f"subdirectories of {root} must be named by integer class label (0, 1, ...), "
                f"got {', '.join(repr(b) for b in bad[:5])}"
            )
        entries = [
            (p, int(d.name)) for d in sorted(subdirs, key=lambda d: int(d.name)) for p in _images_in(d)
        ]
    if not entries:
        where = "in its class subdirectories" if subdirs else "in it"
        raise AmnesiaError(
            f"image folder {root} is empty: no {'/'.join(sorted(IMAGE_EXTENSIONS))} files {where}"
        )
    return entries


def _centre_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _read_image(path: Path, mode: str, image_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise AmnesiaError(f"cannot read image {path}: {e}") from e
    if image_size is not None:
        image = _centre_square(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root: str | Path, image_size: int | None = None, channels: int = 3) -> ImageDataset:
    """Images under ``root`` as uint8 (N, channels, H, W); labels from class subdirectories, else -1."""
    if channels not in _MODES:
        raise AmnesiaError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise AmnesiaError(f"image_size must be a positive integer or None, got {image_size!r}")
    entries = list_image_folder(root)
    arrays: list[np.ndarray] = []
    for path, _ in entries:
        array = _read_image(path, _MODES[channels], image_size)
        if arrays and array.shape != arrays[0].shape:
            first = entries[0][0]
            raise AmnesiaError(
                f"images differ in size: {first} is {arrays[0].shape[2]}x{arrays[0].shape[1]}, "
                f"{path} is {array.shape[2]}x{array.shape[1]} (width x height); set image_size to resize them"
            )
        arrays.append(array)
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    return ImageDataset(torch.from_numpy(np.stack(arrays)), labels)
