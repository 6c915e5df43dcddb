"""`cdc-serve export`: a model.pth -> ONNX -> Triton repository, checked against PyTorch.

The exported graph takes uint8 images and gives every output (cluster_id, confidence,
ood_score, ood, probs, embedding); each is checked on real Fashion-MNIST images against
PyTorch and the numpy OOD code. The slow part starts the real ``tritonserver`` (pip's
nvidia-pytriton, Python backend) on the exported repository and checks that HTTP and
gRPC (tritonclient) and a plain ``curl`` JSON request return the same ``probs`` as
onnxruntime in process and as the PyTorch model, within 1e-5, for batch sizes 1, 7 and
the max batch.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliServe, curl_infer
from typer.testing import CliRunner

from cdc_serve import CDCError
from cdc_serve.cli import app
from cdc_serve.export import export_model
from cdc_serve.ood import OODScorer, fit_ood
from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.checkpoint import arch_of, load_model, save_model
from cdc_serve_training.data import load_dataset
from cdc_serve_training.heads import ClusteringModel

MAX_BATCH = 16
TOL = 1e-5


def _save_tiny_model(
    path: Path, num_classes: int = 10, seed: int = 0, input_norm: str = "dataset"
) -> Path:
    """A small CNN with both heads, trained for a few steps so BatchNorm stats are not trivial."""
    torch.manual_seed(seed)
    model = ClusteringModel(
        build_backbone("smallcnn", 1, 28, input_norm=input_norm), hidden_dim=32,
        num_classes=num_classes,
    )  # fmt: skip
    x = torch.randn(64, 1, 28, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        _, clu, cal = model(x)
        loss = clu.logsumexp(1).mean() + cal.logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train = load_dataset("fashion-mnist", split="train", limit=500).images.float() / 255
    with torch.no_grad():  # OOD statistics fitted on real training images, as training does
        features, _, cal = model((train - 0.286) / 0.353)
    ood = fit_ood(features.numpy(), cal.softmax(1).numpy(), knn_bank=50)
    return save_model(
        path,
        model,
        method="cdc",
        arch=arch_of(model, "smallcnn", 1, (28, 28)),
        preprocess={"input_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]},
        config={"preset": "test"},
        dataset="fashion-mnist",
        metrics={},
        ood=ood,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture(scope="module")
def real_batch() -> np.ndarray:
    """MAX_BATCH real Fashion-MNIST test images (uint8 1 x 28 x 28: what the graph takes)."""
    data = load_dataset("fashion-mnist", split="test", limit=MAX_BATCH)
    return data.images[:MAX_BATCH].numpy().astype(np.uint8)


def _torch_outputs(model_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's ``(probs, embedding)`` for uint8 images, normalised as in training."""
    model, _ = load_model(model_path)
    x = ((images.astype(np.float32) / 255.0 - 0.286) / 0.353).astype(np.float32)
    with torch.no_grad():
        features, _, cal = model(torch.from_numpy(x))
    return cal.softmax(1).numpy(), features.numpy()


def _torch_probs(model_path: Path, images: np.ndarray) -> np.ndarray:
    return _torch_outputs(model_path, images)[0]


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
    """Every output of the served graph, on real images: PyTorch for probs, embedding,
    confidence and cluster_id; the numpy OOD code for ood_score and ood."""
    import onnxruntime as ort

    result = export_model(tiny_model, out=tmp_path / "repo", max_batch=MAX_BATCH)
    assert set(result.diffs) >= {"probs", "embedding", "confidence", "ood_score"}
    assert all(v <= TOL for v in result.diffs.values())
    meta = json.loads((result.version_dir / "cdc_meta.json").read_text())
    assert meta["format_version"] == 2 and meta["reject_below"] == 0.8
    assert meta["ood"]["default"] == "mahalanobis"
    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input", "tensor(uint8)")]
    names = ["cluster_id", "confidence", "ood_score", "ood", "probs", "embedding"]
    assert [o.name for o in session.get_outputs()] == names
    scorer = OODScorer(meta["ood"])
    for n in (1, 7, MAX_BATCH):
        out = dict(zip(names, session.run(names, {"input": real_batch[:n]}), strict=True))
        probs, embedding = _torch_outputs(tiny_model, real_batch[:n])
        assert out["probs"].shape == (n, 10) and out["cluster_id"].dtype == np.int64
        np.testing.assert_allclose(out["probs"], probs, atol=TOL, rtol=0)
        np.testing.assert_allclose(out["confidence"], probs.max(1), atol=TOL, rtol=0)
        assert out["cluster_id"].tolist() == probs.argmax(1).tolist()
        flags, scores = scorer.flags(out["embedding"], out["probs"])
        np.testing.assert_allclose(out["ood_score"], scores, atol=TOL, rtol=0)
        assert out["ood"].tolist() == flags.tolist()


def test_per_image_normalisation_travels_into_the_served_graph(tmp_path, real_batch):
    """An ``--input-norm object`` model: model.pth records it, the export verifies against
    PyTorch, and the served graph gives an inverted image (255 - x) the same answer."""
    import onnxruntime as ort

    path = _save_tiny_model(tmp_path / "model.pth", input_norm="object")
    model, _ = load_model(path)
    assert model.backbone.input_norm_mode == "object"
    result = export_model(path, out=tmp_path / "repo", max_batch=MAX_BATCH)
    assert all(v <= TOL for v in result.diffs.values())
    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    names = ["cluster_id", "probs"]
    ids, probs = session.run(names, {"input": real_batch})
    inverted_ids, inverted_probs = session.run(names, {"input": 255 - real_batch})
    assert inverted_ids.tolist() == ids.tolist()
    np.testing.assert_allclose(inverted_probs, probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs, _torch_probs(path, real_batch), atol=TOL, rtol=0)
    # nearly flat, bright images (16 grey levels of contrast), where the normalisation
    # divides by a small deviation: the graph agrees with PyTorch there too
    faint = (240 + real_batch // 16).astype(np.uint8)
    (faint_probs,) = session.run(["probs"], {"input": faint})
    np.testing.assert_allclose(faint_probs, _torch_probs(path, faint), atol=TOL, rtol=0)


def test_an_export_whose_graph_disagrees_is_refused(tiny_model, tmp_path, monkeypatch):
    """A graph whose Mahalanobis factor is off by 1 % fails the numpy check: nothing written."""
    import cdc_serve.served_graph as served_graph

    exact = served_graph.mahalanobis_factor
    monkeypatch.setattr(served_graph, "mahalanobis_factor", lambda p: exact(p) * 1.01)
    with pytest.raises(
        CDCError, match="served 'ood_score' differs from numpy.*nothing was written"
    ):
        export_model(tiny_model, out=tmp_path / "repo", max_batch=MAX_BATCH)
    assert not (tmp_path / "repo").exists()


def test_export_cli_prints_the_difference(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "max |probs_onnxruntime - probs_torch|" in result.output
    assert "every output checked" in result.output and "ood_score" in result.output
    config = (tmp_path / "r" / "cdc" / "config.pbtxt").read_text()
    assert "kind: KIND_AUTO" in config and "TYPE_UINT8" in config


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

        inp = httpclient.InferInput("input", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        via_http = http.infer("cdc", [inp]).as_numpy("probs")

        ginp = grpcclient.InferInput("input", list(x.shape), "UINT8")
        ginp.set_data_from_numpy(x)
        via_grpc = grpc.infer("cdc", [ginp]).as_numpy("probs")

        via_curl = curl_infer(server.http_url, "cdc", x)["probs"]

        for got in (via_http, via_grpc, via_curl):
            assert got.shape == (n, 10)
            np.testing.assert_allclose(got, expected_ort, atol=TOL, rtol=0)
            np.testing.assert_allclose(got, expected_torch, atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.triton
def test_curl_gets_the_whole_answer_from_cdc_serve_serve_of_the_default_export(
    tiny_model, tmp_path, triton_binary
):
    """`cdc-serve export` (no --backend: onnxruntime), `cdc-serve serve` on the pip server,
    and a plain curl JSON request for 8 real test images: cluster_id, confidence, ood and
    ood_score equal the local Client's on the same images."""
    from cdc_serve.client import Client
    from cdc_serve.idx import read_idx

    repo = tmp_path / "repo"
    done = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(repo), "--name", "fmnist"])  # fmt: skip
    assert done.exit_code == 0, done.output
    images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")[:8]
    with Client(model=repo / "fmnist") as local:
        expected = local.predict(images)
    names = ("cluster_id", "confidence", "ood", "ood_score")
    with CliServe(repo) as serve:
        assert "fmnist: configured for the onnxruntime backend" in serve.output(), serve.output()
        got = curl_infer(serve.http_url, "fmnist", images[:, None], outputs=names)
    assert {k: v.shape for k, v in got.items()} == {n: (8, 1) for n in names}
    assert got["cluster_id"].ravel().tolist() == [p.cluster_id for p in expected]
    assert got["ood"].ravel().tolist() == [p.ood for p in expected]
    for name in ("confidence", "ood_score"):
        want = [getattr(p, name) for p in expected]
        np.testing.assert_allclose(got[name].ravel(), want, rtol=0, atol=1e-5, err_msg=name)
