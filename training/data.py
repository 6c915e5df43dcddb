"""Datasets as uint8 tensors (``ImageData``), read from their standard local files.

Every dataset becomes one ``ImageData``: ``images`` is a uint8 ``N x C x H x W`` CPU
tensor, ``labels`` an int64 ``N`` tensor (or ``None`` for an unlabelled folder), plus the
per-channel mean and std that the model's preprocessing uses
(``(x / 255 - mean[c]) / std[c]``, see docs/ARCHITECTURE.md).

Known names (``DATASETS``):

- ``fashion-mnist``: the four IDX ``.gz`` files (Debian package ``dataset-fashion-mnist``,
  installed at ``/usr/share/datasets/fashion-mnist``).
- ``digits``: scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255).
- ``cifar10``, ``cifar20`` (CIFAR-100's 20 superclasses, the "coarse" labels), ``stl10``:
  their standard Python / binary releases, as torchvision downloads them.
- ``imagefolder:PATH``: any folder of images (one sub-folder per class, or images
  directly inside for unlabelled data), read with Pillow and resized to one size.

``split`` is ``"train"``, ``"test"`` or ``"all"`` (train + test merged, as the CDC paper
clusters both). Nothing is downloaded unless ``download=True``; a missing dataset raises
:class:`cdc_serve.CDCError` saying where it looked and how to get the files.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdc_serve import CDCError

SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ----------------------------------------------------------------------------------------------
# The data container
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """A whole dataset in memory: uint8 images ``N x C x H x W`` on the CPU, with labels."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise CDCError(
                f"{self.name}: images must be a uint8 N x C x H x W tensor, "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise CDCError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index) -> ImageData:
        """The images (and labels) at ``index`` (a slice, a list/array/tensor of ints or a mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = index.long()
        return ImageData(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            num_classes=self.num_classes,
            name=self.name,
            mean=self.mean,
            std=self.std,
            class_names=self.class_names,
        )

    def preprocess(self) -> dict:
        """The preprocessing dict stored in checkpoints and exported metadata."""
        return {
            "input_size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class DatasetInfo:
    """What the loader knows about one named dataset."""

    name: str
    num_classes: int
    channels: int
    size: tuple[int, int]
    default_root: str
    how_to_get: str
    loader: Callable[[Path, str, bool], tuple[np.ndarray, np.ndarray | None, list[str] | None]] = (
        field(repr=False, compare=False)
    )


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _data_home() -> Path:
    """Where datasets other than Fashion-MNIST live by default ($CDC_SERVE_DATA or a cache)."""
    env = os.environ.get("CDC_SERVE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "cdc-serve" / "datasets"


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, computed in chunks (float64)."""
    n, c = images.shape[:2]
    if n == 0:
        return tuple([0.5] * c), tuple([0.5] * c)
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, 8192):
        chunk = images[start : start + 8192].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def resize_images(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize uint8 ``N x C x H x W`` images to ``size`` (bilinear, antialiased), keeping uint8.

    Used for example to turn the 8x8 digits into 28x28 out-of-distribution probes for a
    Fashion-MNIST model.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == (h, w):
        return images
    out = torch.nn.functional.interpolate(
        images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _find(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists under ``root`` (names may contain sub-folders)."""
    for name in names:
        if (root / name).exists():
            return root / name
    return None


def _missing(info_name: str, root: Path, what: str) -> CDCError:
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


def _load_fashion_mnist(root: Path, split: str, download: bool):
    from cdc_serve.idx import read_idx

    if download and not _find(root, ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"]):
        _torchvision_download("FashionMNIST", root)
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
                raise _missing("fashion-mnist", root, f"{stem}.gz")
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
        if labels.size and int(labels.max()) >= 10:
            raise CDCError(f"{files[1]}: label {int(labels.max())} out of range 0..9")
        parts[part] = (images[:, None], labels.astype(np.int64))
    images, labels = _pick_split(parts, split)
    return images, labels, list(FASHION_CLASSES)


def _load_digits(root: Path, split: str, download: bool):
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


def _unpickle(path: Path) -> dict:
    # The CIFAR releases are Python pickles of plain dicts / numpy arrays (the format the
    # dataset authors publish); only files the user placed under the data root are read.
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # any failure means the file is not usable
        raise CDCError(f"{path}: not a readable CIFAR batch file ({exc})") from None


def _load_cifar(root: Path, split: str, download: bool, *, coarse: bool):
    name = "cifar20" if coarse else "cifar10"
    folder_name = "cifar-100-python" if coarse else "cifar-10-batches-py"
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir() and download:
        _torchvision_download("CIFAR100" if coarse else "CIFAR10", root)
    if not folder.is_dir():
        raise _missing(name, root, f"folder {folder_name}/")
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
                raise _missing(name, root, f"{folder_name}/{file_name}")
            batch = _unpickle(path)
            try:
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key], dtype=np.int64))
            except (KeyError, ValueError) as exc:
                raise CDCError(f"{path}: unexpected CIFAR batch contents ({exc})") from None
        parts[part] = (np.concatenate(xs), np.concatenate(ys))
    images, labels = _pick_split(parts, split)
    meta = folder / ("meta" if coarse else "batches.meta")
    class_names = None
    if meta.is_file():
        class_names = _unpickle(meta).get("coarse_label_names" if coarse else "label_names")
    return images, labels, class_names


def _load_stl10(root: Path, split: str, download: bool):
    """STL-10's labelled train (5,000) and test (8,000) images from ``stl10_binary/``."""
    folder = root if root.name == "stl10_binary" else root / "stl10_binary"
    if not folder.is_dir() and download:
        _torchvision_download("STL10", root)
    if not folder.is_dir():
        raise _missing("stl10", root, "folder stl10_binary/")
    parts = {}
    for part in ("train", "test"):
        x_path, y_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
        if not x_path.is_file() or not y_path.is_file():
            raise _missing("stl10", root, f"stl10_binary/{part}_X.bin and {part}_y.bin")
        raw = np.fromfile(x_path, dtype=np.uint8)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if raw.size != len(labels) * 3 * 96 * 96:
            raise CDCError(f"{x_path}: size does not match {len(labels)} 96x96 RGB images")
        # The binary stores each image column-major: N x C x W x H.
        parts[part] = (raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), labels)
    images, labels = _pick_split(parts, split)
    names_file = folder / "class_names.txt"
    class_names = names_file.read_text().split() if names_file.is_file() else None
    return np.ascontiguousarray(images), labels, class_names


def _torchvision_download(dataset_class: str, root: Path) -> None:
    """Fetch a dataset's standard files with torchvision (only when the user asked to)."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, dataset_class)
    try:
        if dataset_class == "STL10":
            cls(str(root), split="train", download=True)
        else:
            cls(str(root), train=True, download=True)
    except Exception as exc:  # network errors of every kind
        raise CDCError(f"could not download {dataset_class} to {root}: {exc}") from None


def load_image_folder(
    path: Path, size: int | Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Read an image folder with Pillow.

    With sub-folders, each sub-folder is a class (sorted names, like torchvision's
    ImageFolder); otherwise the images directly inside are one unlabelled set. Images are
    converted to grayscale when all of them are grayscale, else to RGB, and resized to
    ``size`` (default: the most common size among the images).
    """
    from collections import Counter

    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise CDCError(f"image folder {path} does not exist or is not a folder")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        entries = [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted((path / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        entries = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise CDCError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pictures = []
    for file, _ in entries:
        try:
            with Image.open(file) as im:
                im.load()
                pictures.append(im.copy())
        except (OSError, UnidentifiedImageError) as exc:
            raise CDCError(f"{file}: not a readable image ({exc})") from None
    gray = all(p.mode in ("1", "L", "I", "I;16", "F") for p in pictures)
    mode = "L" if gray else "RGB"
    if size is None:
        w, h = Counter(p.size for p in pictures).most_common(1)[0][0]
    else:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    arrays = []
    for p in pictures:
        p = p.convert(mode)
        if p.size != (w, h):
            p = p.resize((w, h), Image.BILINEAR)
        a = np.asarray(p, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    images = np.stack(arrays)
    labels = np.array([label for _, label in entries], dtype=np.int64) if classes else None
    return images, labels, classes or None


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, (28, 28), "/usr/share/datasets/fashion-mnist",
        "Install the Debian package (apt-get install dataset-fashion-mnist), point "
        "--data-root at a folder with the four *-idx?-ubyte.gz files, or pass --download.",
        _load_fashion_mnist,
    ),
    "digits": DatasetInfo(
        "digits", 10, 1, (8, 8), "(bundled with scikit-learn)",
        "It ships with scikit-learn (sklearn.datasets.load_digits).", _load_digits,
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, (32, 32), str(_data_home() / "cifar10"),
        "Put the Python release (cifar-10-batches-py/) there, point --data-root at it, "
        "or pass --download.",
        lambda r, s, d: _load_cifar(r, s, d, coarse=False),
    ),
    "cifar20": DatasetInfo(
        "cifar20", 20, 3, (32, 32), str(_data_home() / "cifar100"),
        "Put CIFAR-100's Python release (cifar-100-python/) there, point --data-root at it, "
        "or pass --download.",
        lambda r, s, d: _load_cifar(r, s, d, coarse=True),
    ),
    "stl10": DatasetInfo(
        "stl10", 10, 3, (96, 96), str(_data_home() / "stl10"),
        "Put the binary release (stl10_binary/) there, point --data-root at it, "
        "or pass --download.",
        _load_stl10,
    ),
}  # fmt: skip


def dataset_names() -> list[str]:
    return [*DATASETS, "imagefolder:PATH"]


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


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


def _only_classes(images, labels, class_names, classes, name, num_classes):
    """Keep the images of ``classes``, relabelled 0..len(classes)-1 in the listed order."""
    if labels is None:
        raise CDCError(f"{name} has no labels: a class filter needs them")
    if max(classes) >= num_classes:
        raise CDCError(f"{name} has classes 0..{num_classes - 1}; asked for {max(classes)}")
    relabel = torch.full((num_classes,), -1, dtype=torch.int64)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    keep = relabel[labels] >= 0
    names = [class_names[c] for c in classes] if class_names else None
    return images[keep], relabel[labels[keep]], names


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "all",
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
    *,
    size: int | Sequence[int] | None = None,
) -> ImageData:
    """Load a dataset by name as an :class:`ImageData`.

    Args:
        name: one of ``DATASETS`` or ``"imagefolder:PATH"``, optionally with a class
            filter suffix such as ``"fashion-mnist[0-7]"`` (see :func:`parse_class_filter`).
        root: folder with the dataset's files (default: ``DATASETS[name].default_root``).
        split: ``"train"``, ``"test"`` or ``"all"`` (train + test, as the paper).
        download: fetch missing files with torchvision (never done otherwise).
        limit: keep a seeded random subset of this many images (in their original order).
        seed: seed of that subset.
        size: resize every image to this size (``int`` or ``(H, W)``), e.g. digits to 28.

    Mean and std are computed from the returned images.
    """
    if split not in SPLITS:
        raise CDCError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    name, keep_classes = parse_class_filter(name)
    if limit is not None and limit <= 0:
        raise CDCError(f"limit must be a positive number of images, got {limit}")
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1] or (root or "")).expanduser()
        images, labels, class_names = load_image_folder(path, size)
        num_classes = len(class_names) if class_names else 0
    elif name in DATASETS:
        info = DATASETS[name]
        folder = Path(root).expanduser() if root is not None else Path(info.default_root)
        if name != "digits" and not folder.is_dir() and not download:
            raise _missing(name, folder, "the data folder")
        images, labels, class_names = info.loader(folder, split, download)
        num_classes = info.num_classes
    else:
        raise CDCError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")

    images_t = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))
    labels_t = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if keep_classes is not None:
        images_t, labels_t, class_names = _only_classes(
            images_t, labels_t, class_names, keep_classes, name, num_classes
        )
        num_classes = len(keep_classes)
        name = f"{name}[{','.join(map(str, keep_classes))}]"
    if limit is not None and limit < len(images_t):
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(images_t), generator=generator)[:limit].sort().values
        images_t = images_t[keep]
        labels_t = None if labels_t is None else labels_t[keep]
    if size is not None:
        images_t = resize_images(images_t, size)
    mean, std = channel_stats(images_t)
    return ImageData(
        images=images_t.contiguous(),
        labels=labels_t,
        num_classes=num_classes,
        name=name,
        mean=mean,
        std=std,
        class_names=class_names,
    )
