"""Batch scoring on Ray Data (``cdc-serve predict --engine ray``): the local engine's rows.

The data flow, in the order of this module:

1. The driver (this process) has opened one :class:`~cdc_serve.client.Client` for the
   model's metadata and the summary (:func:`cdc_serve.predict.predict` does that for
   both engines). :func:`ray_session` starts a local Ray for the run (the machine's
   cores, no dashboard, the workers' logs kept out of the terminal; shut down at the
   end) or connects to the cluster at ``--ray-address``; a Ray the caller already
   started is used as it is and left running.
2. :func:`expand_inputs` runs as one Ray task, a streaming generator: it expands the
   inputs in order with :func:`cdc_serve.predict.iter_items` (the local engine's
   expansion, duplicates and empty folders included) and yields blocks of ``rows``
   *descriptors*, one per output row: ``index``, ``source`` and how to get the image:
   ``path`` (an image file, decoded by an actor), ``image`` (an item of a ``.npy`` or
   IDX file, sliced here: uint8 ``C x H x W`` bytes), ``error`` (an unreadable input:
   the row's message) or ``done`` (a row of the run being resumed: not scored again).
   The list of inputs is never held whole anywhere: blocks leave the generator as the
   actors take them (Ray Data's backpressure), so a task is not one giant block.
3. ``map_batches`` with the callable class :class:`Scorer` on a fixed pool of actors
   (one per CPU of the cluster unless ``--ray-actors`` says otherwise), each holding one
   Client (one onnxruntime session on one thread, or one Triton client with ``--url``).
   An actor decodes its files in its own process (:class:`~cdc_serve.decode_pool.
   DecodePool` with one worker) and scores them with the local engine's
   :func:`cdc_serve.predict._score_chunk`: the same images, the same error rows.
4. Ray Data hands the result blocks back in input order (``preserve_order``); the
   driver streams them (``iter_batches``), checks that the indices follow on, and gives
   each block to the local engine's :class:`~cdc_serve.predict_output.RowSink`: the same
   writer (CSV, JSONL or Parquet, ``.partial`` and ``--resume``), tally and summary.

Memory stays bounded: the driver holds one result block at a time, each actor one
descriptor block, and Ray Data caps the blocks in flight between them.

On a cluster the model and the inputs must be readable at the same paths on the node
that runs the expansion and on every node with actors (a shared file system): image
files are decoded where the actors run. An actor that fails, or a Triton server that
stays unreachable, stops the run with one error line; rows already written stay in
``<output>.partial`` and ``--resume`` continues. Ray is imported only inside these
functions: ``cdc_serve`` imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError, usable_cores
from cdc_serve.client import Client, Prediction
from cdc_serve.predict_output import RowSink

RAY_EXTRA = "pip install 'cdc-serve[ray]'"
# Ray Data merges what a task yields into blocks of up to this many bytes: small, so that
# the one expanding task gives many blocks (about 80 28x28 images or 400 file paths each)
# and every actor gets work; ``map_batches`` regroups them into ``rows`` per call.
BLOCK_BYTES = 64 * 1024
_EXCEPTION_LINE = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*): (?P<message>.*)$")
DESCRIPTOR = ("index", "source", "path", "image", "error", "done")
RESULT = ("index", "source", "done", "cluster_id", "confidence", "rejected", "ood",
          "ood_score", "error")  # fmt: skip


def require_ray() -> None:
    """Refuse before any work when Ray Data (the ``ray`` extra) is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise CDCError(f"--engine ray needs Ray Data: {RAY_EXTRA}") from None


# -- 1. the driver: Ray for the run, the pipeline, the rows in order ----------------------------


def score_on_ray(
    inputs: Sequence[Path],
    client: Client,
    client_kwargs: dict[str, Any],
    rows: int,
    sink: RowSink,
    address: str | None = None,
    actors: int | None = None,
) -> None:
    """Score ``inputs`` on Ray and give the rows, in input order, to ``sink``.

    ``client`` is the driver's (metadata only); each actor opens
    ``Client(**client_kwargs)``; ``rows`` is the number of images per actor call."""
    require_ray()
    if actors is not None and actors < 1:
        raise CDCError(f"--ray-actors must be >= 1, got {actors}")
    with ray_session(address), _quiet_data_context():
        n_actors, cpus = _actor_pool(actors)
        sink.summary.model += f" on Ray, {n_actors} actor{'s' if n_actors > 1 else ''}"
        kwargs = dict(client_kwargs)
        if kwargs.get("protocol") == "local":
            kwargs["threads"] = max(1, int(cpus))  # one onnxruntime thread per actor's CPU
        source = {
            "inputs": [str(p) for p in inputs],
            "meta": client.meta,
            "max_pixels": client.max_pixels,
            "done": set(sink.done),
            "rows": rows,
        }
        blocks = _pipeline(source, kwargs, rows, n_actors, cpus)
        expected = 0
        while True:
            try:
                table = next(blocks, None)
            except Exception as exc:  # noqa: BLE001  an actor failed: one line, rows kept
                raise sink.stopped(CDCError(_reason(exc))) from None
            if table is None:
                break
            sources, fresh, indices = _rows_of(table)
            if indices != list(range(expected, expected + len(indices))):
                raise sink.stopped(CDCError("Ray returned the rows out of order (a bug)"))
            expected += len(indices)
            sink.add(sources, fresh)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one run: a new local Ray (``address`` None) or the cluster at ``address``."""
    import ray

    if address and address.startswith("ray://"):
        raise CDCError(
            f"{address}: Ray Client addresses do not run Ray Data pipelines; run predict on a "
            "node of the cluster with --ray-address HEAD:6379 (or auto inside `ray job submit`)"
        )
    if ray.is_initialized():  # the caller's own Ray (a test, a notebook): used as it is
        yield
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # "local": a new Ray even when RAY_ADDRESS or a `ray start` cluster exists
            ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False, **quiet)
    except Exception as exc:  # noqa: BLE001  Ray raises many kinds here; one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not address:
            raise CDCError(f"cannot start a local Ray: {first}") from None
        raise CDCError(
            f"cannot connect to the Ray cluster at {address}: {first} (check the address with "
            "`ray status`; a cluster with token authentication, as `ray start` sets up in "
            "Ray 2.60, needs RAY_AUTH_MODE=token here too)"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_data_context() -> Iterator[None]:
    """Ray Data as this engine needs it, restored afterwards: rows in order, small blocks,
    and no progress bars, statistics, warnings or log lines of its own in the terminal
    (``--progress`` draws cdc-serve's bar)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    wanted = {"enable_progress_bars": False, "enable_auto_log_stats": False,
              "verbose_stats_logs": False, "target_max_block_size": BLOCK_BYTES}  # fmt: skip
    saved = {name: getattr(ctx, name) for name in wanted if hasattr(ctx, name)}
    order = ctx.execution_options.preserve_order
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    for name in saved:
        setattr(ctx, name, wanted[name])
    ctx.execution_options.preserve_order = True
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray Data's planning advice and deprecations
            yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.preserve_order = order
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _actor_pool(actors: int | None) -> tuple[int, float]:
    """How many actors, and the CPUs each asks for (never more than the cluster has, so
    that asking for more actors than CPUs shares them instead of waiting for ever)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    n = actors or max(1, int(total))
    return n, min(1.0, total / n)


def _pipeline(
    source: dict[str, Any], client_kwargs: dict[str, Any], rows: int, actors: int, cpus: float
) -> Iterator[Any]:
    """The Ray Data pipeline, streamed: one pyarrow table of results per actor call."""
    import ray.data

    # from_items: one row made here, so no read task competes with the actors for CPUs
    expand = ray.data.from_items([{"run": 0}]).map_batches(
        expand_inputs, fn_kwargs={"source": source}, batch_size=None, num_cpus=0,
        batch_format="pyarrow",
    )  # fmt: skip
    # max_restarts=0: a failed actor stops the run (--resume continues it) rather than
    # being restarted without its constructor arguments (which Ray warns about).
    scored = expand.map_batches(
        Scorer, fn_constructor_kwargs={"client_kwargs": client_kwargs}, batch_size=rows,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus, max_restarts=0,
    )  # fmt: skip
    return iter(scored.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2))


def _rows_of(table: Any) -> tuple[list[str], dict[str, Prediction], list[int]]:
    """A result block -> its sources in order, the rows scored now (by source), the indices."""
    col = {name: table.column(name).to_pylist() for name in RESULT}
    fresh = {
        source: Prediction(
            source=source,
            cluster_id=col["cluster_id"][i],
            confidence=col["confidence"][i],
            rejected=col["rejected"][i],
            ood=col["ood"][i],
            ood_score=col["ood_score"][i],
            error=col["error"][i],
        )  # fmt: skip
        for i, source in enumerate(col["source"])
        if not col["done"][i]
    }
    return col["source"], fresh, col["index"]


def _reason(exc: BaseException) -> str:
    """The one line to show for a failed Ray run. An actor's exception reaches the driver
    as text (Ray's remote traceback): its ``Class: message`` line is found there; a
    CDCError's message is shown as it is, as the local engine shows it."""
    for line in str(exc).splitlines():
        found = _EXCEPTION_LINE.match(line)
        if found and not found["cls"].startswith("ray."):
            cls, message = found["cls"], found["message"].strip()
            if cls.endswith("CDCError") or cls.startswith("cdc_serve."):
                return message
            return f"the Ray run failed in an actor ({cls.rsplit('.', 1)[-1]}: {message})"
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"the Ray run failed ({type(exc).__name__}: {lines[-1] if lines else 'no message'})"


# -- 2. the expansion: one streaming task, blocks of descriptors ---------------------------------


def expand_inputs(_: Any, source: dict[str, Any]) -> Iterator[Any]:
    """The inputs as blocks of ``source["rows"]`` descriptors, in input order (a Ray
    ``map_batches`` generator over a one-row dataset)."""
    import pyarrow as pa

    from cdc_serve.predict import _chunks, _read_one, iter_items

    schema = pa.schema([("index", pa.int64()), ("source", pa.string()), ("path", pa.string()),
                        ("image", pa.binary()), ("error", pa.string()), ("done", pa.bool_())])  # fmt: skip
    done = source["done"]
    items = iter_items([Path(p) for p in source["inputs"]], source["meta"], source["max_pixels"])
    index = 0
    for chunk in _chunks(items, source["rows"]):
        col: dict[str, list] = {name: [] for name in DESCRIPTOR}
        for item in chunk:
            path = image = error = None
            if item.source in done:
                pass
            elif item.error is not None or item.path is not None:
                path, error = item.path, item.error
            else:  # an array item: sliced here, where its file is open
                loaded = _read_one(item)
                if isinstance(loaded, str):
                    error = loaded
                else:
                    image = np.ascontiguousarray(loaded, dtype=np.uint8).tobytes()
            for name, value in zip(DESCRIPTOR, (index, item.source, path, image, error,
                                                item.source in done), strict=True):  # fmt: skip
                col[name].append(value)
            index += 1
        yield pa.table(col, schema=schema)


# -- 3. the actors: one Client each, decode and score a block -----------------------------------


class Scorer:
    """One actor of the pool: one Client, image files decoded in this process."""

    def __init__(self, client_kwargs: dict[str, Any]) -> None:
        from cdc_serve.decode_pool import DecodePool

        self.client = Client(**client_kwargs)
        meta = self.client.meta
        self.shape = (meta.channels, *meta.input_size)
        size = tuple(meta.input_size)
        self.decoder = DecodePool(meta.channels, size, self.client.max_pixels, workers=1)

    def __call__(self, block: Any) -> Any:
        import pyarrow as pa

        from cdc_serve.predict import Item, _score_chunk

        col = {name: block.column(name).to_pylist() for name in DESCRIPTOR}
        todo = [i for i, done in enumerate(col["done"]) if not done]
        loaded: dict[int, np.ndarray | str] = {}
        files = [i for i in todo if col["path"][i] is not None]
        if files:
            job = self.decoder.submit([col["path"][i] for i in files])
            loaded.update(zip(files, self.decoder.collect(job), strict=True))
        for i in todo:
            if i not in loaded:
                image = col["image"][i]
                loaded[i] = (
                    col["error"][i]
                    if image is None
                    else np.frombuffer(image, np.uint8).reshape(self.shape)
                )
        items = [Item(col["source"][i]) for i in todo]
        scored = dict(zip(todo, _score_chunk(self.client, items, [loaded[i] for i in todo]),
                          strict=True))  # fmt: skip
        out: dict[str, list] = {name: [] for name in RESULT}
        for i, source in enumerate(col["source"]):
            p = scored.get(i, Prediction(source=source))
            values = (col["index"][i], source, col["done"][i], p.cluster_id, p.confidence,
                      p.rejected, p.ood, p.ood_score, p.error)  # fmt: skip
            for name, value in zip(RESULT, values, strict=True):
                out[name].append(value)
        return pa.table(out, schema=_result_schema())


def _result_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("source", pa.string()), ("done", pa.bool_()),
                      ("cluster_id", pa.int64()), ("confidence", pa.float64()),
                      ("rejected", pa.bool_()), ("ood", pa.bool_()), ("ood_score", pa.float64()),
                      ("error", pa.string())])  # fmt: skip
