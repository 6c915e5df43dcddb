"""Triton Python-backend model: runs the ``model.onnx`` beside it through onnxruntime.

:func:`cdc_serve.triton.add_model_version` copies this file to ``<repo>/<name>/<v>/model.py``
for the ``python`` backend, the only backend of the ``tritonserver`` that pip installs
(``nvidia-pytriton``). It runs inside Triton's Python stub process, never imported by
cdc-serve itself: it needs only numpy, onnxruntime and Triton's
``triton_python_backend_utils`` (which the stub provides). cdc-serve may not be
installed where the server runs, so this file imports nothing from it.

The tensor names are not written here: they come from the model configuration Triton
hands to :meth:`TritonPythonModel.initialize` (the ``input`` and ``output`` entries of
the ``config.pbtxt`` that :mod:`cdc_serve.triton` writes from :mod:`cdc_serve.contract`).
The ONNX file is ``model.onnx`` in the version folder (``default_model_filename`` names
this ``model.py`` for the python backend, not the graph). The onnxruntime thread count
is the string parameter ``ort_intra_op_threads`` (else ``$CDC_ORT_THREADS``, else
onnxruntime's default).

Every call of :meth:`TritonPythonModel.execute` gets the requests the dynamic batcher
gathered; their input tensors are stacked into one batch, run once, and the output rows
are split back per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# These two names are also in cdc_serve.contract (ONNX_FILE, ORT_THREADS_PARAMETER);
# this file cannot import it, and tests/serving/test_triton.py checks that they agree.
MODEL_FILE = "model.onnx"
THREADS_PARAMETER = "ort_intra_op_threads"


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
        if array.dtype != np.float32 or array.ndim != 4:
            return (
                f"{self.input_name!r} must be float32 [N, C, H, W], got {array.dtype} {array.shape}"
            )
        return array

    def execute(self, requests: list) -> list:
        batches, errors = [], {}
        for i, request in enumerate(requests):
            array = self._read(request)
            if isinstance(array, str):
                errors[i] = array
            else:
                batches.append((i, array))

        results = {}
        if batches:
            stacked = np.concatenate([a for _, a in batches], axis=0)
            try:
                arrays = self.session.run(self.output_names, {self.graph_input: stacked})
            except Exception as exc:  # onnxruntime raises its own exception types
                for i, _ in batches:
                    errors[i] = f"onnxruntime failed: {exc}"
            else:
                start = 0
                for i, array in batches:
                    stop = start + array.shape[0]
                    results[i] = [a[start:stop] for a in arrays]
                    start = stop

        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(rows, dtype=np.float32))
                for name, rows in zip(self.output_names, results[i], strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
