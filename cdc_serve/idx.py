"""IDX files (the MNIST / Fashion-MNIST format), read and written with numpy only.

An IDX file is a 4-byte magic number ``0x00 0x00 <type code> <number of dims>``,
then one big-endian uint32 per dimension, then the data in row-major order
(big-endian for the multi-byte types). Files ending in ``.gz`` are gzip-compressed.

Every problem (wrong magic, unknown type, truncated data, trailing bytes, a broken
gzip stream) raises :class:`cdc_serve.CDCError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from cdc_serve import CDCError

# IDX type code -> numpy dtype (big-endian where it matters).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[str, int] = {dt.str.lstrip("<>|="): code for code, dt in _DTYPES.items()}

# A sanity limit on one dimension, so a corrupt header cannot ask for absurd memory.
_MAX_DIM = 1 << 31
# ... and on their product (zeros counted as ones): 2^48 elements, far beyond any real file.
_MAX_ELEMENTS = 1 << 48


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


def is_idx(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like an IDX file by name (``*-ubyte``, ``*.idx*``, optional .gz)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith("-ubyte") or ".idx" in name or name.endswith(".idx")


def read_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return ``(dtype, shape, header_size)`` of an IDX file without reading its data."""
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise CDCError(f"{path}: not an IDX file (only {len(magic)} bytes)")
            if magic[0] != 0 or magic[1] != 0:
                raise CDCError(f"{path}: not an IDX file (bad magic number {magic.hex()})")
            code, ndim = magic[2], magic[3]
            if code not in _DTYPES:
                raise CDCError(f"{path}: unknown IDX data type code 0x{code:02x}")
            if ndim == 0:
                raise CDCError(f"{path}: IDX file with zero dimensions")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise CDCError(f"{path}: truncated IDX header")
    except (OSError, EOFError, zlib.error) as exc:
        raise CDCError(f"{path}: cannot read IDX file ({exc})") from None
    shape = struct.unpack(f">{ndim}I", raw)
    # numpy cannot even shape an empty array whose other dimensions multiply past 2^63
    if any(d >= _MAX_DIM for d in shape) or math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
        raise CDCError(f"{path}: implausible IDX dimensions {shape}")
    return _DTYPES[code], tuple(int(d) for d in shape), 4 + 4 * ndim


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The bytes ``shape`` of ``dtype`` take, in Python ints: a header of 4 x 65536 images
    would wrap numpy's int64 product to 0 and look like an empty, complete file."""
    return math.prod(shape) * dtype.itemsize


def _read_at_most(f, size: int, chunk: int = 1 << 24) -> bytes:
    """Up to ``size`` bytes of ``f``, in chunks: a header that claims more data than the
    file holds (10^9 images, say) costs only the memory of the data really there."""
    parts, left = [], size
    while left > 0:
        part = f.read(min(chunk, left))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a whole IDX file (raw or ``.gz``) into a native-endian numpy array.

    Raises CDCError when the header is invalid or the data length does not match
    the dimensions (truncated or with trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: no such IDX file")
    dtype, shape, header = read_header(path)
    expected = _nbytes(shape, dtype)
    try:
        with _open(path, "rb") as f:
            f.read(header)
            data = _read_at_most(f, expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise CDCError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CDCError(
            f"{path}: IDX file {what}: header says {shape} of {dtype.name} "
            f"({expected} bytes), found {len(data) if len(data) <= expected else 'more'}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.str.lstrip("<>|=")
    if key not in _CODES:
        raise CDCError(f"{path}: IDX cannot store dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise CDCError(f"{path}: IDX needs 1 to 255 dimensions, got {array.ndim}")
    code = _CODES[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    with _open(path, "wb") as f:
        f.write(header)
        f.write(data)
    return path


def read_idx_rows(path: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Read rows ``start:stop`` of the first dimension (streaming: no full load for raw files).

    For ``.gz`` files the stream is decompressed up to ``stop`` (gzip cannot seek freely,
    but memory stays bounded by the rows asked for).
    """
    path = Path(path)
    dtype, shape, header = read_header(path)
    n = shape[0]
    start, stop = max(0, start), min(stop, n)
    if stop <= start:
        return np.empty((0, *shape[1:]), dtype=dtype.newbyteorder("="))
    row_bytes = _nbytes(shape[1:], dtype)
    want = (stop - start) * row_bytes
    try:
        with _open(path, "rb") as f:
            f.seek(header + start * row_bytes)
            data = _read_at_most(f, want)
    except (OSError, EOFError, zlib.error, OverflowError) as exc:
        raise CDCError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) != want:
        raise CDCError(f"{path}: IDX file truncated: rows {start}:{stop} of {n} are missing")
    array = np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))
    return array.astype(dtype.newbyteorder("="), copy=False)


def check_idx(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[np.dtype, tuple[int, ...]]:
    """Validate header and data length (streaming, bounded memory); return ``(dtype, shape)``."""
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: no such IDX file")
    dtype, shape, header = read_header(path)
    expected = _nbytes(shape, dtype)
    if path.name.endswith(".gz"):
        found = 0
        try:
            with gzip.open(path, "rb") as f:
                f.read(header)
                while block := f.read(chunk):
                    found += len(block)
                    if found > expected:
                        break
        except (OSError, EOFError, zlib.error) as exc:
            raise CDCError(f"{path}: cannot read IDX file ({exc})") from None
    else:
        found = path.stat().st_size - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise CDCError(
            f"{path}: IDX file {what}: header says {shape} of {dtype.name} ({expected} data bytes)"
        )
    return dtype.newbyteorder("="), shape


def iter_idx_blocks(path: str | os.PathLike, block: int = 1024):
    """Yield ``(start, rows)`` blocks of the first dimension, reading the file once, in order."""
    path = Path(path)
    dtype, shape, header = read_header(path)
    row_bytes = _nbytes(shape[1:], dtype)
    try:
        with _open(path, "rb") as f:
            f.read(header)
            for start in range(0, shape[0], block):
                count = min(block, shape[0] - start)
                data = _read_at_most(f, count * row_bytes)
                if len(data) != count * row_bytes:
                    raise CDCError(f"{path}: IDX file truncated at row {start}")
                rows = np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))
                yield start, rows.astype(dtype.newbyteorder("="), copy=False)
    except (OSError, EOFError, zlib.error) as exc:
        raise CDCError(f"{path}: cannot read IDX file ({exc})") from None
