"""Triton Python-backend model: runs the ``model.onnx`` beside it through onnxruntime.

:func:`cdc_serve.triton.add_model_version` copies this file to ``<repo>/<name>/<v>/model.py``
for the ``python`` backend, the only backend of the ``tritonserver`` that pip installs
(``nvidia-pytriton``). It runs inside Triton's Python stub process, never imported by
cdc-serve itself: it needs only numpy, onnxruntime and Triton's
``triton_python_backend_utils`` (which the stub provides). cdc-serve may not be
installed where the server runs, so this file imports nothing from it.

The tensor names and data types are not written here: they come from the model
configuration Triton hands to :meth:`TritonPythonModel.initialize` (the ``input`` and
``output`` entries of the ``config.pbtxt`` that :mod:`cdc_serve.triton` writes from
:mod:`cdc_serve.contract`): uint8 images in and the whole answer out for current
exports, float32 in and ``probs``/``embedding`` out for exports of the previous format,
and any model configured for onnxruntime that ``cdc-serve serve`` runs through this
file on a server without the onnxruntime backend.
The ONNX file is ``model.onnx`` in the version folder (``default_model_filename`` names
this ``model.py`` for the python backend, not the graph). The onnxruntime thread count
is the string parameter ``ort_intra_op_threads`` (else ``$CDC_ORT_THREADS``, else
onnxruntime's default); idle onnxruntime threads sleep rather than spin (they share the
cores with the server and its clients) unless ``ort_allow_spinning`` (or
``$CDC_ORT_SPINNING``) is ``"1"``.

Every call of :meth:`TritonPythonModel.execute` gets the requests the dynamic batcher
gathered; their input tensors are stacked into one batch, run once for the outputs they
ask for (a client that wants no ``embedding`` is not sent one), and the output rows are
split back per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# These names are also in cdc_serve.contract (ONNX_FILE, ORT_THREADS_PARAMETER,
# ORT_SPINNING_PARAMETER);
# this file cannot import it, and tests/serving/test_triton.py checks that they agree.
MODEL_FILE = "model.onnx"
THREADS_PARAMETER = "ort_intra_op_threads"
SPINNING_PARAMETER = "ort_allow_spinning"


NUMPY_TYPES = {  # Triton's data types that a cdc-serve model may declare
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def tensor_types(config: dict) -> dict[str, np.dtype]:
    """The numpy dtype of each input and output the configuration declares."""
    types = {}
    for t in (*config.get("input", []), *config.get("output", [])):
        data_type = t.get("data_type", "TYPE_FP32")
        if data_type not in NUMPY_TYPES:
            raise ValueError(f"tensor {t.get('name')!r} has the unsupported type {data_type}")
        types[t.get("name", "")] = np.dtype(NUMPY_TYPES[data_type])
    return types


def tensor_names(config: dict) -> tuple[str, list[str]]:
    """The input name and the output names that the model configuration declares."""
    inputs = [t.get("name", "") for t in config.get("input", [])]
    outputs = [t.get("name", "") for t in config.get("output", [])]
    if len(inputs) != 1 or not inputs[0] or not outputs or not all(outputs):
        raise ValueError(
            f"the model configuration must declare one named input and named outputs, "
            f"got inputs {inputs} and outputs {outputs}"
        )
    return inputs[0], outputs


class TritonPythonModel:
    """The model instance Triton creates (one per ``instance_group`` count)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        try:
            self.input_name, self.output_names = tensor_names(config)
            self.types = tensor_types(config)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model_path = version_dir / MODEL_FILE
        if not model_path.is_file():
            model_path = Path(__file__).with_name(MODEL_FILE)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        options = ort.SessionOptions()
        threads = int(params.get(THREADS_PARAMETER, os.environ.get("CDC_ORT_THREADS", "0")))
        options.intra_op_num_threads = threads
        # idle onnxruntime threads sleep by default: they share the cores with the server
        spinning = params.get(SPINNING_PARAMETER, os.environ.get("CDC_ORT_SPINNING", "0"))
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning == "1" else "0"
        )
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in (
            ort.get_available_providers()
        ):
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)

        outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in self.output_names if name not in outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{model_path} lacks the outputs {missing} (it has {outputs})"
            )
        self.graph_input = self.session.get_inputs()[0].name

    def _read(self, request) -> np.ndarray | str:
        """The request's input array, or the error message for it."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        array = None if tensor is None else tensor.as_numpy()
        if array is None:
            return f"the request has no tensor named {self.input_name!r}"
        want = self.types[self.input_name]
        if array.dtype != want or array.ndim != 4:
            return (
                f"{self.input_name!r} must be {want} [N, C, H, W], got {array.dtype} {array.shape}"
            )
        return array

    def _wanted(self, request) -> list[str]:
        """The outputs a request asks for (all of them when it names none)."""
        asked = getattr(request, "requested_output_names", None)
        names = set(asked()) if callable(asked) else set()
        return [n for n in self.output_names if n in names] or list(self.output_names)

    def execute(self, requests: list) -> list:
        batches, errors = [], {}
        for i, request in enumerate(requests):
            array = self._read(request)
            if isinstance(array, str):
                errors[i] = array
            else:
                batches.append((i, array, self._wanted(request)))

        results = {}
        if batches:
            # one run for the gathered requests, computing only the outputs they ask for
            stacked = np.concatenate([a for _, a, _ in batches], axis=0)
            names = [n for n in self.output_names if any(n in w for _, _, w in batches)]
            try:
                outputs = self.session.run(names, {self.graph_input: stacked})
                arrays = dict(zip(names, outputs, strict=True))
            except Exception as exc:  # onnxruntime raises its own exception types
                for i, _, _ in batches:
                    errors[i] = f"onnxruntime failed: {exc}"
            else:
                start = 0
                for i, array, wanted in batches:
                    stop = start + array.shape[0]
                    results[i] = {n: arrays[n][start:stop] for n in wanted}
                    start = stop

        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(rows, dtype=self.types[name]))
                for name, rows in results[i].items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
