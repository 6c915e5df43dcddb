"""``.npy`` files read without unpickling and without allocating more than the file holds.

``numpy.load`` alone is not enough for files from outside: a ``.npy`` of dtype ``object``
is a pickle (``allow_pickle=False`` refuses it, with numpy's wording), a file that starts
like a zip archive comes back as an ``NpzFile``, and a header claiming 10^9 rows makes it
allocate them before it finds the data missing. :func:`read_npy` checks the magic and
the header first, refuses object dtypes and headers claiming more data than the file
holds, each with one :class:`cdc_serve.CDCError` naming the file, and then maps the data
read-only (``numpy.memmap``): memory grows only with what is read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from cdc_serve import CDCError

MAGIC = b"\x93NUMPY"
_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}


def _header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of a ``.npy`` file, checked."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CDCError(f"{path}: not a .npy file (it does not start with \\x93NUMPY)")
        f.seek(0)
        version = npy_format.read_magic(f)
        if version not in _HEADER_READERS:
            raise CDCError(f"{path}: .npy format version {version} is not supported (1.0, 2.0)")
        shape, fortran_order, dtype = _HEADER_READERS[version](f)
        return shape, fortran_order, dtype, f.tell()


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped read-only (``np.array(...)`` to copy it).

    Raises CDCError for a missing or unreadable file, one that is not a ``.npy`` (an
    ``.npz`` archive, a pickle), an object dtype (never unpickled) and a header that
    claims more data than the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: no such .npy file")
    try:
        shape, fortran_order, dtype, offset = _header(path)
        if dtype.hasobject:
            raise CDCError(
                f"{path}: refusing to load it: the array holds Python objects (dtype {dtype}), "
                "which only unpickling could read; save a numeric array (numpy.save)"
            )
        need, have = math.prod(shape) * dtype.itemsize, path.stat().st_size - offset
        if need > have:
            raise CDCError(
                f"{path}: .npy file truncated: its header says {shape} of {dtype} "
                f"({need} bytes), the file holds {have}"
            )
        if need == 0:
            return np.empty(shape, dtype=dtype, order="F" if fortran_order else "C")
        return np.memmap(
            path, dtype=dtype, mode="r", offset=offset, shape=shape,
            order="F" if fortran_order else "C",
        )  # fmt: skip
    except CDCError:
        raise
    except Exception as exc:  # noqa: BLE001  numpy's header parser raises ValueError, OSError, ...
        raise CDCError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
