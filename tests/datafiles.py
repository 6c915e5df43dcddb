"""Small data files in the real formats, shared by the serving and the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdc_serve.idx import write_idx


def fake_fmnist(root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root
