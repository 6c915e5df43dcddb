"""Triton Python-backend model: runs the ``model.onnx`` beside it through onnxruntime.

:func:`cdc_serve.triton.add_model_version` copies this file to ``<repo>/<name>/<v>/model.py``
for the ``python`` backend, the only backend of the ``tritonserver`` that pip installs
(``nvidia-pytriton``). It runs inside Triton's Python stub process, never imported by
cdc-serve itself: it needs only numpy, onnxruntime and Triton's
``triton_python_backend_utils`` (which the stub provides).

Every call of :meth:`TritonPythonModel.execute` gets the requests the dynamic batcher
gathered; their ``input`` tensors are stacked into one batch, run once, and the
``probs`` / ``embedding`` rows are split back per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

OUTPUTS = ("probs", "embedding")


class TritonPythonModel:
    """The model instance Triton creates (one per ``instance_group`` count)."""

    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model_path = version_dir / "model.onnx"
        if not model_path.is_file():
            model_path = Path(__file__).with_name("model.onnx")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        options = ort.SessionOptions()
        threads = int(params.get("ort_intra_op_threads", os.environ.get("CDC_ORT_THREADS", "0")))
        options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in (
            ort.get_available_providers()
        ):
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)

        outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in OUTPUTS if name not in outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{model_path} lacks the outputs {missing} (it has {outputs})"
            )
        self.input_name = self.session.get_inputs()[0].name

    def execute(self, requests: list) -> list:
        batches, errors = [], {}
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, "input")
            array = None if tensor is None else tensor.as_numpy()
            if array is None:
                errors[i] = "the request has no tensor named 'input'"
            elif array.dtype != np.float32 or array.ndim != 4:
                errors[i] = f"'input' must be float32 [N, C, H, W], got {array.dtype} {array.shape}"
            else:
                batches.append((i, array))

        results = {}
        if batches:
            stacked = np.concatenate([a for _, a in batches], axis=0)
            try:
                probs, embedding = self.session.run(list(OUTPUTS), {self.input_name: stacked})
            except Exception as exc:  # onnxruntime raises its own exception types
                for i, _ in batches:
                    errors[i] = f"onnxruntime failed: {exc}"
            else:
                start = 0
                for i, array in batches:
                    stop = start + array.shape[0]
                    results[i] = (probs[start:stop], embedding[start:stop])
                    start = stop

        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            probs, embedding = results[i]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("probs", np.ascontiguousarray(probs, dtype=np.float32)),
                        pb_utils.Tensor(
                            "embedding", np.ascontiguousarray(embedding, dtype=np.float32)
                        ),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        self.session = None
