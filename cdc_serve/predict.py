"""Batch scoring (``cdc-serve predict``): streaming, resumable, one row per input.

Inputs are expanded lazily, in a fixed order:

- an image file: one row (source = the path as given);
- a folder: every image file below it (by suffix, see
  :data:`cdc_serve.preprocess.IMAGE_SUFFIXES`), recursively, sorted by path; other
  files are skipped; a folder with no image file gives one row with an ``error``;
- a ``.npy`` file: one row per array item (source ``file.npy[i]``), read through a
  memory map; an IDX file (``*-ubyte[.gz]``, ``*.idx*``): one row per image
  (source ``file[i]``), read block by block;
- a path that does not exist stops the run before it starts (CDCError).

The same source met twice is scored once.

Rows are read, scored and written in bounded chunks (``batch_size`` x the client's
concurrency images), so memory stays flat whatever the input size. With ``output``
the rows go to ``<output>.partial``, flushed and synced chunk by chunk; at the end it
is renamed to ``output`` (an atomic replace). ``resume=True`` reads the rows already
in ``<output>.partial`` (or a finished ``output``), skips those sources and appends
the rest, so the final file has every input exactly once.

Unreadable inputs become rows with ``error`` (the run goes on). When the Triton server
stays unreachable after the client's retries, the run stops with a CDCError that
names the partial file; ``--resume`` completes it.

Output columns: ``source, cluster_id, confidence, rejected, ood, ood_score, error``
(CSV with a header, or one JSON object per line for ``.jsonl``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError
from cdc_serve.client import Client, Prediction
from cdc_serve.idx import check_idx, is_idx, iter_idx_blocks, read_idx
from cdc_serve.preprocess import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    array_layout,
    array_to_image,
    float_scale,
    load_image,
)

COLUMNS = ("source", "cluster_id", "confidence", "rejected", "ood", "ood_score", "error")
OUTPUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PREDICT_RETRIES = 5  # per request; backoff 1, 2, 4, 8, 10 s: rides out a server restart


# -- inputs ----------------------------------------------------------------------------


@dataclass
class Item:
    """One input row: a source name and how to get its uint8 ``C x H x W`` image."""

    source: str
    load: Callable[[], np.ndarray] | None = None
    error: str | None = None

    def read(self) -> np.ndarray:
        if self.error is not None:
            raise CDCError(self.error)
        assert self.load is not None
        return self.load()


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files below ``folder``, recursively, in sorted path order.

    Entries of each folder are sorted by name and sub-folders are entered at their place
    in that order, so the result is sorted by path components; only one folder listing
    is held per level.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_images(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield Path(entry.path)


def _array_items(path: Path, meta: Any) -> Iterator[Item]:
    """One Item per image of a ``.npy`` file (memory-mapped) or an IDX file (streamed)."""
    channels, size = meta.channels, tuple(meta.input_size)
    try:
        if path.suffix.lower() == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001  ValueError, OSError, pickle refusals ...
                raise CDCError(f"{path}: cannot read .npy file ({exc})") from None
            layout = array_layout(array.shape, batched=True)
            if array.dtype.kind not in "uifb":
                raise CDCError(f"{path}: unsupported array dtype {array.dtype}")
            scale = float_scale(array)
            blocks: Iterator[tuple[int, np.ndarray]] = (
                (i, array[i : i + 1024]) for i in range(0, len(array), 1024)
            )
        else:
            dtype, shape = check_idx(path)
            layout = array_layout(shape, batched=True)
            scale = 1.0
            if dtype.kind == "f":  # one streaming pass for the value range
                in_unit = all(float_scale(b) == 255.0 for _, b in iter_idx_blocks(path))
                scale = 255.0 if in_unit else 1.0
            blocks = iter_idx_blocks(path)
        if (len(array) if path.suffix.lower() == ".npy" else shape[0]) == 0:
            raise CDCError(f"{path}: holds no images (first dimension is 0)")
    except CDCError as exc:
        yield Item(str(path), error=str(exc))
        return

    def loader(row: np.ndarray, source: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            try:
                return array_to_image(np.array(row), layout, channels, size, scale)
            except CDCError as exc:
                raise CDCError(f"{source}: {exc}") from None

        return load

    for start, rows in blocks:
        for j in range(len(rows)):
            source = f"{path}[{start + j}]"
            yield Item(source, loader(rows[j], source))


def iter_items(inputs: Sequence[Path], meta: Any, max_pixels: int = MAX_PIXELS) -> Iterator[Item]:
    """Expand the inputs lazily into Items (see the module docstring for the rules)."""
    channels, size = meta.channels, tuple(meta.input_size)
    seen: set[str] = set()

    def image_item(path: Path) -> Item:
        return Item(str(path), lambda: load_image(path, channels, size, max_pixels))

    for given in inputs:
        path = Path(given)
        if path.is_dir():
            empty = True
            for file in _walk_images(path):
                empty = False
                if str(file) not in seen:
                    seen.add(str(file))
                    yield image_item(file)
            if empty:
                yield Item(str(path), error=f"{path}: folder holds no image files")
            continue
        if str(path) in seen:
            continue
        seen.add(str(path))
        if path.suffix.lower() == ".npy" or is_idx(path):
            yield from _array_items(path, meta)
        else:
            yield image_item(path)


def _check_inputs(inputs: Sequence[Path]) -> None:
    if not inputs:
        raise CDCError("no inputs given")
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise CDCError(
            f"input not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )


def read_labels(path: Path) -> np.ndarray:
    """Labels aligned with the inputs: a 1-D IDX or ``.npy`` integer array."""
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: labels file not found")
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise CDCError(f"{path}: cannot read labels ({exc})") from None
    else:
        labels = read_idx(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CDCError(
            f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


# -- output ----------------------------------------------------------------------------


def _format_of(output: Path) -> str:
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


class _Writer:
    """Appends rows to ``<output>.partial`` (CSV or JSONL), flushed and synced per chunk."""

    def __init__(self, partial: Path, kind: str, append: bool) -> None:
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


def _read_done(partial: Path, kind: str) -> dict[str, Prediction]:
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


# -- summary ---------------------------------------------------------------------------


@dataclass
class Summary:
    """Counts and accuracy estimates of a scoring run (``format()`` prints them)."""

    n: int = 0
    n_errors: int = 0
    n_rejected: int = 0
    n_ood: int = 0
    n_resumed: int = 0
    reject_below: float = 0.8
    ood_score_name: str = ""
    estimated_accuracy_accepted: float | None = None
    estimated_accuracy_all: float | None = None
    true_accuracy_accepted: float | None = None
    true_accuracy_rejected: float | None = None
    true_accuracy_all: float | None = None
    output: str | None = None
    model: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_scored(self) -> int:
        return self.n - self.n_errors

    @property
    def n_accepted(self) -> int:
        return self.n_scored - self.n_rejected

    @property
    def share_rejected(self) -> float | None:
        return self.n_rejected / self.n_scored if self.n_scored else None

    @property
    def share_ood(self) -> float | None:
        return self.n_ood / self.n_scored if self.n_scored else None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        data.update(
            n_scored=self.n_scored,
            n_accepted=self.n_accepted,
            share_rejected=self.share_rejected,
            share_ood=self.share_ood,
        )
        return data

    def format(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f} %"

        def acc(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        rate = f", {self.n / self.seconds:.0f} inputs/s" if self.seconds > 0 and self.n else ""
        lines = [
            f"scored {self.n} inputs with {self.model} in {self.seconds:.1f} s{rate}"
            + (f" ({self.n_resumed} from the earlier run)" if self.n_resumed else ""),
            f"  errors (unreadable inputs): {self.n_errors}",
            f"  rejected (confidence < {self.reject_below:g}): {self.n_rejected} ({pct(self.share_rejected)})",
            f"  flagged OOD ({self.ood_score_name}): {self.n_ood} ({pct(self.share_ood)})",
            "",
            f"  {'':10}{'count':>9}{'est. accuracy':>16}{'true accuracy':>16}",
        ]
        show_true = self.true_accuracy_all is not None
        rows = [
            (
                "accepted",
                self.n_accepted,
                self.estimated_accuracy_accepted,
                self.true_accuracy_accepted,
            ),
            ("rejected", self.n_rejected, None, self.true_accuracy_rejected),
            ("all", self.n_scored, self.estimated_accuracy_all, self.true_accuracy_all),
        ]
        for name, count, est, true in rows:
            lines.append(f"  {name:10}{count:>9}{acc(est):>16}{acc(true) if show_true else '':>16}")
        lines.append(
            "  (est. accuracy = mean calibrated confidence; true accuracy after Hungarian matching)"
        )
        if self.output:
            lines.append(f"output: {self.output}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Tally:
    """Per-row results in input order (compact arrays), for the summary."""

    def __init__(self) -> None:
        self.cluster = array("q")  # -1 for error rows
        self.confidence = array("f")
        self.rejected = array("b")
        self.ood = array("b")

    def add(self, p: Prediction) -> None:
        ok = p.error is None and p.cluster_id is not None
        self.cluster.append(p.cluster_id if ok else -1)  # type: ignore[arg-type]
        self.confidence.append(p.confidence if ok else float("nan"))  # type: ignore[arg-type]
        self.rejected.append(bool(p.rejected) if ok else False)
        self.ood.append(bool(p.ood) if ok else False)

    def summary(self, summary: Summary, labels: np.ndarray | None) -> Summary:
        cluster = np.asarray(self.cluster, dtype=np.int64)
        conf = np.asarray(self.confidence, dtype=np.float64)
        rejected = np.asarray(self.rejected, dtype=bool)
        valid = cluster >= 0
        accepted = valid & ~rejected
        summary.n = len(cluster)
        summary.n_errors = int((~valid).sum())
        summary.n_rejected = int(rejected.sum())
        summary.n_ood = int(np.asarray(self.ood, dtype=bool).sum())
        if accepted.any():
            summary.estimated_accuracy_accepted = float(conf[accepted].mean())
        if valid.any():
            summary.estimated_accuracy_all = float(conf[valid].mean())
        if labels is not None:
            if len(labels) != len(cluster):
                summary.notes.append(
                    f"labels ignored: {len(labels)} labels for {len(cluster)} inputs"
                )
            elif valid.any():
                from cdc_serve.metrics import hungarian_match

                mapping = hungarian_match(labels[valid], cluster[valid])
                matched = np.full(len(cluster), -2, dtype=np.int64)
                matched[valid] = mapping[cluster[valid]]
                correct = matched == labels
                summary.true_accuracy_all = float(correct[valid].mean())
                if accepted.any():
                    summary.true_accuracy_accepted = float(correct[accepted].mean())
                if (valid & rejected).any():
                    summary.true_accuracy_rejected = float(correct[valid & rejected].mean())
        return summary


# -- the run ---------------------------------------------------------------------------


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _score_chunk(client: Client, items: list[Item], pool: ThreadPoolExecutor) -> list[Prediction]:
    """Decode a chunk (in threads), score the readable images, keep errors as rows."""

    def read(item: Item) -> np.ndarray | str:
        try:
            return item.read()
        except CDCError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001  never let one odd input stop the run
            return f"{item.source}: cannot read ({type(exc).__name__}: {exc})"

    loaded = list(pool.map(read, items))
    predictions = [
        Prediction(source=it.source, error=x if isinstance(x, str) else None)
        for it, x in zip(items, loaded, strict=True)
    ]
    good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
    if good:
        scores = client.score_images(np.stack([loaded[i] for i in good]))
        for j, i in enumerate(good):
            scores.fill(predictions[i], j)
    return predictions


def predict(
    inputs: Sequence[Path],
    model: Path | None = None,
    url: str | None = None,
    protocol: str = "http",
    model_name: str = "cdc",
    reject_below: float = 0.8,
    batch_size: int = 256,
    output: Path | None = None,
    ood_score: str | None = None,
    resume: bool = False,
    labels: Path | None = None,
    progress: bool = False,
    *,
    client: Client | None = None,
    concurrency: int = 4,
    retries: int = PREDICT_RETRIES,
    on_chunk: Callable[[int], None] | None = None,
    shared_memory: str = "auto",
) -> Summary:
    """Score every input and write one row each (see the module docstring).

    ``client`` reuses an existing :class:`Client` (``model``/``url`` are then ignored);
    ``shared_memory`` is :class:`Client`'s (how Triton requests carry their input);
    ``on_chunk(rows_written)`` is called after each chunk is safely on disk (a hook for
    progress reporting and tests).
    """
    started = time.monotonic()
    inputs = [Path(p) for p in inputs]
    _check_inputs(inputs)
    if batch_size < 1:
        raise CDCError(f"batch size must be >= 1, got {batch_size}")
    kind = _format_of(Path(output)) if output is not None else None
    if resume and output is None:
        raise CDCError("--resume needs --output (the file of the interrupted run)")
    label_array = read_labels(labels) if labels is not None else None

    own_client = client is None
    if client is None:
        if model is None and url is None:
            raise CDCError("give --model PATH (local scoring) or --url HOST:PORT (Triton)")
        if url is not None and protocol not in ("http", "grpc"):
            raise CDCError(f"protocol must be http or grpc, not {protocol!r}")
        client = Client(
            model=model if url is None else None,
            url=url,
            backend="local" if url is None else protocol,
            model_name=model_name,
            reject_below=reject_below,
            ood_score=ood_score,
            batch_size=batch_size,
            concurrency=concurrency,
            retries=retries,
            backoff=1.0,
            shared_memory=shared_memory,
        )

    partial = Path(f"{output}.partial") if output is not None else None
    done: dict[str, Prediction] = {}
    if output is not None and partial is not None:
        output = Path(output)
        if resume and not partial.exists() and output.exists():
            partial.write_bytes(output.read_bytes())  # resume a finished run: nothing left to do
        if resume and partial.exists():
            done = _read_done(partial, kind)  # type: ignore[arg-type]
        output.parent.mkdir(parents=True, exist_ok=True)

    summary = Summary(
        reject_below=client.reject_below,
        ood_score_name=client.ood.name,
        model=f"{client.meta.name} v{client.meta.version} [{client.backend}: {client.where}]",
        output=str(output) if output is not None else None,
    )
    tally = _Tally()
    writer = _Writer(partial, kind, append=bool(done)) if partial is not None else None  # type: ignore[arg-type]
    bar = _progress_bar() if progress else None
    chunk_size = batch_size * max(1, client.concurrency)
    written = 0
    try:
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            for chunk in _chunks(iter_items(inputs, client.meta, client.max_pixels), chunk_size):
                todo = [it for it in chunk if it.source not in done]
                try:
                    fresh = {p.source: p for p in _score_chunk(client, todo, pool)} if todo else {}
                except CDCError as exc:
                    where = (
                        f"; {written + len(done)} rows are kept in {partial}: rerun with --resume"
                        if partial
                        else ""
                    )
                    raise CDCError(f"{exc}{where}") from None
                if writer is not None and fresh:
                    writer.write([fresh[it.source] for it in todo])
                for it in chunk:
                    if it.source in fresh:
                        tally.add(fresh[it.source])
                    else:
                        tally.add(done[it.source])
                        summary.n_resumed += 1
                written += len(fresh)
                if bar is not None:
                    bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk(written)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
        if own_client:
            client.close()
    if output is not None and partial is not None:
        os.replace(partial, output)
    summary.seconds = time.monotonic() - started
    return tally.summary(summary, label_array)


def _progress_bar():
    from tqdm import tqdm

    return tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, desc="scoring")
