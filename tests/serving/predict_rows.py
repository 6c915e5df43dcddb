"""Test helper: the rows of a ``cdc-serve predict`` output (CSV, JSONL or Parquet) as typed
dicts, and the comparison the engines and formats must pass."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cdc_serve.predict_output import COLUMNS


def typed_rows(path: Path) -> list[dict]:
    """Every row of a predictions file, values typed as the Parquet file types them."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]

    def value(column: str, text: str):
        if text == "":
            return None
        if column in ("rejected", "ood"):
            return {"true": True, "false": False}[text]
        if column == "cluster_id":
            return int(text)
        if column in ("confidence", "ood_score"):
            return float(text)
        return text

    with open(path, newline="") as f:
        return [{c: value(c, row[c]) for c in COLUMNS} for row in csv.DictReader(f)]


def assert_same_rows(got: list[dict], want: list[dict], tolerance: float = 1e-6) -> None:
    """Same sources in the same order, same ids, flags and errors; scores within tolerance."""
    assert [r["source"] for r in got] == [r["source"] for r in want]
    for key in ("cluster_id", "rejected", "ood", "error"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    for key in ("confidence", "ood_score"):
        for g, w in zip(got, want, strict=True):
            if w[key] is None:
                assert g[key] is None, (key, g["source"])
            else:
                assert abs(g[key] - w[key]) <= tolerance, (key, g["source"], g[key], w[key])
