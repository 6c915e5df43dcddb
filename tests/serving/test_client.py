"""Client (local protocol), ModelMeta and find_model, against real onnxruntime on tiny models."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image
from tiny_export import (
    PREVIOUS_FORMAT,
    make_exported_model,
    reference_outputs,
    tiny_modelmeta,
    write_tiny_graph,
)

from cdc_serve import CDCError
from cdc_serve.client import Client, Prediction
from cdc_serve.modelmeta import FORMAT_VERSION, META_FILE, ModelMeta, find_model
from cdc_serve.ood import OODScorer
from cdc_serve.preprocess import normalise
from cdc_serve.shm import SharedInput, SharedMemoryUnavailable, is_loopback


@pytest.fixture(
    scope="module", params=[FORMAT_VERSION, PREVIOUS_FORMAT], ids=["current", "previous"]
)
def model_dir(request, tmp_path_factory):
    """An export of the current format (scores in the graph) and one of the previous format
    (float input, scores computed by the client): every test below runs on both."""
    return make_exported_model(tmp_path_factory.mktemp("repo"), format_version=request.param)


@pytest.fixture(scope="module")
def client(model_dir):
    with Client(model=model_dir, reject_below=0.5) as c:
        yield c


def images(n: int, seed: int = 0, shape=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.uint8)


# -- ModelMeta -----------------------------------------------------------------------------


def test_meta_round_trip(tmp_path):
    meta = tiny_modelmeta(3, (16, 12))
    back = ModelMeta.from_json(meta.to_json())
    assert back == meta and back.input_size == (16, 12)
    meta.write(tmp_path / META_FILE)
    assert ModelMeta.read(tmp_path / META_FILE) == meta
    data = json.loads(meta.to_json())
    assert data["format"] == "cdc-serve/export" and data["format_version"] == FORMAT_VERSION
    assert data["outputs"] == ["probs", "embedding"] and data["input_name"] == "input"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": FORMAT_VERSION + 1}, "newer"),
        ({"format": "something/else"}, "not a cdc-serve export"),
        ({"channels": 2}, "channels"),
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"std": [0.0]}, "std"),
        ({"num_classes": 1}, "num_classes"),
        ({"method": "dec"}, "method"),
        ({"input_size": [8]}, "input_size"),
    ],
)
def test_meta_validation(change, message):
    data = json.loads(tiny_modelmeta().to_json())
    data.update(change)
    with pytest.raises(CDCError, match=message):
        ModelMeta.from_dict(data)


def test_meta_missing_field_and_bad_json(tmp_path):
    data = json.loads(tiny_modelmeta().to_json())
    del data["embedding_dim"]
    with pytest.raises(CDCError, match="missing field.*embedding_dim"):
        ModelMeta.from_dict(data)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(CDCError, match="not valid JSON"):
        ModelMeta.read(tmp_path / META_FILE)


def test_find_model_paths(tmp_path):
    repo = tmp_path / "repo"
    make_exported_model(repo, version=1)
    model_dir = make_exported_model(repo, version=3, seed=1)
    onnx_path, meta = find_model(model_dir)
    assert onnx_path == model_dir / "3" / "model.onnx" and meta.version == 3
    assert find_model(model_dir / "1")[0] == model_dir / "1" / "model.onnx"
    assert find_model(model_dir / "1" / "model.onnx")[1].version == 1
    with pytest.raises(CDCError, match="model not found"):
        find_model(tmp_path / "nowhere")
    with pytest.raises(CDCError, match="no model found"):
        find_model(repo)
    (model_dir / "3" / META_FILE).unlink()
    with pytest.raises(CDCError, match="no cdc_meta.json"):
        find_model(model_dir)


def test_find_model_in_triton_repository(tmp_path):
    """A repository written by cdc_serve.triton.add_model_version (the export layout)."""
    from conftest import make_tiny_onnx

    from cdc_serve.triton import add_model_version

    onnx_path, meta = write_tiny_graph(tmp_path / "src.onnx")
    version_dir = add_model_version(
        tmp_path / "repo", "cdc", onnx_path, meta.to_dict(), "python", 8
    )
    previous = make_tiny_onnx(tmp_path / "v1.onnx", num_classes=5, embedding_dim=6)
    with pytest.raises(CDCError, match="format_version=2 in the metadata disagrees"):
        add_model_version(tmp_path / "repo", "cdc", previous, meta.to_dict(), "python", 8)
    found_onnx, found = find_model(tmp_path / "repo" / "cdc")
    assert found_onnx == version_dir / "model.onnx" and found.version == int(version_dir.name)
    with Client(model=tmp_path / "repo" / "cdc") as c:
        assert len(c.predict(images(3))) == 3


# -- local predictions -----------------------------------------------------------------------


def test_predict_matches_numpy_reference(client, model_dir):
    batch = images(20)
    preds = client.predict(batch, return_probs=True)
    x = normalise(batch[:, None], client.meta)
    probs, emb = reference_outputs(model_dir / "1" / "model.onnx", x)
    assert [p.cluster_id for p in preds] == list(probs.argmax(1))
    np.testing.assert_allclose([p.confidence for p in preds], probs.max(1), atol=1e-5)
    np.testing.assert_allclose(np.array([p.probs for p in preds]), probs, atol=1e-5)
    assert [p.rejected for p in preds] == list(probs.max(1) < 0.5)
    flags, scores = OODScorer(client.meta.ood).flags(emb, probs)
    np.testing.assert_allclose([p.ood_score for p in preds], scores, rtol=1e-4, atol=1e-4)
    assert all(p.error is None and p.source == f"[{i}]" for i, p in enumerate(preds))


def test_predict_arrays(client, model_dir):
    batch = images(7, seed=1)[:, None]
    x = client.model_input(batch)
    assert x.dtype == (np.uint8 if client.meta.scores_in_graph else np.float32)
    out = client.predict_arrays(x)
    probs, emb = reference_outputs(model_dir / "1" / "model.onnx", normalise(batch, client.meta))
    np.testing.assert_allclose(out["probs"], probs, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], emb, atol=1e-4)
    if client.meta.scores_in_graph:  # the graph's own answer, per image
        assert set(out) == {"cluster_id", "confidence", "ood_score", "ood", "probs", "embedding"}
        assert out["cluster_id"].dtype == np.int64 and out["ood"].dtype == np.bool_
        assert out["cluster_id"].tolist() == probs.argmax(1).tolist()
    else:
        assert set(out) == {"probs", "embedding"}
    empty = client.predict_arrays(x[:0])
    assert empty["probs"].shape == (0, 5) and empty["embedding"].shape == (0, 6)
    with pytest.raises(CDCError, match="N x 1 x 8 x 8"):
        client.predict_arrays(np.zeros((2, 3, 8, 8), x.dtype))
    wrong = np.float32 if client.meta.scores_in_graph else np.uint8
    with pytest.raises(CDCError, match="uint8 images" if wrong == np.float32 else "float"):
        client.predict_arrays(np.zeros((2, 1, 8, 8), wrong))


def test_current_format_reads_the_answer_from_the_graph(tmp_path):
    """The client takes cluster_id, confidence, ood_score and ood from the graph (sending
    uint8) and computes an OOD score only when another one than the model's is asked for."""
    model_dir = make_exported_model(tmp_path)
    batch = images(50, seed=9)
    with Client(model=model_dir) as c:
        graph = c.predict_arrays(batch[:, None])
        preds = c.predict(batch)
        assert c.reject_below == c.meta.reject_below == 0.8  # the model's default
    assert [p.cluster_id for p in preds] == graph["cluster_id"].tolist()
    assert [p.ood_score for p in preds] == graph["ood_score"].tolist()  # the very same floats
    assert [p.ood for p in preds] == graph["ood"].tolist()
    assert [p.rejected for p in preds] == (graph["confidence"] < 0.8).tolist()
    flags, scores = OODScorer(c.meta.ood).flags(graph["embedding"], graph["probs"])
    np.testing.assert_allclose(graph["ood_score"], scores, rtol=0, atol=1e-5)
    assert graph["ood"].tolist() == flags.tolist()
    with Client(model=model_dir, ood_score="knn", reject_below=0.3) as c:
        other = c.predict(batch)
    expected = OODScorer(c.meta.ood, "knn").score(graph["embedding"], graph["probs"])
    np.testing.assert_allclose([p.ood_score for p in other], expected, atol=1e-6)
    assert [p.rejected for p in other] == (graph["confidence"] < 0.3).tolist()


def test_every_input_kind_gives_the_same_answer(client, tmp_path):
    img = images(1, seed=5)[0]
    Image.fromarray(img).save(tmp_path / "a.png")
    items = [tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(img), img, img / 255.0]
    preds = client.predict(items)
    assert len({p.cluster_id for p in preds}) == 1
    assert max(p.confidence for p in preds) - min(p.confidence for p in preds) < 1e-6
    assert preds[0].source == str(tmp_path / "a.png") and preds[2].source == "[2]"
    # Batched arrays in every layout, and floats in 0..1.
    batch = images(4, seed=6)
    layouts = [batch, batch[:, None], batch[..., None], batch.astype(np.float32) / 255]
    results = [[p.cluster_id for p in client.predict(b)] for b in layouts]
    assert all(r == results[0] for r in results)


def test_bad_items_become_error_predictions(client, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    good = images(2, seed=2)
    preds = client.predict([good[0], tmp_path / "empty.png", good[1]], sources=["a", "b", "c"])
    assert [p.source for p in preds] == ["a", "b", "c"]
    assert preds[1].error and "empty file" in preds[1].error and preds[1].cluster_id is None
    alone = client.predict(good)
    assert preds[0].cluster_id == alone[0].cluster_id and preds[2].cluster_id == alone[1].cluster_id
    nan_batch = good.astype(np.float32)
    nan_batch[1, 0, 0] = np.nan
    preds = client.predict(nan_batch)
    assert preds[0].error is None and "NaN" in preds[1].error
    assert isinstance(preds[0], Prediction) and set(preds[0].to_dict()) >= {"cluster_id", "ood"}


def test_rgb_model_resizes(tmp_path):
    model_dir = make_exported_model(tmp_path, channels=3, size=(6, 5))
    with Client(model=model_dir) as c:
        preds = c.predict([images(1, shape=(20, 30, 3))[0], images(1, shape=(9, 9))[0]])
    assert all(p.error is None for p in preds)


def test_ood_score_choice(model_dir):
    with Client(model=model_dir, ood_score="msp") as c:
        p = c.predict(images(3), return_probs=True)
        assert c.ood.name == "msp"
        np.testing.assert_allclose(
            [x.ood_score for x in p], [1 - max(x.probs) for x in p], atol=1e-6
        )
    with pytest.raises(CDCError, match="not available"):
        Client(model=model_dir, ood_score="energy")


def test_constructor_errors(tmp_path):
    with pytest.raises(CDCError, match="needs a model"):
        Client()
    with pytest.raises(CDCError, match="model not found"):
        Client(model=tmp_path / "missing")
    with pytest.raises(CDCError, match="protocol must be one of local, http, grpc"):
        Client(model=tmp_path, protocol="carrier-pigeon")
    with pytest.raises(CDCError, match="reject_below"):
        Client(model=tmp_path, reject_below=2)
    with pytest.raises(CDCError, match="shared_memory must be one of auto, system, none"):
        Client(model=tmp_path, shared_memory="carrier-pigeon")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"garbage")
    tiny_modelmeta().write(tmp_path / "m" / META_FILE)
    with pytest.raises(CDCError, match="onnxruntime cannot load"):
        Client(model=tmp_path / "m")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_is_one_clear_error(protocol):
    url = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(CDCError, match=f"Triton server at {url}.*unreachable"):
        Client(url=url, protocol=protocol, timeout=5)


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("127.0.0.1:8001", True),
        ("localhost:8000", True),
        ("http://127.0.0.1:8000/", True),
        ("127.0.1.1:8001", True),
        ("[::1]:8001", True),
        ("::1", True),
        ("10.0.0.5:8001", False),
        ("triton.example.org:443", False),
        ("https://localhost.example.org:443", False),
    ],
)
def test_is_loopback(url, local):
    assert is_loopback(url) is local


def test_a_region_larger_than_half_the_free_shared_memory_is_refused_before_creation():
    # checked before any region exists or the server is asked (no client needed)
    with pytest.raises(SharedMemoryUnavailable, match="free"):
        SharedInput(client=None, module=None, nbytes=2**62)
