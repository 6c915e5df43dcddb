"""The exported-model contract: tensor names, file names and the repository layout.

Everything that the exporter, the Triton configuration, the Python-backend model and
the clients must agree on is written here once (``docs/ARCHITECTURE.md``):

- the served graph takes one float32 input ``input`` of shape ``[N, C, H, W]`` and gives
  two float32 outputs, ``probs`` ``[N, num_classes]`` (the calibration head's softmax)
  and ``embedding`` ``[N, D]`` (the backbone feature the OOD scores use);
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
OUTPUT_NAMES = (PROBS, EMBEDDING)  # in this order: (probabilities, embedding)

# -- files -----------------------------------------------------------------------------

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"  # a TensorRT engine (the tensorrt backend)
PYTHON_MODEL_FILE = "model.py"  # the python backend's model (runs model.onnx)
META_FILE = "cdc_meta.json"
CONFIG_FILE = "config.pbtxt"

META_FORMAT = "cdc-serve/export"
META_FORMAT_VERSION = 1

# -- config.pbtxt parameters -------------------------------------------------------------

META_PARAMETER = "cdc_meta"  # the whole cdc_meta.json as one JSON string
META_FILE_PARAMETER = "cdc_meta_file"  # the metadata's file name in a version folder
ORT_THREADS_PARAMETER = "ort_intra_op_threads"  # python backend: onnxruntime threads

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
