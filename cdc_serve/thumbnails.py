"""Thumbnails of the sources named in a predictions file, read the way ``predict`` reads them.

A source is what :mod:`cdc_serve.predict` wrote in the ``source`` column:

- ``path/to/img.png``: an image file, opened with :func:`cdc_serve.preprocess.open_image`
  (the same guards against broken files and decompression bombs);
- ``arr.npy[12]`` / ``t10k-images-idx3-ubyte.gz[345]``: image ``i`` of a ``.npy`` or
  IDX file, read through :func:`cdc_serve.predict.iter_items` (so the same layouts,
  dtypes and value ranges are understood).

Relative paths are looked up in each of the ``roots`` in turn (the report uses the
current folder, then the predictions file's folder).

:func:`load_thumbnails` loads only the sources it is given: image files one by one, and
each array file in one pass that stops after the last index asked for (a ``.gz`` IDX
file cannot seek), so a report over 70,000 rows decodes only the few images it shows.
Every thumbnail is an RGB ``PIL.Image`` fitting in ``box`` x ``box`` pixels; small
images are enlarged by a whole factor with nearest-neighbour sampling (crisp pixels),
large ones reduced. A source that cannot be read maps to its error message instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from cdc_serve import CDCError
from cdc_serve.idx import is_idx, read_header
from cdc_serve.npy import read_npy
from cdc_serve.predict import iter_items
from cdc_serve.preprocess import array_layout, open_image, to_model_image

__all__ = ["Source", "load_thumbnails", "parse_source"]

_INDEXED = re.compile(r"^(?P<path>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class Source:
    """Where one source's image lives: a file, and the item index inside an array file."""

    path: str
    index: int | None = None


def parse_source(source: str) -> Source:
    """``a.npy[3]`` / ``x-ubyte.gz[3]`` -> (path, 3); anything else is an image file path."""
    match = _INDEXED.match(source)
    if match is not None:
        path = match["path"]
        if Path(path).suffix.lower() == ".npy" or is_idx(path):
            return Source(path, int(match["index"]))
    return Source(source)


def _resolve(path: str, roots: Sequence[Path]) -> Path:
    """The file ``path`` names, looked up in each root when it is relative; CDCError if none."""
    given = Path(path)
    candidates = [given] if given.is_absolute() else [Path(root) / given for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CDCError(f"{path}: file not found")


# -- sizing ------------------------------------------------------------------------------


def _fit(image: Image.Image, box: int) -> Image.Image:
    """``image`` scaled to fit in ``box`` x ``box``: whole-factor nearest-neighbour
    enlargement for small images, a smooth reduction for large ones."""
    width, height = image.size
    if max(width, height) <= box:
        factor = max(1, box // max(width, height))
        return image.resize((width * factor, height * factor), Image.NEAREST)
    scale = box / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.BILINEAR)


def _to_pil(chw: np.ndarray) -> Image.Image:
    """uint8 ``C x H x W`` (C = 1 or 3) -> an RGB PIL image."""
    if chw.shape[0] == 1:
        return Image.fromarray(chw[0], mode="L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), mode="RGB")


# -- readers -----------------------------------------------------------------------------


def _image_file(path: Path, box: int) -> Image.Image:
    """One image file as an RGB thumbnail (modes converted as predict converts them)."""
    img = open_image(path, draft=box)  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when it can
    width, height = img.size
    scale = min(1.0, box / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return _fit(_to_pil(to_model_image(img, 3, size)), box)


def _native_meta(path: Path) -> SimpleNamespace:
    """Channels and size of the images in an array file, so they are read unresized."""
    shape = read_npy(path).shape if path.suffix.lower() == ".npy" else read_header(path)[1]
    layout = array_layout(shape, batched=True)
    if layout == "HW":
        height, width, channels = shape[1], shape[2], 1
    elif layout == "CHW":
        height, width, channels = shape[2], shape[3], shape[1]
    else:
        height, width, channels = shape[1], shape[2], shape[3]
    return SimpleNamespace(channels=1 if channels == 1 else 3, input_size=(height, width))


def _array_file(path: Path, indices: set[int], box: int) -> dict[int, Image.Image | str]:
    """The images ``indices`` of one ``.npy`` / IDX file, in one pass over it."""
    found: dict[int, Image.Image | str] = {}
    last, position = max(indices), -1
    try:
        items = iter_items([path], _native_meta(path))
        for position, item in enumerate(items):
            if item.error is not None:
                raise CDCError(item.error)
            if position in indices:
                try:
                    found[position] = _fit(_to_pil(item.read()), box)
                except CDCError as exc:
                    found[position] = str(exc)
            if position >= last:
                break
    except CDCError as exc:
        return {i: found.get(i, str(exc)) for i in indices}
    for i in indices - found.keys():
        found[i] = f"{path}[{i}]: index out of range (the file holds {position + 1} images)"
    return found


def load_thumbnails(
    sources: Iterable[str], roots: Sequence[Path], box: int = 64
) -> dict[str, Image.Image | str]:
    """Each source -> its RGB thumbnail (at most ``box`` px a side), or why it is unreadable."""
    out: dict[str, Image.Image | str] = {}
    wanted: dict[str, dict[int, str]] = {}  # array file -> index -> source
    for source in dict.fromkeys(sources):
        ref = parse_source(source)
        if ref.index is None:
            try:
                out[source] = _image_file(_resolve(ref.path, roots), box)
            except CDCError as exc:
                out[source] = str(exc)
            except Exception as exc:  # noqa: BLE001  an exotic mode Pillow cannot convert
                out[source] = f"{source}: cannot read ({type(exc).__name__}: {exc})"
        else:
            wanted.setdefault(ref.path, {})[ref.index] = source
    for path, by_index in wanted.items():
        try:
            images = _array_file(_resolve(path, roots), set(by_index), box)
        except CDCError as exc:
            images = dict.fromkeys(by_index, str(exc))
        for index, source in by_index.items():
            out[source] = images[index]
    return out
