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
the rows go to ``<output>.partial``, flushed chunk by chunk and synced to disk at most
once a second (:class:`~cdc_serve.predict_output.RowWriter`); at the end it
is renamed to ``output`` (an atomic replace). ``resume=True`` reads the rows already
in ``<output>.partial`` (or a finished ``output``), skips those sources and appends
the rest, so the final file has every input exactly once.

Image files are decoded on every core, by helper processes and by this process
(:class:`cdc_serve.decode_pool.DecodePool`), the next chunk while the current one is
scored; array items are sliced in threads. The in-process model then shares the cores
with the decoders (:func:`_scoring_threads`). Unreadable inputs become rows with ``error``
(the run goes on), and so do the images of
a request the server refuses (a wrong datatype or shape: Triton's reason, one line, in
``error``). When the Triton server stays unreachable after the client's retries, the
run stops with a CDCError that names the partial file; ``--resume`` completes it.

Output columns: ``source, cluster_id, confidence, rejected, ood, ood_score, error``
(CSV with a header, one JSON object per line for ``.jsonl``, or typed ``.parquet``): the
file format is :mod:`cdc_serve.predict_output`, the printed summary
:mod:`cdc_serve.predict_summary`.

``engine="ray"`` (``--engine ray``) scores the same rows on Ray Data actors, on a local
Ray or a cluster (:mod:`cdc_serve.ray_engine`); output, resume and summary are shared
with the local engine (:class:`cdc_serve.predict_output.RowSink`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError, usable_cores
from cdc_serve.choices import Engine, values
from cdc_serve.client import Client, Prediction
from cdc_serve.decode_pool import DecodePool
from cdc_serve.idx import check_idx, is_idx, iter_idx_blocks, read_idx
from cdc_serve.modelmeta import find_model
from cdc_serve.npy import read_npy
from cdc_serve.predict_output import (
    COLUMNS,
    RowSink,
    RowWriter,
    finish_output,
    format_of,
    journal_kind,
    read_done,
    reopen_finished,
)
from cdc_serve.predict_summary import Summary, Tally
from cdc_serve.preprocess import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    array_layout,
    array_to_image,
    float_scale,
    load_image,
)
from cdc_serve.transport import RequestRejected

__all__ = ["COLUMNS", "Item", "Summary", "iter_items", "predict", "read_labels"]

PREDICT_RETRIES = 5  # per request; backoff 1, 2, 4, 8, 10 s: rides out a server restart


# -- inputs ----------------------------------------------------------------------------


@dataclass
class Item:
    """One input row: a source name and how to get its uint8 ``C x H x W`` image.

    ``path`` is set for an image file: a :class:`DecodePool` may decode it instead of
    ``load``, in the same way."""

    source: str
    load: Callable[[], np.ndarray] | None = None
    error: str | None = None
    path: str | None = None

    def read(self) -> np.ndarray:
        if self.error is not None:
            raise CDCError(self.error)
        assert self.load is not None
        return self.load()


def _walk_images(folder: str) -> Iterator[str]:
    """Image files below ``folder``, recursively, in sorted path order.

    Entries of each folder are sorted by name and sub-folders are entered at their place
    in that order, so the result is sorted by path components; only one folder listing
    is held per level. Paths stay strings: a folder of millions of files is listed at the
    speed of ``os.scandir``.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_images(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
            yield entry.path


def _array_items(path: Path, meta: Any) -> Iterator[Item]:
    """One Item per image of a ``.npy`` file (memory-mapped) or an IDX file (streamed)."""
    channels, size = meta.channels, tuple(meta.input_size)
    try:
        if path.suffix.lower() == ".npy":
            array = read_npy(path)  # memory-mapped; never unpickles
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

    def image_item(path: str) -> Item:
        return Item(path, lambda: load_image(path, channels, size, max_pixels), path=path)

    for given in inputs:
        path = Path(given)
        if path.is_dir():
            empty = True
            for file in _walk_images(str(path)):
                empty = False
                if file not in seen:
                    seen.add(file)
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
            yield image_item(str(path))


def _check_inputs(inputs: Sequence[Path]) -> None:
    if not inputs:
        raise CDCError("no inputs given")
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise CDCError(
            f"input not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )


def read_labels(path: Path) -> np.ndarray:
    """Labels aligned with the inputs: a 1-D IDX or ``.npy`` array of integers >= 0."""
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"{path}: labels file not found")
    labels = np.array(read_npy(path)) if path.suffix.lower() == ".npy" else read_idx(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CDCError(
            f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int64).max):
        raise CDCError(
            f"{path}: labels must be integers >= 0, found {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64)


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


def _read_one(item: Item) -> np.ndarray | str:
    """An item's image, or the one-line reason it cannot be read."""
    try:
        return item.read()
    except CDCError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001  never let one odd input stop the run
        return f"{item.source}: cannot read ({type(exc).__name__}: {exc})"


def _start_reading(
    items: list[Item], decoder: DecodePool | None, pool: ThreadPoolExecutor
) -> Callable[[], list[np.ndarray | str]]:
    """Start reading a chunk: image files go to ``decoder``'s workers, the rest to threads.

    Returns at once with a function that waits for the images (or reasons), in order."""
    files = [i for i, it in enumerate(items) if it.path is not None and decoder is not None]
    job = decoder.submit([items[i].path for i in files]) if files else None
    in_files = set(files)
    others = {i: pool.submit(_read_one, it) for i, it in enumerate(items) if i not in in_files}

    def wait() -> list[np.ndarray | str]:
        loaded: list[np.ndarray | str] = [""] * len(items)
        if job is not None:
            for i, x in zip(files, decoder.collect(job), strict=True):
                loaded[i] = x
        for i, future in others.items():
            loaded[i] = future.result()
        return loaded

    return wait


def _score_chunk(
    client: Client, items: list[Item], loaded: list[np.ndarray | str]
) -> list[Prediction]:
    """Score a chunk's readable images; the unreadable ones keep their reason as a row."""
    predictions = [
        Prediction(source=it.source, error=x if isinstance(x, str) else None)
        for it, x in zip(items, loaded, strict=True)
    ]
    good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
    if good:
        try:
            scores = client.score_images(np.stack([loaded[i] for i in good]))
        except RequestRejected as exc:  # the server's one-line reason on each row; go on
            for i in good:
                predictions[i].error = str(exc)
            return predictions
        for j, i in enumerate(good):
            scores.fill(predictions[i], j)
    return predictions


def predict(
    inputs: Sequence[Path],
    model: Path | None = None,
    url: str | None = None,
    protocol: str = "http",
    model_name: str = "cdc",
    reject_below: float | None = None,
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
    decode_workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
) -> Summary:
    """Score every input and write one row each (see the module docstring).

    ``protocol`` is :class:`Client`'s with ``url`` (``http`` or ``grpc``; without ``url``
    the model is scored in process, ``local``). ``client`` reuses an existing
    :class:`Client` (``model``/``url`` are then ignored); ``shared_memory`` is
    :class:`Client`'s (how Triton requests carry their input); ``on_chunk(rows_written)``
    is called after each chunk is safely on disk (a hook for progress reporting and tests);
    ``decode_workers`` processes decode image files (None: one per core; 1: this process).
    ``engine`` ``ray`` scores on Ray Data actors (``ray_actors`` of them, default one per
    CPU) on a new local Ray, or on the cluster at ``ray_address``.
    """
    started = time.monotonic()
    inputs = [Path(p) for p in inputs]
    _check_inputs(inputs)
    if batch_size < 1:
        raise CDCError(f"batch size must be >= 1, got {batch_size}")
    kind = format_of(Path(output)) if output is not None else None
    if resume and output is None:
        raise CDCError("--resume needs --output (the file of the interrupted run)")
    label_array = read_labels(labels) if labels is not None else None
    _check_engine(engine, client, ray_address, ray_actors)
    own_client = client is None
    client_kwargs: dict[str, Any] = {}
    if client is None:
        if model is None and url is None:
            raise CDCError("give --model PATH (local scoring) or --url HOST:PORT (Triton)")
        if url is not None and protocol not in ("http", "grpc"):
            raise CDCError(f"protocol must be http or grpc, not {protocol!r}")
        client_kwargs = dict(
            model=str(model) if url is None else None,
            url=url,
            protocol="local" if url is None else protocol,
            model_name=model_name,
            reject_below=reject_below,
            ood_score=ood_score,
            batch_size=batch_size,
            concurrency=concurrency,
            retries=retries,
            backoff=1.0,
            shared_memory=shared_memory,
            **_scoring_threads(inputs, decode_workers, engine, url),
        )
    decoder = _early_decoder(inputs, model, url, decode_workers, engine) if own_client else None
    try:
        if client is None:
            client = Client(**client_kwargs)
        partial = Path(f"{output}.partial") if output is not None else None
        done = _rows_done(Path(output), partial, kind) if resume and partial else {}
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
        summary = _new_summary(client, output)
        tally = Tally()
        writer = (
            RowWriter(partial, journal_kind(kind), append=bool(done)) if partial and kind else None
        )
        sink = RowSink(done, writer, tally, summary, progress, on_chunk)
        try:
            if engine == Engine.ray.value:
                from cdc_serve.ray_engine import score_on_ray

                rows = batch_size * max(1, client.concurrency)
                score_on_ray(inputs, client, client_kwargs, rows, sink, ray_address, ray_actors)
            else:
                _score_all(inputs, client, batch_size, sink, decode_workers, decoder)
        finally:
            sink.close()
    finally:
        if decoder is not None:
            decoder.close()
        if own_client and client is not None:
            client.close()
    if output is not None and partial is not None and kind is not None:
        finish_output(partial, Path(output), kind)
    summary.seconds = time.monotonic() - started
    return tally.summary(summary, label_array)


def _scoring_threads(
    inputs: Sequence[Path], decode_workers: int | None, engine: str, url: str | None = None
) -> dict[str, Any]:
    """:class:`Client`'s ``threads`` and ``spinning`` for scoring in process (none for
    Triton, ``url``); ``threads`` None is all cores.

    When image files are decoded on every core (:class:`DecodePool`: helper processes
    and this one), the scoring shares the cores with the decoding. Decoding a small file
    costs 4-5 times what scoring it does (docs/BENCHMARKS.md, section 5), so the scoring
    gets a quarter of the cores (at least one thread), and its idle threads sleep
    instead of spinning on cores the decoders need (measured: 1.4x the images/s of a
    folder of small files on 2 cores, with the earlier pool of one decoder per core).
    """
    if url is not None:
        return {}
    decoding = (
        engine == Engine.local.value
        and (decode_workers or usable_cores()) > 1
        and _has_image_files(inputs)
    )
    if decoding:
        return {"threads": max(1, usable_cores() // 4), "spinning": False}
    return {"threads": None, "spinning": True}


def _has_image_files(inputs: Sequence[Path]) -> bool:
    """Whether the inputs hold image files to decode (a folder, or an image file)."""
    return any(p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES for p in inputs)


def _new_summary(client: Client, output: Path | None) -> Summary:
    """The run's summary before any row: the model, its thresholds and the output."""
    where = f"{client.meta.name} v{client.meta.version} [{client.protocol}: {client.where}]"
    return Summary(
        reject_below=client.reject_below,
        ood_score_name=client.ood.name,
        model=where,
        output=str(output) if output is not None else None,
    )


def _early_decoder(
    inputs: Sequence[Path],
    model: Path | None,
    url: str | None,
    decode_workers: int | None,
    engine: str,
) -> DecodePool | None:
    """The decoding pool of a local run over image files, started before the model loads.

    Started now, while no library with threads of its own is loaded, its helper
    processes are forked from this process at once (:func:`cdc_serve.image_folder.pool_context`);
    started after onnxruntime, they would come from a fork server, which costs a command
    run about 0.3 s to start. None when no pool is needed (Triton, one worker, no image
    files, another engine) or the model's metadata cannot be read (the Client then says
    why)."""
    workers = decode_workers or usable_cores()
    wanted = (
        url is None
        and model is not None
        and engine == Engine.local.value
        and workers > 1
        and _has_image_files(inputs)
    )
    if not wanted:
        return None
    try:
        _, meta = find_model(model)
    except CDCError:
        return None
    return DecodePool(meta.channels, tuple(meta.input_size), MAX_PIXELS, workers)


def _check_engine(
    engine: str, client: Client | None, ray_address: str | None, ray_actors: int | None
) -> None:
    """Refuse a wrong engine, or Ray options without Ray, before any work starts."""
    if engine not in values(Engine):
        raise CDCError(f"engine must be one of {', '.join(values(Engine))}, not {engine!r}")
    if engine == Engine.ray.value:
        from cdc_serve.ray_engine import require_ray

        require_ray()
        if client is not None:
            raise CDCError("engine ray opens a client in each actor: give model/url, not client")
    elif ray_address is not None or ray_actors is not None:
        raise CDCError("--ray-address and --ray-actors need --engine ray")


def _rows_done(output: Path, partial: Path, kind: str | None) -> dict[str, Prediction]:
    """The rows an interrupted (or finished) run already wrote, by source (``--resume``)."""
    if not partial.exists() and output.exists():
        reopen_finished(output, partial, kind)  # resume a finished run: nothing left to do
    if not partial.exists() or kind is None:
        return {}
    return read_done(partial, journal_kind(kind))


def _score_all(
    inputs: Sequence[Path],
    client: Client,
    batch_size: int,
    sink: RowSink,
    decode_workers: int | None = None,
    decoder: DecodePool | None = None,
) -> None:
    """Read, score and write the inputs chunk by chunk; rows in ``done`` are not scored again.

    Reading runs one chunk ahead: chunk k+1 is being decoded while chunk k is scored.
    Image files go to ``decoder``, else to a pool started at the first chunk that has any
    (closed here either way)."""
    chunk_size = batch_size * max(1, client.concurrency)
    done = sink.done
    workers = decode_workers or usable_cores()

    def finish(chunk: list[Item], todo: list[Item], wait: Callable) -> None:
        try:
            fresh = {p.source: p for p in _score_chunk(client, todo, wait())} if todo else {}
        except CDCError as exc:
            raise sink.stopped(exc) from None
        sink.add([it.source for it in chunk], fresh)

    try:
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            pending = None
            for chunk in _chunks(iter_items(inputs, client.meta, client.max_pixels), chunk_size):
                todo = [it for it in chunk if it.source not in done]
                if decoder is None and workers > 1 and any(it.path for it in todo):
                    size = tuple(client.meta.input_size)
                    decoder = DecodePool(client.meta.channels, size, client.max_pixels, workers)
                started = (chunk, todo, _start_reading(todo, decoder, pool))
                if pending is not None:
                    finish(*pending)
                pending = started
            if pending is not None:
                finish(*pending)
    finally:
        if decoder is not None:
            decoder.close()
