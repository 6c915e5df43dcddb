"""The predictions file of ``cdc-serve predict``: one row per input, CSV, JSONL or Parquet.

Columns: ``source, cluster_id, confidence, rejected, ood, ood_score, error``
(:data:`COLUMNS`). A ``.csv`` file has a header row and writes booleans as
``true``/``false`` and missing values as empty cells; a ``.jsonl`` (or ``.ndjson``)
file holds one JSON object per line, missing values as ``null``; a ``.parquet`` file
(needs pyarrow: ``pip install 'cdc-serve[parquet]'``) has the typed columns of
:data:`PARQUET_SCHEMA` (string, int64, double, bool, bool, double, string; missing
values null), with the same values as the text formats (confidence rounded to 7
decimals, ood_score to 7 significant digits).

:class:`RowWriter` appends rows to ``<output>.partial``, flushed chunk by chunk, so a
killed run loses at most the chunk in flight; it is synced to disk (``fsync``) by the
first chunk written a second or more after the last sync, and on close.
:func:`read_done` reads the rows such a file already holds (dropping a half-written
last line) to resume it.

A Parquet file has its index at the end, so a killed writer leaves nothing readable.
For a ``.parquet`` output the partial file is therefore a CSV journal (the same
appends, the same resume); :func:`finish_output` turns it into the Parquet file at the
end (row groups streamed from the journal into ``<output>.converting``, then an atomic
rename) and removes it. ``--resume`` of a finished Parquet run reads the file back into
a journal (:func:`reopen_finished`). Resuming is thus as sound as for CSV; the price is
one extra pass over the rows at the end.

:class:`RowSink` is what every engine of ``predict`` does with a chunk of scored rows,
in input order: the new rows go to the writer, every row to the summary's
:class:`~cdc_serve.predict_summary.Tally`, and the progress bar moves.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cdc_serve import CDCError
from cdc_serve.client import Prediction
from cdc_serve.predict_summary import Summary, Tally

COLUMNS = ("source", "cluster_id", "confidence", "rejected", "ood", "ood_score", "error")
OUTPUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}  # the text formats
PARQUET = "parquet"
PARQUET_EXTRA = "pip install 'cdc-serve[parquet]'"
PARQUET_ROWS = 65536  # rows per row group when a journal becomes a Parquet file


def format_of(output: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet``, from the output's suffix."""
    if output.suffix.lower() == ".parquet":
        _pyarrow()  # refuse before any work when pyarrow is missing
        return PARQUET
    kind = OUTPUT_SUFFIXES.get(output.suffix.lower())
    if kind is None:
        raise CDCError(f"{output}: output must end in .csv or .jsonl (text) or .parquet")
    return kind


def journal_kind(kind: str) -> str:
    """The format of ``<output>.partial``: the output's own, CSV for a Parquet output."""
    return "csv" if kind == PARQUET else kind


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CDCError(f"writing .parquet needs pyarrow: {PARQUET_EXTRA}") from None
    return pyarrow


def parquet_schema():
    """The Parquet file's columns and types (missing values are nulls)."""
    pa = _pyarrow()
    types = [
        pa.string(),
        pa.int64(),
        pa.float64(),
        pa.bool_(),
        pa.bool_(),
        pa.float64(),
        pa.string(),
    ]
    return pa.schema(list(zip(COLUMNS, types, strict=True)))


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
    """Appends rows to ``<output>.partial`` (CSV or JSONL): flushed per chunk; synced to
    disk by a chunk written :data:`SYNC_SECONDS` or more after the last sync, and on close
    (an ``fsync`` per chunk cost a folder of small files about 12 us an image)."""

    def __init__(self, partial: Path, kind: str, append: bool) -> None:
        self.path = partial
        self.kind = kind
        self.synced = time.monotonic()
        self.file = open(partial, "a" if append else "w", encoding="utf-8", newline="")  # noqa: SIM115
        if kind == "csv" and not append:
            csv.writer(self.file).writerow(COLUMNS)

    def write(self, predictions: Sequence[Prediction]) -> None:
        buffer = io.StringIO()
        if self.kind == "csv":
            csv.writer(buffer).writerows(_csv_cells(_row(p)) for p in predictions)
        else:
            for p in predictions:
                buffer.write(json.dumps(_row(p), ensure_ascii=False) + "\n")
        self.file.write(buffer.getvalue())
        self.file.flush()
        if time.monotonic() - self.synced >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.synced = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            self.sync()
        self.file.close()


SYNC_SECONDS = 1.0  # at most one fsync a second


def _csv_cells(row: dict[str, Any]) -> list[str]:
    """A row's CSV cells: booleans as true/false, missing values empty."""
    return [_csv_cell(value) for value in row.values()]


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
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


def _prediction(row: dict[str, Any]) -> Prediction:
    """A written row (CSV strings, JSON or Parquet values) back as a Prediction."""
    return Prediction(
        source=row["source"],
        cluster_id=None if row["cluster_id"] in (None, "") else int(row["cluster_id"]),
        confidence=None if row["confidence"] in (None, "") else float(row["confidence"]),
        rejected=_parse_bool(row["rejected"]),
        ood=_parse_bool(row["ood"]),
        ood_score=None if row["ood_score"] in (None, "") else float(row["ood_score"]),
        error=row["error"] or None,
    )


def read_done(partial: Path, kind: str) -> dict[str, Prediction]:
    """Rows already written (resume): source -> Prediction (``kind``: the journal's)."""
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
                done[row["source"]] = _prediction(row)
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise CDCError(f"{partial}: cannot resume from this file ({exc})") from None
    return done


# -- Parquet: the journal at the end, and back for --resume ---------------------------------


def finish_output(partial: Path, output: Path, kind: str) -> None:
    """The finished ``partial`` becomes ``output``: renamed, or (Parquet) converted."""
    if kind != PARQUET:
        os.replace(partial, output)
        return
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = parquet_schema()
    converting = Path(f"{output}.converting")
    options = pacsv.ConvertOptions(
        column_types=schema, true_values=["true"], false_values=["false"],
        null_values=[""], strings_can_be_null=True,
    )  # fmt: skip
    parse = pacsv.ParseOptions(newlines_in_values=True)
    read = pacsv.ReadOptions(block_size=1 << 22)
    reader = pacsv.open_csv(
        partial, read_options=read, parse_options=parse, convert_options=options
    )
    with pq.ParquetWriter(converting, schema) as writer:
        pending: list = []
        for batch in reader:
            pending.append(batch)
            if sum(len(b) for b in pending) >= PARQUET_ROWS:
                writer.write_table(pa.Table.from_batches(pending, schema=schema))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema=schema))
    with open(converting, "rb") as f:
        os.fsync(f.fileno())
    os.replace(converting, output)
    partial.unlink()


def reopen_finished(output: Path, partial: Path, kind: str) -> None:
    """``--resume`` of a finished run: its rows back into ``partial`` (nothing left to do)."""
    if kind != PARQUET:
        partial.write_bytes(output.read_bytes())
        return
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(output)
        if tuple(file.schema_arrow.names) != COLUMNS:
            raise CDCError(
                f"{output}: not a cdc-serve predictions file ({file.schema_arrow.names})"
            )
        writer = RowWriter(partial, journal_kind(kind), append=False)
        try:
            for batch in file.iter_batches(batch_size=PARQUET_ROWS):
                writer.write([_prediction(row) for row in batch.to_pylist()])
        finally:
            writer.close()
    except (OSError, ValueError) as exc:  # pyarrow's errors on a damaged file
        partial.unlink(missing_ok=True)
        raise CDCError(f"{output}: cannot resume from this file ({exc})") from None


# -- what each engine does with a chunk of scored rows --------------------------------------


class RowSink:
    """The rows of a run, chunk by chunk in input order: new rows to ``writer`` (or none),
    every row to ``tally``; the progress bar and ``on_chunk(rows_written)`` follow.

    ``done`` holds the rows of the interrupted run being resumed (by source): they are
    tallied, not written again, and counted in ``summary.n_resumed``."""

    def __init__(
        self,
        done: dict[str, Prediction],
        writer: RowWriter | None,
        tally: Tally,
        summary: Summary,
        progress: bool = False,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.done, self.writer, self.tally, self.summary = done, writer, tally, summary
        self.on_chunk = on_chunk
        self.written = 0
        self.bar = _progress_bar() if progress else None

    def add(self, sources: Sequence[str], fresh: dict[str, Prediction]) -> None:
        """One chunk: its ``sources`` in input order; ``fresh`` the rows scored now (by
        source), every other source is a row of ``done``."""
        if self.writer is not None and fresh:
            self.writer.write([fresh[s] for s in sources if s in fresh])
        for source in sources:
            row = fresh.get(source)
            if row is None:
                row = self.done[source]
                self.summary.n_resumed += 1
            self.tally.add(row)
        self.written += len(fresh)
        if self.bar is not None:
            self.bar.update(len(sources))
        if self.on_chunk is not None:
            self.on_chunk(self.written)

    def stopped(self, exc: Exception) -> CDCError:
        """The error that stops the run, saying where the rows kept so far are."""
        where = (
            f"; {self.written + len(self.done)} rows are kept in {self.writer.path}: "
            "rerun with --resume"
            if self.writer is not None
            else ""
        )
        return CDCError(f"{exc}{where}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _progress_bar():
    import sys

    from tqdm import tqdm

    return tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, desc="scoring")
