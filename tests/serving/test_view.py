"""What ``cdc-serve serve`` gives Triton (cdc_serve/view.py): shadows, links, and the one
clear line for what cannot be served. No server is started here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_repository

from cdc_serve import CDCError
from cdc_serve.contract import CONFIG_FILE, META_FILE
from cdc_serve.triton import PYTHON_MODEL_SOURCE, parse_config
from cdc_serve.view import inspect_repository, server_backends, sync_view, view_config

PIP_SERVER = {"python"}  # the backends of the tritonserver that nvidia-pytriton brings


def cli_serve(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cdc_serve.cli", "serve", str(repo)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_onnxruntime_models_get_a_python_backend_shadow(tmp_path):
    repo = tmp_path / "repo"
    make_tiny_repository(repo, "ort", backend="onnxruntime", trt_accelerator=True)
    make_tiny_repository(repo, "ort", backend="onnxruntime", seed=1)
    make_tiny_repository(repo, "py", backend="python")
    models = {m.name: m for m in inspect_repository(repo, PIP_SERVER)}
    assert models["ort"].shadow and not models["py"].shadow
    assert models["ort"].versions == [1, 2] and models["py"].versions == [1]
    assert "through the Python backend" in models["ort"].note() and models["py"].note() is None

    config = parse_config(view_config(models["ort"]))
    assert config.backend == "python" and config.platform == ""
    assert not config.HasField("optimization")  # the TensorRT accelerator is onnxruntime's
    original = parse_config((repo / "ort" / CONFIG_FILE).read_text())
    assert [t.name for t in config.output] == [t.name for t in original.output]
    assert config.instance_group == original.instance_group  # KIND_AUTO stays
    assert config.parameters == original.parameters

    view = tmp_path / "view"
    assert sorted(sync_view(list(models.values()), view)) == ["ort", "py"]
    two = view / "ort" / "2"
    assert (two / "model.onnx").resolve() == (repo / "ort" / "2" / "model.onnx").resolve()
    assert (two / META_FILE).resolve() == (repo / "ort" / "2" / META_FILE).resolve()
    assert (two / "model.py").resolve() == PYTHON_MODEL_SOURCE.resolve()
    assert (view / "py" / "1").resolve() == (repo / "py" / "1").resolve()  # linked as it is
    assert (view / "py" / CONFIG_FILE).read_text() == (repo / "py" / CONFIG_FILE).read_text()
    assert sync_view(list(models.values()), view) == []  # nothing changed since

    # a version being exported (its folder claimed, files not there yet) is not linked
    (repo / "ort" / "3").mkdir()
    again = inspect_repository(repo, PIP_SERVER)
    assert sync_view(again, view) == [] and not (view / "ort" / "3").exists()
    make_tiny_repository(repo, "ort", backend="onnxruntime", seed=3)  # becomes version 4
    assert sync_view(inspect_repository(repo, PIP_SERVER), view) == ["ort"]
    assert (view / "ort" / "4" / "model.onnx").is_file()


def test_a_server_with_every_backend_gets_no_shadow(tmp_path):
    make_tiny_repository(tmp_path / "repo", "ort", backend="onnxruntime")
    (model,) = inspect_repository(tmp_path / "repo", {"onnxruntime", "python", "tensorrt"})
    assert not model.shadow
    (tmp_path / "backends" / "python").mkdir(parents=True)
    assert server_backends(tmp_path / "backends") == {"python"}
    assert server_backends(tmp_path / "nowhere") is None  # unknown: serve models as they are


def _disagreeing_shapes(repo: Path) -> Path:
    version = make_tiny_repository(repo, "tiny")
    meta = json.loads((version / META_FILE).read_text())
    (version / META_FILE).write_text(json.dumps({**meta, "input_size": [9, 9]}))
    return version


def _tensorrt_plan(repo: Path) -> Path:
    from cdc_serve.triton import add_model_version

    plan = repo.parent / "engine.plan"
    plan.write_bytes(b"an engine")
    meta = json.loads((make_tiny_repository(repo.parent / "other", "x") / META_FILE).read_text())
    return add_model_version(repo, "trt", plan, meta, "tensorrt", 16)


def _no_complete_version(repo: Path) -> Path:
    version = make_tiny_repository(repo, "tiny")
    (version / "model.onnx").unlink()
    return version


@pytest.mark.parametrize(
    "make, message",
    [
        (_disagreeing_shapes, r"model 'tiny': config.pbtxt declares the input TYPE_UINT8 \[1, 8, 8\] "
                              r"but .*cdc_meta.json says TYPE_UINT8 \[1, 9, 9\].*export the model again"),
        (_tensorrt_plan, r"model 'trt' needs Triton's tensorrt backend, which this tritonserver "
                         r"lacks \(it has: python\).*NVIDIA's Triton container"),
        (_no_complete_version, r"model 'tiny' has no complete version folder.*cdc-serve export"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_one_line_naming_the_model(tmp_path, make, message):
    repo = tmp_path / "repo"
    make(repo)
    with pytest.raises(CDCError, match=message):
        inspect_repository(repo, PIP_SERVER)


@pytest.mark.triton
@pytest.mark.parametrize(
    "make, message",
    [
        (None, "holds no model"),
        (_disagreeing_shapes, "model 'tiny': config.pbtxt declares the input"),
        (_tensorrt_plan, "model 'trt' needs Triton's tensorrt backend"),
    ],
)
def test_cli_serve_refuses_with_one_line(tmp_path, triton_binary, make, message):
    repo = tmp_path / "repo"
    repo.mkdir()
    if make is not None:
        make(repo)
    done = cli_serve(repo)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "+---" not in done.stdout + done.stderr and "Traceback" not in done.stderr
