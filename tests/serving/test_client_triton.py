"""Client and predict against a real Triton server (python backend): parity and restarts.

The server is the real ``tritonserver`` (the nvidia-pytriton binary or one on PATH),
started by the ``triton_server`` fixture of conftest.py on loopback ports. Parity is
checked for exports of the current format (the answer computed in the graph) and of the
previous one (float input; the client computes the answer), on 1,000 real
Fashion-MNIST test images.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_onnx
from tiny_export import (
    EMBEDDING_DIM,
    NUM_CLASSES,
    PREVIOUS_FORMAT,
    RENAMED,
    make_renamed_export,
    tiny_modelmeta,
    write_tiny_graph,
)

from cdc_serve import CDCError
from cdc_serve.client import META_PARAMETER, Client
from cdc_serve.idx import read_idx
from cdc_serve.modelmeta import FORMAT_VERSION, find_model
from cdc_serve.predict import predict
from cdc_serve.shm import SharedInput, SharedMemoryUnavailable
from cdc_serve.triton import add_model_version, meta_parameters

pytestmark = [pytest.mark.slow, pytest.mark.triton]

MAX_BATCH = 16
FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def build_repository(
    root: Path,
    with_full_meta: bool,
    name: str = "cdc",
    format_version: int = FORMAT_VERSION,
    size: tuple[int, int] = (8, 8),
) -> Path:
    """A Triton repository with the tiny model (python backend) and its local copy."""
    onnx_path, meta = write_tiny_graph(root / f"src-{name}" / "model.onnx", size=size, seed=7,
                                       format_version=format_version)  # fmt: skip
    params = meta_parameters(meta.to_dict())  # carries the whole metadata as META_PARAMETER
    assert META_PARAMETER in params
    if not with_full_meta:  # a repository written by another tool: per-field parameters only
        del params[META_PARAMETER]
    add_model_version(root / "repo", name, onnx_path, meta.to_dict(), "python", MAX_BATCH,
                      parameters=params)  # fmt: skip
    return root / "repo"


@pytest.fixture(scope="module")
def served(tmp_path_factory, triton_server):
    """ "cdc" (current format, 8x8), "renamed" (previous format, tensors renamed) and the
    1x28x28 "fmnist" (current) and "fmnist_previous" (previous format) models."""
    root = tmp_path_factory.mktemp("triton")
    repo = build_repository(root, with_full_meta=True)
    make_renamed_export(repo)  # model "renamed": tensors not called input/probs/embedding
    build_repository(root, True, "fmnist", size=(28, 28))
    build_repository(root, True, "fmnist_previous", PREVIOUS_FORMAT, size=(28, 28))
    server = triton_server(repo)
    yield repo, server
    server.stop()


def fashion_mnist(n: int) -> np.ndarray:
    if not FMNIST_TEST.is_file():
        pytest.skip(f"{FMNIST_TEST} is missing (apt-get install dataset-fashion-mnist)")
    return read_idx(FMNIST_TEST)[:n]


def assert_same_predictions(got: list, ref: list, tolerance: float = 1e-5) -> None:
    """Ids, flags and rejections equal; confidence, ood_score and probs within ``tolerance``."""
    for key in ("source", "error", "cluster_id", "ood", "rejected"):
        assert [getattr(p, key) for p in got] == [getattr(p, key) for p in ref], key
    for key in ("confidence", "ood_score", "probs"):
        np.testing.assert_allclose([getattr(p, key) for p in got], [getattr(p, key) for p in ref],
                                   rtol=0, atol=tolerance, err_msg=key)  # fmt: skip


@pytest.mark.parametrize("model", ["fmnist", "fmnist_previous"])
def test_local_http_grpc_identical_on_1000_fashion_mnist_images(served, model):
    """The same 1,000 real test images through onnxruntime in process, HTTP and gRPC, for an
    export of the current format and one of the previous format (float input)."""
    repo, server = served
    batch = fashion_mnist(1000)
    with Client(model=repo / model) as local:
        assert local.meta.scores_in_graph == (model == "fmnist")
        ref = local.predict(batch, return_probs=True)
    assert 0 < sum(p.ood for p in ref) < len(ref) and sum(p.rejected for p in ref) > 0
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        for shared_memory in ("auto", "none"):
            with Client(url=url, protocol=protocol, model_name=model,
                        shared_memory=shared_memory) as remote:  # fmt: skip
                assert remote.meta.format_version == local.meta.format_version
                got = remote.predict(batch, return_probs=True)
            assert_same_predictions(got, ref)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8)).astype(np.uint8)


def test_local_http_grpc_give_identical_results(served):
    repo, server = served
    batch = images(100, seed=1)  # more than one max batch: requests are split and sent concurrently
    results = {}
    with Client(model=repo / "cdc") as local:
        results["local"] = local.predict(batch, return_probs=True)
        local_meta = local.meta
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with Client(url=url, protocol=protocol, model_name="cdc", concurrency=4) as remote:
            assert remote.meta.ood == local_meta.ood  # the full metadata came from the server
            assert remote.batch_size == MAX_BATCH
            results[protocol] = remote.predict(batch, return_probs=True)
    ref = results["local"]
    for protocol in ("http", "grpc"):
        got = results[protocol]
        assert [p.cluster_id for p in got] == [p.cluster_id for p in ref]
        np.testing.assert_allclose(
            [p.confidence for p in got], [p.confidence for p in ref], atol=1e-5
        )
        np.testing.assert_allclose([p.probs for p in got], [p.probs for p in ref], atol=1e-5)
        np.testing.assert_allclose([p.ood_score for p in got], [p.ood_score for p in ref],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        assert [p.ood for p in got] == [p.ood for p in ref]
        assert [p.rejected for p in got] == [p.rejected for p in ref]


def _our_regions(server) -> tuple[list[str], list[Path]]:
    """Shared-memory regions of this process: registered with the server, and in /dev/shm."""
    import tritonclient.http as tc

    prefix = f"cdc-serve-{os.getpid()}-"
    client = tc.InferenceServerClient(server.http_url)
    try:
        status = client.get_system_shared_memory_status()
    finally:
        client.close()
    names = sorted(r["name"] for r in status if r["name"].startswith(prefix))
    return names, sorted(Path("/dev/shm").glob(prefix + "*"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shared_memory_requests_match_in_message_ones_and_leave_nothing(served, protocol):
    repo, server = served
    url = server.http_url if protocol == "http" else server.grpc_url
    batch = images(100, seed=6)  # 7 requests of at most 16 images from 4 threads
    with Client(url=url, protocol=protocol, shared_memory="none", concurrency=4) as plain:
        ref = plain.predict(batch, return_probs=True)
        assert _our_regions(server) == ([], [])
    for mode in ("auto", "system"):  # auto: the server is on loopback
        with Client(url=url, protocol=protocol, shared_memory=mode, concurrency=4) as client:
            got = client.predict(batch, return_probs=True)
            names, files = _our_regions(server)
            assert 1 <= len(names) <= 4, names  # one region per worker thread
            assert [f.name for f in files] == names
        assert _our_regions(server) == ([], [])  # unregistered and unlinked on close
        assert [p.cluster_id for p in got] == [p.cluster_id for p in ref]
        np.testing.assert_allclose([p.probs for p in got], [p.probs for p in ref], atol=1e-6)
        np.testing.assert_allclose([p.ood_score for p in got], [p.ood_score for p in ref],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_region_the_server_cannot_open_is_refused_and_freed(served):
    """The server really refuses a key it cannot open (as for a client on another host)."""
    import tritonclient.http as tc

    _, server = served

    class KeyElsewhere:  # a real client that registers a key the server cannot find
        def __init__(self, real):
            self.real = real

        def register_system_shared_memory(self, name, key, nbytes):
            return self.real.register_system_shared_memory(name, key + "-elsewhere", nbytes)

    real = tc.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(SharedMemoryUnavailable, match="server cannot open"):
            SharedInput(KeyElsewhere(real), tc, 4096)
    finally:
        real.close()
    assert _our_regions(server) == ([], [])


def test_predict_over_both_protocols_matches_local(served, tmp_path):
    repo, server = served
    np.save(tmp_path / "x.npy", images(70, seed=2))
    outputs = {}
    for name, kwargs in (
        ("local", {"model": repo / "cdc"}),
        ("http", {"url": server.http_url, "protocol": "http"}),
        ("grpc", {"url": server.grpc_url, "protocol": "grpc"}),
    ):
        out = tmp_path / f"{name}.csv"
        predict([tmp_path / "x.npy"], output=out, batch_size=8, **kwargs)
        with open(out, newline="") as f:
            outputs[name] = list(csv.DictReader(f))
    for name in ("http", "grpc"):
        assert [r["cluster_id"] for r in outputs[name]] == [
            r["cluster_id"] for r in outputs["local"]
        ]
        diff = [abs(float(a["confidence"]) - float(b["confidence"]))
                for a, b in zip(outputs[name], outputs["local"], strict=True)]  # fmt: skip
        assert max(diff) <= 1e-5


def test_metadata_without_the_full_parameter(tmp_path, triton_server):
    """Only the per-field parameters: predictions still match, OOD falls back to msp."""
    repo = build_repository(tmp_path, with_full_meta=False)
    server = triton_server(repo)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            remote = Client(url=server.http_url, model_name="cdc")
        assert any("no OOD parameters" in str(w.message) for w in caught)
        with remote, Client(model=repo / "cdc") as local:
            assert remote.meta.input_size == local.meta.input_size and remote.ood.name == "msp"
            batch = images(20, seed=3)
            assert [p.cluster_id for p in remote.predict(batch)] == [
                p.cluster_id for p in local.predict(batch)
            ]
        # A local copy of the metadata restores the fitted OOD score.
        _, meta = find_model(repo / "cdc")
        with Client(url=server.grpc_url, protocol="grpc", meta=meta) as remote:
            assert remote.ood.name == meta.ood["default"]
    finally:
        server.stop()


def test_tensor_names_come_from_the_metadata(served):
    """Over both protocols the client asks for the tensors ``meta.outputs`` names."""
    repo, server = served
    batch = images(20, seed=5)
    with Client(model=repo / "renamed") as local:
        assert local.meta.outputs == (RENAMED["probs"], RENAMED["embedding"])
        expected = local.predict(batch, return_probs=True)
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with Client(url=url, protocol=protocol, model_name="renamed") as remote:
            assert remote.meta.input_name == RENAMED["input"]
            got = remote.predict(batch, return_probs=True)
        np.testing.assert_allclose([p.probs for p in got], [p.probs for p in expected], atol=1e-5)
        np.testing.assert_allclose([p.ood_score for p in got],
                                   [p.ood_score for p in expected], rtol=1e-4, atol=1e-5)  # fmt: skip
    # metadata naming tensors the served model does not have: one clear error, up front
    with pytest.raises(CDCError, match="does not match its metadata.*expected input 'input'"):
        Client(url=server.http_url, model_name="renamed", meta=tiny_modelmeta())


def test_unknown_model_is_a_clear_error(served):
    _, server = served
    with pytest.raises(CDCError, match="model 'nope'.*not ready.*cdc"):
        Client(url=server.http_url, model_name="nope")


def _restart_later(server, delay: float, started: list) -> threading.Thread:
    """Start a fresh server on the same ports after ``delay`` seconds (in a thread)."""
    from cdc_serve.serve import TritonServer

    def run() -> None:
        threading.Event().wait(delay)
        again = TritonServer(server.repository, http_port=server.http_port,
                             grpc_port=server.grpc_port, metrics_port=server.metrics_port,
                             binary=server.binary)  # fmt: skip
        started.append(again)
        again.start()
        again.wait_ready()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _sources(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["source"] for r in csv.DictReader(f)]


def test_an_idle_client_registers_its_region_again_after_restart(tmp_path, triton_server):
    """The new server does not know the old region (404): the retry registers a fresh one."""
    repo = build_repository(tmp_path, with_full_meta=True)
    server = triton_server(repo)
    batch = images(40, seed=7)
    started: list = []
    try:
        with Client(url=server.grpc_url, protocol="grpc", model_name="cdc", concurrency=1,
                    backoff=0.1, shared_memory="system") as client:  # fmt: skip
            before = client.predict(batch, return_probs=True)
            old = _our_regions(server)[0]
            server.stop()
            _restart_later(server, 0.0, started).join(timeout=180)
            assert started and _our_regions(started[0])[0] == []  # the new server knows none
            after = client.predict(batch, return_probs=True)
            new = _our_regions(started[0])[0]
            assert len(new) == 1 and new != old
        np.testing.assert_allclose([p.probs for p in after], [p.probs for p in before])
        assert _our_regions(started[0]) == ([], [])
    finally:
        for s in started:
            s.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_restart_mid_run_loses_no_row(tmp_path, triton_server, protocol):
    """The server stops after the first chunk and comes back: the run retries and finishes."""
    repo = build_repository(tmp_path, with_full_meta=True)
    server = triton_server(repo)
    n = 3000
    np.save(tmp_path / "x.npy", images(n, seed=4))
    out = tmp_path / "p.csv"
    started: list = []
    threads: list[threading.Thread] = []

    def stop_once(written: int) -> None:
        if not threads:
            server.stop()
            threads.append(_restart_later(server, 1.0, started))

    url = server.http_url if protocol == "http" else server.grpc_url
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = predict([tmp_path / "x.npy"], url=url, protocol=protocol,
                              model_name="cdc", output=out, batch_size=MAX_BATCH,
                              on_chunk=stop_once)  # fmt: skip
        assert threads and started, "the server was never restarted"
        # the shared-memory regions were registered again with the new server, not given up
        assert not [w for w in caught if "shared memory" in str(w.message)]
        assert summary.n == n and summary.n_errors == 0
        assert _sources(out) == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(n)]
    finally:
        for thread in threads:
            thread.join(timeout=180)
        for s in started:
            s.stop()


def test_server_down_stops_with_clear_error_then_resume_completes(tmp_path, triton_server):
    repo = build_repository(tmp_path, with_full_meta=True)
    server = triton_server(repo)
    n = 3000
    np.save(tmp_path / "x.npy", images(n, seed=5))
    out = tmp_path / "p.csv"
    partial = Path(f"{out}.partial")

    def stop_after_two(written: int) -> None:
        if written >= 2 * 4 * MAX_BATCH and server.process.poll() is None:
            server.stop()

    kwargs = {"url": server.http_url, "protocol": "http", "model_name": "cdc",
              "output": out, "batch_size": MAX_BATCH}  # fmt: skip
    with pytest.raises(
        CDCError, match=r"failed .* times.*rows are kept in .*p\.csv\.partial.*--resume"
    ):
        predict([tmp_path / "x.npy"], on_chunk=stop_after_two, retries=2, **kwargs)
    assert not out.exists() and 0 < len(_sources(partial)) < n

    from cdc_serve.serve import TritonServer

    again = TritonServer(repo, http_port=server.http_port, grpc_port=server.grpc_port,
                         metrics_port=server.metrics_port, binary=server.binary)  # fmt: skip
    again.start().wait_ready()
    try:
        summary = predict([tmp_path / "x.npy"], resume=True, **kwargs)
    finally:
        again.stop()
    assert summary.n == n and summary.n_resumed > 0 and summary.n_errors == 0
    assert _sources(out) == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(n)]
    with open(out, newline="") as f:
        assert all(r["cluster_id"] != "" for r in csv.DictReader(f))
    assert json.loads(json.dumps(summary.to_dict()))["n"] == n


def test_full_size_ood_parameters_travel_over_both_protocols(tmp_path, triton_server):
    """A ResNet-sized embedding (512-d) makes the metadata megabytes: it still arrives whole."""
    from cdc_serve.ood import fit_ood

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 512)).astype(np.float32)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=3000).astype(np.float32)
    big = fit_ood(emb, probs)
    onnx_path = make_tiny_onnx(tmp_path / "src" / "model.onnx", num_classes=NUM_CLASSES,
                               embedding_dim=EMBEDDING_DIM)  # fmt: skip
    meta = tiny_modelmeta(ood=big, format_version=PREVIOUS_FORMAT)  # the graph is a bare core
    text = meta.to_json()
    assert 1_000_000 < len(text) < 5_000_000
    params = {**meta_parameters(meta.to_dict()), META_PARAMETER: text}
    add_model_version(tmp_path / "repo", "cdc", onnx_path, meta.to_dict(), "python", MAX_BATCH,
                      parameters=params)  # fmt: skip
    server = triton_server(tmp_path / "repo")
    try:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with Client(url=url, protocol=protocol, model_name="cdc") as remote:
                assert remote.meta.ood == big and remote.ood.name == big["default"]
    finally:
        server.stop()
