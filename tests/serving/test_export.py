"""`cdc-serve export`: a model.pth -> ONNX -> Triton repository, checked against PyTorch.

The slow part starts the real ``tritonserver`` (pip's nvidia-pytriton, Python backend)
on the exported repository and checks that HTTP and gRPC (tritonclient) and a plain
``curl`` JSON request return the same ``probs`` as onnxruntime in process and as the
PyTorch model, within 1e-5, for batch sizes 1, 7 and the max batch.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import curl_infer
from typer.testing import CliRunner

from cdc_serve import CDCError
from cdc_serve.cli import app
from cdc_serve.export import export_model
from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.checkpoint import arch_of, load_model, save_model
from cdc_serve_training.data import load_dataset
from cdc_serve_training.heads import ClusteringModel

MAX_BATCH = 16
TOL = 1e-5


def _save_tiny_model(path: Path, num_classes: int = 10, seed: int = 0) -> Path:
    """A small CNN with both heads, trained for a few steps so BatchNorm stats are not trivial."""
    torch.manual_seed(seed)
    model = ClusteringModel(
        build_backbone("smallcnn", 1, 28), hidden_dim=32, num_classes=num_classes
    )
    x = torch.randn(64, 1, 28, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        _, clu, cal = model(x)
        loss = clu.logsumexp(1).mean() + cal.logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_model(
        path,
        model,
        method="cdc",
        arch=arch_of(model, "smallcnn", 1, (28, 28)),
        preprocess={"input_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]},
        config={"preset": "test"},
        dataset="fashion-mnist",
        metrics={},
        ood={},
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture(scope="module")
def real_batch() -> np.ndarray:
    """MAX_BATCH real Fashion-MNIST test images, normalised as the model expects."""
    data = load_dataset("fashion-mnist", split="test", limit=MAX_BATCH)
    x = data.images[:MAX_BATCH].float().numpy() / 255.0
    return ((x - 0.286) / 0.353).astype(np.float32)


def _torch_probs(model_path: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(model_path)
    with torch.no_grad():
        _, _, cal = model(torch.from_numpy(x))
    return cal.softmax(1).numpy()


def test_export_writes_verified_versions(tiny_model, tmp_path):
    repo = tmp_path / "repo"
    first = export_model(tiny_model, out=repo, name="fmnist", max_batch=MAX_BATCH)
    assert first.max_abs_diff <= TOL
    assert first.version_dir == repo / "fmnist" / "1"
    assert (repo / "fmnist" / "1" / "model.onnx").is_file()
    meta = json.loads((repo / "fmnist" / "1" / "cdc_meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["channels"] == 1 and meta["input_size"] == [28, 28]
    config = (repo / "fmnist" / "config.pbtxt").read_text()
    assert (
        'platform: "onnxruntime_onnx"' in config.replace("'", '"') or "onnxruntime_onnx" in config
    )
    before = (repo / "fmnist" / "1" / "model.onnx").read_bytes()
    second = export_model(tiny_model, out=repo, name="fmnist", max_batch=MAX_BATCH)
    assert second.version_dir == repo / "fmnist" / "2"
    assert (repo / "fmnist" / "1" / "model.onnx").read_bytes() == before  # never overwritten


def test_onnx_matches_pytorch_on_real_images(tiny_model, tmp_path, real_batch):
    import onnxruntime as ort

    result = export_model(tiny_model, out=tmp_path / "repo", max_batch=MAX_BATCH)
    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    for n in (1, 7, MAX_BATCH):
        (probs,) = session.run(["probs"], {"input": real_batch[:n]})
        assert probs.shape == (n, 10)
        np.testing.assert_allclose(
            probs, _torch_probs(tiny_model, real_batch[:n]), atol=TOL, rtol=0
        )


def test_export_cli_prints_the_difference(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "max |probs_onnxruntime - probs_torch|" in result.output


# ------------------------------------------------------------------------- bad checkpoints


class _RunsCode:
    """Unpickling this would call os.system: weights_only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/cdc-serve-pwned",))


def _bad_files(tmp_path: Path, tiny_model: Path) -> dict[str, Path]:
    files = {}
    data = tiny_model.read_bytes()
    files["truncated"] = tmp_path / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not a checkpoint"] = tmp_path / "notes.pth"
    files["not a checkpoint"].write_text("hello, I am not a model\n")
    files["crafted pickle"] = tmp_path / "evil.pth"
    torch.save({"format": "cdc-serve/model", "payload": _RunsCode()}, files["crafted pickle"])
    files["plain pickle"] = tmp_path / "plain.pth"
    files["plain pickle"].write_bytes(pickle.dumps({"a": 1}))

    payload = torch.load(tiny_model, weights_only=True)
    other = dict(payload, project_version="9.0.0")
    files["other version"] = tmp_path / "other_version.pth"
    torch.save(other, files["other version"])
    wrong = dict(payload, arch=dict(payload["arch"], num_classes=7))
    files["class count"] = tmp_path / "wrong_classes.pth"
    torch.save(wrong, files["class count"])
    return files


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "truncated"),
        ("not a checkpoint", "not"),
        ("crafted pickle", "refusing to unpickle"),
        ("plain pickle", "not a cdc-serve model|not a readable torch file|refusing to unpickle"),
        ("other version", "9.0.0"),
        ("class count", "classes"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(case, message, tiny_model, tmp_path):
    path = _bad_files(tmp_path, tiny_model)[case]
    Path("/tmp/cdc-serve-pwned").unlink(missing_ok=True)
    with pytest.raises(CDCError, match=message):
        export_model(path, out=tmp_path / "repo")
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "repo")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert not Path("/tmp/cdc-serve-pwned").exists(), "a crafted checkpoint ran code"
    assert not (tmp_path / "repo").exists(), "nothing may be written for a bad checkpoint"


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(CDCError, match="no model file"):
        export_model(tmp_path / "missing.pth")
    with pytest.raises(CDCError, match="--format"):
        export_model(tiny_model, fmt="coreml")
    with pytest.raises(CDCError, match="max-batch"):
        export_model(tiny_model, max_batch=0)


def test_tensorrt_without_the_package_is_a_clear_error(tiny_model, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: the missing-package message cannot be shown")
    except ImportError:
        pass
    with pytest.raises(CDCError, match="tensorrt"):
        export_model(tiny_model, out=tmp_path / "repo", fmt="tensorrt")


# ---------------------------------------------------------------- a real Triton server


@pytest.mark.slow
@pytest.mark.triton
def test_triton_http_grpc_curl_match_onnxruntime_and_pytorch(
    tiny_model, tmp_path, real_batch, triton_server
):
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    result = export_model(tiny_model, out=repo, name="cdc", backend="python", max_batch=MAX_BATCH)
    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    server = triton_server(repo)
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert http.is_server_ready() and http.is_model_ready("cdc")

    for n in (1, 7, MAX_BATCH):
        x = real_batch[:n]
        expected_torch = _torch_probs(tiny_model, x)
        (expected_ort,) = session.run(["probs"], {"input": x})

        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        via_http = http.infer("cdc", [inp]).as_numpy("probs")

        ginp = grpcclient.InferInput("input", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        via_grpc = grpc.infer("cdc", [ginp]).as_numpy("probs")

        via_curl = curl_infer(server.http_url, "cdc", x)["probs"]

        for got in (via_http, via_grpc, via_curl):
            assert got.shape == (n, 10)
            np.testing.assert_allclose(got, expected_ort, atol=TOL, rtol=0)
            np.testing.assert_allclose(got, expected_torch, atol=TOL, rtol=0)
