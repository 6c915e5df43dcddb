"""The client library: cluster IDs with calibrated confidence, rejection and OOD flags.

One :class:`Client`, three protocols (``Client(protocol=...)``) that give the same answers:

- ``local`` (the default): onnxruntime in this process, on an exported model
  (``repo/<name>``, a version folder or a ``model.onnx`` with ``cdc_meta.json`` beside it);
- ``http`` / ``grpc``: a Triton Inference Server (``tritonclient``); requests are cut
  to the server's max batch, sent concurrently from a small thread pool and retried
  with exponential backoff when the connection fails.

How each protocol runs a batch is :mod:`cdc_serve.transport`; the tensor names are the
model metadata's (``input_name``, ``outputs``), by default :mod:`cdc_serve.contract`'s.

Input conventions:

- :meth:`Client.predict` takes *images*: a list of file paths, PIL images or single
  image arrays, or one numpy array of images ``N x H x W``, ``N x C x H x W`` or
  ``N x H x W x C`` (uint8 0..255, or float 0..1 / 0..255; see
  :mod:`cdc_serve.preprocess`). It decodes, converts and resizes them as the model's
  metadata says, and returns one :class:`Prediction` per item; an unreadable item gets
  a Prediction with ``error`` set instead of failing the batch.
- :meth:`Client.predict_arrays` takes the model's input as is: float32
  ``N x C x H x W`` already normalised, and returns ``{"probs", "embedding"}``.

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
from cdc_serve.contract import EMBEDDING, META_PARAMETER, PROBS
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
from cdc_serve.shm import MODES as SHM_MODES
from cdc_serve.transport import LocalRunner, TritonRunner

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
    probs: np.ndarray  # float32 (N, num_classes)

    def fill(self, p: Prediction, j: int, with_probs: bool = False) -> Prediction:
        """Copy row ``j`` of these scores into the prediction ``p``."""
        p.cluster_id = int(self.cluster_id[j])
        p.confidence = float(self.confidence[j])
        p.rejected = bool(self.rejected[j])
        p.ood = bool(self.ood[j])
        p.ood_score = float(self.ood_score[j])
        if with_probs:
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
        reject_below: a prediction is ``rejected`` when its confidence is below this.
        ood_score: OOD score name (default: the one the model's metadata names).
        threads: onnxruntime intra-op threads (default: all cores).
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
        reject_below: float = 0.8,
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
    ) -> None:
        protocol = protocol or ("local" if url is None else "http")
        if protocol not in PROTOCOLS:
            raise CDCError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if not 0.0 <= reject_below <= 1.0:
            raise CDCError(f"reject_below must lie in [0, 1], got {reject_below}")
        if concurrency < 1 or retries < 0:
            raise CDCError("concurrency must be >= 1 and retries >= 0")
        if shared_memory not in SHM_MODES:
            raise CDCError(
                f"shared_memory must be one of {', '.join(SHM_MODES)}, not {shared_memory!r}"
            )
        self.protocol = protocol
        self.reject_below = float(reject_below)
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
            self._runner: LocalRunner | TritonRunner = LocalRunner(onnx_path, self.meta, threads)
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
        self.ood = OODScorer(self.meta.ood, ood_score)
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

    def predict_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on normalised float32 ``N x C x H x W``: ``{"probs", "embedding"}``."""
        x = np.asarray(x)
        want = (self.meta.channels, *self.meta.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise CDCError(f"model input must be N x {' x '.join(map(str, want))}, got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise CDCError(f"model input must be float (normalised), got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return {
                PROBS: np.zeros((0, self.meta.num_classes), np.float32),
                EMBEDDING: np.zeros((0, self.meta.embedding_dim), np.float32),
            }
        chunks = [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]
        if self._pool is not None and len(chunks) > 1:
            results = list(self._pool.map(self._runner.run, chunks))
        else:
            results = [self._runner.run(c) for c in chunks]
        probs = np.concatenate([r[0] for r in results]).astype(np.float32, copy=False)
        embedding = np.concatenate([r[1] for r in results]).astype(np.float32, copy=False)
        return {PROBS: probs, EMBEDDING: embedding}

    # -- images ---------------------------------------------------------------------

    def score_images(self, images: np.ndarray) -> Scores:
        """Score preprocessed uint8 ``N x C x H x W`` images (see :mod:`cdc_serve.preprocess`)."""
        out = self.predict_arrays(normalise(images, self.meta))
        probs = out[PROBS]
        confidence = probs.max(axis=1) if len(probs) else np.zeros(0, np.float32)
        ood, ood_score = self.ood.flags(out[EMBEDDING], probs)
        return Scores(
            cluster_id=probs.argmax(axis=1).astype(np.int64),
            confidence=confidence.astype(np.float32),
            rejected=confidence < self.reject_below,
            ood=ood,
            ood_score=ood_score,
            probs=probs,
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
            scores = self.score_images(np.stack(images))
            for j, i in enumerate(good):
                scores.fill(predictions[i], j, with_probs=return_probs)
        return predictions
