"""Triton model repository layout and ``config.pbtxt`` generation.

A Triton model repository holds one folder per model, a ``config.pbtxt`` describing
how to serve it and one numbered folder per version::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx      (model.plan for the tensorrt backend)
    <repo>/<name>/<version>/cdc_meta.json   (the exported model's metadata)
    <repo>/<name>/<version>/model.py        (python backend only; runs model.onnx)

Three serving variants share that layout:

- ``onnxruntime``: ``platform: "onnxruntime_onnx"``, for NVIDIA's Triton containers,
  optionally with the TensorRT execution accelerator;
- ``tensorrt``: ``platform: "tensorrt_plan"`` with a TensorRT engine (GPU only);
- ``python``: ``backend: "python"`` with :mod:`cdc_serve.triton_python_model` as
  ``model.py``, for the ``tritonserver`` that ``pip install nvidia-pytriton`` ships
  (it has the Python backend only).

The model contract (tensor names, file names, version folders) is
:mod:`cdc_serve.contract`: input ``input`` uint8 ``[N, C, H, W]``, outputs
``cluster_id`` (INT64), ``confidence``, ``ood_score`` (FP32), ``ood`` (BOOL), one value
per image (``dims: [ 1 ]`` reshaped to the batch axis alone), ``probs`` FP32
``[N, num_classes]`` and ``embedding`` FP32 ``[N, D]``; exports of the previous format
(``format_version`` 1) take FP32 normalised input and give ``probs`` and ``embedding``
only. The ``input`` and ``output`` entries of ``config.pbtxt`` carry those names and
types to the server and to the Python-backend ``model.py``, which reads them from there.
The instance kind is Triton's ``KIND_AUTO`` unless asked otherwise (the serving machine
decides, not the exporting one). A new version never replaces an existing one: it is
written to a hidden folder first and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cdc_serve import CDCError
from cdc_serve.contract import (
    CONFIG_FILE,
    EMBEDDING,
    FLOAT_INPUT_FORMAT_VERSION,
    INPUT_NAME,
    META_FILE,
    META_FILE_PARAMETER,
    META_FORMAT_VERSION,
    META_PARAMETER,
    ONNX_FILE,
    OOD_SCORE_PARAMETER,
    OOD_THRESHOLD_PARAMETER,
    OUTPUT_NAMES,
    PLAN_FILE,
    PROBS,
    PYTHON_MODEL_FILE,
    SERVED_OUTPUTS,
    TENSOR_TYPES,
    latest_version_dir,
    next_version,
    versions,
)
from cdc_serve.served_graph import onnx_shapes, served_score

__all__ = [  # the layout helpers live in cdc_serve.contract; re-exported for callers here
    "CONFIG_FILE",
    "INPUT_NAME",
    "META_FILE",
    "OUTPUT_NAMES",
    "add_model_version",
    "config_pbtxt",
    "latest_version_dir",
    "list_models",
    "meta_parameters",
    "next_version",
    "onnx_shapes",
    "parse_config",
    "read_config",
    "read_meta",
]

BACKENDS = ("onnxruntime", "python", "tensorrt")
INSTANCE_KINDS = ("auto", "KIND_AUTO", "KIND_CPU", "KIND_GPU")

# The file each backend loads from a version folder (Triton's default file names).
MODEL_FILES = {"onnxruntime": ONNX_FILE, "python": ONNX_FILE, "tensorrt": PLAN_FILE}
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- versions


def read_meta(path: Path) -> dict[str, Any]:
    """Read ``cdc_meta.json`` from a version folder, a model folder (its latest version) or the file."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).exists() and versions(path):
            path = latest_version_dir(path)
        path = path / META_FILE
    if not path.is_file():
        raise CDCError(f"no model metadata: {path} does not exist")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CDCError(f"cannot read model metadata {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise CDCError(f"model metadata {path} is not a JSON object")
    return meta


def list_models(repo: Path) -> list[str]:
    """Names of the models in a repository: the sub-folders that hold a ``config.pbtxt``."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


# ----------------------------------------------------------------------------- config.pbtxt


def gpu_visible() -> bool:
    """True when a CUDA GPU is visible to processes started from here.

    ``CUDA_VISIBLE_DEVICES`` set to an empty string or ``-1`` hides every GPU; otherwise
    ``nvidia-smi -L`` must list at least one.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def resolve_instance_kind(instance_kind: str, backend: str) -> str:
    """The ``instance_group`` kind to write: ``"auto"`` is Triton's ``KIND_AUTO`` (the
    serving machine's GPU when it has one, else its CPU), except for a TensorRT plan,
    which runs on a GPU only. Never depends on the machine that exports."""
    if instance_kind not in INSTANCE_KINDS:
        raise CDCError(
            f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, not {instance_kind!r}"
        )
    if backend == "tensorrt":
        if instance_kind == "KIND_CPU":
            raise CDCError("a TensorRT plan runs on a GPU only: use KIND_GPU (or auto)")
        return "KIND_GPU"
    return "KIND_AUTO" if instance_kind == "auto" else instance_kind


def pbtxt_string(value: str) -> str:
    """``value`` as a protobuf text-format string literal (quotes, backslashes, control chars escaped)."""
    out = []
    for ch in str(value):
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def config_pbtxt(
    name: str,
    backend: str,
    num_classes: int,
    input_chw: tuple[int, int, int],
    embedding_dim: int,
    max_batch: int,
    instance_kind: str = "auto",
    instance_count: int = 1,
    trt_accelerator: bool = False,
    fp16: bool = False,
    parameters: dict[str, str] | None = None,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 100,
    format_version: int = META_FORMAT_VERSION,
) -> str:
    """The text of a Triton ``config.pbtxt`` for the cdc-serve model contract.

    ``backend`` picks ``platform: "onnxruntime_onnx"``, ``backend: "python"`` or
    ``platform: "tensorrt_plan"``. The batch axis is dynamic up to ``max_batch`` and
    requests are merged by the dynamic batcher (waiting at most ``max_queue_delay_us``).
    ``trt_accelerator`` (onnxruntime only) asks ONNX Runtime to run the graph through
    TensorRT on GPU instances, in FP16 when ``fp16`` (Triton applies it to GPU instances
    only). ``parameters`` are written as string parameters (the python backend's
    ``model.py`` and clients can read them). ``format_version`` is the graph's
    (:mod:`cdc_serve.contract`): 2 lists the uint8 input and every output, 1 the float
    input and ``probs``/``embedding``.
    """
    if backend not in BACKENDS:
        raise CDCError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    _check_model_name(name)
    chw = _check_shapes(num_classes, input_chw, embedding_dim, max_batch, instance_count)
    if not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise CDCError(
            f"max_queue_delay_us must be a non-negative integer, not {max_queue_delay_us!r}"
        )
    _check_acceleration(backend, trt_accelerator, fp16)
    kind = resolve_instance_kind(instance_kind, backend)
    if trt_accelerator and kind == "KIND_CPU":
        raise CDCError("the TensorRT accelerator applies to GPU instances: not with KIND_CPU")
    preferred = sorted(set(preferred_batch_sizes or []))
    bad = [b for b in preferred if not isinstance(b, int) or not 1 <= b <= max_batch]
    if bad:
        raise CDCError(f"preferred batch sizes must lie in 1..{max_batch}, got {bad}")

    lines = [
        *_head_lines(name, backend, max_batch),
        *_tensor_lines(chw, num_classes, embedding_dim, format_version),
        *_batching_lines(preferred, max_queue_delay_us),
        *_instance_lines(instance_count, kind),
    ]
    if trt_accelerator:
        lines += _accelerator_lines(fp16)
    lines += _parameter_lines(parameters or {})
    return "\n".join(lines) + "\n"


def _check_shapes(
    num_classes: int,
    input_chw: tuple[int, int, int],
    embedding_dim: int,
    max_batch: int,
    instance_count: int,
) -> tuple[int, int, int]:
    """Check the sizes config_pbtxt writes; returns ``input_chw`` as a tuple."""
    for label, value in (
        ("num_classes", num_classes),
        ("embedding_dim", embedding_dim),
        ("max_batch", max_batch),
        ("instance_count", instance_count),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CDCError(f"{label} must be a positive integer, not {value!r}")
    chw = tuple(input_chw)
    if len(chw) != 3 or not all(isinstance(d, int) and d >= 1 for d in chw):
        raise CDCError(f"input_chw must be three positive integers (C, H, W), not {input_chw!r}")
    return chw  # type: ignore[return-value]


def _check_acceleration(backend: str, trt_accelerator: bool, fp16: bool) -> None:
    """TensorRT options only where they apply."""
    if trt_accelerator and backend != "onnxruntime":
        raise CDCError(
            "the TensorRT execution accelerator is an option of the onnxruntime backend only"
        )
    if fp16 and backend == "python":
        raise CDCError(
            "fp16 applies to TensorRT (the tensorrt backend or --trt-accelerator), not to the python backend"
        )
    if fp16 and backend == "onnxruntime" and not trt_accelerator:
        raise CDCError(
            "fp16 with the onnxruntime backend needs the TensorRT accelerator (trt_accelerator=True)"
        )


def _head_lines(name: str, backend: str, max_batch: int) -> list[str]:
    platform = {
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "tensorrt": 'platform: "tensorrt_plan"',
        "python": 'backend: "python"',
    }[backend]
    return [f"name: {pbtxt_string(name)}", platform, f"max_batch_size: {max_batch}"]


def _tensor_lines(
    chw: tuple[int, int, int], num_classes: int, embedding_dim: int, format_version: int
) -> list[str]:
    """The ``input`` / ``output`` entries: the contract's tensor names, types and shapes.

    A per-image output (shape ``[N]`` in the graph) is ``dims: [ 1 ]`` reshaped to ``[ ]``,
    Triton's way of writing a tensor that has the batch axis only.
    """

    def tensor(name: str, dims: tuple[int, ...], dtype: str) -> list[str]:
        lines = [
            "  {",
            f"    name: {pbtxt_string(name)}",
            f"    data_type: TYPE_{dtype}",
            f"    dims: [ {', '.join(str(d) for d in dims or (1,))} ]",
        ]
        return [*lines, "    reshape: { shape: [ ] }"] if not dims else lines

    if format_version == FLOAT_INPUT_FORMAT_VERSION:
        names, types = OUTPUT_NAMES, {INPUT_NAME: "FP32", PROBS: "FP32", EMBEDDING: "FP32"}
    elif format_version == META_FORMAT_VERSION:
        names, types = SERVED_OUTPUTS, TENSOR_TYPES
    else:
        raise CDCError(f"format_version must be 1 or {META_FORMAT_VERSION}, not {format_version!r}")
    dims = {PROBS: (num_classes,), EMBEDDING: (embedding_dim,)}
    outputs = [tensor(n, dims.get(n, ()), types[n]) + ["  }"] for n in names]
    for block in outputs[:-1]:
        block[-1] += ","
    flat = [line for block in outputs for line in block]
    inp = tensor(INPUT_NAME, chw, types[INPUT_NAME]) + ["  }"]
    return ["input [", *inp, "]", "output [", *flat, "]"]


def _batching_lines(preferred: list[int], max_queue_delay_us: int) -> list[str]:
    lines = ["dynamic_batching {"]
    if preferred:
        lines.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
    return [*lines, f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]


def _instance_lines(count: int, kind: str) -> list[str]:
    return ["instance_group [", "  {", f"    count: {count}", f"    kind: {kind}", "  }", "]"]


def _accelerator_lines(fp16: bool) -> list[str]:
    return [
        "optimization {",
        "  execution_accelerators {",
        "    gpu_execution_accelerator : [",
        "      {",
        '        name : "tensorrt"',
        '        parameters { key: "precision_mode" value: ' + ('"FP16" }' if fp16 else '"FP32" }'),
        '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
        "      }",
        "    ]",
        "  }",
        "}",
    ]


def _parameter_lines(parameters: dict[str, str]) -> list[str]:
    return [
        f"parameters {{ key: {pbtxt_string(key)} value: {{ string_value: {pbtxt_string(value)} }} }}"
        for key, value in sorted(parameters.items())
    ]


def parse_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` protobuf (a real syntax check)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise CDCError(f"invalid config.pbtxt: {exc}") from None


def read_config(model_dir: Path):
    """The parsed ``config.pbtxt`` of a model folder (a ``ModelConfig`` protobuf)."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CDCError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CDCError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    try:
        return parse_config(text)
    except CDCError as exc:
        raise CDCError(f"{path}: {exc}") from None


def meta_parameters(meta: dict[str, Any], max_len: int = 2048) -> dict[str, str]:
    """The metadata as Triton string parameters: scalars as text, small lists/dicts as JSON.

    Values whose text is longer than ``max_len`` are left out as separate parameters; the
    whole metadata always travels as one JSON string in ``cdc_meta``, which is how a
    client talking to Triton learns the preprocessing and the fitted OOD statistics.
    """
    score, threshold = served_score(meta.get("ood") if isinstance(meta.get("ood"), dict) else {})
    params = {
        META_FILE_PARAMETER: META_FILE,
        META_PARAMETER: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False),
        OOD_SCORE_PARAMETER: score,  # what the graph's ood_score is, and its ood threshold
        OOD_THRESHOLD_PARAMETER: repr(threshold),
    }
    for key, value in meta.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = str(value)
        elif value is None:
            continue
        else:
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        if len(text) <= max_len:
            params[str(key)] = text
    return params


# ----------------------------------------------------------------------------- repository


def add_model_version(
    repo: Path,
    name: str,
    model_file: Path,
    meta: dict[str, Any],
    backend: str,
    max_batch: int,
    **config_kwargs: Any,
) -> Path:
    """Add ``model_file`` as a new version of model ``name`` in repository ``repo``.

    Writes ``<repo>/<name>/<v>/model.onnx`` (``model.plan`` for tensorrt), ``cdc_meta.json``
    (``meta`` with ``"version": v``) and, for the python backend, ``model.py``; then
    (re)writes ``<repo>/<name>/config.pbtxt``. ``v`` is :func:`next_version`; an existing
    version folder is never touched (the new one is assembled in a hidden folder and
    renamed into place).

    ``config_kwargs`` go to :func:`config_pbtxt`. ``num_classes``, ``input_chw`` and
    ``embedding_dim`` come from ``config_kwargs``, else from ``meta`` (its ``num_classes``,
    ``embedding_dim``, ``channels`` and ``input_size``); for an ONNX file they are read from
    the graph and every value given must agree with it. ``parameters`` default to
    :func:`meta_parameters` of ``meta``. Returns the new version folder.
    """
    if backend not in BACKENDS:
        raise CDCError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    _check_model_name(name)
    model_file = Path(model_file)
    if not model_file.is_file():
        raise CDCError(f"model file {model_file} does not exist")
    if not isinstance(meta, dict):
        raise CDCError(f"meta must be a dict, not {type(meta).__name__}")
    meta = dict(meta)
    _meta_json(meta)  # fail early on values JSON cannot hold

    model_dir = Path(repo) / name
    shapes = _model_shapes(model_file, backend, config_kwargs, meta)
    config_kwargs = {**config_kwargs, **shapes}
    explicit_parameters = config_kwargs.pop("parameters", None)

    def render_config(version: int) -> str:
        parameters = explicit_parameters
        if parameters is None:
            parameters = meta_parameters({**meta, "version": version})
        return config_pbtxt(
            name, backend, max_batch=max_batch, parameters=parameters, **config_kwargs
        )

    parse_config(render_config(next_version(model_dir)))  # check before writing anything
    _check_same_backend(model_dir, backend)
    model_dir.mkdir(parents=True, exist_ok=True)

    version_dir = _claim_next_version(model_dir)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=model_dir))
    try:
        meta["version"] = int(version_dir.name)
        shutil.copyfile(model_file, staging / MODEL_FILES[backend])
        (staging / META_FILE).write_text(_meta_json(meta), encoding="utf-8")
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL_SOURCE, staging / PYTHON_MODEL_FILE)
        os.chmod(staging, 0o755)
        os.rename(staging, version_dir)  # replaces the empty folder we claimed, atomically
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            version_dir.rmdir()  # only if still empty
        raise
    _write_atomically(model_dir / CONFIG_FILE, render_config(int(version_dir.name)))
    return version_dir


def _meta_json(meta: dict[str, Any]) -> str:
    try:
        return json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CDCError(f"model metadata is not plain JSON: {exc}") from None


def _claim_next_version(model_dir: Path) -> Path:
    """Create the empty folder of the next free version number (retrying if another export won)."""
    for _ in range(1000):
        target = model_dir / str(next_version(model_dir))
        try:
            os.mkdir(target)  # exclusive: fails if a concurrent export took the number
        except FileExistsError:
            continue
        return target
    raise CDCError(f"could not find a free version number in {model_dir}")


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_model_name(name: str) -> None:
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise CDCError(
            f"model name {name!r} is not a valid folder name: use letters, digits, '_', '-', '.' "
            "(not starting with '.' or '-')"
        )


def _check_same_backend(model_dir: Path, backend: str) -> None:
    """Refuse to add e.g. a python-backend version to a model served by onnxruntime."""
    if not (model_dir / CONFIG_FILE).is_file():
        return
    config = read_config(model_dir)
    existing = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}.get(
        config.platform, config.backend
    )
    if existing and existing != backend:
        raise CDCError(
            f"{model_dir} is served by the {existing} backend; a {backend} version cannot be "
            "added to it (choose another model name or repository)"
        )


def _model_shapes(
    model_file: Path, backend: str, given: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """``num_classes``, ``input_chw``, ``embedding_dim``, ``format_version`` from ``given``,
    ``meta`` and the ONNX graph (which wins; the others must agree with it)."""
    keys = ("num_classes", "input_chw", "embedding_dim", "format_version")
    sources = []  # (where, values) to check against the graph / against each other
    explicit = {k: given[k] for k in keys if given.get(k) is not None}
    if "input_chw" in explicit:
        explicit["input_chw"] = tuple(explicit["input_chw"])
    sources.append(("the arguments", explicit))
    sources.append(("the metadata", _meta_shapes(meta)))
    if backend == "tensorrt":
        found: dict[str, Any] = {"format_version": META_FORMAT_VERSION}
        for _, values in reversed(sources):  # explicit arguments win over the metadata
            found.update(values)
        missing = [k for k in keys if k not in found]
        if missing:
            raise CDCError(
                f"a TensorRT plan needs {', '.join(missing)} (as arguments or in the metadata)"
            )
        return found
    found = onnx_shapes(model_file)
    for where, values in sources:
        for key, value in values.items():
            if value != found[key]:
                raise CDCError(
                    f"{key}={value!r} in {where} disagrees with the ONNX model "
                    f"{model_file} ({found[key]!r})"
                )
    return found


def _meta_shapes(meta: dict[str, Any]) -> dict[str, Any]:
    """The shapes the metadata states (``cdc_serve.modelmeta.ModelMeta`` field names)."""
    out: dict[str, Any] = {}
    try:
        for key in ("num_classes", "embedding_dim", "format_version"):
            if meta.get(key) is not None:
                out[key] = int(meta[key])
        if meta.get("channels") is not None and meta.get("input_size") is not None:
            h, w = (int(v) for v in meta["input_size"])
            out["input_chw"] = (int(meta["channels"]), h, w)
    except (TypeError, ValueError):
        raise CDCError(
            "model metadata: num_classes, embedding_dim, channels and input_size must be integers"
        ) from None
    return out
