"""The numpy dataset readers (cdc_serve.datasets): what training's tensors are made from."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from datafiles import fake_fmnist, official_cifar, official_stl10
from PIL import Image

from cdc_serve import CDCError
from cdc_serve.datasets import (
    DATASETS,
    Dataset,
    parse_class_filter,
    read_dataset,
    read_label_csv,
)


def fake_cifar10(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return root


def image_tree(root: Path) -> Path:
    for label, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            size = (20, 20) if i else (30, 24)
            Image.new("RGB", size, (label * 200, i * 50, 10)).save(root / cls / f"{i}.png")
    return root


def test_arrays_labels_and_names(tmp_path):
    data = read_dataset("fashion-mnist", fake_fmnist(tmp_path / "fm"), split="test")
    assert isinstance(data, Dataset) and len(data) == 20
    assert data.images.dtype == np.uint8 and data.images.shape == (20, 1, 28, 28)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [i % 10 for i in range(20)]
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top"
    digits = read_dataset("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.max() == 255
    folder = read_dataset(f"imagefolder:{image_tree(tmp_path / 'tree')}")
    assert folder.images.shape == (6, 3, 20, 20) and folder.class_names == ["cat", "dog"]


def test_class_filter(tmp_path):
    assert parse_class_filter("fashion-mnist[0-2,7]") == ("fashion-mnist", [0, 1, 2, 7])
    assert parse_class_filter("digits") == ("digits", None)
    root = fake_fmnist(tmp_path / "fm")
    full = read_dataset("fashion-mnist", root)
    out = read_dataset("fashion-mnist[9,8]", root)
    assert out.name == "fashion-mnist[9,8]" and out.num_classes == 2
    np.testing.assert_array_equal(out.images, full.images[full.labels >= 8])
    np.testing.assert_array_equal(out.labels, 9 - full.labels[full.labels >= 8])
    assert out.class_names == ["Ankle boot", "Bag"]
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(CDCError, match="has no labels"):
        read_dataset(f"imagefolder:{tmp_path / 'flat'}[0]")  # a flat folder: no classes


def test_errors_say_where_and_how(tmp_path):
    with pytest.raises(CDCError, match="unknown split"):
        read_dataset("digits", split="val")
    with pytest.raises(CDCError, match="known: fashion-mnist, digits, cifar10"):
        read_dataset("mnist-fashion")
    with pytest.raises(CDCError, match=r"(?s)not found under .*nowhere.*--data-root"):
        read_dataset("fashion-mnist", tmp_path / "nowhere")
    fetched = []
    with pytest.raises(CDCError, match="cifar-10-batches-py"):  # fetch asked, then still missing
        read_dataset("cifar10", tmp_path, fetch=lambda cls, root: fetched.append((cls, root)))
    assert fetched == [("CIFAR10", tmp_path)]


def test_training_tensors_are_these_arrays(tmp_path):
    """cdc_serve_training.data.load_dataset wraps exactly what the numpy readers return."""
    pytest.importorskip("torch")
    from cdc_serve_training.data import load_dataset

    fm = fake_fmnist(tmp_path / "fm")
    cases = [
        ("fashion-mnist", fm, "all"),
        ("fashion-mnist[0-7]", fm, "train"),
        ("digits", None, "test"),
        ("cifar10", fake_cifar10(tmp_path / "c"), "all"),
        (f"imagefolder:{image_tree(tmp_path / 'tree')}", None, "all"),
    ]
    for name, root, split in cases:
        served = read_dataset(name, root, split)
        trained = load_dataset(name, root, split=split)
        np.testing.assert_array_equal(trained.images.numpy(), served.images, err_msg=name)
        np.testing.assert_array_equal(trained.labels.numpy(), served.labels, err_msg=name)
        assert (trained.name, trained.num_classes, trained.class_names) == (
            served.name,
            served.num_classes,
            served.class_names,
        )
    assert set(DATASETS) == {"fashion-mnist", "digits", "cifar10", "cifar20", "stl10"}


@pytest.mark.parametrize("coarse", [False, True], ids=["cifar10", "cifar100"])
def test_official_format_cifar_folders_load(tmp_path, coarse):
    """Files pickled as the releases are (Python 2 cPickle: byte-string keys and pixels)."""
    wrote = official_cifar(tmp_path, coarse=coarse, n=3)
    name, classes = ("cifar20", 20) if coarse else ("cifar10", 10)
    full = read_dataset(name, tmp_path)
    assert full.images.shape == ((3 + 3) if coarse else (15 + 3), 3, 32, 32)
    assert full.num_classes == classes and full.class_names == wrote["names"]
    for split in ("train", "test"):
        data = read_dataset(name, tmp_path, split=split)
        images, labels = wrote[split]
        np.testing.assert_array_equal(data.images, images)  # R, G, B planes of 32 x 32
        np.testing.assert_array_equal(data.labels, labels)  # coarse_labels for CIFAR-100


def test_stl10_sizes_and_labels_are_checked(tmp_path):
    wrote = official_stl10(tmp_path)
    data = read_dataset("stl10", tmp_path, split="test")
    np.testing.assert_array_equal(data.images, wrote["test"][0])
    np.testing.assert_array_equal(data.labels, wrote["test"][1])
    folder = tmp_path / "stl10_binary"
    np.array([1, 11], dtype=np.uint8).tofile(folder / "test_y.bin")
    with pytest.raises(CDCError, match=r"test_y\.bin: labels 1\.\.11 outside 1\.\.10"):
        read_dataset("stl10", tmp_path)
    np.array([1, 2, 3], dtype=np.uint8).tofile(folder / "test_y.bin")
    with pytest.raises(CDCError, match=r"test_X\.bin: 55296 bytes, not the 82944 of the 3"):
        read_dataset("stl10", tmp_path)


SOURCES = ["a.png", "b.png", "cats/c.png"]


def test_label_csv_in_the_order_of_the_sources(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,label\ncats/c.png,2\n./a.png, 0\nb.png,+7\n")
    assert read_label_csv(path, SOURCES).tolist() == [0, 7, 2]
    path.write_text("b.png,1\r\n\r\na.png,0\r\ncats\\c.png,1\r\n")  # no header, CRLF, blank line
    labels = read_label_csv(path, SOURCES)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,0\nb.png,1\n", r"no row for 1 of the 3 images, e\.g\. 'cats/c\.png'"),
        ("a.png,0\nb.png,1\ncats/c.png,1\nd.png,0\n", r"line 4: 'd\.png' is not one of the 3"),
        ("a.png,0\nb.png,1\na.png,1\n", r"line 3: 'a\.png' is listed again \(first on line 1\)"),
        ("a.png,0\nb.png,x\n", r"line 2: label 'x' of 'b\.png' is not an integer >= 0"),
        ("a.png,0\nb.png,-1\n", r"line 2: label '-1'"),
        ("a.png,0\nb.png,1.0\n", r"line 2: label '1\.0'"),
        ("a.png,0\nb.png\n", r"line 2: expected two fields `file,label`, got 1"),
        ("a.png,0,3\n", r"line 1: expected two fields"),
        ('a.png,0\n"b.png,1\n', r"line 2: expected two fields `file,label`, got 1: 'b\.png,1'"),
        ("", r"no row for 3 of the 3 images"),
    ],
)
def test_label_csv_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(CDCError, match=rf"labels\.csv.*{message}"):
        read_label_csv(path, SOURCES)


def test_label_csv_not_text(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"a.png,0\n\xff\xfe\x00b.png,1\n")
    with pytest.raises(CDCError, match=r"labels\.csv: not a UTF-8 text file"):
        read_label_csv(path, SOURCES)
    with pytest.raises(CDCError, match="no such labels file"):
        read_label_csv(tmp_path / "nothing.csv", SOURCES)
