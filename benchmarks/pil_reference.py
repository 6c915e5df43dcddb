"""A per-image PIL + torchvision.transforms + DataLoader pipeline like the authors' reference.

The reference CDC code builds three views of every image in its ``Dataset.__getitem__``
with PIL and ``torchvision.transforms`` and batches them with a ``DataLoader`` (worker
processes):

- val: ``ToTensor`` + ``Normalize``;
- weak: ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``;
- strong: ``RandomHorizontalFlip`` + ``RandomResizedCrop`` + 4 random RandAugment ops +
  ``ToTensor`` + ``Normalize`` + Cutout (one square hole, half the image side).

It is the baseline of the training benchmark only; the project's own pipeline is the
batched tensor :class:`cdc_serve_training.augment.Augmenter`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class Cutout:
    """Zero one ``size`` x ``size`` square (clipped at the borders) at a random centre."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img


def reference_transforms(size: int, mean, std, crop_scale=(0.2, 1.0)):
    """The three per-image transforms (val, weak, strong) of the reference pipeline."""
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    val = T.Compose(normalize)
    weak = T.Compose(
        [T.RandomResizedCrop(size, scale=crop_scale), T.RandomHorizontalFlip(), *normalize]
    )
    strong = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomResizedCrop(size, scale=crop_scale),
            T.RandAugment(num_ops=4),
            *normalize,
            Cutout(size // 2),
        ]
    )
    return val, weak, strong


class ThreeViews(Dataset):
    """uint8 ``N x C x H x W`` images -> (val, weak, strong) float tensors, one PIL image at a time."""

    def __init__(self, images: torch.Tensor, mean, std) -> None:
        self.images = images.numpy()
        self.mode = "L" if self.images.shape[1] == 1 else "RGB"
        self.val, self.weak, self.strong = reference_transforms(self.images.shape[-1], mean, std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        arr = self.images[i]
        img = Image.fromarray(arr[0] if self.mode == "L" else arr.transpose(1, 2, 0), self.mode)
        return self.val(img), self.weak(img), self.strong(img)


def reference_loader(
    images: torch.Tensor, mean, std, batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """A shuffling DataLoader over :class:`ThreeViews` yielding ``(val, weak, strong)`` batches."""
    return DataLoader(
        ThreeViews(images, mean, std),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
    )


class PrecomputedViews:
    """Hands views built elsewhere to code that calls ``augmenter.val/weak/strong(x)``.

    The training step is driven with ``x = torch.arange(B)`` (indices into the batch), so
    ``strong(x[chosen])`` returns the chosen rows of the precomputed strong views.
    """

    def __init__(self, val: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor) -> None:
        self._val, self._weak, self._strong = val, weak, strong

    def val(self, idx: torch.Tensor) -> torch.Tensor:
        return self._val[idx]

    def weak(self, idx: torch.Tensor, generator=None) -> torch.Tensor:
        return self._weak[idx]

    def strong(self, idx: torch.Tensor, generator=None) -> torch.Tensor:
        return self._strong[idx]
