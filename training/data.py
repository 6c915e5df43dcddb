"""Datasets as uint8 tensors (``ImageData``): the torch side of :mod:`cdc_serve.datasets`.

The readers of every known dataset (Fashion-MNIST, digits, CIFAR-10/20, STL-10, image
folders), the registry of names (``DATASETS``) and the class filter
(``fashion-mnist[0-7]``) live in :mod:`cdc_serve.datasets` and need numpy and Pillow
only. This module wraps what they read into one ``ImageData``: ``images`` is a uint8
``N x C x H x W`` CPU tensor, ``labels`` an int64 ``N`` tensor (or ``None`` for an
unlabelled folder), plus the per-channel mean and std that the model's preprocessing
uses (``(x / 255 - mean[c]) / std[c]``, see docs/ARCHITECTURE.md). On top of the
readers it adds what needs torch: a seeded random subset (``limit``), resizing
(:func:`resize_images`), the channel statistics and ``--download`` through torchvision.

``split`` is ``"train"``, ``"test"`` or ``"all"`` (train + test merged, as the CDC paper
clusters both). Nothing is downloaded unless ``download=True``; a missing dataset raises
:class:`cdc_serve.CDCError` saying where it looked and how to get the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve.datasets import (
    DATASETS,
    FASHION_CLASSES,
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetInfo,
    check_split,
    dataset_names,
    parse_class_filter,
    read_dataset,
)
from cdc_serve.datasets import read_image_folder as load_image_folder

__all__ = [  # the numpy side is re-exported for the callers that import it from here
    "DATASETS",
    "FASHION_CLASSES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "DatasetInfo",
    "ImageData",
    "channel_stats",
    "dataset_names",
    "load_dataset",
    "load_image_folder",
    "parse_class_filter",
    "resize_images",
]

# ----------------------------------------------------------------------------------------------
# The data container
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """A whole dataset in memory: uint8 images ``N x C x H x W`` on the CPU, with labels."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise CDCError(
                f"{self.name}: images must be a uint8 N x C x H x W tensor, "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise CDCError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index) -> ImageData:
        """The images (and labels) at ``index`` (a slice, a list/array/tensor of ints or a mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = index.long()
        return ImageData(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            num_classes=self.num_classes,
            name=self.name,
            mean=self.mean,
            std=self.std,
            class_names=self.class_names,
        )

    def preprocess(self) -> dict:
        """The preprocessing dict stored in checkpoints and exported metadata."""
        return {
            "input_size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


# ----------------------------------------------------------------------------------------------
# Torch helpers
# ----------------------------------------------------------------------------------------------


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, computed in chunks (float64)."""
    n, c = images.shape[:2]
    if n == 0:
        return tuple([0.5] * c), tuple([0.5] * c)
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, 8192):
        chunk = images[start : start + 8192].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def resize_images(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize uint8 ``N x C x H x W`` images to ``size`` (bilinear, antialiased), keeping uint8.

    Used for example to turn the 8x8 digits into 28x28 out-of-distribution probes for a
    Fashion-MNIST model.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == (h, w):
        return images
    out = torch.nn.functional.interpolate(
        images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _torchvision_download(dataset_class: str, root: Path) -> None:
    """Fetch a dataset's standard files with torchvision (only when the user asked to)."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, dataset_class)
    try:
        if dataset_class == "STL10":
            cls(str(root), split="train", download=True)
        else:
            cls(str(root), train=True, download=True)
    except Exception as exc:  # network errors of every kind
        raise CDCError(f"could not download {dataset_class} to {root}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "all",
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
    *,
    size: int | Sequence[int] | None = None,
) -> ImageData:
    """Load a dataset by name as an :class:`ImageData`.

    Args:
        name: one of ``DATASETS`` or ``"imagefolder:PATH"``, optionally with a class
            filter suffix such as ``"fashion-mnist[0-7]"`` (see :func:`parse_class_filter`).
        root: folder with the dataset's files (default: ``DATASETS[name].default_root``).
        split: ``"train"``, ``"test"`` or ``"all"`` (train + test, as the paper).
        download: fetch missing files with torchvision (never done otherwise).
        limit: keep a seeded random subset of this many images (in their original order).
        seed: seed of that subset.
        size: resize every image to this size (``int`` or ``(H, W)``), e.g. digits to 28.

    Mean and std are computed from the returned images.
    """
    check_split(split)
    parse_class_filter(name)  # a bad class list is reported before anything is read
    if limit is not None and limit <= 0:
        raise CDCError(f"limit must be a positive number of images, got {limit}")
    data = read_dataset(
        name, root, split, folder_size=size, fetch=_torchvision_download if download else None
    )
    images_t = torch.from_numpy(np.require(data.images, np.uint8, ["C", "W"]))
    labels_t = None if data.labels is None else torch.from_numpy(data.labels)
    if limit is not None and limit < len(images_t):
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(images_t), generator=generator)[:limit].sort().values
        images_t = images_t[keep]
        labels_t = None if labels_t is None else labels_t[keep]
    if size is not None:
        images_t = resize_images(images_t, size)
    mean, std = channel_stats(images_t)
    return ImageData(
        images=images_t.contiguous(),
        labels=labels_t,
        num_classes=data.num_classes,
        name=data.name,
        mean=mean,
        std=std,
        class_names=data.class_names,
    )
