"""Folders of real images for the tests: scikit-learn's digits as coloured PNG/JPEG files of
random sizes, with optional class sub-folders and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_folder(
    root: Path, n: int = 200, *, classes: bool = False, broken: bool = True, seed: int = 0
) -> tuple[Path, np.ndarray]:
    """``n`` digits as RGB files (random colours, 16-64 px, PNG and JPEG) in ``root``.

    ``classes``: one sub-folder per digit. ``broken``: also a zero-byte file, a truncated
    JPEG and a text file named like an image. Returns the folder and the true labels in
    the folder's sorted listing order.
    """
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names, labels = [], []
    for i in range(n):
        gray = digits.images[i] / 16.0
        fg, bg = rng.integers(128, 256, 3), rng.integers(0, 96, 3)
        rgb = (gray[..., None] * fg + (1 - gray[..., None]) * bg).astype(np.uint8)
        side = int(rng.integers(16, 65))
        image = Image.fromarray(rgb).resize((side, side), Image.BILINEAR)
        label = int(digits.target[i])
        folder = root / f"digit{label}" if classes else root
        folder.mkdir(exist_ok=True)
        name = folder / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png")
        image.save(name, quality=95)
        names.append(name)
        labels.append(label)
    if broken:
        bad = root / "digit0" if classes else root
        (bad / "zz-empty.png").write_bytes(b"")
        jpeg = next(p for p in names if p.suffix == ".jpg")
        (bad / "zz-truncated.jpg").write_bytes(jpeg.read_bytes()[:100])
        (bad / "zz-text.png").write_text("not an image")
    order = np.argsort([str(p) for p in names], kind="stable")
    return root, np.asarray(labels)[order]
