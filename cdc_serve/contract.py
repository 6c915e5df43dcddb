"""The exported-model contract: tensor names, file names and the repository layout.

Everything that the exporter, the Triton configuration, the Python-backend model and
the clients must agree on is written here once (``docs/ARCHITECTURE.md``):

- the served graph (metadata ``format_version`` 2) takes the images as they are, one
  uint8 input ``input`` of shape ``[N, C, H, W]``, normalises them inside the graph and
  answers completely, per image: ``cluster_id`` (int64 ``[N]``), ``confidence``
  (float32 ``[N]``, the calibration head's max probability), ``ood_score`` (float32
  ``[N]``, the model's default OOD score), ``ood`` (bool ``[N]``, ``ood_score`` above
  its fitted threshold), ``probs`` (float32 ``[N, num_classes]``) and ``embedding``
  (float32 ``[N, D]``, the backbone feature other OOD scores use). The graph is built by
  :mod:`cdc_serve.served_graph`. Rejection (``confidence < t``) stays the caller's
  choice; the model's default ``t`` is in the metadata;
- the previous format (``format_version`` 1, exports made before the in-graph scores)
  takes the float32 input already normalised and gives only ``probs`` and ``embedding``;
  clients still read it and compute the rest themselves;
- an exported model is ``model.onnx`` with its metadata ``cdc_meta.json`` beside it
  (format ``cdc-serve/export``, see :mod:`cdc_serve.modelmeta`);
- a Triton model repository holds one folder per model, its ``config.pbtxt`` and one
  numbered folder per version::

      <repo>/<name>/config.pbtxt
      <repo>/<name>/<version>/model.onnx      (model.plan for the tensorrt backend)
      <repo>/<name>/<version>/cdc_meta.json
      <repo>/<name>/<version>/model.py        (python backend only)

  A new export adds version ``max(existing) + 1`` and never replaces one.

The Python-backend ``model.py`` (:mod:`cdc_serve.triton_python_model`) runs inside
Triton, where cdc-serve may not be installed: it does not import this module but reads
the tensor names from the ``config.pbtxt`` that :mod:`cdc_serve.triton` writes from
these constants (``tests/serving/test_triton.py`` checks that they agree).
"""

from __future__ import annotations

import os
from pathlib import Path

from cdc_serve import CDCError

# -- tensors ---------------------------------------------------------------------------

INPUT_NAME = "input"
PROBS = "probs"
EMBEDDING = "embedding"
OUTPUT_NAMES = (PROBS, EMBEDDING)  # in this order: (probabilities, embedding); both formats
CLUSTER_ID = "cluster_id"
CONFIDENCE = "confidence"
OOD_SCORE = "ood_score"
OOD = "ood"
SCORE_OUTPUTS = (CLUSTER_ID, CONFIDENCE, OOD_SCORE, OOD)  # format 2: the per-image answer
SERVED_OUTPUTS = (*SCORE_OUTPUTS, *OUTPUT_NAMES)  # format 2: every output, in graph order
# Triton data types of the format-2 graph's tensors (config.pbtxt TYPE_<x>, KServe v2 <x>)
TENSOR_TYPES = {
    INPUT_NAME: "UINT8",
    CLUSTER_ID: "INT64",
    CONFIDENCE: "FP32",
    OOD_SCORE: "FP32",
    OOD: "BOOL",
    PROBS: "FP32",
    EMBEDDING: "FP32",
}

# -- files -----------------------------------------------------------------------------

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"  # a TensorRT engine (the tensorrt backend)
PYTHON_MODEL_FILE = "model.py"  # the python backend's model (runs model.onnx)
META_FILE = "cdc_meta.json"
CONFIG_FILE = "config.pbtxt"

META_FORMAT = "cdc-serve/export"
META_FORMAT_VERSION = 2  # 2: uint8 input, scores in the graph; 1: float input, probs + embedding
FLOAT_INPUT_FORMAT_VERSION = 1  # the previous format, still read and served
DEFAULT_REJECT_BELOW = 0.8  # the model's default reject threshold (a caller may pick another)

# -- config.pbtxt parameters -------------------------------------------------------------

META_PARAMETER = "cdc_meta"  # the whole cdc_meta.json as one JSON string
META_FILE_PARAMETER = "cdc_meta_file"  # the metadata's file name in a version folder
ORT_THREADS_PARAMETER = "ort_intra_op_threads"  # python backend: onnxruntime threads
ORT_SPINNING_PARAMETER = "ort_allow_spinning"  # python backend: "0" (default) idle threads sleep
REJECT_PARAMETER = "reject_below"  # the model's default reject threshold
OOD_SCORE_PARAMETER = "ood_score_name"  # which OOD score the graph's ood_score is
OOD_THRESHOLD_PARAMETER = "ood_threshold"  # the threshold the graph's ood flag uses

# -- the version-folder layout -----------------------------------------------------------


def versions(model_dir: str | os.PathLike, holding: str | None = None) -> list[int]:
    """The version numbers of a model folder: its numeric sub-folders, sorted.

    With ``holding`` (a file name, e.g. :data:`ONNX_FILE`) only the versions that hold
    that file count. A folder that does not exist has no versions.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (holding is None or (p / holding).is_file())
    )


def next_version(model_dir: str | os.PathLike) -> int:
    """The version number a new export gets: the largest numeric sub-folder + 1 (1 if none)."""
    return max(versions(model_dir), default=0) + 1


def latest_version_dir(model_dir: str | os.PathLike) -> Path:
    """The highest numbered version folder of ``model_dir`` (the one Triton serves by default)."""
    model_dir = Path(model_dir)
    found = versions(model_dir)
    if not found:
        raise CDCError(f"{model_dir} holds no numbered version folder (expected {model_dir}/1/...)")
    return model_dir / str(found[-1])


def find_model_file(path: str | os.PathLike) -> Path:
    """The ``model.onnx`` a user-given path means.

    ``path`` may be a repository model folder (``repo/name``: the latest numeric version
    holding a ``model.onnx``), a version folder (``repo/name/3``) or a ``.onnx`` file.
    """
    path = Path(path)
    if not path.exists():
        raise CDCError(
            f"{path}: model not found (give repo/<name>, a version folder or a .onnx file)"
        )
    if path.is_file():
        if path.suffix != ".onnx":
            raise CDCError(f"{path}: not an ONNX model (expected a .onnx file or a model folder)")
        return path
    if (path / ONNX_FILE).is_file():
        return path / ONNX_FILE
    found = versions(path, holding=ONNX_FILE)
    if not found:
        raise CDCError(
            f"{path}: no model found (no {ONNX_FILE} here nor in a numeric version folder)"
        )
    return path / str(found[-1]) / ONNX_FILE


def version_of(model_file: str | os.PathLike) -> int | None:
    """The version number of the folder a model file lies in (None outside a version folder)."""
    folder = Path(model_file).parent.name
    return int(folder) if folder.isdigit() else None
