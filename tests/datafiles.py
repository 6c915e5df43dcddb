"""Small data files in the real formats, shared by the serving and the training tests."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

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


# -- CIFAR and STL-10 in their official formats ------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles ``str`` and ``bytes`` as Python 2's cPickle wrote its ``str`` (the opcodes
    SHORT_BINSTRING / BINSTRING), protocol 2: the format of the official CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING
        self.write(opcode + (b"" if n < 256 else struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def official_pickle(obj: Any) -> bytes:
    """``obj`` pickled as the CIFAR releases are (Python 2 cPickle, protocol 2)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def official_cifar(root: Path, coarse: bool = False, n: int = 4, seed: int = 0) -> dict:
    """A CIFAR-10 (or, ``coarse``, CIFAR-100) "python version" folder under ``root`` with
    ``n`` images per batch, pickled as the official files; returns what it wrote:
    ``{"train": (images N x 3 x 32 x 32, labels), "test": (...), "names": [...]}``."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if coarse else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": ["train"], "test": ["test"]} if coarse else {
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]
    }  # fmt: skip
    wrote = {}
    for part, names in files.items():
        xs, ys = [], []
        for name in names:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 20 if coarse else 10, n)]
            batch = {"batch_label": f"{part} batch", "data": data,
                     "filenames": [f"img_{i}.png" for i in range(n)]}  # fmt: skip
            if coarse:
                batch.update(
                    coarse_labels=labels, fine_labels=[int(v) for v in rng.integers(0, 100, n)]
                )
            else:
                batch["labels"] = labels
            (folder / name).write_bytes(official_pickle(batch))
            xs.append(data.reshape(n, 3, 32, 32))
            ys.append(np.asarray(labels, dtype=np.int64))
        wrote[part] = (np.concatenate(xs), np.concatenate(ys))
    if coarse:
        names = [f"super{i}" for i in range(20)]
        meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": names}
        (folder / "meta").write_bytes(official_pickle(meta))
    else:
        names = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
        meta = {"num_cases_per_batch": n, "label_names": names, "num_vis": 3072}
        (folder / "batches.meta").write_bytes(official_pickle(meta))
    wrote["names"] = names
    return wrote


def official_stl10(root: Path, n_train: int = 3, n_test: int = 2, seed: int = 0) -> dict:
    """An ``stl10_binary/`` folder (column-major images, labels 1..10) under ``root``;
    returns ``{"train": (images N x 3 x 96 x 96, labels 0..9), "test": (...)}``."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    wrote = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        labels = rng.integers(1, 11, n).astype(np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # column-major on disk
        labels.tofile(folder / f"{part}_y.bin")
        wrote[part] = (images, labels.astype(np.int64) - 1)
    return wrote
