"""Datasets: real Fashion-MNIST and digits, synthetic files for the other formats, errors."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import fake_fmnist, official_cifar
from PIL import Image

from cdc_serve import CDCError
from cdc_serve.idx import write_idx
from cdc_serve_training.data import DATASETS, ImageData, load_dataset, resize_images

FMNIST = Path(DATASETS["fashion-mnist"].default_root)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_fmnist
def test_real_fashion_mnist_test_split() -> None:
    data = load_dataset("fashion-mnist", split="test")
    assert len(data) == 10_000 and data.images.shape == (10_000, 1, 28, 28)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert data.num_classes == 10 and data.channels == 1 and data.size == (28, 28)
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert 0.2 < data.mean[0] < 0.4 and 0.25 < data.std[0] < 0.45
    assert data.class_names[0] == "T-shirt/top"


def test_splits_and_limit(tmp_path: Path) -> None:
    root = fake_fmnist(tmp_path / "fm")
    assert len(load_dataset("fashion-mnist", root, split="train")) == 30
    assert len(load_dataset("fashion-mnist", root, split="test")) == 20
    everything = load_dataset("fashion-mnist", root)
    assert len(everything) == 50
    a = load_dataset("fashion-mnist", root, limit=12, seed=1)
    b = load_dataset("fashion-mnist", root, limit=12, seed=1)
    c = load_dataset("fashion-mnist", root, limit=12, seed=2)
    assert len(a) == 12 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    # The subset keeps images with their own labels (original order kept).
    rows = {
        tuple(img.flatten().tolist()): int(lab)
        for img, lab in zip(everything.images, everything.labels, strict=True)
    }
    assert all(
        rows[tuple(img.flatten().tolist())] == int(lab)
        for img, lab in zip(a.images, a.labels, strict=True)
    )
    # Mean and std are those of the returned images.
    assert a.mean[0] == pytest.approx(float(a.images.float().mean() / 255), abs=1e-5)


def test_class_filter_keeps_and_relabels_classes(tmp_path: Path) -> None:
    root = fake_fmnist(tmp_path / "fm")  # labels 0..9 repeating
    full = load_dataset("fashion-mnist", root)
    held_in = load_dataset("fashion-mnist[0-7]", root)
    held_out = load_dataset("fashion-mnist[9,8]", root)
    assert held_in.num_classes == 8 and held_out.num_classes == 2
    assert len(held_in) + len(held_out) == len(full)
    assert torch.equal(held_in.images, full.images[full.labels < 8])
    assert torch.equal(held_in.labels, full.labels[full.labels < 8])
    # Listed order defines the new labels: class 9 -> 0, class 8 -> 1.
    assert torch.equal(held_out.labels, 9 - full.labels[full.labels >= 8])
    assert held_out.class_names == [full.class_names[9], full.class_names[8]]
    for bad in ("fashion-mnist[x]", "fashion-mnist[1,1]", "fashion-mnist[12]"):
        with pytest.raises(CDCError):
            load_dataset(bad, root)


def test_subset_accepts_indices_masks_and_slices(tmp_path: Path) -> None:
    data = load_dataset("fashion-mnist", fake_fmnist(tmp_path / "fm"))
    assert len(data.subset([0, 2, 4])) == 3
    assert len(data.subset(np.array([1, 3]))) == 2
    assert len(data.subset(torch.arange(50) < 7)) == 7
    part = data.subset(slice(10, 20))
    assert torch.equal(part.labels, data.labels[10:20]) and part.mean == data.mean
    assert isinstance(part, ImageData) and part.preprocess()["input_size"] == [28, 28]


def test_digits_and_resize() -> None:
    data = load_dataset("digits")
    assert len(data) == 1797 and data.size == (8, 8) and data.images.max() == 255
    assert (
        len(load_dataset("digits", split="train")) + len(load_dataset("digits", split="test"))
        == 1797
    )
    big = load_dataset("digits", size=28, limit=100)
    assert big.images.shape == (100, 1, 28, 28) and big.images.dtype == torch.uint8
    resized = resize_images(data.images[:5], (16, 12))
    assert resized.shape == (5, 1, 16, 12)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(CDCError, match="fashion-mnist.*digits.*cifar10"):
        load_dataset("mnist-fashion")


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"limit": 0}])
def test_bad_split_or_limit(kwargs) -> None:
    with pytest.raises(CDCError):
        load_dataset("digits", **kwargs)


def test_missing_folder_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(
        CDCError, match=r"(?s)not found under .*nowhere.*dataset-fashion-mnist.*--data-root"
    ):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CDCError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", tmp_path / "empty")
    for name in ("cifar10", "cifar20", "stl10"):
        with pytest.raises(CDCError, match="--download"):
            load_dataset(name, tmp_path / "empty")


def test_truncated_idx_file(tmp_path: Path) -> None:
    root = fake_fmnist(tmp_path / "fm")
    path = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(CDCError, match="truncated"):
        load_dataset("fashion-mnist", root, split="train")


def test_corrupt_idx_files(tmp_path: Path) -> None:
    root = fake_fmnist(tmp_path / "fm")
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(CDCError, match="t10k-images"):
        load_dataset("fashion-mnist", root, split="test")
    # Valid IDX, wrong content: float images, or labels that do not match the images.
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28), dtype=np.float32))
    with pytest.raises(CDCError, match="uint8"):
        load_dataset("fashion-mnist", root, split="test")
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(CDCError, match="19 labels for 20 images"):
        load_dataset("fashion-mnist", root, split="test")


def test_cifar_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_dataset("cifar10", tmp_path)
    assert data.images.shape == (24, 3, 32, 32) and len(data.mean) == 3
    assert len(load_dataset("cifar10", folder, split="test")) == 4
    folder100 = tmp_path / "cifar-100-python"
    folder100.mkdir()
    for name in ("train", "test"):
        batch = {
            "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
            "coarse_labels": [0, 5, 19, 3, 2, 1],
            "fine_labels": [99] * 6,
        }
        (folder100 / name).write_bytes(pickle.dumps(batch))
    twenty = load_dataset("cifar20", tmp_path)
    assert twenty.num_classes == 20 and int(twenty.labels.max()) == 19 and len(twenty) == 12
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(CDCError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_stl10_files(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 3), ("test", 2)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # column-major on disk
        np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{part}_y.bin")
        if part == "train":
            first = images[0]
    data = load_dataset("stl10", tmp_path)
    assert data.images.shape == (5, 3, 96, 96)
    assert np.array_equal(data.images[0].numpy(), first)
    assert data.labels.tolist() == [0, 1, 2, 0, 1]


def test_image_folder(tmp_path: Path) -> None:
    for label, cls in enumerate(["cat", "dog"]):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            size = (20, 20) if i else (30, 24)
            Image.new("RGB", size, (label * 200, i * 50, 10)).save(
                tmp_path / "tree" / cls / f"{i}.png"
            )
    data = load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    assert data.images.shape == (6, 3, 20, 20) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.new("L", (10, 10), i * 100).save(tmp_path / "flat" / f"{i}.png")
    flat = load_dataset(f"imagefolder:{tmp_path / 'flat'}", size=16)
    assert flat.labels is None and flat.images.shape == (2, 1, 16, 16)
    (tmp_path / "flat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CDCError, match="bad.png"):
        load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    with pytest.raises(CDCError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")


def test_official_format_cifar10_and_cifar100_tensors(tmp_path: Path) -> None:
    """CIFAR-10 and CIFAR-100 folders pickled as the releases are (Python 2 byte strings)."""
    ten = official_cifar(tmp_path / "c10", n=2)
    data = load_dataset("cifar10", tmp_path / "c10", split="test")
    assert data.images.shape == (2, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == ten["test"][1].tolist() and data.class_names[0] == "airplane"
    assert torch.equal(data.images, torch.from_numpy(ten["test"][0]))
    hundred = official_cifar(tmp_path / "c100", coarse=True, n=5)
    data = load_dataset("cifar20", tmp_path / "c100")
    assert data.images.shape == (10, 3, 32, 32) and data.num_classes == 20
    labels = np.concatenate([hundred["train"][1], hundred["test"][1]])
    assert data.labels.tolist() == labels.tolist() and data.class_names == hundred["names"]
