"""Reading a folder of photos for training (``cdc_serve.image_folder``), side by side.

Two goals of issue 14, each a ratio of contenders timed in alternating rounds:

- **draft mode**: 12-MP JPEGs (4000 x 3000) decoded for a 32-px input with Pillow's
  ``Image.draft`` (the JPEG decoder scales by 1/8 while decoding) against full decoding
  then resizing; images per second, one process (goal >= 5x);
- **parallel decoding**: ``read_image_folder`` over a folder of 1024 x 768 PNGs (a format
  without reduced-scale decoding: every pixel is decoded) with one worker process per
  core against one worker (goal >= 1.6x on 2 cores); the pool's start is part of each
  round, as a user pays it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import BenchSettings, Section, cpu_cores, fmt_rate, fmt_ratio, md_table, met

DRAFT_GOAL, PARALLEL_GOAL = 5.0, 1.6


def _photos(
    folder: Path, n: int, size: tuple[int, int], seed: int = 0, suffix: str = ".jpg"
) -> list[Path]:
    """``n`` smooth random pictures of ``size`` (W, H) as JPEG (quality 85) or PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        base = Image.fromarray(np.roll(small, i, axis=1)).resize((width, height), Image.BILINEAR)
        paths.append(folder / f"{i:04d}{suffix}")
        base.save(paths[-1], quality=85, compress_level=1)
    return paths


def _decode_rate(paths: list[Path], draft: bool) -> callable:
    from cdc_serve.preprocess import open_image, to_model_image

    def work(n: int) -> int:
        for i in range(n):
            image = open_image(paths[i % len(paths)], draft=32 if draft else None)
            to_model_image(image, 3, (32, 32))
        return n

    return work


def _folder_rate(folder: Path, workers: int, count: int) -> callable:
    from cdc_serve.image_folder import read_image_folder

    def work(n: int) -> int:
        for _ in range(n):
            read_image_folder(folder, (32, 32), channels=3, workers=workers, progress=False)
        return n * count

    return work


def run(settings: BenchSettings) -> Section:
    from benchmarks.common import interleaved

    n_photos, n_files = (4, 64) if settings.quick else (12, 200)
    with tempfile.TemporaryDirectory(prefix="cdc-bench-folder-") as tmp:
        photos = _photos(Path(tmp) / "photos", n_photos, (4000, 3000))
        draft = interleaved(
            {"draft": _decode_rate(photos, True), "full": _decode_rate(photos, False)},
            settings, units={"draft": n_photos, "full": n_photos},
        )  # fmt: skip
        files = _photos(Path(tmp) / "files", n_files, (1024, 768), seed=1, suffix=".png")
        workers = max(2, cpu_cores())
        parallel = interleaved(
            {"workers": _folder_rate(files[0].parent, workers, n_files),
             "one": _folder_rate(files[0].parent, 1, n_files)},
            settings, units={"workers": 1, "one": 1},
        )  # fmt: skip
    draft_ratio = draft["draft"].throughput / draft["full"].throughput
    parallel_ratio = parallel["workers"].throughput / parallel["one"].throughput
    rows = [
        ["12-MP JPEG -> 32 px, draft decode", fmt_rate(draft["draft"].throughput), "img/s"],
        ["12-MP JPEG -> 32 px, full decode", fmt_rate(draft["full"].throughput), "img/s"],
        [f"1024x768 PNG folder, {workers} workers", fmt_rate(parallel["workers"].throughput),
         "img/s"],
        ["1024x768 PNG folder, 1 worker", fmt_rate(parallel["one"].throughput), "img/s"],
    ]  # fmt: skip
    goals = [
        (f"folder reader: draft vs full decode >= {DRAFT_GOAL:.0f}x", fmt_ratio(draft_ratio),
         draft_ratio >= DRAFT_GOAL),
        (f"folder reader: {workers} workers vs 1 >= {PARALLEL_GOAL}x", fmt_ratio(parallel_ratio),
         parallel_ratio >= PARALLEL_GOAL),
    ]  # fmt: skip
    markdown = "\n\n".join(
        [
            "## 4. Reading an image folder (issue 14)",
            f"{n_photos} synthetic 12-MP JPEGs and a folder of {n_files} 1024x768 PNGs, "
            f"{settings.rounds} alternating rounds.",
            md_table(["contender", "rate", "unit"], rows),
            md_table(["goal", "measured", "met?"], [[g, m, met(ok)] for g, m, ok in goals]),
        ]
    )
    data = {"draft_ratio": draft_ratio, "parallel_ratio": parallel_ratio, "workers": workers}
    return Section("folders", markdown, goals, data)
