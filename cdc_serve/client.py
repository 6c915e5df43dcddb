"""The client library: cluster IDs with calibrated confidence, rejection and OOD flags.

One :class:`Client`, three backends that give the same answers:

- ``local`` (the default): onnxruntime in this process, on an exported model
  (``repo/<name>``, a version folder or a ``model.onnx`` with ``cdc_meta.json`` beside it);
- ``http`` / ``grpc``: a Triton Inference Server (``tritonclient``); requests are cut
  to the server's max batch, sent concurrently from a small thread pool and retried
  with exponential backoff when the connection fails.

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

import contextlib
import json
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError
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
from cdc_serve.shm import SharedInput, SharedMemoryUnavailable, is_loopback

BACKENDS = ("local", "http", "grpc")
META_PARAMETER = "cdc_meta"
LOCAL_CHUNK = 1024  # images per onnxruntime call (bounds the memory of one call)


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


# -- backends --------------------------------------------------------------------------


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class _LocalRunner:
    """onnxruntime in-process."""

    def __init__(self, onnx_path: Path, meta: ModelMeta, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or _usable_cores()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            raise CDCError(f"{onnx_path}: onnxruntime cannot load the model ({exc})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in meta.outputs if n not in outputs]
        if meta.input_name not in inputs or missing:
            raise CDCError(
                f"{onnx_path}: graph does not match its metadata (inputs {inputs}, outputs {outputs}; "
                f"expected input {meta.input_name!r} and outputs {list(meta.outputs)})"
            )
        self.input_name = meta.input_name
        self.outputs = list(meta.outputs)
        self.max_batch = LOCAL_CHUNK
        self.where = str(onnx_path)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            probs, embedding = self.session.run(self.outputs, {self.input_name: x})
        except Exception as exc:  # noqa: BLE001
            raise CDCError(f"{self.where}: inference failed ({exc})") from None
        return probs, embedding

    def close(self) -> None:
        pass


def _gpu_present() -> bool:
    """A CUDA GPU is visible (checked without torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").exists()


class _TritonRunner:
    """A Triton server over HTTP or gRPC, one tritonclient per worker thread."""

    def __init__(
        self,
        url: str,
        protocol: str,
        model_name: str,
        model_version: str,
        timeout: float,
        retries: int,
        backoff: float,
        shared_memory: str = "auto",
    ) -> None:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        self.module = module
        self.protocol = protocol
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.model_name = model_name
        self.model_version = str(model_version or "")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self.where = f"Triton server at {self.url} ({protocol})"
        # input tensors through system shared memory: asked for, or the server is local
        self.shared_memory = shared_memory == "system" or (
            shared_memory == "auto" and is_loopback(self.url)
        )
        self._shm_required = shared_memory == "system"
        self._regions: list[SharedInput] = []
        self._regions_lock = threading.Lock()

        client = self._client()
        try:
            live = client.is_server_live()
        except Exception as exc:  # noqa: BLE001  connection refused, DNS, timeouts, ...
            raise CDCError(f"{self.where} is unreachable: {_short(exc)}") from None
        if not live:
            raise CDCError(f"{self.where} is not live")
        try:
            ready = client.is_model_ready(model_name, self.model_version)
        except Exception as exc:  # noqa: BLE001
            raise CDCError(
                f"{self.where}: cannot query model {model_name!r}: {_short(exc)}"
            ) from None
        if not ready:
            raise CDCError(
                f"{self.where}: model {model_name!r} (version {self.model_version or 'latest'}) "
                f"is not ready; models there: {self._model_names(client)}"
            )
        self.config = self._model_config(client)
        self.max_batch = int(self.config.get("max_batch_size", 0) or 0) or LOCAL_CHUNK

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                client = self.module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            else:
                client = self.module.InferenceServerClient(self.url)
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        self._drop_region(client)
        if client is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                client.close()

    def _model_names(self, client) -> list[str]:
        try:
            index = client.get_model_repository_index()
        except Exception:  # noqa: BLE001
            return []
        if self.protocol == "grpc":
            return sorted(m.name for m in index.models)
        return sorted(m.get("name", "") for m in index)

    def _model_config(self, client) -> dict[str, Any]:
        try:
            if self.protocol == "grpc":
                config = client.get_model_config(
                    self.model_name, self.model_version, as_json=True, client_timeout=self.timeout
                )
                return config.get("config", config)
            return client.get_model_config(self.model_name, self.model_version)
        except Exception as exc:  # noqa: BLE001
            raise CDCError(
                f"{self.where}: cannot read the model configuration: {_short(exc)}"
            ) from None

    def meta(self) -> ModelMeta:
        """The model metadata from the configuration's string parameters."""
        params = {
            key: value.get("string_value", "")
            for key, value in (self.config.get("parameters") or {}).items()
        }
        source = f"{self.where} model {self.model_name!r} metadata"
        if META_PARAMETER in params:
            return ModelMeta.from_json(params[META_PARAMETER], source=source)
        data: dict[str, Any] = {}
        for key, text in params.items():
            try:
                data[key] = json.loads(text)
            except json.JSONDecodeError:
                data[key] = text
        for key in ("name", "dataset", "created", "project_version", "format", "method"):
            if key in data:
                data[key] = params[key]  # keep strings as strings ("1" stays "1")
        if not data.get("ood"):
            warnings.warn(
                f"{source}: no OOD parameters in the model configuration (no '{META_PARAMETER}' "
                "parameter); only the msp score is available and no image is flagged OOD. "
                "Pass meta= (a local cdc_meta.json) to use the fitted OOD scores.",
                stacklevel=3,
            )
        return ModelMeta.from_dict(data, source=source)

    # -- shared memory: one region per worker thread, registered on first use

    def _region(self, client, nbytes: int) -> SharedInput | None:
        """This thread's shared-memory region (at least ``nbytes``), or None to send in-message."""
        region = getattr(self._local, "region", None)
        if region is not None and region.nbytes >= nbytes:
            return region
        self._drop_region(client)
        try:
            region = SharedInput(client, self.module, nbytes)
        except SharedMemoryUnavailable as exc:  # connection errors propagate: run() retries
            if self._shm_required:
                raise CDCError(
                    f"{self.where}: cannot use system shared memory: {_short(exc)}"
                ) from None
            if self.shared_memory:
                self.shared_memory = False
                warnings.warn(
                    f"{self.where}: system shared memory unavailable ({_short(exc)}); "
                    "sending tensors inside the requests instead",
                    stacklevel=2,
                )
            return None
        self._local.region = region
        with self._regions_lock:
            self._regions.append(region)
        return region

    def _drop_region(self, client) -> None:
        region = getattr(self._local, "region", None)
        self._local.region = None
        if region is not None:
            with self._regions_lock:
                if region in self._regions:
                    self._regions.remove(region)
            region.close(client)

    def _infer_once(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        module, client = self.module, self._client()
        region = self._region(client, x.nbytes) if self.shared_memory else None
        if region is not None:
            inp = region.input(x)
        else:
            inp = module.InferInput("input", list(x.shape), "FP32")
        if self.protocol == "http":
            if region is None:
                inp.set_data_from_numpy(x, binary_data=True)
            outputs = [
                module.InferRequestedOutput(n, binary_data=True) for n in ("probs", "embedding")
            ]
            result = client.infer(self.model_name, [inp], self.model_version, outputs=outputs)
        else:
            if region is None:
                inp.set_data_from_numpy(x)
            outputs = [module.InferRequestedOutput(n) for n in ("probs", "embedding")]
            result = client.infer(
                self.model_name,
                [inp],
                self.model_version,
                outputs=outputs,
                client_timeout=self.timeout,
            )
        return result.as_numpy("probs"), result.as_numpy("embedding")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One request, retried with exponential backoff on connection or server errors."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._infer_once(x)
            except Exception as exc:  # noqa: BLE001  connection errors have many types
                if _is_client_error(exc):
                    raise CDCError(f"{self.where}: request rejected: {_short(exc)}") from None
                last = exc
                self._drop_client()  # a fresh connection after a server restart
                if attempt < self.retries:
                    time.sleep(min(self.backoff * 2**attempt, 10.0))
        raise CDCError(
            f"{self.where} failed {self.retries + 1} times in a row (last error: {_short(last)})"
        )

    def close(self) -> None:
        """Unregister and free every thread's shared-memory region, then drop the client."""
        with self._regions_lock:
            regions, self._regions = self._regions, []
        if regions:
            client = self._client()  # tritonclient objects stay in the thread that made them
            for region in regions:
                region.close(client)
        self._local.region = None
        self._drop_client()


def _short(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else "unknown error"
    text = " ".join(text.split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _is_client_error(exc: BaseException) -> bool:
    """A request the server understood and refused (retrying will not help)."""
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    return str(status) in ("400", "StatusCode.INVALID_ARGUMENT")


# -- the client ------------------------------------------------------------------------


class Client:
    """Score images with an exported CDC/RUC model, locally or through Triton.

    Args:
        model: exported model path (``local``; with ``http``/``grpc`` it only supplies a
            local copy of the metadata).
        url: Triton ``HOST:PORT`` (implies ``backend="http"`` unless given).
        backend: ``local``, ``http`` or ``grpc``.
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
        backend: str | None = None,
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
        backend = backend or ("local" if url is None else "http")
        if backend not in BACKENDS:
            raise CDCError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if not 0.0 <= reject_below <= 1.0:
            raise CDCError(f"reject_below must lie in [0, 1], got {reject_below}")
        if concurrency < 1 or retries < 0:
            raise CDCError("concurrency must be >= 1 and retries >= 0")
        if shared_memory not in SHM_MODES:
            raise CDCError(
                f"shared_memory must be one of {', '.join(SHM_MODES)}, not {shared_memory!r}"
            )
        self.backend = backend
        self.reject_below = float(reject_below)
        self.max_pixels = max_pixels
        self.concurrency = concurrency if backend != "local" else 1

        if isinstance(meta, (str, os.PathLike)):
            meta = ModelMeta.read(meta)
        if backend == "local":
            if model is None:
                raise CDCError(
                    "the local backend needs a model (repo/<name>, a version folder or .onnx)"
                )
            onnx_path, found = find_model(model)
            self.meta = meta or found
            self._runner: _LocalRunner | _TritonRunner = _LocalRunner(onnx_path, self.meta, threads)
        else:
            if not url:
                raise CDCError(f"the {backend} backend needs url=HOST:PORT of a Triton server")
            local_meta = meta or (find_model(model)[1] if model is not None else None)
            runner = _TritonRunner(
                url,
                backend,
                model_name,
                str(model_version),
                timeout,
                retries,
                backoff,
                shared_memory,
            )
            self._runner = runner
            self.meta = local_meta or runner.meta()
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
                "probs": np.zeros((0, self.meta.num_classes), np.float32),
                "embedding": np.zeros((0, self.meta.embedding_dim), np.float32),
            }
        chunks = [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]
        if self._pool is not None and len(chunks) > 1:
            results = list(self._pool.map(self._runner.run, chunks))
        else:
            results = [self._runner.run(c) for c in chunks]
        probs = np.concatenate([r[0] for r in results]).astype(np.float32, copy=False)
        embedding = np.concatenate([r[1] for r in results]).astype(np.float32, copy=False)
        return {"probs": probs, "embedding": embedding}

    # -- images ---------------------------------------------------------------------

    def score_images(self, images: np.ndarray) -> Scores:
        """Score preprocessed uint8 ``N x C x H x W`` images (see :mod:`cdc_serve.preprocess`)."""
        out = self.predict_arrays(normalise(images, self.meta))
        probs = out["probs"]
        confidence = probs.max(axis=1) if len(probs) else np.zeros(0, np.float32)
        ood, ood_score = self.ood.flags(out["embedding"], probs)
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
