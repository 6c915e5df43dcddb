"""Parquet output of ``cdc-serve predict`` (local engine): typed columns, the same values as
CSV, resume through the CSV journal, and one clear error without pyarrow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from predict_rows import assert_same_rows, typed_rows
from tiny_export import make_exported_model

from cdc_serve import CDCError
from cdc_serve.predict import COLUMNS, predict

pq = pytest.importorskip(
    "pyarrow.parquet", reason="Parquet output needs pyarrow (the parquet extra)"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_exported_model(tmp_path_factory.mktemp("repo"))


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    """40 array images, an unreadable .npy and a folder with a broken PNG."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8), np.uint8))
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    return [tmp_path / "x.npy", tmp_path / "bad.npy", tmp_path / "imgs"]


class Interrupt(Exception):
    pass


def test_parquet_has_typed_columns_and_the_csv_values(model_dir, inputs, tmp_path):
    csv_summary = predict(inputs, model=model_dir, output=tmp_path / "p.csv", batch_size=16)
    summary = predict(inputs, model=model_dir, output=tmp_path / "p.parquet", batch_size=16)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == list(COLUMNS)
    assert [str(t) for t in table.schema.types] == [
        "string", "int64", "double", "bool", "bool", "double", "string",
    ]  # fmt: skip
    rows = typed_rows(tmp_path / "p.parquet")
    assert rows == typed_rows(tmp_path / "p.csv")  # the very same values
    assert_same_rows(rows, typed_rows(tmp_path / "p.csv"), tolerance=0)
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 2 and all(r["cluster_id"] is None for r in errors)
    assert summary.n == csv_summary.n == 42 and summary.n_errors == 2
    assert not Path(f"{tmp_path / 'p.parquet'}.partial").exists()
    assert not Path(f"{tmp_path / 'p.parquet'}.converting").exists()


def test_parquet_resume_through_the_csv_journal(model_dir, inputs, tmp_path):
    full = tmp_path / "full.parquet"
    predict(inputs, model=model_dir, output=full, batch_size=5)
    out = tmp_path / "resumed.parquet"
    partial = Path(f"{out}.partial")

    def stop(written: int) -> None:
        if written >= 15:
            raise Interrupt

    with pytest.raises(Interrupt):
        predict(inputs, model=model_dir, output=out, batch_size=5, on_chunk=stop)
    assert not out.exists()
    journal = partial.read_text().splitlines()
    assert journal[0] == ",".join(COLUMNS) and len(journal) == 1 + 15  # a CSV journal
    partial.write_bytes(partial.read_bytes() + b"half a li")  # killed mid-write: dropped
    counts: list[int] = []
    summary = predict(inputs, model=model_dir, output=out, batch_size=5, resume=True,
                      on_chunk=counts.append)  # fmt: skip
    assert counts[-1] == 42 - 15 and summary.n_resumed == 15 and summary.n == 42
    assert typed_rows(out) == typed_rows(full) and not partial.exists()
    # Resuming the finished Parquet file scores nothing and gives the same file back.
    counts.clear()
    again = predict(inputs, model=model_dir, output=out, batch_size=5, resume=True,
                    on_chunk=counts.append)  # fmt: skip
    assert set(counts) == {0} and again.n == 42 and again.n_resumed == 42
    assert typed_rows(out) == typed_rows(full)


def test_resume_refuses_a_file_that_is_not_predictions(model_dir, inputs, tmp_path):
    import pyarrow as pa

    out = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), out)
    with pytest.raises(CDCError, match="not a cdc-serve predictions file"):
        predict(inputs, model=model_dir, output=out, resume=True)


def test_parquet_without_pyarrow_is_one_clear_error(model_dir, inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CDCError, match=r"needs pyarrow: pip install 'cdc-serve\[parquet\]'"):
        predict(inputs, model=model_dir, output=tmp_path / "p.parquet")
    assert not list(tmp_path.glob("p.parquet*"))  # refused before any work
