"""The client library: cluster IDs with calibrated confidence, rejection and OOD flags.

One :class:`Client`, three protocols (``Client(protocol=...)``) that give the same answers:

- ``local`` (the default): onnxruntime in this process, on an exported model
  (``repo/<name>``, a version folder or a ``model.onnx`` with ``cdc_meta.json`` beside it);
- ``http`` / ``grpc``: a Triton Inference Server (``tritonclient``); requests are cut
  to the server's max batch, sent concurrently from a small thread pool and retried
  with exponential backoff when the connection fails.

How each protocol runs a batch is :mod:`cdc_serve.transport`; the tensor names are the
model metadata's (``input_name``, ``outputs``), by default :mod:`cdc_serve.contract`'s.

Current exports (metadata ``format_version`` 2) answer completely: the client sends the
uint8 images and reads ``cluster_id``, ``confidence``, ``ood_score`` and ``ood`` from the
model (``rejected`` is ``confidence < reject_below``, the caller's choice, by default the
model's ``reject_below``). Only an OOD score other than the model's default
(``ood_score=``) is computed here, from the ``embedding``. Exports of the previous format
(``format_version`` 1: float32 normalised input, ``probs`` and ``embedding`` only) are
still served: the client normalises and computes the rest itself.

Input conventions:

- :meth:`Client.predict` takes *images*: a list of file paths, PIL images or single
  image arrays, or one numpy array of images ``N x H x W``, ``N x C x H x W`` or
  ``N x H x W x C`` (uint8 0..255, or float 0..1 / 0..255; see
  :mod:`cdc_serve.preprocess`). It decodes, converts and resizes them as the model's
  metadata says, and returns one :class:`Prediction` per item; an unreadable item gets
  a Prediction with ``error`` set instead of failing the batch.
- :meth:`Client.predict_arrays` takes the model's input as is (:meth:`Client.model_input`
  makes it from uint8 images: the images themselves, or their normalised float32 for
  the previous format) and returns the outputs asked for, by their contract names.

The model metadata over Triton comes from the model configuration's parameters: the
whole ``cdc_meta.json`` as the string parameter ``cdc_meta`` when present, otherwise
the per-field parameters (the OOD parameters may then be missing, and only the
``msp`` score without a threshold is available; pass ``meta=`` to use a local copy).

This module never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cdc_serve import CDCError
from cdc_serve.choices import Protocol, values
from cdc_serve.contract import (
    CLUSTER_ID,
    CONFIDENCE,
    EMBEDDING,
    META_PARAMETER,
    OOD,
    OOD_SCORE,
    PROBS,
    SCORE_OUTPUTS,
)
from cdc_serve.modelmeta import ModelMeta, find_model
from cdc_serve.ood import OODScorer
from cdc_serve.preprocess import (
    MAX_PIXELS,
    array_layout,
    array_to_image,
    float_scale,
    normalise,
    prepare,
)
from cdc_serve.served_graph import served_score
from cdc_serve.shm import MODES as SHM_MODES
from cdc_serve.transport import LocalRunner, TritonRunner, graph_outputs

__all__ = ["META_PARAMETER", "PROTOCOLS", "Client", "Prediction", "Scores"]

PROTOCOLS = values(Protocol)


@dataclass
class Prediction:
    """The answer for one image. On an unreadable input only ``source`` and ``error`` are set."""

    source: str
    cluster_id: int | None = None
    confidence: float | None = None
    rejected: bool | None = None
    ood: bool | None = None
    ood_score: float | None = None
    probs: list[float] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scores:
    """Per-image arrays for a batch of valid images (what :class:`Prediction` is built from)."""

    cluster_id: np.ndarray  # int64 (N,)
    confidence: np.ndarray  # float32 (N,): max calibrated probability
    rejected: np.ndarray  # bool (N,): confidence < reject_below
    ood: np.ndarray  # bool (N,): ood_score > threshold
    ood_score: np.ndarray  # float32 (N,)
    probs: np.ndarray | None  # float32 (N, num_classes), when asked for

    def fill(self, p: Prediction, j: int, with_probs: bool = False) -> Prediction:
        """Copy row ``j`` of these scores into the prediction ``p``."""
        p.cluster_id = int(self.cluster_id[j])
        p.confidence = float(self.confidence[j])
        p.rejected = bool(self.rejected[j])
        p.ood = bool(self.ood[j])
        p.ood_score = float(self.ood_score[j])
        if with_probs and self.probs is not None:
            p.probs = [float(v) for v in self.probs[j]]
        return p


# -- the client ------------------------------------------------------------------------


def _bind(runner: TritonRunner, meta: ModelMeta | None) -> ModelMeta:
    """The metadata to use with a Triton runner (``meta``, else the server's), bound to it."""
    try:
        meta = meta or runner.meta()
        runner.bind(meta)
    except BaseException:
        runner.close()
        raise
    return meta


class Client:
    """Score images with an exported CDC/RUC model, locally or through Triton.

    Args:
        model: exported model path (``local``; with ``http``/``grpc`` it only supplies a
            local copy of the metadata).
        url: Triton ``HOST:PORT`` (implies ``protocol="http"`` unless given).
        protocol: ``local`` (onnxruntime in process), ``http`` or ``grpc`` (Triton).
        model_name, model_version: the model on the Triton server ('' = latest).
        reject_below: a prediction is ``rejected`` when its confidence is below this
            (default: the model's ``reject_below``, 0.8 unless chosen at export).
        ood_score: OOD score name (default: the one the model's metadata names).
        threads: onnxruntime intra-op threads (default: all cores).
        spinning: whether idle onnxruntime threads spin waiting for the next batch (the
            default; False lets them sleep, for a process that shares the cores).
        timeout: seconds per Triton request.
        retries: retries per Triton request (exponential backoff from ``backoff`` s).
        concurrency: Triton requests in flight at once.
        batch_size: images per request (default: the server's max batch; local 1024).
        meta: a ModelMeta or ``cdc_meta.json`` path overriding the model's own.
        max_pixels: larger images are refused before decoding.
        shared_memory: how Triton requests carry their input: ``auto`` (the default) puts
            it in a system shared-memory region when the server is on loopback, else in
            the message; ``system`` always uses shared memory (an error if the server
            cannot open it); ``none`` always sends it in the message. See
            :mod:`cdc_serve.shm`.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        url: str | None = None,
        protocol: str | None = None,
        model_name: str = "cdc",
        model_version: str | int = "",
        reject_below: float | None = None,
        ood_score: str | None = None,
        threads: int | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        concurrency: int = 4,
        batch_size: int | None = None,
        meta: ModelMeta | str | os.PathLike | None = None,
        backoff: float = 0.5,
        max_pixels: int = MAX_PIXELS,
        shared_memory: str = "auto",
        spinning: bool = True,
    ) -> None:
        protocol = protocol or ("local" if url is None else "http")
        if protocol not in PROTOCOLS:
            raise CDCError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if reject_below is not None and not 0.0 <= reject_below <= 1.0:
            raise CDCError(f"reject_below must lie in [0, 1], got {reject_below}")
        if concurrency < 1 or retries < 0:
            raise CDCError("concurrency must be >= 1 and retries >= 0")
        if shared_memory not in SHM_MODES:
            raise CDCError(
                f"shared_memory must be one of {', '.join(SHM_MODES)}, not {shared_memory!r}"
            )
        self.protocol = protocol
        self.max_pixels = max_pixels
        self.concurrency = concurrency if protocol != "local" else 1

        if isinstance(meta, (str, os.PathLike)):
            meta = ModelMeta.read(meta)
        if protocol == "local":
            if model is None:
                raise CDCError(
                    "the local protocol needs a model (repo/<name>, a version folder or .onnx)"
                )
            onnx_path, found = find_model(model)
            self.meta = meta or found
            self._runner: LocalRunner | TritonRunner = LocalRunner(
                onnx_path, self.meta, threads, spinning
            )
        else:
            if not url:
                raise CDCError(f"the {protocol} protocol needs url=HOST:PORT of a Triton server")
            local_meta = meta or (find_model(model)[1] if model is not None else None)
            runner = TritonRunner(
                url, protocol, model_name, str(model_version), timeout, retries, backoff,
                shared_memory,
            )  # fmt: skip
            self._runner = runner
            self.meta = _bind(runner, local_meta)
        self.batch_size = min(batch_size or self._runner.max_batch, self._runner.max_batch)
        self.reject_below = float(self.meta.reject_below if reject_below is None else reject_below)
        self.ood = OODScorer(self.meta.ood, ood_score)
        # the graph's own ood_score / ood, unless another score was asked for
        self._ood_in_graph = self.meta.scores_in_graph and (
            self.ood.name == served_score(self.meta.ood)[0]
        )
        self._pool = ThreadPoolExecutor(self.concurrency) if self.concurrency > 1 else None

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        return self._runner.where

    # -- model input as is ----------------------------------------------------------

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``N x C x H x W`` images -> what the model takes: the images themselves, or
        (previous format) their normalised float32."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise CDCError(f"images must be uint8 N x C x H x W, got {images.dtype}")
        return np.ascontiguousarray(images) if self.meta.scores_in_graph else normalise(images, self.meta)  # fmt: skip

    def predict_arrays(
        self, x: np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on its input as is (see :meth:`model_input`): ``{name: array}`` of
        ``outputs`` (contract names; default every output the model gives)."""
        x = np.asarray(x)
        want = (self.meta.channels, *self.meta.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise CDCError(f"model input must be N x {' x '.join(map(str, want))}, got {x.shape}")
        dtype = np.uint8 if self.meta.scores_in_graph else np.float32
        if x.dtype != dtype and not (dtype == np.float32 and np.issubdtype(x.dtype, np.floating)):
            kind = "uint8 images" if dtype == np.uint8 else "float (normalised)"
            raise CDCError(f"model input must be {kind}, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=dtype)
        names = self._names(outputs)
        if len(x) == 0:
            return self._empty(names)
        chunks = [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]
        graph_names = list(names.values())

        def run(chunk: np.ndarray) -> dict[str, np.ndarray]:
            return self._runner.run(chunk, graph_names)

        if self._pool is not None and len(chunks) > 1:
            results = list(self._pool.map(run, chunks))
        else:
            results = [run(c) for c in chunks]
        return {key: np.concatenate([r[name] for r in results]) for key, name in names.items()}

    def _names(self, outputs: Sequence[str] | None) -> dict[str, str]:
        """Contract name -> the graph's name, for the outputs asked for."""
        graph = dict(zip((PROBS, EMBEDDING), self.meta.outputs, strict=True))
        graph.update({n: n for n in graph_outputs(self.meta) if n in SCORE_OUTPUTS})
        keys = list(outputs) if outputs is not None else list(graph)
        unknown = [k for k in keys if k not in graph]
        if unknown:
            raise CDCError(f"this model gives no output {unknown} (it gives {list(graph)})")
        return {k: graph[k] for k in keys}

    def _empty(self, names: dict[str, str]) -> dict[str, np.ndarray]:
        shapes = {PROBS: (0, self.meta.num_classes), EMBEDDING: (0, self.meta.embedding_dim)}
        types = {CLUSTER_ID: np.int64, OOD: np.bool_}
        return {k: np.zeros(shapes.get(k, (0,)), types.get(k, np.float32)) for k in names}

    # -- images ---------------------------------------------------------------------

    def score_images(self, images: np.ndarray, with_probs: bool = False) -> Scores:
        """Score preprocessed uint8 ``N x C x H x W`` images (see :mod:`cdc_serve.preprocess`).

        A current export is asked for its per-image answer only (plus ``probs`` when
        ``with_probs``, and what another OOD score than the model's needs): the least a
        request can carry back."""
        if not self.meta.scores_in_graph:  # the previous format: everything computed here
            out = self.predict_arrays(self.model_input(images), (PROBS, EMBEDDING))
            out[CONFIDENCE] = out[PROBS].max(axis=1, initial=0.0)
            out[CLUSTER_ID] = out[PROBS].argmax(axis=1) if len(images) else np.zeros(0, np.int64)
        else:
            extra = [PROBS] if with_probs else []
            if not self._ood_in_graph:  # another score, computed here from the embedding
                extra = [PROBS, EMBEDDING]
            out = self.predict_arrays(self.model_input(images), [*SCORE_OUTPUTS, *extra])
        if not self._ood_in_graph:
            out[OOD], out[OOD_SCORE] = self.ood.flags(out[EMBEDDING], out[PROBS])
        confidence = out[CONFIDENCE].astype(np.float32)
        return Scores(
            cluster_id=out[CLUSTER_ID].astype(np.int64),
            confidence=confidence,
            rejected=confidence < self.reject_below,
            ood=out[OOD].astype(bool),
            ood_score=out[OOD_SCORE].astype(np.float32),
            probs=out[PROBS].astype(np.float32) if PROBS in out else None,
        )

    def prepare(self, item: Any) -> np.ndarray:
        """One path / PIL image / image array -> uint8 ``C x H x W`` for this model."""
        return prepare(item, self.meta.channels, self.meta.input_size, self.max_pixels)

    def predict(
        self,
        batch: Sequence[Any] | np.ndarray,
        sources: Sequence[str] | None = None,
        return_probs: bool = False,
    ) -> list[Prediction]:
        """Score a batch of images (paths, PIL images, arrays): one Prediction per item.

        An item that cannot be read gets a Prediction with ``error`` set; the others are
        scored. Server or model failures raise CDCError.
        """
        channels, size = self.meta.channels, self.meta.input_size
        if isinstance(batch, np.ndarray):
            layout = array_layout(batch.shape, batched=True)
            scale = float_scale(batch)

            def load(i: int) -> np.ndarray:
                return array_to_image(batch[i], layout, channels, size, scale)

            n = len(batch)
            default_sources = [f"[{i}]" for i in range(n)]
        else:
            items = list(batch)

            def load(i: int) -> np.ndarray:
                return self.prepare(items[i])

            n = len(items)
            default_sources = [
                str(it) if isinstance(it, (str, os.PathLike)) else f"[{i}]"
                for i, it in enumerate(items)
            ]
        sources = list(sources) if sources is not None else default_sources
        if len(sources) != n:
            raise CDCError(f"got {len(sources)} sources for {n} images")

        predictions: list[Prediction] = []
        good: list[int] = []
        images: list[np.ndarray] = []
        for i in range(n):
            try:
                images.append(load(i))
                good.append(i)
                predictions.append(Prediction(source=sources[i]))
            except CDCError as exc:
                predictions.append(Prediction(source=sources[i], error=str(exc)))
        if images:
            scores = self.score_images(np.stack(images), with_probs=return_probs)
            for j, i in enumerate(good):
                scores.fill(predictions[i], j, with_probs=return_probs)
        return predictions
