""".npy files from outside: data back, or one CDCError; never an unpickling, never a huge allocation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from cdc_serve import CDCError
from cdc_serve.npy import read_npy
from cdc_serve.predict import read_labels


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=">f4").reshape(3, 4)),
        np.zeros((0, 28, 28), dtype=np.uint8),
        np.array(7, dtype=np.int64),
    ],
    ids=["uint8", "fortran-big-endian", "empty", "0-d"],
)
def test_arrays_come_back(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    out = read_npy(tmp_path / "a.npy")
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_object_array_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "labels.npy"
    np.save(path, np.array([_Payload(f"touch {marker}")], dtype=object), allow_pickle=True)
    for read in (read_npy, read_labels):
        with pytest.raises(CDCError, match=r"labels\.npy: refusing to load it: .*dtype object"):
            read(path)
    assert not marker.exists()
    np.load(path, allow_pickle=True)  # the same file unpickled does run its payload
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a .npy file"),
        (pickle.dumps([1, 2, 3]), "not a .npy file"),
        (b"PK\x03\x04" + bytes(40), "not a .npy file"),  # an .npz archive
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<u1'", "not a readable .npy file"),
        (b"\x93NUMPY\x09\x00" + bytes(20), r"\.npy format version \(9, 0\) is not supported"),
    ],
    ids=["empty", "pickle", "npz", "cut-header", "version-9"],
)
def test_not_npy(tmp_path, content, message):
    (tmp_path / "x.npy").write_bytes(content)
    with pytest.raises(CDCError, match=rf"x\.npy: {message}"):
        read_npy(tmp_path / "x.npy")


def test_header_claiming_a_billion_rows_is_refused_before_allocating(tmp_path):
    path = tmp_path / "big.npy"
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(3 * 784))  # 3 images of the claimed 10^9
    with pytest.raises(CDCError, match=r"big\.npy: \.npy file truncated: .*\(1000000000, 28, 28\)"):
        read_npy(path)


def test_labels_must_be_1d_integers_at_least_0(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([0, 3, 1], dtype=np.uint8))
    assert read_labels(tmp_path / "ok.npy").tolist() == [0, 3, 1]
    for name, bad, message in [
        ("neg.npy", np.array([0, -1]), "integers >= 0"),
        ("2d.npy", np.zeros((2, 2), dtype=np.int64), "1-D integer array"),
        ("float.npy", np.array([0.0, 1.0]), "1-D integer array"),
    ]:
        np.save(tmp_path / name, bad)
        with pytest.raises(CDCError, match=message):
            read_labels(tmp_path / name)
