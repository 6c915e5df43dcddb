"""The reference implementation's input pipeline: per-image torchvision transforms on PIL
images behind a DataLoader. ``benchmarks/training_bench.py`` times it against the batched
tensor views of ``cdc_serve_training.augment.Augmenter``; nothing in training uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdc_serve_training.augment import Augmenter


class _Cutout:
    """One square hole of ``length`` px set to 0 on a normalised C x H x W tensor."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.length // 2
        t = t.clone()
        t[:, max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 0
        return t


class PILReferencePipeline(torch.utils.data.Dataset):
    """Per-image torchvision transforms on PIL images, as the reference code feeds its model.

    ``PILReferencePipeline(data, "strong").loader(batch_size, num_workers)`` yields
    ``(views, index)`` batches; ``view`` is ``"val"``, ``"weak"``, ``"strong"`` or ``"moco"``
    or a tuple of them (one tensor per view).
    """

    def __init__(
        self, data, view: str | Sequence[str] = "strong", aug: Augmenter | None = None
    ) -> None:
        import torchvision.transforms as T

        self.images = data.images
        aug = aug or Augmenter(data.size, data.mean, data.std)
        size, c = data.size, data.channels
        tail = [T.ToTensor(), T.Normalize(aug.mean, aug.std)]
        jitter = T.ColorJitter(*aug.jitter) if c == 3 else T.ColorJitter(*aug.jitter[:2])
        pipelines = {
            "val": T.Compose(tail),
            "weak": T.Compose(
                [
                    T.RandomResizedCrop(size, scale=aug.weak_crop_scale),
                    T.RandomHorizontalFlip(),
                    *tail,
                ]
            ),
            "strong": T.Compose(
                [
                    T.RandomHorizontalFlip(),
                    T.RandomResizedCrop(size, scale=aug.crop_scale),
                    T.RandAugment(num_ops=aug.strong_ops),
                    *tail,
                    *([_Cutout(aug.cutout)] if aug.cutout > 0 else []),
                ]
            ),
            "moco": T.Compose(
                [
                    T.RandomResizedCrop(size, scale=aug.crop_scale),
                    T.RandomHorizontalFlip(),
                    T.RandomApply([jitter], p=aug.jitter_p),
                    *([T.RandomGrayscale(aug.grayscale_p)] if c == 3 else []),
                    *(
                        [T.RandomApply([T.GaussianBlur(aug.blur_kernel, (0.1, 2.0))], p=0.5)]
                        if aug.blur
                        else []
                    ),
                    *tail,
                ]
            ),
        }
        self.views = (view,) if isinstance(view, str) else tuple(view)
        self.transforms = [pipelines[v] for v in self.views]
        self.mode = "L" if c == 1 else "RGB"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        from PIL import Image

        a = self.images[i].numpy()
        img = Image.fromarray(a[0] if self.mode == "L" else a.transpose(1, 2, 0), self.mode)
        views = [t(img) for t in self.transforms]
        return (views[0] if len(views) == 1 else tuple(views)), i

    def loader(self, batch_size: int, num_workers: int = 2, shuffle: bool = True, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            self,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            generator=generator,
            drop_last=True,
            persistent_workers=num_workers > 0,
        )
