"""Decode the common JPEG and PNG files with OpenCV, to the pixels Pillow gives them.

Opening a small file costs Pillow much Python before any pixel is decoded (format
detection, marker parsing); OpenCV's ``imdecode`` decodes a small JPEG in about 45 us
with the same libjpeg (docs/BENCHMARKS.md, section 5). :func:`cdc_serve.preprocess.load_image`
asks this module first and falls back to Pillow whenever it answers ``None``. So this
module only takes the files whose pixels it can give exactly as Pillow would (measured
equal in ``tests/serving/test_fast_decode.py``), and it answers ``None`` for the rest:

- JPEG: baseline, extended or progressive, 8-bit, 1 or 3 components, one frame, no
  EXIF or XMP segment (an orientation to apply), no Adobe segment (CMYK, YCCK), ending in
  its end-of-image marker (a truncated file goes to Pillow, which reports it). Pillow's
  draft rule is applied: the file decodes at 1/1, 1/2, 1/4 or 1/8 scale, the smallest
  whose sides are at least ``draft`` pixels (``JpegImageFile.draft``); a colour JPEG for
  one channel decodes straight to its luma, as Pillow's draft mode ``L`` does.
- PNG: 8-bit grayscale, RGB or palette without transparency, one frame, no EXIF or XMP,
  a complete chunk list up to ``IEND``. A colour PNG comes back as RGB, and Pillow
  converts it for a 1-channel model (its ITU-R 601-2 luma), as it does on its own path.
- Everything else (other formats, alpha, 16-bit, CMYK, broken or unreadable files, files
  above the pixel limit) goes to Pillow, which also writes every error message.

OpenCV is ``opencv-python-headless`` (a dependency; 4.11 is the last release that runs
with numpy < 2, which the pip Triton server needs). Without it every file goes to Pillow,
with the same pixels, only slower.
"""

from __future__ import annotations

import os
import struct

import numpy as np

try:  # an accelerator: without it Pillow decodes every file, to the same pixels
    import cv2
except ImportError:  # pragma: no cover - cv2 is a dependency
    cv2 = None

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers of the JPEG processes libjpeg decodes and Pillow opens as one
# "JPEG" tile: baseline, extended sequential, progressive (Huffman coded).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})
# PNG text chunks whose keyword carries an orientation Pillow applies.
_PNG_ORIENTATION_KEYWORDS = (b"Raw profile type exif", b"XML:com.adobe.xmp")


def available() -> bool:
    """Whether OpenCV is installed (else every file goes to Pillow)."""
    return cv2 is not None


def decode(
    path: str | os.PathLike, channels: int, draft: int, max_pixels: int
) -> np.ndarray | None:
    """The file's pixels as Pillow's path would give them, or ``None`` to let Pillow decode it.

    Returns uint8 ``H x W`` (grayscale) or ``H x W x 3`` (RGB), before resizing: a JPEG in
    the model's ``channels``, a PNG in its own (grayscale for a 1-channel model when the
    file is grayscale, else RGB). ``draft`` is the JPEG draft size (the model's larger side).
    """
    if cv2 is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(len(_PNG_SIGNATURE))
            if not data.startswith((_JPEG_SOI, _PNG_SIGNATURE)):
                return None  # another format: Pillow's, without reading the whole file here
            data += f.read()
    except OSError:
        return None  # Pillow writes the message
    if data.startswith(_JPEG_SOI):
        return _jpeg(data, channels, draft, max_pixels)
    return _png(data, channels, max_pixels)


# -- JPEG ------------------------------------------------------------------------------


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` of a JPEG this module decodes, else ``None``.

    Walks the marker segments from the start of the file to the frame header; any segment
    that would make Pillow's pixels differ (EXIF/XMP, Adobe, a multi-picture index) or a
    frame type Pillow handles otherwise answers ``None``.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and (segment.startswith(b"Exif") or b"adobe.com/xap" in segment[:40]):
            return None  # an orientation Pillow would apply
        if marker == 0xE2 and segment.startswith(b"MPF"):
            return None  # a multi-picture file (MPO): several frames
        if marker == 0xEE:
            return None  # Adobe: CMYK / YCCK or an unusual colour transform
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _JPEG_SOF or len(segment) < 6 or segment[0] != 8:
                return None  # lossless, arithmetic-coded or 12-bit: Pillow's business
            height, width = struct.unpack_from(">HH", segment, 1)
            components = segment[5]
            return (width, height, components) if components in (1, 3) else None
        pos += 2 + length
    return None


def draft_scale(width: int, height: int, draft: int) -> int:
    """Pillow's ``JpegImageFile.draft`` rule for a square draft size: 8, 4, 2 or 1."""
    scale = min(width // draft, height // draft)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


_REDUCED = {  # (channels, scale) -> imdecode flag
    (1, 1): "IMREAD_GRAYSCALE",
    (1, 2): "IMREAD_REDUCED_GRAYSCALE_2",
    (1, 4): "IMREAD_REDUCED_GRAYSCALE_4",
    (1, 8): "IMREAD_REDUCED_GRAYSCALE_8",
    (3, 1): "IMREAD_COLOR",
    (3, 2): "IMREAD_REDUCED_COLOR_2",
    (3, 4): "IMREAD_REDUCED_COLOR_4",
    (3, 8): "IMREAD_REDUCED_COLOR_8",
}


def _jpeg(data: bytes, channels: int, draft: int, max_pixels: int) -> np.ndarray | None:
    header = jpeg_header(data)
    if header is None or not data.rstrip(b"\x00").endswith(_JPEG_EOI):
        return None
    width, height, _ = header
    if width * height > max_pixels or min(width, height) == 0:
        return None
    scale = draft_scale(width, height, draft)
    flag = getattr(cv2, _REDUCED[(channels, scale)]) | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    expected = ((height + scale - 1) // scale, (width + scale - 1) // scale)
    if pixels is None or pixels.shape[:2] != expected:
        return None
    return pixels if channels == 1 else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


# -- PNG -------------------------------------------------------------------------------


def png_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, colour type)`` of a PNG this module decodes, else ``None``.

    Walks the chunk list to ``IEND`` (a truncated file answers ``None``): 8-bit grayscale
    (type 0), RGB (2) or palette (3), without transparency, animation or an orientation.
    """
    pos, header = 8, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length:
            return None
        if kind == b"IHDR":
            width, height, depth, colour, _, _, _ = struct.unpack_from(">IIBBBBB", body)
            if depth != 8 or colour not in (0, 2, 3):
                return None
            header = (width, height, colour)
        elif kind in (b"tRNS", b"acTL", b"eXIf"):
            return None  # transparency to composite, frames, an orientation
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and body.split(b"\x00", 1)[0] in (
            _PNG_ORIENTATION_KEYWORDS
        ):
            return None
        elif kind == b"IEND":
            return header
        pos += 12 + length
    return None


def _png(data: bytes, channels: int, max_pixels: int) -> np.ndarray | None:
    header = png_header(data)
    if header is None:
        return None
    width, height, colour = header
    if width * height > max_pixels or min(width, height) == 0:
        return None
    gray = colour == 0 and channels == 1
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.shape[:2] != (height, width):
        return None
    return pixels if gray else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
