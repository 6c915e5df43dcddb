"""Decode, convert, resize and normalise images for an exported model.

Everything a model needs is in its metadata (:class:`cdc_serve.modelmeta.ModelMeta`):
``channels`` (1 = grayscale, 3 = RGB), ``input_size`` (H, W), ``mean`` and ``std``.

The pipeline for one image is::

    file / PIL image / array  ->  uint8 C x H x W (model channels and size)  ->  batch
    batch (uint8 N x C x H x W)  ->  normalise  ->  float32 (x / 255 - mean[c]) / std[c]

Conventions for images given as arrays (one image, or ``.npy`` / IDX files of many):

- shapes ``H x W`` (grayscale), ``H x W x C`` or ``C x H x W`` with ``C`` in 1, 3, 4
  (a 3-D shape is channels-first when its first axis is 1, 3 or 4 and its last is not);
- ``uint8`` (and other integer types) are pixel values 0..255;
- floats are 0..1 when the largest value of the whole array (file) is at most 1,
  else 0..255; NaN, inf or values outside the range make that image an error.

Bad input never crashes deep inside Pillow: every problem (zero-byte or truncated
file, not an image, a decompression bomb, a mode we cannot convert) raises
:class:`cdc_serve.CDCError` naming the source.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cdc_serve import CDCError, fast_decode

# Images larger than this many pixels are refused before they are decoded
# (a decompression bomb: a small file that expands to gigabytes).
MAX_PIXELS = 40_000_000

# File name suffixes treated as images when a folder is scanned.
IMAGE_SUFFIXES = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)

# Transparent pixels are composited onto this background (black, like MNIST-style data).
BACKGROUND = 0


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8-bit grayscale ('L')."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif img.mode == "I":
        # 32-bit signed container; PNG 16-bit files open as 'I' in some Pillow versions.
        arr = arr.astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
    elif img.mode == "F":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise CDCError("image contains NaN or inf")
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with alpha onto the background; returns 'L' or 'RGB'."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
    flat = Image.alpha_composite(background, rgba).convert("RGB")
    return flat.convert("L") if img.mode in ("LA", "La", "PA") else flat


def to_model_image(img: Image.Image, channels: int, input_size: tuple[int, int]) -> np.ndarray:
    """A decoded PIL image -> uint8 ``C x H x W`` for the model (mode, channels, size)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _to_8bit(img)
    elif mode == "P":
        has_alpha = "transparency" in img.info
        img = _flatten_alpha(img) if has_alpha else img.convert("RGB")
    elif mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        img = _flatten_alpha(img)
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    height, width = input_size
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    flat = np.frombuffer(img.tobytes(), np.uint8)  # raw bytes: cheaper than np.asarray(img)
    if channels == 1:
        return flat.reshape(1, height, width)
    return np.ascontiguousarray(flat.reshape(height, width, 3).transpose(2, 0, 1))


def open_image(
    path: str | os.PathLike,
    max_pixels: int = MAX_PIXELS,
    draft: int | None = None,
    gray: bool = False,
) -> Image.Image:
    """Open and fully decode an image file, turning every failure into CDCError.

    ``draft``: a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose sides
    are both at least ``draft`` pixels (Pillow's ``Image.draft``): a 12-MP photo bound for
    a 64-px model input decodes at 1/8 of the work and memory. Other formats ignore it.
    ``gray``: a colour JPEG is decoded straight to grayscale (its luma channel; the
    caller wants one channel), which skips the colour conversion.

    The image comes upright: an EXIF or XMP orientation is applied. A JPEG or PNG file
    without such metadata (the common case) skips that step.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            try:
                return _decoded(img, path, max_pixels, draft, gray)
            except BaseException:
                with img:  # closes the file
                    raise
    except CDCError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CDCError(f"{path}: image too large (decompression bomb guard: {exc})") from None
    except Image.UnidentifiedImageError:
        raise _unidentified(path) from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            raise CDCError(f"{path}: cannot read ({exc.strerror or exc})") from None
        raise CDCError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise CDCError(f"{path}: image too large to decode") from None
    except Exception as exc:  # noqa: BLE001  Pillow raises OSError, SyntaxError, ValueError, ...
        raise CDCError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


# Where Pillow finds an orientation to apply (``ImageOps.exif_transpose``).
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _decoded(
    img: Image.Image, path: Any, max_pixels: int, draft: int | None, gray: bool
) -> Image.Image:
    """The pixels of an opened image, upright, in an image that no longer needs the file."""
    width, height = img.size
    if width * height > max_pixels:
        raise CDCError(
            f"{path}: image too large ({width} x {height} = {width * height:,} pixels, "
            f"limit {max_pixels:,})"
        )
    if draft is not None and img.format == "JPEG":
        mode = ("L" if gray else img.mode) if img.mode in ("L", "RGB") else None
        img.draft(mode, (draft, draft))
    img.load()
    if (
        img.format in ("JPEG", "PNG")
        and getattr(img, "n_frames", 1) == 1
        and not any(key in img.info for key in _ORIENTATION_KEYS)
    ):
        return img  # upright, and load() has read and closed the file: nothing to copy
    with img:
        upright = ImageOps.exif_transpose(img)  # a new image, detached from the file
        return upright if upright is not img else img.copy()


def _unidentified(path: str | os.PathLike) -> CDCError:
    """Pillow recognised no format: an empty file, or not an image."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return CDCError(f"{path}: empty file (0 bytes)")
    return CDCError(f"{path}: not an image (unrecognised format)")


def load_image(
    path: str | os.PathLike,
    channels: int,
    input_size: tuple[int, int],
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read an image file as uint8 ``C x H x W`` ready for :func:`normalise`.

    A JPEG much larger than ``input_size`` is decoded at reduced scale (``draft``, see
    :func:`open_image`), and straight to grayscale for a 1-channel model: every path to
    the model (training's folder reader, ``predict``, :class:`~cdc_serve.client.Client`)
    decodes a file the same way.

    A common JPEG or PNG is decoded by OpenCV (:mod:`cdc_serve.fast_decode`, to the
    pixels Pillow gives it, faster: docs/BENCHMARKS.md, section 5); every other file by Pillow.
    """
    pixels = fast_decode.decode(path, channels, max(input_size), max_pixels)
    if pixels is not None:  # handed to Pillow as raw bytes (cheaper than Image.fromarray)
        mode = "L" if pixels.ndim == 2 else "RGB"
        size = (pixels.shape[1], pixels.shape[0])
        img = Image.frombuffer(mode, size, pixels, "raw", mode, 0, 1)
        return to_model_image(img, channels, input_size)
    img = open_image(path, max_pixels, draft=max(input_size), gray=channels == 1)
    try:
        return to_model_image(img, channels, input_size)
    except CDCError as exc:
        raise CDCError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  an exotic mode Pillow cannot convert
        raise CDCError(f"{path}: cannot convert image mode {img.mode!r} ({exc})") from None


# -- arrays ----------------------------------------------------------------------------


def array_layout(shape: tuple[int, ...], batched: bool) -> str:
    """Layout of an image array: 'HW', 'CHW' or 'HWC' (with a leading N when ``batched``).

    Raises CDCError for any other shape.
    """
    dims = shape[1:] if batched else shape
    what = (
        "N x H x W, N x C x H x W or N x H x W x C" if batched else "H x W, C x H x W or H x W x C"
    )
    if batched and len(shape) < 1:
        raise CDCError(f"wrong array shape {shape}: expected {what}")
    if len(dims) == 2 and min(dims) > 0:
        return "HW"
    if len(dims) == 3 and min(dims) > 0:
        if dims[0] in (1, 3, 4) and dims[2] not in (1, 3, 4):
            return "CHW"
        if dims[2] in (1, 3, 4):
            return "HWC"
        if dims[0] in (1, 3, 4):
            return "CHW"
    raise CDCError(f"wrong array shape {shape}: expected {what} with C in 1, 3, 4")


def float_scale(array: np.ndarray, chunk: int = 4096) -> float:
    """255 when a float array's finite values all lie in [0, 1] (so they are scaled), else 1."""
    if not np.issubdtype(array.dtype, np.floating):
        return 1.0
    top = -np.inf
    for i in range(0, max(len(array), 1), chunk):
        part = np.asarray(array[i : i + chunk], dtype=np.float64)
        finite = part[np.isfinite(part)]
        if finite.size:
            top = max(top, float(finite.max()))
    return 255.0 if top <= 1.0 else 1.0


def array_to_image(
    item: np.ndarray, layout: str, channels: int, input_size: tuple[int, int], scale: float = 1.0
) -> np.ndarray:
    """One image array (see the module conventions) -> uint8 ``C x H x W`` for the model.

    ``scale`` multiplies float values first (255 for a 0..1 array, see :func:`float_scale`).
    """
    item = np.asarray(item)
    if layout == "CHW":
        item = item.transpose(1, 2, 0)
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[:, :, 0]
    if item.dtype == np.uint8:
        pixels = item
    elif np.issubdtype(item.dtype, np.integer) or np.issubdtype(item.dtype, np.bool_):
        if item.size and (item.min() < 0 or item.max() > 255):
            raise CDCError(f"pixel values outside 0..255 (min {item.min()}, max {item.max()})")
        pixels = item.astype(np.uint8)
    elif np.issubdtype(item.dtype, np.floating):
        values = item.astype(np.float64) * scale
        if not np.isfinite(values).all():
            raise CDCError("image contains NaN or inf")
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        if low < -0.5 or high > 255.5:
            raise CDCError(f"pixel values outside 0..255 (min {low:g}, max {high:g})")
        pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        raise CDCError(f"unsupported array dtype {item.dtype}")
    height, width = input_size
    if pixels.shape[:2] == (height, width):  # already the model's size: no resampling
        if pixels.ndim == 2 and channels == 1:
            return np.ascontiguousarray(pixels)[None]
        if pixels.ndim == 3 and pixels.shape[2] == 3 and channels == 3:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        img = Image.fromarray(pixels, mode="RGBA")
    elif pixels.ndim == 3:
        img = Image.fromarray(pixels, mode="RGB")
    else:
        img = Image.fromarray(pixels, mode="L")
    return to_model_image(img, channels, input_size)


def to_model_images(images: np.ndarray, channels: int, input_size: tuple[int, int]) -> np.ndarray:
    """uint8 ``N x C x H x W`` images (C = 1 or 3, any size) -> uint8 ``N x channels x H' x W'``.

    Each image is converted and resized exactly as :meth:`cdc_serve.client.Client.predict`
    does it for an image array (:func:`array_to_image`: Pillow's bilinear resize, Pillow's
    ITU-R 601-2 luma for RGB to grayscale); images already at the model's size and
    channels are returned as they are.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in (1, 3):
        raise CDCError(
            f"expected uint8 N x C x H x W images with C = 1 or 3, got {images.dtype} {images.shape}"
        )
    if images.shape[1] == channels and tuple(images.shape[2:]) == tuple(input_size):
        return images
    height, width = input_size
    out = np.empty((len(images), channels, height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = array_to_image(image, "CHW", channels, (height, width))
    return out


def prepare(
    item: Any, channels: int, input_size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """A file path, PIL image or single image array -> uint8 ``C x H x W`` for the model."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, channels, input_size, max_pixels)
    if isinstance(item, Image.Image):
        return to_model_image(item, channels, input_size)
    if isinstance(item, np.ndarray):
        scale = 255.0 if item.dtype.kind == "f" and np.nanmax(item, initial=0) <= 1.0 else 1.0
        return array_to_image(
            item, array_layout(item.shape, batched=False), channels, input_size, scale
        )
    raise CDCError(
        f"cannot use a {type(item).__name__} as an image (give a path, PIL image or array)"
    )


def normalise(batch: np.ndarray, meta: Any) -> np.ndarray:
    """uint8 ``N x C x H x W`` -> float32 model input, with the model's ``meta.mean``/``meta.std``."""
    return normalise_with(batch, meta.mean, meta.std)


def normalise_with(batch: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """uint8 ``N x C x H x W`` -> float32 ``(x / 255 - mean[c]) / std[c]`` (per-channel lists)."""
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise CDCError(f"normalise: expected N x C x H x W, got shape {batch.shape}")
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    if mean.shape[1] != batch.shape[1] or std.shape[1] != batch.shape[1]:
        raise CDCError(
            f"normalise: batch has {batch.shape[1]} channels, mean/std have {mean.shape[1]}/{std.shape[1]}"
        )
    return ((batch.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)
