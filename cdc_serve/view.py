"""What ``cdc-serve serve`` hands to Triton: a *view* of the user's repository that the
server found can serve, as it is.

The user's repository is never edited. ``cdc-serve serve REPO`` builds, in a temporary
folder, one entry per model of ``REPO``:

- a model whose backend the server has: its ``config.pbtxt`` copied, each complete
  version folder linked (``view/<name>/<v> -> REPO/<name>/<v>``);
- a model configured for onnxruntime on a server without the onnxruntime backend (the
  ``tritonserver`` that pip's ``nvidia-pytriton`` brings has the Python backend only):
  a *shadow*: the same configuration turned into a Python-backend one (``backend:
  "python"``, the TensorRT accelerator settings dropped, as they apply to onnxruntime
  only) and version folders that link the same ``model.onnx`` and ``cdc_meta.json``
  beside cdc-serve's own ``model.py`` (:mod:`cdc_serve.triton_python_model`), which runs
  them through onnxruntime. Nothing is re-exported; :func:`Model.note` is the one log
  line saying so.

A version is linked once it is complete (its model file and ``cdc_meta.json`` are
there), so a server that reloads the view (``serve --poll``) never sees an export in
progress. A model that cannot be served is refused before Triton starts, with one line
naming it and what to do (:func:`inspect_model`): no complete version, a
``config.pbtxt`` and ``cdc_meta.json`` that disagree on the input, a backend the server
lacks. :func:`sync_view` (re)builds the view and says which models changed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cdc_serve import CDCError
from cdc_serve.contract import (
    CONFIG_FILE,
    META_FILE,
    ONNX_FILE,
    PLAN_FILE,
    PYTHON_MODEL_FILE,
    versions,
)

DEFAULT_BACKEND_DIR = Path("/opt/tritonserver/backends")  # NVIDIA's containers
PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
MODEL_FILES = {  # what a version folder needs, per backend (besides cdc_meta.json)
    "onnxruntime": (ONNX_FILE,),
    "tensorrt": (PLAN_FILE,),
    "python": (PYTHON_MODEL_FILE, ONNX_FILE),
}


def server_backends(backend_dir: Path | None) -> set[str] | None:
    """The backends in a server's backend folder (``None`` where that cannot be told)."""
    folder = Path(backend_dir) if backend_dir is not None else DEFAULT_BACKEND_DIR
    if not folder.is_dir():
        return None
    return {p.name for p in folder.iterdir() if p.is_dir()}


@dataclass
class Model:
    """One model of the user's repository, and how this server will run it."""

    name: str
    folder: Path
    backend: str  # the backend its config.pbtxt names
    shadow: bool  # run through the Python backend instead
    versions: list[int] = field(default_factory=list)  # the complete ones

    def note(self) -> str | None:
        if not self.shadow:
            return None
        return (
            f"{self.name}: configured for the {self.backend} backend, which this tritonserver "
            f"lacks; serving the same {ONNX_FILE} through the Python backend (nothing re-exported)"
        )


def _backend_of(config) -> str:
    return PLATFORMS.get(config.platform, config.backend or config.platform or "?")


def complete_versions(folder: Path, backend: str) -> list[int]:
    """The version folders that hold the backend's model files and ``cdc_meta.json``."""
    wanted = (*MODEL_FILES.get(backend, ()), META_FILE)
    return [v for v in versions(folder) if all((folder / str(v) / f).is_file() for f in wanted)]


def inspect_model(folder: Path, backends: set[str] | None) -> Model:
    """How ``folder`` (``REPO/<name>``) will be served; CDCError naming the model and what
    to do when it cannot be."""
    from cdc_serve.triton import read_config

    name = folder.name
    config = read_config(folder)
    backend = _backend_of(config)
    shadow = backends is not None and backend not in backends
    if shadow and not (backend == "onnxruntime" and "python" in backends):
        raise CDCError(
            f"model {name!r} needs Triton's {backend} backend, which this tritonserver lacks "
            f"(it has: {', '.join(sorted(backends)) or 'none'}): serve the repository with "
            "NVIDIA's Triton container (docs/DEPLOY.md)"
            + (", or export it again with --format onnx" if backend == "tensorrt" else "")
        )
    found = complete_versions(folder, "onnxruntime" if shadow else backend)
    if not found:
        raise CDCError(
            f"model {name!r} has no complete version folder ({folder}/<n>/ holding "
            f"{', '.join(MODEL_FILES.get(backend, ('its model file',)))} and {META_FILE}): export it again "
            f"with `cdc-serve export MODEL.pth --out {folder.parent} --name {name}`"
        )
    _check_input(name, config, folder / str(found[-1]) / META_FILE)
    return Model(name, folder, backend, shadow, found)


def _check_input(name: str, config, meta_path: Path) -> None:
    """config.pbtxt and the newest cdc_meta.json must describe the same input."""
    from tritonclient.grpc import model_config_pb2 as pb

    from cdc_serve.modelmeta import ModelMeta

    meta = ModelMeta.read(meta_path)
    want_type = "TYPE_UINT8" if meta.scores_in_graph else "TYPE_FP32"
    want = (want_type, [meta.channels, *meta.input_size])
    declared = [(pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input]
    if declared != [want]:
        got = ", ".join(f"{t} {d}" for t, d in declared) or "none"
        raise CDCError(
            f"model {name!r}: config.pbtxt declares the input {got} but {meta_path} says "
            f"{want[0]} {want[1]} (format_version {meta.format_version}): the two come from "
            "different exports; export the model again (or restore the config.pbtxt written "
            "with that version)"
        )


def inspect_repository(repo: Path, backends: set[str] | None) -> list[Model]:
    """Every model of ``repo``; one CDCError listing each model that cannot be served."""
    from cdc_serve.serve import check_repository

    models, problems = [], []
    for name in check_repository(repo):
        try:
            models.append(inspect_model(Path(repo) / name, backends))
        except CDCError as exc:
            problems.append(str(exc))
    if problems:
        raise CDCError("; ".join(problems))
    return models


# -- the view folder --------------------------------------------------------------------------


def view_config(model: Model) -> str:
    """The ``config.pbtxt`` text the view gives ``model`` (a Python-backend one for a shadow)."""
    from google.protobuf import text_format

    from cdc_serve.triton import read_config

    text = (model.folder / CONFIG_FILE).read_text(encoding="utf-8")
    if not model.shadow:
        return text
    config = read_config(model.folder)
    config.platform, config.backend = "", "python"
    config.ClearField("default_model_filename")
    config.ClearField("optimization")  # the TensorRT accelerator is onnxruntime's
    return text_format.MessageToString(config)


def _link_version(model: Model, version: int, target: Path) -> None:
    """``target`` (a view version folder) for one complete version, made atomically."""
    from cdc_serve.triton import PYTHON_MODEL_SOURCE

    source = model.folder / str(version)
    staging = target.with_name(f".incoming-{target.name}")
    _remove(staging)  # left by an interrupted run
    if model.shadow:
        staging.mkdir()
        for name in (ONNX_FILE, META_FILE):
            (staging / name).symlink_to(source / name)
        (staging / PYTHON_MODEL_FILE).symlink_to(PYTHON_MODEL_SOURCE)
    else:
        staging.symlink_to(source, target_is_directory=True)
    os.replace(staging, target)


def sync_view(models: list[Model], view: Path) -> list[str]:
    """Make ``view`` mirror ``models``; the names of the models whose entry changed."""
    changed = []
    view.mkdir(parents=True, exist_ok=True)
    for model in models:
        folder = view / model.name
        folder.mkdir(exist_ok=True)
        config, text = folder / CONFIG_FILE, view_config(model)
        dirty = not config.is_file() or config.read_text(encoding="utf-8") != text
        if dirty:
            tmp = folder / f".{CONFIG_FILE}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, config)
        have = set(versions(folder))
        for version in sorted(set(model.versions) - have):
            _link_version(model, version, folder / str(version))
        for version in have - set(model.versions):
            _remove(folder / str(version))
        if dirty or have != set(model.versions):
            changed.append(model.name)
    for stale in {p.name for p in view.iterdir() if p.is_dir()} - {m.name for m in models}:
        shutil.rmtree(view / stale, ignore_errors=True)
        changed.append(stale)
    return changed


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
