"""Preprocessing: image modes, resizing, normalisation, arrays, and every bad input."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdc_serve import CDCError
from cdc_serve.modelmeta import ModelMeta
from cdc_serve.preprocess import (
    MAX_PIXELS,
    array_layout,
    array_to_image,
    float_scale,
    load_image,
    normalise,
    normalise_with,
    prepare,
    to_model_image,
    to_model_images,
)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# -- good images in every mode ----------------------------------------------------------


def test_grayscale_png_exact(tmp_path):
    pixels = noise((8, 8))
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 1, (8, 8))
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], pixels)


def test_rgb_to_gray_and_gray_to_rgb(tmp_path):
    rgb = noise((6, 6, 3))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    gray = load_image(tmp_path / "rgb.png", 1, (6, 6))[0].astype(int)
    # Pillow's ITU-R 601-2 luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    want = (r * 299 + g * 587 + b * 114) / 1000
    assert np.abs(gray - want).max() <= 1
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    three = load_image(tmp_path / "l.png", 3, (6, 6))
    assert three.shape == (3, 6, 6)
    np.testing.assert_array_equal(three[0], three[2])
    np.testing.assert_array_equal(three[1], rgb[..., 0])


def test_rgb_channel_order(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 200  # red
    Image.fromarray(img).save(tmp_path / "red.png")
    out = load_image(tmp_path / "red.png", 3, (4, 4))
    assert (out[0] == 200).all() and (out[1] == 0).all() and (out[2] == 0).all()


def test_resize_to_input_size(tmp_path):
    Image.fromarray(noise((50, 30))).save(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg", 1, (28, 28)).shape == (1, 28, 28)
    assert load_image(tmp_path / "big.jpg", 3, (12, 20)).shape == (3, 12, 20)


def test_four_channel_png_is_composited(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque
    rgba[2:, :, 3] = 0  # bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", 3, (4, 4))
    assert (out[:, :2] == 200).all()
    assert (out[:, 2:] == 0).all()  # transparent -> black background
    gray = load_image(tmp_path / "rgba.png", 1, (4, 4))
    assert gray.shape == (1, 4, 4) and (gray[0, :2] == 200).all()


def test_la_png(tmp_path):
    la = np.stack([np.full((3, 3), 100, np.uint8), np.full((3, 3), 255, np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png", 1, (3, 3)) == 100).all()


def test_sixteen_bit_png_is_scaled(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 3]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    out = load_image(tmp_path / "deep.png", 1, (2, 2))
    np.testing.assert_array_equal(out[0], [[0, 100], [255, 3]])


def test_float_mode_image():
    img = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(to_model_image(img, 1, (2, 2))[0], [[0, 128], [255, 64]])


def test_palette_and_cmyk_and_bilevel(tmp_path):
    rgb = noise((5, 5, 3))
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.gif", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(rgb[..., 0]).convert("1").save(tmp_path / "b.png")
    for name in ("p.png", "p.gif", "c.jpg", "b.png"):
        for channels in (1, 3):
            out = load_image(tmp_path / name, channels, (5, 5))
            assert out.shape == (channels, 5, 5) and out.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 4), np.uint8)
    pixels[0, 0] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.png", exif=exif)
    out = load_image(tmp_path / "o.png", 1, (4, 2))
    assert out.shape == (1, 4, 2) and out[0, 0, 1] == 255


def test_exif_orientation_of_a_jpeg_is_applied(tmp_path):
    pixels = np.zeros((16, 32), np.uint8)
    pixels[:8, :8] = 255  # a bright top-left corner
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=95)
    assert load_image(tmp_path / "plain.jpg", 1, (16, 32))[0, 0, 0] > 200
    out = load_image(tmp_path / "o.jpg", 1, (32, 16))
    assert out[0, 0, -1] > 200 and out[0, 0, 0] < 50  # the corner is now top-right


def test_a_colour_jpeg_for_one_channel_decodes_to_its_luma(tmp_path):
    rgb = noise((40, 40, 3))
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as img:
        via_rgb = np.asarray(img.convert("L"), dtype=int)
    luma = load_image(tmp_path / "c.jpg", 1, (40, 40))[0].astype(int)
    # the decoder's own luma: the same up to rounding, and where RGB clips
    assert np.abs(luma - via_rgb).mean() < 1.5 and np.abs(luma - via_rgb).max() <= 32


def test_decoding_leaves_no_file_open(tmp_path):
    rgb = noise((12, 12, 3))
    for suffix in ("jpg", "png", "gif", "tif", "bmp"):
        Image.fromarray(rgb).save(tmp_path / f"a.{suffix}")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    files = sorted(tmp_path.iterdir())
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        for path in files:
            assert load_image(path, 3, (6, 6)).shape == (3, 6, 6)
    assert len(os.listdir("/proc/self/fd")) == before


# -- bad files ---------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CDCError, match="empty.png.*empty file"):
        load_image(tmp_path / "empty.png", 1, (8, 8))


def test_truncated_png(tmp_path):
    Image.fromarray(noise((64, 64))).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CDCError, match="t.png"):
        load_image(tmp_path / "t.png", 1, (8, 8))


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(CDCError, match="notes.jpg.*not an image"):
        load_image(tmp_path / "notes.jpg", 1, (8, 8))


def test_huge_image_is_refused_before_decoding(tmp_path):
    # Within Pillow's own bomb limit but above ours.
    side = int(MAX_PIXELS**0.5) + 100
    png_claiming_size(tmp_path / "huge.png", side, side)
    with pytest.raises(CDCError, match="huge.png.*too large"):
        load_image(tmp_path / "huge.png", 1, (8, 8))
    # Far beyond Pillow's limit (it raises DecompressionBombError while opening).
    png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(CDCError, match="bomb.png.*too large"):
        load_image(tmp_path / "bomb.png", 1, (8, 8))


def test_missing_file(tmp_path):
    with pytest.raises(CDCError, match="cannot read"):
        load_image(tmp_path / "nope.png", 1, (8, 8))


# -- arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, batched, layout",
    [
        ((5, 28, 28), True, "HW"),
        ((5, 1, 28, 28), True, "CHW"),
        ((5, 3, 32, 32), True, "CHW"),
        ((5, 32, 32, 3), True, "HWC"),
        ((5, 32, 32, 4), True, "HWC"),
        ((28, 28), False, "HW"),
        ((3, 8, 8), False, "CHW"),
        ((8, 8, 3), False, "HWC"),
    ],
)
def test_array_layout(shape, batched, layout):
    assert array_layout(shape, batched) == layout


@pytest.mark.parametrize("shape", [(5,), (5, 784), (5, 2, 8, 8, 1), (5, 8, 8, 2), (5, 0, 8)])
def test_array_layout_rejects(shape):
    with pytest.raises(CDCError, match="wrong array shape"):
        array_layout(shape, batched=True)


def test_array_conversions():
    img = noise((8, 8))
    np.testing.assert_array_equal(array_to_image(img, "HW", 1, (8, 8))[0], img)
    np.testing.assert_array_equal(array_to_image(img[None], "CHW", 1, (8, 8))[0], img)
    np.testing.assert_array_equal(array_to_image(img[..., None], "HWC", 1, (8, 8))[0], img)
    as_float = img.astype(np.float32) / 255
    assert float_scale(as_float[None]) == 255.0
    np.testing.assert_array_equal(array_to_image(as_float, "HW", 1, (8, 8), 255.0)[0], img)
    assert float_scale(img.astype(np.float32)[None]) == 1.0
    np.testing.assert_array_equal(array_to_image(img.astype(np.float64), "HW", 1, (8, 8))[0], img)
    np.testing.assert_array_equal(array_to_image(img.astype(np.int32), "HW", 1, (8, 8))[0], img)


def test_array_bad_values():
    img = np.zeros((4, 4), np.float32)
    img[1, 1] = np.nan
    with pytest.raises(CDCError, match="NaN"):
        array_to_image(img, "HW", 1, (4, 4))
    with pytest.raises(CDCError, match="outside 0..255"):
        array_to_image(np.full((4, 4), 300.0), "HW", 1, (4, 4))
    with pytest.raises(CDCError, match="outside 0..255"):
        array_to_image(np.full((4, 4), -5, np.int16), "HW", 1, (4, 4))


def test_prepare_dispatch(tmp_path):
    img = noise((8, 8))
    Image.fromarray(img).save(tmp_path / "x.png")
    for item in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(img), img):
        np.testing.assert_array_equal(prepare(item, 1, (8, 8))[0], img)
    with pytest.raises(CDCError, match="cannot use a int"):
        prepare(3, 1, (8, 8))


# -- normalisation -------------------------------------------------------------------------


def test_normalise_formula():
    meta = ModelMeta(
        name="m", num_classes=2, channels=3, input_size=(2, 2),
        mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0], embedding_dim=4,
    )  # fmt: skip
    batch = noise((2, 3, 2, 2))
    out = normalise(batch, meta)
    assert out.dtype == np.float32 and out.shape == batch.shape
    for c in range(3):
        want = (batch[:, c] / 255.0 - meta.mean[c]) / meta.std[c]
        np.testing.assert_allclose(out[:, c], want, rtol=1e-6, atol=1e-6)


def test_normalise_rejects_wrong_shapes():
    with pytest.raises(CDCError, match="N x C x H x W"):
        normalise_with(np.zeros((3, 4, 4), np.uint8), [0.5], [0.5])
    with pytest.raises(CDCError, match="channels"):
        normalise_with(np.zeros((1, 3, 4, 4), np.uint8), [0.5], [0.5])


def test_the_numpy_and_torch_normalisations_agree():
    """One formula, two homes: the client's (numpy) and training's (torch) must agree."""
    torch = pytest.importorskip("torch")
    from cdc_serve_training.augment import Augmenter
    from cdc_serve_training.evaluation import normalize_images

    mean, std = [0.1, 0.5, 0.9], [0.3, 0.25, 2.0]
    batch = noise((4, 3, 5, 6))
    served = normalise_with(batch, mean, std)
    trained = normalize_images(torch.from_numpy(batch), mean, std).numpy()
    augmenter_val = Augmenter((5, 6), mean, std).val(torch.from_numpy(batch)).numpy()
    for other in (trained, augmenter_val):
        assert other.dtype == served.dtype == np.float32
        np.testing.assert_allclose(other, served, rtol=0, atol=1e-6)


# -- whole datasets at the model's size ----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channels", "size"),
    [((5, 1, 28, 28), 1, (8, 8)), ((5, 3, 32, 32), 1, (28, 28)), ((5, 1, 8, 8), 3, (16, 12))],
    ids=["gray-down", "rgb-to-gray", "gray-to-rgb-up"],
)
def test_to_model_images_is_the_clients_preprocessing(shape, channels, size):
    images = noise(shape)
    out = to_model_images(images, channels, size)
    assert out.dtype == np.uint8 and out.shape == (shape[0], channels, *size)
    expected = np.stack([prepare(image, channels, size) for image in images])
    np.testing.assert_array_equal(out, expected)


def test_to_model_images_keeps_images_that_fit_and_refuses_odd_arrays():
    images = noise((3, 1, 8, 8))
    assert to_model_images(images, 1, (8, 8)) is images
    with pytest.raises(CDCError, match="uint8 N x C x H x W"):
        to_model_images(images.astype(np.float32), 1, (8, 8))
    with pytest.raises(CDCError, match="C = 1 or 3"):
        to_model_images(noise((3, 4, 8, 8)), 1, (8, 8))
