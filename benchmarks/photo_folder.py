"""Build folders of real images for the folder benchmarks and the issue-14 quality run.

``python -m benchmarks.photo_folder fmnist OUT [--n 10000]``: Fashion-MNIST test images as
a flat, unlabelled folder: each image in a random foreground and background colour,
resized to a random side of 20-120 px, saved as JPEG or PNG (alternating); the labels go
to ``OUT.labels.csv`` (``file,label``), outside the folder.

``python -m benchmarks.photo_folder photos OUT [--n 200]``: synthetic 12-MP JPEG photos
(4000 x 3000) of two kinds of content (smooth horizontal or vertical colour gradients
with noise), for the reader's memory and draft-mode rows, plus a zero-byte and a
truncated JPEG.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
FMNIST_TEST_LABELS = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"


def fmnist_folder(out: Path, n: int = 10_000, seed: int = 0) -> Path:
    """Coloured, resized Fashion-MNIST test images in ``out``; labels in ``out.labels.csv``."""
    from cdc_serve.idx import read_idx

    images, labels = read_idx(FMNIST_TEST)[:n], read_idx(FMNIST_TEST_LABELS)[:n]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = image[..., None] / 255.0
        rgb = np.rint(t * fg + (1 - t) * bg).astype(np.uint8)
        side = int(rng.integers(20, 121))
        name = f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png"
        Image.fromarray(rgb).resize((side, side), Image.BILINEAR).save(out / name, quality=90)
        rows.append((name, int(label)))
    with open(out.with_name(out.name + ".labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *rows])
    return out


def photo_folder(out: Path, n: int = 200, size: tuple[int, int] = (4000, 3000), seed: int = 0):
    """``n`` synthetic JPEG photos of two kinds, a zero-byte and a truncated JPEG."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(n):
        ramp = np.linspace(0, 1, width if i % 2 else height, dtype=np.float32)
        field = ramp[None, :] if i % 2 else ramp[:, None]  # kind 0: vertical, 1: horizontal
        colour = rng.uniform(60, 255, 3).astype(np.float32)
        small = (field[..., None] * colour).astype(np.float32)
        image = np.broadcast_to(small, (height, width, 3)).copy()
        image += rng.normal(0, 12, (height // 8, width // 8, 1)).repeat(8, 0).repeat(8, 1)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            out / f"{i:04d}.jpg", quality=85
        )
    (out / "empty.jpg").write_bytes(b"")
    (out / "truncated.jpg").write_bytes((out / "0000.jpg").read_bytes()[:5000])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["fmnist", "photos"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    if args.kind == "fmnist":
        print(fmnist_folder(args.out, args.n or 10_000))
    else:
        print(photo_folder(args.out, args.n or 200))


if __name__ == "__main__":
    main()
