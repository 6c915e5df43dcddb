"""The predictions file of ``cdc-serve predict``: one row per input, CSV or JSONL.

Columns: ``source, cluster_id, confidence, rejected, ood, ood_score, error``
(:data:`COLUMNS`). A ``.csv`` file has a header row and writes booleans as
``true``/``false`` and missing values as empty cells; a ``.jsonl`` (or ``.ndjson``)
file holds one JSON object per line, missing values as ``null``.

:class:`RowWriter` appends rows to ``<output>.partial``, flushed and synced chunk by
chunk, so a killed run loses at most the chunk in flight; :func:`read_done` reads the
rows such a file already holds (dropping a half-written last line) to resume it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cdc_serve import CDCError
from cdc_serve.client import Prediction

COLUMNS = ("source", "cluster_id", "confidence", "rejected", "ood", "ood_score", "error")
OUTPUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def format_of(output: Path) -> str:
    kind = OUTPUT_SUFFIXES.get(output.suffix.lower())
    if kind is None:
        raise CDCError(f"{output}: output must end in .csv or .jsonl")
    return kind


def _row(p: Prediction) -> dict[str, Any]:
    return {
        "source": p.source,
        "cluster_id": p.cluster_id,
        "confidence": None if p.confidence is None else round(p.confidence, 7),
        "rejected": p.rejected,
        "ood": p.ood,
        "ood_score": None if p.ood_score is None else float(f"{p.ood_score:.7g}"),
        "error": p.error,
    }


class RowWriter:
    """Appends rows to ``<output>.partial`` (CSV or JSONL), flushed and synced per chunk."""

    def __init__(self, partial: Path, kind: str, append: bool) -> None:
        self.path = partial
        self.kind = kind
        self.file = open(partial, "a" if append else "w", encoding="utf-8", newline="")  # noqa: SIM115
        if kind == "csv" and not append:
            csv.writer(self.file).writerow(COLUMNS)

    def write(self, predictions: Sequence[Prediction]) -> None:
        buffer = io.StringIO()
        if self.kind == "csv":
            writer = csv.writer(buffer)
            for p in predictions:
                row = _row(p)
                writer.writerow(["" if row[c] is None else _csv_value(row[c]) for c in COLUMNS])
        else:
            for p in predictions:
                buffer.write(json.dumps(_row(p), ensure_ascii=False) + "\n")
        self.file.write(buffer.getvalue())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _truncate_partial_line(path: Path) -> None:
    """Drop an incomplete last line (a run killed while writing)."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _parse_bool(value: Any) -> bool | None:
    if value in (None, ""):
        return None
    if isinstance(value, bool):
        return value
    return str(value).lower() == "true"


def read_done(partial: Path, kind: str) -> dict[str, Prediction]:
    """Rows already written (resume): source -> Prediction."""
    _truncate_partial_line(partial)
    done: dict[str, Prediction] = {}
    with open(partial, encoding="utf-8", newline="") as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return done
            if tuple(reader.fieldnames) != COLUMNS:
                raise CDCError(
                    f"{partial}: not a cdc-serve predictions file (columns {reader.fieldnames})"
                )
            rows: Iterator[dict[str, Any]] = iter(reader)
        else:
            rows = (json.loads(line) for line in f if line.strip())
        try:
            for row in rows:
                done[row["source"]] = Prediction(
                    source=row["source"],
                    cluster_id=None if row["cluster_id"] in (None, "") else int(row["cluster_id"]),
                    confidence=None
                    if row["confidence"] in (None, "")
                    else float(row["confidence"]),
                    rejected=_parse_bool(row["rejected"]),
                    ood=_parse_bool(row["ood"]),
                    ood_score=None if row["ood_score"] in (None, "") else float(row["ood_score"]),
                    error=row["error"] or None,
                )
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise CDCError(f"{partial}: cannot resume from this file ({exc})") from None
    return done
