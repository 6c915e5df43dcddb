"""Read the CIFAR releases' pickles without ever running code from them.

The CIFAR-10 and CIFAR-100 "python version" files are pickles of plain dicts: byte or
text keys, lists of ints, lists of byte/text strings and one numpy ``uint8`` array. A
pickle, though, may name any importable callable (``os.system``, ``builtins.eval``,
``subprocess.Popen``) and have it called while it loads. :func:`load_cifar_pickle`
therefore unpickles with :class:`RestrictedUnpickler`, whose ``find_class`` allows only
the few numpy names an array needs (and ``_codecs.encode``, with which Python 3 pickles
bytes) and refuses every other global with one :class:`cdc_serve.CDCError` naming the
file and the global, before anything is called. The loaded object is then checked to
hold only the value types of the official files.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError

# The globals a pickled numpy array (and Python 3's pickled bytes) needs; nothing else.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to: a pickled array only passes the class to
    ``_reconstruct``; calling it (``ndarray((10**9,), "O")`` fills gigabytes) is refused."""

    def __init__(self, refuse) -> None:
        self.refuse = refuse

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.refuse("calls numpy.ndarray itself")


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`, each to no more than what a
    pickled array uses it for: no object dtype, no array but the empty one ``_reconstruct``
    starts from (the data comes with its state, of the size the file holds).

    It is Python's own pure-Python unpickler: its memo is a dict, where the C one grows an
    array up to any index a ``LONG_BINPUT`` names (a 4-byte index cost gigabytes of
    zeroed memory). Read from a ``BytesIO``, no length a file claims is allocated before
    the bytes are there.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self.source = source
        self._ndarray = _NdarrayToken(self._refuse)

    def _refuse(self, what: str) -> CDCError:
        return CDCError(
            f"{self.source}: refusing to load it: the pickle {what}, which no CIFAR release "
            "does (the file may be crafted); use the official files"
        )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise self._refuse(f"asks for {module}.{name}")
        wrapped = {
            "encode": self._latin1_encode,
            "ndarray": self._ndarray,
            "dtype": self._dtype,
            "_reconstruct": self._reconstruct,
        }
        return wrapped.get(name) or super().find_class(module, name)

    def _latin1_encode(self, text: Any, encoding: Any = "latin1", *rest: Any) -> bytes:
        """``_codecs.encode`` as Python 3 pickles bytes with it (latin-1 only: another codec
        name would make the unpickler import that codec's module)."""
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str) or rest:
            raise self._refuse(f"encodes text with {str(encoding)[:40]!r}")
        return text.encode("latin1")

    def _dtype(self, *args: Any) -> np.dtype:
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise self._refuse(f"makes an array of Python objects (dtype {dtype})")
        return dtype

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not self._ndarray or shape != (0,):
            raise self._refuse(f"builds an array of shape {str(shape)[:40]} directly")
        return np.empty((0,), dtype=self._dtype(dtype))


def _plain(value: Any, depth: int = 0) -> bool:
    """True for the value types of the official files (nested at most a few levels)."""
    if isinstance(value, (bytes, str, int, float, bool)) or value is None:
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "uib" and not value.dtype.hasobject
    if isinstance(value, (list, tuple)) and depth < 3:
        return all(_plain(v, depth + 1) for v in value)
    return False


def load_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of one CIFAR batch/meta file, keys as ``str``; CDCError for anything else."""
    path = Path(path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except CDCError:
        raise
    except Exception as exc:  # truncated or not a pickle: the unpickler fails in many ways
        raise CDCError(
            f"{path}: not a readable CIFAR batch file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise CDCError(f"{path}: not a CIFAR batch file (a {type(obj).__name__}, not a dict)")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, (bytes, str)) or not _plain(value):
            raise CDCError(
                f"{path}: not a CIFAR batch file (unexpected entry {key!r} of type "
                f"{type(value).__name__})"
            )
        out[key.decode("latin1") if isinstance(key, bytes) else key] = value
    return out
