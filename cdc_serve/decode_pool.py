"""Decoding a stream of image files for ``cdc-serve predict``, on every core, this one too.

``predict`` reads a chunk of files while it scores the one before. Decoding costs more
than scoring (docs/BENCHMARKS.md, section 5), so the scoring process would often wait
for its decoders; and a decoder on every core besides the scoring process puts two busy
processes on one core. :class:`DecodePool` shares the decoding instead:

1. ``submit(files)`` cuts the chunk into tasks of :data:`TASK` files and hands the
   chunk to the helper processes (one per core but this one); each helper takes the
   tasks one at a time from a counter in shared memory, decodes them and keeps the
   results;
2. the caller scores the previous chunk meanwhile;
3. ``collect(job)`` makes the calling process a decoder too: it takes the tasks still
   left from the same counter and decodes them itself; while the helpers finish the
   job's last tasks, it decodes tasks of the jobs submitted after it (their results
   wait for their own ``collect``); then it gathers the helpers' results and returns
   every file's image (or its one-line reason) in order.

So the helpers never wait for work, the caller waits for its images only when no task
is left anywhere, and no core carries more than one busy process. With ``workers`` 1
there is no helper: the caller decodes each chunk at ``collect``.

Every file is decoded by :func:`cdc_serve.preprocess.load_image`, the same function
training's folder reader uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cdc_serve import CDCError, usable_cores
from cdc_serve.image_folder import pool_context
from cdc_serve.preprocess import MAX_PIXELS, load_image

TASK = 16  # files per task: about 5 ms of decoding, small enough to share a chunk evenly
SLOTS = 8  # jobs submitted and not yet collected, at most (predict keeps two)

_helper: dict[str, Any] = {}  # in a helper process: the shared counters and the target


def decode_files(
    files: Sequence[str], channels: int, size: tuple[int, int], max_pixels: int
) -> tuple[np.ndarray, dict[int, str]]:
    """The files as one uint8 ``N x C x H x W`` array (a cheap result to send back) and,
    by position, why each unreadable one failed (its rows are zeros)."""
    images = np.zeros((len(files), channels, *size), np.uint8)
    failed: dict[int, str] = {}
    for i, f in enumerate(files):
        try:
            images[i] = load_image(f, channels, size, max_pixels)
        except CDCError as exc:
            failed[i] = str(exc)
        except Exception as exc:  # noqa: BLE001  never let one odd file stop the others
            failed[i] = f"{f}: cannot read ({type(exc).__name__}: {exc})"
    return images, failed


def _take(counters: Any, slot: int) -> int:
    """The next task of the job in ``slot`` (shared by the helpers and the caller)."""
    with counters.get_lock():
        task = counters[slot]
        counters[slot] = task + 1
    return task


def _start_helper(counters: Any, target: tuple) -> None:
    _helper["counters"], _helper["target"] = counters, target


def _drain(slot: int, tasks: list[list[str]]) -> list[tuple[int, tuple]]:
    """In a helper: decode the job's tasks until none is left; ``(task, result)`` each."""
    done = []
    while (task := _take(_helper["counters"], slot)) < len(tasks):
        done.append((task, decode_files(tasks[task], *_helper["target"])))
    return done


class DecodePool:
    """Image files -> uint8 ``C x H x W`` arrays (or a one-line reason), decoded by
    ``workers`` processes: this one and ``workers - 1`` helpers (see the module doc).

    ``submit(files)`` returns at once; ``collect(job)`` returns the job's images in the
    files' order. Up to :data:`SLOTS` jobs may be submitted before they are collected.
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        max_pixels: int = MAX_PIXELS,
        workers: int | None = None,
    ) -> None:
        self.workers = max(1, workers or usable_cores())
        self._target = (channels, tuple(size), max_pixels)
        self._pool = None
        self._counters = None
        self._submitted = self._collected = 0
        self._open: dict[int, list[list[str]]] = {}  # slot -> tasks, of jobs not collected
        self._ahead: dict[int, dict[int, tuple]] = {}  # slot -> results decoded early
        if self.workers > 1:
            context = pool_context()
            self._counters = context.Array("q", SLOTS)
            self._pool = context.Pool(
                self.workers - 1, initializer=_start_helper, initargs=(self._counters, self._target)
            )

    def submit(self, files: Sequence[str]) -> tuple[int, list[list[str]], list]:
        if self._submitted - self._collected >= SLOTS:
            raise CDCError(f"DecodePool: at most {SLOTS} jobs may wait to be collected")
        slot = self._submitted % SLOTS
        self._submitted += 1
        tasks = [list(files[i : i + TASK]) for i in range(0, len(files), TASK)]
        self._open[slot], self._ahead[slot] = tasks, {}
        helpers = []
        if self._pool is not None and self._counters is not None:
            self._counters[slot] = 0
            count = min(self.workers - 1, len(tasks))
            helpers = [self._pool.apply_async(_drain, (slot, tasks)) for _ in range(count)]
        return slot, tasks, helpers

    def collect(self, job: tuple[int, list[list[str]], list]) -> list[np.ndarray | str]:
        slot, tasks, helpers = job
        results = self._ahead.pop(slot)
        del self._open[slot]
        if self._counters is None:
            results = {t: decode_files(files, *self._target) for t, files in enumerate(tasks)}
        else:
            while (task := _take(self._counters, slot)) < len(tasks):
                results[task] = decode_files(tasks[task], *self._target)
            while not all(helper.ready() for helper in helpers) and self._decode_ahead():
                pass
            for helper in helpers:
                results.update(helper.get())
        self._collected += 1
        return [x for t in range(len(tasks)) for x in _unpack(results[t])]

    def _decode_ahead(self) -> bool:
        """Decode one task of the oldest job not yet collected that has one left; False
        when no job has a task left."""
        for slot, tasks in self._open.items():
            if (task := _take(self._counters, slot)) < len(tasks):
                self._ahead[slot][task] = decode_files(tasks[task], *self._target)
                return True
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # nothing is left to wait for once every job is collected
            self._pool.join()
            self._pool = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unpack(result: tuple[np.ndarray, dict[int, str]]) -> list[np.ndarray | str]:
    images, failed = result
    return [failed[i] if i in failed else images[i] for i in range(len(images))]
