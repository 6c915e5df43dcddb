"""How a :class:`cdc_serve.client.Client` runs a batch: the ``local``, ``http`` and ``grpc`` protocols.

A runner takes a batch of the model's input as is (uint8 images ``N x C x H x W`` for
current exports, normalised float32 for the previous format) and the names of the
outputs wanted, and returns them as a ``{name: array}`` dict; per-image outputs come
back with shape ``[N]``. The tensor names are the model metadata's
(``ModelMeta.input_name`` and ``ModelMeta.outputs``, by default those of
:mod:`cdc_serve.contract`, plus the contract's per-image outputs of format 2):

- :class:`LocalRunner` (``local``): onnxruntime in this process, on the GPU when
  onnxruntime has CUDA and one is visible, else on every usable core;
- :class:`TritonRunner` (``http`` / ``grpc``): a Triton Inference Server through
  ``tritonclient``, one client per worker thread; each request is retried with
  exponential backoff when the connection fails (a server restart), refused requests
  are not. Against a server on loopback the input goes through system shared memory
  (:mod:`cdc_serve.shm`). The model metadata can come from the server: the model
  configuration's parameters carry it (:meth:`TritonRunner.meta`).

Failures raise :class:`cdc_serve.CDCError` naming the model or the server. This module
never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError, usable_cores
from cdc_serve.contract import INPUT_NAME, META_PARAMETER, SCORE_OUTPUTS
from cdc_serve.modelmeta import ModelMeta
from cdc_serve.shm import DATATYPES, SharedInput, SharedMemoryUnavailable, is_loopback

LOCAL_CHUNK = 1024  # images per onnxruntime call (bounds the memory of one call)


def graph_outputs(meta: ModelMeta) -> list[str]:
    """Every output the model's graph gives, under the metadata's names."""
    return [*SCORE_OUTPUTS, *meta.outputs] if meta.scores_in_graph else list(meta.outputs)


def _per_image(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image outputs as ``[N]`` (Triton returns its ``dims: [1]`` tensors as ``[N, 1]``)."""
    return {k: v.reshape(len(v)) if k in SCORE_OUTPUTS else v for k, v in result.items()}


class RequestRejected(CDCError):
    """The server understood a request and refused it (a wrong datatype or shape, say):
    retrying will not help, but other requests may still succeed."""


class LocalRunner:
    """onnxruntime in-process."""

    def __init__(
        self, onnx_path: Path, meta: ModelMeta, threads: int | None, spinning: bool = True
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or usable_cores()
        # idle threads spin for the next run; they sleep when other work needs the cores
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            raise CDCError(f"{onnx_path}: onnxruntime cannot load the model ({exc})") from None
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        expected = graph_outputs(meta)
        missing = [n for n in expected if n not in outputs]
        want_type = "tensor(uint8)" if meta.scores_in_graph else "tensor(float)"
        if inputs.get(meta.input_name) != want_type or missing:
            raise CDCError(
                f"{onnx_path}: graph does not match its metadata (format_version "
                f"{meta.format_version}; inputs {inputs}, outputs {outputs}; expected input "
                f"{meta.input_name!r} of type {want_type} and outputs {expected})"
            )
        self.input_name = meta.input_name
        self.max_batch = LOCAL_CHUNK
        self.where = str(onnx_path)

    def run(self, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            arrays = self.session.run(outputs, {self.input_name: x})
        except Exception as exc:  # noqa: BLE001
            raise CDCError(f"{self.where}: inference failed ({exc})") from None
        return dict(zip(outputs, arrays, strict=True))

    def close(self) -> None:
        pass


def _gpu_present() -> bool:
    """A CUDA GPU is visible (checked without torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").exists()


class TritonRunner:
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
        self.input_name = INPUT_NAME  # until bind(meta)

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
                stacklevel=4,  # Client() -> _bind -> meta -> warn
            )
        return ModelMeta.from_dict(data, source=source)

    def bind(self, meta: ModelMeta) -> None:
        """Use the tensors ``meta`` names, once checked against the server's configuration
        (names, the input's data type and shape)."""
        inputs = {t.get("name"): t for t in self.config.get("input") or []}
        outputs = [t.get("name") for t in self.config.get("output") or []]
        expected = graph_outputs(meta)
        missing = [n for n in expected if n not in outputs]
        if (inputs and meta.input_name not in inputs) or (outputs and missing):
            raise CDCError(
                f"{self.where}: model {self.model_name!r} does not match its metadata (inputs "
                f"{sorted(inputs)}, outputs {outputs}; expected input {meta.input_name!r} and "
                f"outputs {expected}): pass meta= the model's own cdc_meta.json"
            )
        declared = inputs.get(meta.input_name, {})
        want_type = "TYPE_UINT8" if meta.scores_in_graph else "TYPE_FP32"
        want_dims = [meta.channels, *meta.input_size]
        dims = [int(d) for d in declared.get("dims", want_dims)]
        if declared.get("data_type", want_type) != want_type or dims != want_dims:
            raise CDCError(
                f"{self.where}: model {self.model_name!r} takes {declared.get('data_type')} "
                f"{dims} but its metadata (format_version {meta.format_version}) says "
                f"{want_type} {want_dims}: re-export the model or pass meta= its own cdc_meta.json"
            )
        self.input_name = meta.input_name

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

    def _infer_once(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        module, client = self.module, self._client()
        region = self._region(client, x.nbytes) if self.shared_memory else None
        if region is not None:
            inp = region.input(x, self.input_name)
        else:
            inp = module.InferInput(self.input_name, list(x.shape), DATATYPES[str(x.dtype)])
        if self.protocol == "http":
            if region is None:
                inp.set_data_from_numpy(x, binary_data=True)
            outputs = [module.InferRequestedOutput(n, binary_data=True) for n in names]
            result = client.infer(self.model_name, [inp], self.model_version, outputs=outputs)
        else:
            if region is None:
                inp.set_data_from_numpy(x)
            outputs = [module.InferRequestedOutput(n) for n in names]
            result = client.infer(
                self.model_name,
                [inp],
                self.model_version,
                outputs=outputs,
                client_timeout=self.timeout,
            )
        return _per_image({n: result.as_numpy(n) for n in names})

    def run(self, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """One request, retried with exponential backoff on connection or server errors."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._infer_once(x, outputs)
            except Exception as exc:  # noqa: BLE001  connection errors have many types
                if _is_client_error(exc):
                    raise RequestRejected(
                        f"{self.where}: request rejected: {_short(exc)}"
                    ) from None
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
