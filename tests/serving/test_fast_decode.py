"""OpenCV's fast path gives exactly Pillow's pixels, and hands every other file to Pillow.

The files are real images: scikit-learn's digits in random
colours, saved by Pillow as the formats and variants users have (baseline, progressive,
grayscale, 4:4:4 and 4:2:0 JPEG; grayscale, RGB and palette PNG), at sizes that make
Pillow's JPEG draft mode pick each scale (1/1 to 1/8, odd sides included).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from cdc_serve import CDCError, fast_decode
from cdc_serve.preprocess import MAX_PIXELS, load_image, open_image, to_model_image

pytestmark = pytest.mark.skipif(not fast_decode.available(), reason="opencv is not installed")


def _picture(index: int, side: tuple[int, int], seed: int = 0) -> Image.Image:
    """Digit ``index`` in random colours, resized to ``side`` (width, height)."""
    rng = np.random.default_rng(seed + index)
    gray = load_digits().images[index] / 16.0
    fg, bg = rng.integers(128, 256, 3), rng.integers(0, 96, 3)
    rgb = (gray[..., None] * fg + (1 - gray[..., None]) * bg).astype(np.uint8)
    # a little texture, so that every DCT coefficient and every resampling tap matters
    big = np.asarray(Image.fromarray(rgb).resize(side, Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, big.shape)
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def _pillow_load(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """What ``load_image`` gave before the fast path: Pillow alone."""
    img = open_image(path, MAX_PIXELS, draft=max(size), gray=channels == 1)
    return to_model_image(img, channels, size)


def _save(img: Image.Image, path: Path, **options) -> Path:
    img.save(path, **options)
    return path


JPEG_VARIANTS = {
    "baseline": dict(quality=90),
    "progressive": dict(quality=85, progressive=True),
    "444": dict(quality=95, subsampling=0),
    "420-low": dict(quality=40, subsampling=2),
    "optimized": dict(quality=75, optimize=True),
}
# (width, height) -> the draft scale for a 28-px model: 1, 2, 4 and 8, odd sides included
SIDES = [(20, 33), (28, 28), (61, 57), (120, 97), (131, 255), (640, 480)]
SIZES = [(28, 28), (32, 24)]


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_pixels_equal_pillow(tmp_path, variant, mode):
    for i, side in enumerate(SIDES):
        img = _picture(i, side).convert(mode)
        path = _save(img, tmp_path / f"{i}.jpg", **JPEG_VARIANTS[variant])
        for channels in (1, 3):
            for size in SIZES:
                assert fast_decode.decode(path, channels, max(size), MAX_PIXELS) is not None
                fast = load_image(path, channels, size)
                slow = _pillow_load(path, channels, size)
                assert fast.shape == (channels, *size)
                np.testing.assert_array_equal(fast, slow, err_msg=f"{side} {channels} {size}")


def test_jpeg_draft_decodes_at_pillows_scale(tmp_path):
    """The decoded picture (before resizing) has Pillow's draft size, for every scale."""
    for i, (side, scale) in enumerate([((40, 40), 1), ((64, 70), 2), ((130, 128), 4),
                                       ((257, 301), 8), ((2000, 1500), 8)]):  # fmt: skip
        path = _save(_picture(i, side), tmp_path / f"{i}.jpg", quality=90)
        assert fast_decode.draft_scale(*side, 28) == scale
        pixels = fast_decode.decode(path, 3, 28, MAX_PIXELS)
        with Image.open(path) as img:
            img.draft("RGB", (28, 28))
            np.testing.assert_array_equal(pixels, np.asarray(img.convert("RGB")))
        assert pixels.shape == (-(-side[1] // scale), -(-side[0] // scale), 3)


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_png_pixels_equal_pillow(tmp_path, mode):
    for i, side in enumerate(SIDES[:5]):
        img = _picture(i, side)
        img = img.quantize(64) if mode == "P" else img.convert(mode)
        path = _save(img, tmp_path / f"{i}.png")
        for channels in (1, 3):
            for size in SIZES:
                assert fast_decode.decode(path, channels, max(size), MAX_PIXELS) is not None
                np.testing.assert_array_equal(
                    load_image(path, channels, size), _pillow_load(path, channels, size)
                )


def _exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _png_with(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _cases(img: Image.Image) -> dict[str, bytes]:
    """Files the fast path must leave to Pillow, each with what makes it so."""
    jpeg = io.BytesIO()
    img.save(jpeg, "JPEG", quality=90)
    cmyk = io.BytesIO()
    img.convert("CMYK").save(cmyk, "JPEG")
    gif, webp, bmp = io.BytesIO(), io.BytesIO(), io.BytesIO()
    img.save(gif, "GIF")
    img.save(bmp, "BMP")
    img.save(webp, "WEBP")
    transparent = img.quantize(16)
    return {
        "exif-orientation.jpg": _exif_rotated(img),
        "cmyk.jpg": cmyk.getvalue(),
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "rgba.png": _png_with(img.convert("RGBA")),
        "gray-alpha.png": _png_with(img.convert("LA")),
        "palette-transparency.png": _png_with(transparent, transparency=0),
        "16-bit.png": _png_with(img.convert("L").convert("I;16")),
        "exif.png": _png_with(img, exif=Image.open(io.BytesIO(_exif_rotated(img))).getexif()),
        "truncated.png": _png_with(img)[:-20],
        "picture.gif": gif.getvalue(),
        "picture.bmp": bmp.getvalue(),
        "picture.webp": webp.getvalue(),
    }


def test_other_files_go_to_pillow_with_the_same_pixels(tmp_path):
    img = _picture(3, (45, 60))
    for name, data in _cases(img).items():
        path = tmp_path / name
        path.write_bytes(data)
        assert fast_decode.decode(path, 3, 28, MAX_PIXELS) is None, name
        if name.startswith("truncated"):
            continue  # an error: below
        for channels in (1, 3):
            np.testing.assert_array_equal(
                load_image(path, channels, (28, 28)), _pillow_load(path, channels, (28, 28))
            )
    rotated = load_image(tmp_path / "exif-orientation.jpg", 3, (40, 20))
    assert rotated.shape == (3, 40, 20)  # upright: Pillow applied the orientation


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jpg", b"", r"empty file \(0 bytes\)"),
        ("text.png", b"not an image", "not an image"),
        ("header-only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "cannot decode image"),
        ("header-only.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "cannot"),
    ],
)
def test_unreadable_files_keep_pillows_errors(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    assert fast_decode.decode(path, 1, 28, MAX_PIXELS) is None
    with pytest.raises(CDCError, match=message):
        load_image(path, 1, (28, 28))


def test_truncated_jpeg_is_pillows_error(tmp_path):
    path = tmp_path / "cut.jpg"
    full = io.BytesIO()
    _picture(0, (64, 64)).save(full, "JPEG")
    path.write_bytes(full.getvalue()[:300])
    with pytest.raises(CDCError, match="cut.jpg: cannot decode image"):
        load_image(path, 3, (28, 28))


def test_pixel_limit_goes_to_pillows_error(tmp_path):
    path = _save(_picture(1, (300, 200)), tmp_path / "big.jpg")
    assert fast_decode.decode(path, 3, 28, 50_000) is None
    with pytest.raises(CDCError, match="image too large"):
        load_image(path, 3, (28, 28), max_pixels=50_000)


def test_headers_are_read_from_the_bytes():
    jpeg, png, png4 = io.BytesIO(), io.BytesIO(), io.BytesIO()
    _picture(2, (37, 21)).save(jpeg, "JPEG", progressive=True)
    _picture(2, (37, 21)).quantize(64).save(png, "PNG")
    _picture(2, (37, 21)).quantize(8).save(png4, "PNG")  # 4 bits per pixel: Pillow's
    assert fast_decode.jpeg_header(jpeg.getvalue()) == (37, 21, 3)
    assert fast_decode.png_header(png.getvalue()) == (37, 21, 3)
    assert fast_decode.png_header(png4.getvalue()) is None
    assert fast_decode.jpeg_header(b"\xff\xd8\xff") is None
    assert fast_decode.png_header(png.getvalue()[:30]) is None
