"""Datasets as numpy arrays, read from their standard local files (numpy and Pillow only).

Every reader returns a :class:`Dataset`: ``images`` is a uint8 ``N x C x H x W`` array,
``labels`` an int64 ``N`` array (or ``None`` for an unlabelled folder), plus the number
of classes and their names. Training wraps it into tensors
(``cdc_serve_training.data.load_dataset``); ``cdc-serve evaluate`` of an exported model
uses it as it is, without torch.

Known names (:data:`DATASETS`):

- ``fashion-mnist``: the four IDX ``.gz`` files (Debian package ``dataset-fashion-mnist``,
  installed at ``/usr/share/datasets/fashion-mnist``).
- ``digits``: scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255).
- ``cifar10``, ``cifar20`` (CIFAR-100's 20 superclasses, the "coarse" labels), ``stl10``:
  their standard Python / binary releases, as torchvision downloads them.
- ``imagefolder:PATH``: any folder of images (one sub-folder per class, or images
  directly inside for unlabelled data), read with Pillow and resized to one size.

A name may end in a class filter, ``fashion-mnist[0-7]`` (:func:`parse_class_filter`):
only those classes are kept, relabelled in the listed order. ``split`` is ``"train"``,
``"test"`` or ``"all"`` (train + test merged, as the CDC paper clusters both).

Nothing is downloaded here. A missing dataset raises :class:`cdc_serve.CDCError` saying
where it looked and how to get the files; the training side passes a ``fetch`` function
(torchvision's download) for ``--download``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdc_serve import CDCError
from cdc_serve.choices import Split, values
from cdc_serve.safe_pickle import load_cifar_pickle

SPLITS = values(Split)

# fetch(dataset_class, root): download a dataset's standard files into root, e.g. with
# torchvision (``dataset_class`` is torchvision's class name: FashionMNIST, CIFAR10, ...).
Fetch = Callable[[str, Path], None]
# What a reader returns: uint8 N x C x H x W images, int labels (or None), class names.
Arrays = tuple[np.ndarray, np.ndarray | None, list[str] | None]


@dataclass
class Dataset:
    """A whole dataset in memory: uint8 images ``N x C x H x W`` with int64 labels (or None)."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    name: str
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """What the readers know about one named dataset."""

    name: str
    num_classes: int
    channels: int
    size: tuple[int, int]
    default_root: str
    how_to_get: str
    loader: Callable[[Path, str, Fetch | None], Arrays] = field(repr=False, compare=False)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _data_home() -> Path:
    """Where datasets other than Fashion-MNIST live by default ($CDC_SERVE_DATA or a cache)."""
    env = os.environ.get("CDC_SERVE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "cdc-serve" / "datasets"


def _find(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists under ``root`` (names may contain sub-folders)."""
    for name in names:
        if (root / name).exists():
            return root / name
    return None


def missing(info_name: str, root: Path, what: str) -> CDCError:
    """The error for a dataset file or folder that is not there, with how to get it."""
    info = DATASETS[info_name]
    return CDCError(f"dataset {info_name!r}: {what} not found under {root}. {info.how_to_get}")


def _pick_split(parts: dict[str, tuple[np.ndarray, np.ndarray]], split: str):
    if split == "all":
        images = np.concatenate([parts["train"][0], parts["test"][0]])
        labels = np.concatenate([parts["train"][1], parts["test"][1]])
        return images, labels
    return parts[split]


# ----------------------------------------------------------------------------------------------
# Per-dataset readers: each returns (uint8 N x C x H x W array, int labels or None, class names)
# ----------------------------------------------------------------------------------------------

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _read_fashion_mnist(root: Path, split: str, fetch: Fetch | None) -> Arrays:
    from cdc_serve.idx import read_idx

    if fetch and not _find(root, ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"]):
        fetch("FashionMNIST", root)
        if (root / "FashionMNIST" / "raw").is_dir():
            root = root / "FashionMNIST" / "raw"
    prefixes = {"train": "train", "test": "t10k"}
    parts = {}
    for part in ("train", "test") if split == "all" else (split,):
        files = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            stem = f"{prefixes[part]}-{kind}"
            path = _find(root, [stem + ".gz", stem, f"FashionMNIST/raw/{stem}"])
            if path is None:
                raise missing("fashion-mnist", root, f"{stem}.gz")
            files.append(path)
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise CDCError(
                f"{files[0]}: expected uint8 N x 28 x 28 images, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise CDCError(
                f"{files[1]}: {len(labels)} labels for {len(images)} images in {files[0].name}"
            )
        if labels.dtype.kind not in "iu":
            raise CDCError(f"{files[1]}: labels must be integers, got {labels.dtype}")
        if labels.size and not 0 <= labels.min() <= labels.max() < 10:
            raise CDCError(
                f"{files[1]}: labels {labels.min()}..{labels.max()} outside 0..9 (the ten classes)"
            )
        parts[part] = (images[:, None], labels.astype(np.int64))
    images, labels = _pick_split(parts, split)
    return images, labels, list(FASHION_CLASSES)


def _read_digits(root: Path, split: str, fetch: Fetch | None) -> Arrays:
    """scikit-learn's digits (1,797 images). No official split: "train" is the first 80 %."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    cut = int(round(0.8 * len(images)))
    if split == "train":
        images, labels = images[:cut], labels[:cut]
    elif split == "test":
        images, labels = images[cut:], labels[cut:]
    return images, labels, [str(d) for d in range(10)]


def _read_cifar(root: Path, split: str, fetch: Fetch | None, *, coarse: bool) -> Arrays:
    name = "cifar20" if coarse else "cifar10"
    folder_name = "cifar-100-python" if coarse else "cifar-10-batches-py"
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir() and fetch:
        fetch("CIFAR100" if coarse else "CIFAR10", root)
    if not folder.is_dir():
        raise missing(name, root, f"folder {folder_name}/")
    if coarse:
        files = {"train": ["train"], "test": ["test"]}
        label_key = "coarse_labels"
    else:
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = "labels"
    parts = {}
    for part, names in files.items():
        xs, ys = [], []
        for file_name in names:
            path = folder / file_name
            if not path.is_file():
                raise missing(name, root, f"{folder_name}/{file_name}")
            images, labels = _cifar_batch(path, label_key, 20 if coarse else 10)
            xs.append(images)
            ys.append(labels)
        parts[part] = (np.concatenate(xs), np.concatenate(ys))
    images, labels = _pick_split(parts, split)
    meta = folder / ("meta" if coarse else "batches.meta")
    class_names = None
    if meta.is_file():
        names = load_cifar_pickle(meta).get("coarse_label_names" if coarse else "label_names")
        if isinstance(names, list):
            class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return images, labels, class_names


def _cifar_batch(path: Path, label_key: str, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's ``N x 3 x 32 x 32`` uint8 images and ``N`` labels in
    ``0..num_labels-1`` (10 classes, or CIFAR-100's 20 superclasses), checked."""
    batch = load_cifar_pickle(path)  # never runs code: see cdc_serve.safe_pickle
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise CDCError(f"{path}: unexpected CIFAR batch contents (no uint8 N x 3072 'data')")
    if data.shape[1] != 3 * 32 * 32 or not isinstance(labels, (list, np.ndarray)):
        raise CDCError(
            f"{path}: unexpected CIFAR batch contents (data {data.shape}, {label_key!r} "
            f"{type(labels).__name__})"
        )
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise CDCError(f"{path}: {label_key!r} must be a list of integers")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise CDCError(f"{path}: {labels.size} {label_key!r} for {len(data)} images")
    if labels.size and not 0 <= labels.min() <= labels.max() < num_labels:
        raise CDCError(f"{path}: {label_key!r} outside 0..{num_labels - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_stl10(root: Path, split: str, fetch: Fetch | None) -> Arrays:
    """STL-10's labelled train (5,000) and test (8,000) images from ``stl10_binary/``."""
    folder = root if root.name == "stl10_binary" else root / "stl10_binary"
    if not folder.is_dir() and fetch:
        fetch("STL10", root)
    if not folder.is_dir():
        raise missing("stl10", root, "folder stl10_binary/")
    parts = {}
    for part in ("train", "test"):
        x_path, y_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
        if not x_path.is_file() or not y_path.is_file():
            raise missing("stl10", root, f"stl10_binary/{part}_X.bin and {part}_y.bin")
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if labels.size and not 0 <= labels.min() <= labels.max() < 10:
            raise CDCError(
                f"{y_path}: labels {labels.min() + 1}..{labels.max() + 1} outside 1..10 "
                "(STL-10's classes)"
            )
        size, expected = x_path.stat().st_size, len(labels) * 3 * 96 * 96
        if size != expected:
            raise CDCError(
                f"{x_path}: {size} bytes, not the {expected} of the {len(labels)} 96x96 RGB "
                f"images that {y_path.name} labels"
            )
        raw = np.fromfile(x_path, dtype=np.uint8)
        # The binary stores each image column-major: N x C x W x H.
        parts[part] = (raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), labels)
    images, labels = _pick_split(parts, split)
    names_file = folder / "class_names.txt"
    names = (
        names_file.read_bytes().decode("utf-8", "replace").split() if names_file.is_file() else []
    )
    class_names = names if len(names) == 10 else None
    return np.ascontiguousarray(images), labels, class_names


def read_image_folder(path: Path, size: int | Sequence[int] | None = None) -> Arrays:
    """An image folder's images in memory, labels (one class per sub-folder) and classes.

    Read by :func:`cdc_serve.image_folder.read_image_folder` (streaming, parallel, bounded
    memory) with ``strict=True``: here an unreadable file is an error naming it. Images
    are grayscale when all of them are, else RGB, resized to ``size`` (``int`` or
    ``(H, W)``; default: the most common size among the images).
    """
    from cdc_serve.image_folder import list_images, most_common_size
    from cdc_serve.image_folder import read_image_folder as read_folder

    if size is None:
        size = most_common_size(list_images(path)[0])
    elif isinstance(size, int):
        size = (size, size)
    read = read_folder(path, (int(size[0]), int(size[1])), strict=True, progress=False)
    return np.asarray(read.images), read.labels, read.class_names


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, (28, 28), "/usr/share/datasets/fashion-mnist",
        "Install the Debian package (apt-get install dataset-fashion-mnist), point "
        "--data-root at a folder with the four *-idx?-ubyte.gz files, or pass --download.",
        _read_fashion_mnist,
    ),
    "digits": DatasetInfo(
        "digits", 10, 1, (8, 8), "(bundled with scikit-learn)",
        "It ships with scikit-learn (sklearn.datasets.load_digits).", _read_digits,
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, (32, 32), str(_data_home() / "cifar10"),
        "Put the Python release (cifar-10-batches-py/) there, point --data-root at it, "
        "or pass --download.",
        lambda r, s, f: _read_cifar(r, s, f, coarse=False),
    ),
    "cifar20": DatasetInfo(
        "cifar20", 20, 3, (32, 32), str(_data_home() / "cifar100"),
        "Put CIFAR-100's Python release (cifar-100-python/) there, point --data-root at it, "
        "or pass --download.",
        lambda r, s, f: _read_cifar(r, s, f, coarse=True),
    ),
    "stl10": DatasetInfo(
        "stl10", 10, 3, (96, 96), str(_data_home() / "stl10"),
        "Put the binary release (stl10_binary/) there, point --data-root at it, "
        "or pass --download.",
        _read_stl10,
    ),
}  # fmt: skip


def dataset_names() -> list[str]:
    return [*DATASETS, "imagefolder:PATH"]


# ----------------------------------------------------------------------------------------------
# Names, splits and class filters
# ----------------------------------------------------------------------------------------------


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise CDCError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def parse_class_filter(name: str) -> tuple[str, list[int] | None]:
    """Split ``"fashion-mnist[0-7]"`` into ``("fashion-mnist", [0, ..., 7])``.

    A bracket suffix keeps only the listed classes (``a-b`` ranges and ``,`` lists), e.g.
    to train on eight Fashion-MNIST classes and hold the other two out as OOD data.
    """
    if not name.endswith("]") or "[" not in name:
        return name, None
    base, spec = name[:-1].split("[", 1)
    classes: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            classes += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise CDCError(f"bad class list in {name!r}: use e.g. {base}[0-7] or {base}[8,9]") from None
    if len(set(classes)) != len(classes) or not classes:
        raise CDCError(f"bad class list in {name!r}: classes must be distinct")
    return base, classes


def only_classes(data: Dataset, classes: list[int]) -> Dataset:
    """Keep the images of ``classes``, relabelled 0..len(classes)-1 in the listed order."""
    if data.labels is None:
        raise CDCError(f"{data.name} has no labels: a class filter needs them")
    if max(classes) >= data.num_classes:
        raise CDCError(
            f"{data.name} has classes 0..{data.num_classes - 1}; asked for {max(classes)}"
        )
    relabel = np.full(data.num_classes, -1, dtype=np.int64)
    relabel[np.asarray(classes)] = np.arange(len(classes))
    keep = relabel[data.labels] >= 0
    names = [data.class_names[c] for c in classes] if data.class_names else None
    return Dataset(
        images=data.images[keep],
        labels=relabel[data.labels[keep]],
        num_classes=len(classes),
        name=f"{data.name}[{','.join(map(str, classes))}]",
        class_names=names,
    )


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def read_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "all",
    *,
    folder_size: int | Sequence[int] | None = None,
    fetch: Fetch | None = None,
) -> Dataset:
    """Read a dataset by name as a :class:`Dataset` of numpy arrays.

    Args:
        name: one of :data:`DATASETS` or ``"imagefolder:PATH"``, optionally with a class
            filter suffix such as ``"fashion-mnist[0-7]"`` (see :func:`parse_class_filter`).
        root: folder with the dataset's files (default: ``DATASETS[name].default_root``).
        split: ``"train"``, ``"test"`` or ``"all"`` (train + test, as the paper).
        folder_size: the size an image folder's images are resized to (``int`` or
            ``(H, W)``; default: their most common size). Named datasets keep their size.
        fetch: downloads missing files (``fetch(dataset_class, root)``); None never does.
    """
    check_split(split)
    name, keep_classes = parse_class_filter(name)
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1] or (root or "")).expanduser()
        images, labels, class_names = read_image_folder(path, folder_size)
        num_classes = len(class_names) if class_names else 0
    elif name in DATASETS:
        info = DATASETS[name]
        folder = Path(root).expanduser() if root is not None else Path(info.default_root)
        if name != "digits" and not folder.is_dir() and fetch is None:
            raise missing(name, folder, "the data folder")
        images, labels, class_names = info.loader(folder, split, fetch)
        num_classes = info.num_classes
    else:
        raise CDCError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    data = Dataset(
        images=np.require(images, np.uint8, ["C"]),
        labels=None if labels is None else np.asarray(labels, dtype=np.int64),
        num_classes=num_classes,
        name=name,
        class_names=class_names,
    )
    return data if keep_classes is None else only_classes(data, keep_classes)


# ----------------------------------------------------------------------------------------------
# Label files: `file,label` CSV rows
# ----------------------------------------------------------------------------------------------

_LABEL = re.compile(r"\+?[0-9]{1,18}")  # an integer >= 0 that fits int64


def parse_label(text: str) -> int | None:
    """The integer >= 0 that ``text`` spells (digits only, optional ``+``), else None."""
    text = text.strip()
    return int(text) if _LABEL.fullmatch(text) else None


def read_csv_rows(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a UTF-8 CSV file as ``(line number, stripped fields)``.

    CDCError, naming the file, when it is missing, not UTF-8 text or not CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: no such labels file")
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for fields in reader:
                if any(c.strip() for c in fields):
                    rows.append((reader.line_num, [c.strip() for c in fields]))
    except UnicodeDecodeError as exc:
        raise CDCError(
            f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); write the labels "
            "as plain CSV text"
        ) from None
    except (csv.Error, OSError) as exc:
        raise CDCError(f"{path}: cannot read it as CSV ({exc})") from None
    return rows


def _source_key(source: str | os.PathLike) -> str:
    """A file name as the label file and the image list both spell it (``./a\\b`` = ``a/b``)."""
    return Path(os.path.normpath(str(source).strip().replace("\\", "/"))).as_posix()


def read_label_csv(path: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> np.ndarray:
    """One label per source, in the order of ``sources``, from ``file,label`` CSV rows.

    The file has one row per image (an optional first header row such as ``file,label``);
    ``file`` is spelt as in ``sources`` (e.g. paths relative to the image folder) and
    ``label`` is an integer >= 0. A row with another number of fields, a label that is not
    such an integer, a file that is not among ``sources`` or is listed twice, and a
    source with no row each raise one CDCError naming the file and the line (or source).
    """
    path = Path(path)
    index = {_source_key(s): i for i, s in enumerate(sources)}
    rows = read_csv_rows(path)
    head = rows[0][1] if rows else []
    if len(head) == 2 and parse_label(head[1]) is None and _source_key(head[0]) not in index:
        rows = rows[1:]  # a header row
    labels = np.full(len(sources), -1, dtype=np.int64)
    first_line: dict[str, int] = {}
    for line, fields in rows:
        where = f"{path}, line {line}"
        if len(fields) != 2:
            shown = ",".join(fields)
            raise CDCError(
                f"{where}: expected two fields `file,label`, got {len(fields)}: {shown[:80]!r}"
            )
        name, text = fields
        value, key = parse_label(text), _source_key(name)
        if value is None:
            raise CDCError(f"{where}: label {text[:40]!r} of {name[:80]!r} is not an integer >= 0")
        if key not in index:
            raise CDCError(
                f"{where}: {name[:80]!r} is not one of the {len(index)} images (a row too many, "
                "or a name spelt otherwise than the image's path)"
            )
        if key in first_line:
            raise CDCError(
                f"{where}: {name[:80]!r} is listed again (first on line {first_line[key]})"
            )
        first_line[key] = line
        labels[index[key]] = value
    missing = np.flatnonzero(labels < 0)
    if missing.size:
        raise CDCError(
            f"{path}: no row for {missing.size} of the {len(labels)} images, e.g. "
            f"{str(sources[missing[0]])!r}; give every image one `file,label` row"
        )
    return labels
