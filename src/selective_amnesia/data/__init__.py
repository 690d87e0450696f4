"""Datasets as uint8 image tensors (N, C, H, W) with int64 labels; nothing is downloaded."""

from selective_amnesia.data.mnist import ImageDataset, load_dataset

__all__ = ["ImageDataset", "load_dataset"]
