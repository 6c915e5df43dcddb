"""The streaming folder reader: sizes, channels, bad files, strict, the cache, draft JPEGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from folders import digit_folder
from PIL import Image

from cdc_serve import CDCError
from cdc_serve.image_folder import list_images, read_image_folder


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return digit_folder(tmp_path_factory.mktemp("flat") / "photos", n=80)


def test_reads_every_good_image_at_the_size_asked_and_skips_bad_files(flat, tmp_path):
    folder, _ = flat
    read = read_image_folder(folder, (24, 20), cache_dir=tmp_path, workers=2, progress=False)
    assert read.images.shape == (80, 3, 24, 20) and read.images.dtype == np.uint8
    assert read.labels is None and read.class_names is None and not read.cached
    assert read.sources == sorted(p.name for p in folder.iterdir() if not p.name.startswith("zz"))
    reasons = dict(read.skipped)
    assert set(reasons) == {"zz-empty.png", "zz-truncated.jpg", "zz-text.png"}
    assert "empty file" in reasons["zz-empty.png"] and "not an image" in reasons["zz-text.png"]
    # the same pixels as decoding one file by hand (a PNG: no draft scaling)
    by_hand = Image.open(folder / read.sources[0]).convert("RGB").resize((20, 24), Image.BILINEAR)
    assert np.array_equal(read.images[0], np.asarray(by_hand).transpose(2, 0, 1))


def test_one_worker_and_no_cache_give_the_same_array(flat, tmp_path):
    folder, _ = flat
    two = read_image_folder(folder, (16, 16), cache_dir=tmp_path, workers=2, progress=False)
    one = read_image_folder(folder, (16, 16), workers=1, progress=False)
    assert type(one.images) is np.ndarray and np.array_equal(one.images, two.images)
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_is_reused_and_a_changed_file_invalidates_it(tmp_path):
    folder, _ = digit_folder(tmp_path / "photos", n=40, broken=False)
    cache = tmp_path / "cache"
    first = read_image_folder(folder, (16, 16), cache_dir=cache, progress=False)
    again = read_image_folder(folder, (16, 16), cache_dir=cache, progress=False)
    assert again.cached and np.array_equal(first.images, again.images)
    victim = folder / first.sources[3]
    Image.new("RGB", (30, 30), (255, 0, 0)).save(victim)  # same name, new content
    os.utime(victim, ns=(1, 1))
    changed = read_image_folder(folder, (16, 16), cache_dir=cache, progress=False)
    assert not changed.cached and changed.images[3, 0].min() >= 250  # red (JPEG rounding)
    assert len(list(cache.glob("images-*.npy"))) == 1  # the stale array was removed


def test_sub_folders_are_labels_and_gray_folders_get_one_channel(tmp_path):
    folder, labels = digit_folder(tmp_path / "classes", n=60, classes=True, broken=False)
    read = read_image_folder(folder, (12, 12), progress=False)
    assert read.class_names == [f"digit{d}" for d in range(10)]
    assert np.array_equal(read.labels, labels)
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(4):
        Image.new("L", (10 + i, 10), i * 40).save(gray / f"{i}.png")
    assert read_image_folder(gray, (8, 8), progress=False).images.shape == (4, 1, 8, 8)
    assert read_image_folder(gray, (8, 8), channels=3, progress=False).images.shape[1] == 3


def test_strict_empty_and_unusable_folders_give_one_clear_error(flat, tmp_path):
    folder, _ = flat
    with pytest.raises(CDCError, match=r"zz-empty.png: empty file.*--strict"):
        read_image_folder(folder, (8, 8), strict=True, progress=False)
    with pytest.raises(CDCError, match="holds no images"):
        list_images(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("x")
    with pytest.raises(CDCError, match="none of its 2 files is a readable image"):
        read_image_folder(bad, (8, 8), progress=False)
    with pytest.raises(CDCError, match="does not exist"):
        read_image_folder(tmp_path / "missing", (8, 8))
    with pytest.raises(CDCError, match="--channels must be 1 or 3"):
        read_image_folder(folder, (8, 8), channels=2)


def test_decompression_bomb_and_odd_modes(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (400, 400)).save(folder / "big.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (20, 20), 4000).save(folder / "deep.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(folder / "clear.png")
    read = read_image_folder(folder, (8, 8), max_pixels=100_000, progress=False)
    assert dict(read.skipped).keys() == {"big.png"}
    assert "too large" in dict(read.skipped)["big.png"]
    assert read.images.shape == (3, 3, 8, 8)


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """Draft mode: a 4000x3000 JPEG bound for 32 px decodes at 1/8 scale (500x375)."""
    from cdc_serve.preprocess import open_image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=80)
    assert open_image(tmp_path / "photo.jpg", draft=32).size == (500, 375)
    assert open_image(tmp_path / "photo.jpg").size == (4000, 3000)
    read = read_image_folder(tmp_path, (32, 32), progress=False)
    assert read.images.shape == (1, 3, 32, 32)
