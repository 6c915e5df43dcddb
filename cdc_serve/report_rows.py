"""The rows of a predictions file, read one at a time, for ``cdc-serve report``.

Two kinds of file are understood, as CSV (with a header) or JSONL (one object a line):

- the output of ``cdc-serve predict`` (:mod:`cdc_serve.predict_output`): ``source,
  cluster_id, confidence, rejected, ood, ood_score, error``;
- an ``assignments.csv`` of ``cdc-serve train``: ``source, cluster_id, confidence`` and
  perhaps more (``rejected``, ``ood``, ``label``, ...).

Only ``source``, ``cluster_id`` and ``confidence`` are required; ``rejected``, ``ood``,
``ood_score``, ``error`` and ``label`` are used when present, other columns are
ignored. A row with an ``error`` (an input ``predict`` could not read) needs no cluster.

:func:`read_rows` streams: it holds one row at a time, so a file of any length costs
the same memory. A missing file, an unknown suffix, missing columns or a value that
does not parse raise :class:`cdc_serve.CDCError` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc_serve import CDCError
from cdc_serve.client import Prediction
from cdc_serve.predict_output import OUTPUT_SUFFIXES

REQUIRED_COLUMNS = ("source", "cluster_id", "confidence")

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


@dataclass
class Row(Prediction):
    """One row of a predictions file: a Prediction, its position in the file (``index``,
    0-based, error rows included) and its label, if there is one."""

    index: int = 0
    label: int | None = None


@dataclass
class Columns:
    """Which optional columns the file has (known from its header or first row)."""

    rejected: bool = False
    ood: bool = False
    ood_score: bool = False
    label: bool = False


# -- values ------------------------------------------------------------------------------


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _int(value: Any, name: str) -> int | None:
    if _empty(value):
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} {value!r} is not an integer")
    try:
        number = int(value) if not isinstance(value, str) else int(value.strip())
    except ValueError:
        raise ValueError(f"{name} {value!r} is not an integer") from None
    if number < 0:
        raise ValueError(f"{name} {value!r} is negative")
    return number


def _float(value: Any, name: str) -> float | None:
    if _empty(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not finite")
    return number


def _bool(value: Any, name: str) -> bool | None:
    if isinstance(value, bool):
        return value
    if _empty(value):
        return None
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} {value!r} is not true/false")


def _row(index: int, record: dict[str, Any]) -> Row:
    """A parsed Row from one CSV/JSON record (ValueError says which value is wrong)."""
    source = record.get("source")
    if _empty(source):
        raise ValueError("empty source")
    row = Row(index=index, source=str(source), label=_int(record.get("label"), "label"))
    error = record.get("error")
    if not _empty(error):
        row.error = str(error)
        return row
    row.cluster_id = _int(record.get("cluster_id"), "cluster_id")
    row.confidence = _float(record.get("confidence"), "confidence")
    if row.cluster_id is None or row.confidence is None:
        raise ValueError("a row without an error needs a cluster_id and a confidence")
    if not 0.0 <= row.confidence <= 1.0:
        raise ValueError(f"confidence {row.confidence} is outside [0, 1]")
    row.rejected = _bool(record.get("rejected"), "rejected")
    row.ood = _bool(record.get("ood"), "ood")
    row.ood_score = _float(record.get("ood_score"), "ood_score")
    return row


# -- files -------------------------------------------------------------------------------


def _check_columns(path: Path, names: Any) -> Columns:
    """The optional columns of a file whose header (or first object) is ``names``."""
    present = set(names or ())
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        shown = ", ".join(sorted(map(str, present))[:8]) or "none"
        raise CDCError(
            f"{path}: not a predictions or assignments file: it lacks the column(s) "
            f"{', '.join(missing)} (its columns: {shown})"
        )
    return Columns(
        rejected="rejected" in present,
        ood="ood" in present,
        ood_score="ood_score" in present,
        label="label" in present,
    )


def _csv_records(path: Path, f) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(f)
    for record in reader:
        if None in record:
            raise CDCError(f"{path}, line {reader.line_num}: more cells than the header has")
        yield reader.line_num, record


def _jsonl_records(path: Path, f) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CDCError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise CDCError(f"{path}, line {number}: not a JSON object")
        yield number, record


def file_kind(path: Path) -> str:
    """``csv`` or ``jsonl`` from the file name, or CDCError."""
    kind = OUTPUT_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise CDCError(f"{path}: a predictions file ends in .csv or .jsonl")
    return kind


def _header(path: Path, kind: str) -> list[str] | None:
    """The column names (the CSV header, the keys of the first JSON object); None when empty."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if kind == "csv":
                return csv.DictReader(f).fieldnames  # type: ignore[return-value]
            first = next(_jsonl_records(path, f), None)
            return None if first is None else list(first[1])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CDCError(f"{path}: cannot read ({exc})") from None


def read_rows(path: Path) -> tuple[Columns, Iterator[Row]]:
    """The file's optional columns, and its rows one at a time (see the module docstring).

    The header (or the first JSON object) is checked at once, so a file that is not a
    predictions file is refused before any row is used.
    """
    path = Path(path)
    kind = file_kind(path)
    if not path.is_file():
        raise CDCError(f"{path}: predictions file not found")
    names = _header(path, kind)
    if names is None:
        raise CDCError(f"{path}: the file is empty (no header, no rows)")
    return _check_columns(path, names), _rows(path, kind)


def _rows(path: Path, kind: str) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as f:
        records = _csv_records(path, f) if kind == "csv" else _jsonl_records(path, f)
        try:
            for index, (number, record) in enumerate(records):
                try:
                    yield _row(index, record)
                except ValueError as exc:
                    raise CDCError(f"{path}, line {number}: {exc}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise CDCError(f"{path}: cannot read ({exc})") from None
