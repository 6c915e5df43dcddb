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
    SPLITS,
    DatasetInfo,
    check_split,
    dataset_names,
    parse_class_filter,
    read_dataset,
)
from cdc_serve.datasets import read_image_folder as load_image_folder
from cdc_serve.preprocess import IMAGE_SUFFIXES

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
    sources: list[str] | None = None  # where each image came from (image folders: its file)
    skipped: list[tuple[str, str]] | None = None  # image folders: (file, reason) left out

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
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
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
            sources=None if self.sources is None else [self.sources[i] for i in index.tolist()],
            skipped=self.skipped,
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
    folder: FolderOptions | None = None,
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
        folder: for ``imagefolder:PATH``, the streaming reader's options
            (:class:`FolderOptions`: size, channels, cluster count, cache, strict).

    Mean and std are computed from the returned images.
    """
    check_split(split)
    parse_class_filter(name)  # a bad class list is reported before anything is read
    if limit is not None and limit <= 0:
        raise CDCError(f"limit must be a positive number of images, got {limit}")
    if name.startswith("imagefolder:") and folder is not None:
        data = _load_folder(name, folder)
    else:
        arrays = read_dataset(
            name, root, split, folder_size=size, fetch=_torchvision_download if download else None
        )
        data = ImageData(
            images=torch.from_numpy(np.require(arrays.images, np.uint8, ["C", "W"])),
            labels=None if arrays.labels is None else torch.from_numpy(arrays.labels),
            num_classes=arrays.num_classes,
            name=arrays.name,
            mean=(0.0,),
            std=(1.0,),
            class_names=arrays.class_names,
        )
    if limit is not None and limit < len(data):
        generator = torch.Generator().manual_seed(seed)
        data = data.subset(torch.randperm(len(data), generator=generator)[:limit].sort().values)
    images = data.images
    if size is not None and folder is None:
        images = resize_images(images, size)
    data.images = images.contiguous()  # a memory-mapped folder array stays mapped
    data.mean, data.std = channel_stats(data.images)
    return data


@dataclass
class FolderOptions:
    """How to read an image folder (``cdc_serve.image_folder``) for training."""

    size: tuple[int, int]
    channels: int | None = None
    num_clusters: int | None = None  # required without class sub-folders
    cache_dir: str | None = None  # where the decoded array is kept for the next run
    strict: bool = False
    progress: bool = True
    labels: str | None = None  # a `file,label` CSV (file names relative to the folder)


def _load_folder(name: str, options: FolderOptions) -> ImageData:
    """An image folder through the streaming reader: memory-mapped uint8 images."""
    from cdc_serve.image_folder import read_image_folder

    path = Path(name.split(":", 1)[1]).expanduser()
    read = read_image_folder(
        path, options.size, channels=options.channels, cache_dir=options.cache_dir,
        strict=options.strict, progress=options.progress,
    )  # fmt: skip
    classes = len(read.class_names) if read.class_names else 0
    num_classes = options.num_clusters or classes
    labels = read.labels
    if options.labels is not None:  # for evaluation only: every listed file, kept or skipped
        from cdc_serve.datasets import read_label_csv

        listed = read.sources + [file for file, _ in read.skipped]
        labels = read_label_csv(options.labels, listed)[: len(read.sources)]
    if num_classes < 1:
        raise CDCError(
            f"{path} has no class sub-folders: say how many clusters to find with --num-clusters K"
        )
    return ImageData(
        images=torch.from_numpy(read.images),
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        num_classes=num_classes,
        name=f"imagefolder:{path}",
        mean=(0.0,),
        std=(1.0,),
        class_names=read.class_names if num_classes == classes else None,
        sources=[str(path / s) for s in read.sources],
        skipped=read.skipped,
    )
