"""Helpers for the fuzzed reader suites (tests/serving/test_fuzz_readers.py, tests/training/
test_fuzz_labels.py): Hypothesis profiles, mutations of valid files, the one assertion.

Profiles (``HYPOTHESIS_PROFILE``, default ``ci``): ``ci`` runs a small, derandomised
budget per test (the same examples on every run), ``long`` runs 2,000 random examples
per test::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/serving/test_fuzz_readers.py \\
        tests/training/test_fuzz_labels.py

A failure prints the example and its ``@reproduce_failure`` blob: keep it as an
``@example(...)`` on the test, with a comment saying what it found, and fix the reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cdc_serve import CDCError

PROFILE_ENV = "HYPOTHESIS_PROFILE"
# Every example must end within this (inputs are kept small: a few KB each).
DEADLINE = timedelta(seconds=2)


def register_profiles() -> None:
    """Register the ``ci`` and ``long`` profiles and load the one ``$HYPOTHESIS_PROFILE`` names."""
    common = {
        "deadline": DEADLINE,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **common)
    settings.register_profile("long", max_examples=2000, database=None, **common)
    settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))


register_profiles()


# -- mutations of a valid file ---------------------------------------------------------


def _flip(valid: bytes, bits: list[int]) -> bytes:
    out = bytearray(valid)
    for bit in bits:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _overwrite(valid: bytes, patches: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(valid)
    for at, chunk in patches:
        out[at : at + len(chunk)] = chunk
    return bytes(out)


def mutations(valid: bytes, max_random: int = 256, head: int = 64) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations (prefixes), bit flips and byte overwrites of ``valid``
    (flips and overwrites anywhere, or within the first ``head`` bytes, where headers are)."""
    n = len(valid)
    if n == 0:
        return st.binary(max_size=max_random)
    head = min(head, n)

    def flips(limit: int) -> st.SearchStrategy[bytes]:
        bits = st.lists(st.integers(0, 8 * limit - 1), min_size=1, max_size=8)
        return bits.map(partial(_flip, valid))

    def overwrites(limit: int) -> st.SearchStrategy[bytes]:
        patch = st.tuples(st.integers(0, limit - 1), st.binary(min_size=1, max_size=8))
        return st.lists(patch, min_size=1, max_size=4).map(partial(_overwrite, valid))

    return st.one_of(
        st.binary(max_size=max_random),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
        flips(n),
        flips(head),
        overwrites(n),
        overwrites(head),
        st.binary(min_size=1, max_size=64).map(lambda tail: valid + tail),
    )


def mutations_of(valid_files: list[bytes], **kwargs: Any) -> st.SearchStrategy[bytes]:
    """:func:`mutations` of one of ``valid_files``."""
    return st.sampled_from(valid_files).flatmap(lambda valid: mutations(valid, **kwargs))


# -- the one assertion -----------------------------------------------------------------


def data_or_cdcerror(read: Callable[..., Any], *args: Any, expect: type | tuple = object) -> Any:
    """Call ``read(*args)``: it returns an ``expect`` or raises CDCError (returned then, with
    its message checked); any other exception propagates and fails the test."""
    try:
        out = read(*args)
    except CDCError as exc:
        assert str(exc).strip(), "a CDCError without a message"
        return exc
    assert isinstance(out, expect), f"{read.__name__} returned a {type(out).__name__}"
    return out
