"""IDX reader/writer: round trips, real Fashion-MNIST files, corrupt files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from cdc_serve import CDCError
from cdc_serve.idx import (
    check_idx,
    iter_idx_blocks,
    read_header,
    read_idx,
    read_idx_rows,
    write_idx,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.arange(6, dtype=np.int16).reshape(3, 2) * -300,
        np.arange(5, dtype=np.int32) * 100_000,
        np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2),
        np.linspace(-1, 1, 3, dtype=np.float64),
    ],
    ids=lambda a: str(a.dtype),
)
def test_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"a-ubyte{suffix}", array)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)
    assert check_idx(path)[1] == array.shape


def test_header_is_big_endian(tmp_path):
    path = write_idx(tmp_path / "x-ubyte", np.zeros((3, 258), dtype=np.uint8))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 2])
    assert raw[4:12] == bytes([0, 0, 0, 3, 0, 0, 1, 2])
    assert len(raw) == 12 + 3 * 258


def test_rows_and_blocks(tmp_path):
    array = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2)
    for name in ("r-ubyte", "r-ubyte.gz"):
        path = write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx_rows(path, 3, 7), array[3:7])
        blocks = list(iter_idx_blocks(path, block=4))
        assert [s for s, _ in blocks] == [0, 4, 8]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), array)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert read_header(FMNIST / "train-images-idx3-ubyte.gz")[1] == (60000, 28, 28)


def test_truncated_file_names_the_file(tmp_path):
    path = write_idx(tmp_path / "t-ubyte", np.ones((4, 5, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CDCError, match="t-ubyte.*truncated"):
        read_idx(path)
    with pytest.raises(CDCError, match="truncated"):
        check_idx(path)


def test_truncated_gzip(tmp_path):
    path = write_idx(
        tmp_path / "t-ubyte.gz",
        np.random.default_rng(0).integers(0, 255, (50, 9, 9)).astype(np.uint8),
    )
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CDCError, match="t-ubyte.gz"):
        read_idx(path)
    with pytest.raises(CDCError, match="t-ubyte.gz"):
        check_idx(path)


def test_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "t-ubyte", np.ones((2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(CDCError, match="trailing"):
        read_idx(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an IDX"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "type code"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (b"hello world, not idx", "bad magic"),
    ],
)
def test_bad_headers(tmp_path, content, message):
    path = tmp_path / "bad-ubyte"
    path.write_bytes(content)
    with pytest.raises(CDCError, match=message):
        read_idx(path)


def test_not_gzip(tmp_path):
    path = tmp_path / "fake-ubyte.gz"
    path.write_bytes(b"definitely not gzip data")
    with pytest.raises(CDCError, match="fake-ubyte.gz"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(CDCError, match="no such IDX"):
        read_idx(tmp_path / "nope-ubyte")


def test_gzip_written_is_real_gzip(tmp_path):
    array = np.arange(12, dtype=np.uint8)
    path = write_idx(tmp_path / "g-ubyte.gz", array)
    with gzip.open(path, "rb") as f:
        assert f.read()[8:] == array.tobytes()


def test_gzip_header_claiming_a_billion_images_allocates_only_what_is_there(tmp_path):
    """The header says 10^9 28x28 images (784 GB); the file holds 3. Refused, in small memory."""
    import subprocess
    import sys

    path = tmp_path / "huge-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10**9, 28, 28)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(3 * 784))
    code = (
        "import resource, sys\n"
        "from cdc_serve import CDCError\n"
        "from cdc_serve.idx import read_idx, read_idx_rows, iter_idx_blocks\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for read in (lambda p: read_idx(p), lambda p: read_idx_rows(p, 0, 10**9),\n"
        "             lambda p: list(iter_idx_blocks(p, block=10**6))):\n"
        "    try:\n"
        "        read(sys.argv[1])\n"
        "    except CDCError as exc:\n"
        "        assert 'truncated' in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit('not refused')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    # a cap on the address space: an attempt to allocate the claimed 784 GB would fail
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    done = subprocess.run(
        [sys.executable, "-c", limit + code, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_kib = int(done.stdout.strip().splitlines()[-1])
    assert grown_kib < 200 * 1024  # well under 200 MiB more than before reading
