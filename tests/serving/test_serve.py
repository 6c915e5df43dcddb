"""A real tritonserver (the pip-installed one, python backend) serving a tiny ONNX model.

HTTP and gRPC (tritonclient) and a plain curl JSON request must return what
onnxruntime computes in-process (uint8 images in; every output, the per-image ones as
``[N, 1]``); the server must listen on loopback only.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CliServe, curl_infer, make_tiny_repository

from cdc_serve import CDCError
from cdc_serve.serve import TritonServer, check_repository, free_port

MAX_BATCH = 16
BATCH_SIZES = (1, 7, MAX_BATCH)
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tmp_path_factory, triton_server):
    """One server for the module: model "tiny" with versions 1 and 2 (2 is served), and
    "tiny_batching" whose dynamic batcher waits up to 2 s so concurrent requests get merged."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    make_tiny_repository(repo, "tiny", max_batch=MAX_BATCH, seed=0, instance_kind="KIND_CPU")
    latest = make_tiny_repository(
        repo, "tiny", max_batch=MAX_BATCH, seed=1, instance_kind="KIND_CPU"
    )
    batching = make_tiny_repository(
        repo,
        "tiny_batching",
        max_batch=MAX_BATCH,
        seed=2,
        instance_kind="KIND_CPU",
        max_queue_delay_us=2_000_000,
    )
    server = triton_server(repo)
    yield {
        "server": server,
        "repo": repo,
        "tiny": ort.InferenceSession(
            str(latest / "model.onnx"), providers=["CPUExecutionProvider"]
        ),
        "tiny_batching": ort.InferenceSession(
            str(batching / "model.onnx"), providers=["CPUExecutionProvider"]
        ),
    }
    server.stop()


OUTPUTS = ("cluster_id", "confidence", "ood_score", "ood", "probs", "embedding")


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 1, 8, 8)).astype(np.uint8)


def reference(session: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, embedding = session.run(["probs", "embedding"], {"input": x})
    return probs, embedding


def assert_same_answer(got: dict[str, np.ndarray], session, x: np.ndarray) -> None:
    """Every output as in-process onnxruntime computes it (per-image ones come as [N, 1])."""
    expected = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"input": x}), strict=True))
    for name in ("cluster_id", "ood"):
        assert got[name].shape == (len(x), 1)
        assert got[name].ravel().tolist() == expected[name].tolist()
    for name in ("confidence", "ood_score", "probs", "embedding"):
        want = expected[name].reshape(got[name].shape)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=TOLERANCE)


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ----------------------------------------------------------------------------- inference


@pytest.mark.slow
@pytest.mark.triton
def test_health_ready_and_latest_version_served(served):
    server = served["server"]
    assert http_get(f"http://{server.http_url}/v2/health/ready") == 200
    assert http_get(f"http://{server.http_url}/v2/models/tiny/ready") == 200
    assert http_get(f"http://{server.http_url}/v2/models/tiny/versions/2/ready") == 200
    assert http_get(f"http://{server.http_url}/v2/models/tiny/versions/1/ready") != 200
    assert server.start_seconds is not None and server.start_seconds > 0
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_http_inference_matches_onnxruntime(served, batch):
    import tritonclient.http as httpclient

    x = images(batch, seed=batch)
    client = httpclient.InferenceServerClient(served["server"].http_url)
    inp = httpclient.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("tiny", [inp])
    assert result.get_response()["model_version"] == "2"
    assert_same_answer({n: result.as_numpy(n) for n in OUTPUTS}, served["tiny"], x)
    assert result.as_numpy("probs").shape == (batch, 5)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_grpc_inference_matches_onnxruntime(served, batch):
    import tritonclient.grpc as grpcclient

    x = images(batch, seed=100 + batch)
    client = grpcclient.InferenceServerClient(served["server"].grpc_url)
    inp = grpcclient.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    result = client.infer("tiny", [inp])
    assert_same_answer({n: result.as_numpy(n) for n in OUTPUTS}, served["tiny"], x)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_curl_json_inference_matches_onnxruntime(served, batch, tmp_path):
    x = images(batch, seed=200 + batch)
    got = curl_infer(served["server"].http_url, "tiny", x, outputs=OUTPUTS)
    assert got["probs"].shape == (batch, 5)
    assert_same_answer(got, served["tiny"], x)


@pytest.mark.slow
@pytest.mark.triton
def test_batch_above_max_is_refused(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    x = images(MAX_BATCH + 1)
    client = httpclient.InferenceServerClient(served["server"].http_url)
    inp = httpclient.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="batch"):
        client.infer("tiny", [inp])


@pytest.mark.slow
@pytest.mark.triton
def test_concurrent_requests_are_batched_and_split_back(served):
    """Requests merged by the dynamic batcher run as one onnxruntime call in model.py and
    must come back to their own senders, row for row."""
    import tritonclient.http as httpclient

    server = served["server"]
    sizes = [1, 3, 2, 5, 1, 4]

    def stats() -> tuple[int, int]:
        with urllib.request.urlopen(
            f"http://{server.http_url}/v2/models/tiny_batching/stats", timeout=5
        ) as r:
            s = json.load(r)["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    def send(i: int) -> tuple[np.ndarray, np.ndarray]:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            x = images(sizes[i], seed=300 + i)
            inp = httpclient.InferInput("input", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            return x, client.infer("tiny_batching", [inp]).as_numpy("probs")
        finally:
            client.close()  # in this thread: a client closed by the GC in another one warns

    inferences_before, executions_before = stats()
    with concurrent.futures.ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(send, range(len(sizes))))
    # Triton updates its statistics after the responses go out: wait until they settle.
    for _ in range(100):
        inferences_after, executions_after = stats()
        if inferences_after - inferences_before >= sum(sizes):
            break
        time.sleep(0.1)
    for x, probs in results:
        np.testing.assert_allclose(probs, reference(served["tiny_batching"], x)[0], atol=TOLERANCE)
    assert inferences_after - inferences_before == sum(sizes)
    # The batcher waits up to 2 s for more requests (16 rows fill a batch at once):
    # six concurrent requests need fewer runs than six.
    assert executions_after - executions_before < len(sizes)


# ----------------------------------------------------------------------------- binding


def non_loopback_addresses() -> list[str]:
    """This machine's own non-loopback IP addresses (those a local socket can bind)."""
    found: set[str] = set()
    if shutil.which("hostname"):
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
        found.update(out.split())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # routing trick: no packet is sent, the kernel only picks the source address
            s.connect(("192.0.2.1", 9))
            found.add(s.getsockname()[0])
        except OSError:
            pass
    usable = []
    for text in sorted(found):
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
            continue
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((str(ip), 0))
            except OSError:
                continue
        usable.append(str(ip))
    return usable


def reachable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((host, port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.triton
def test_ports_bound_to_loopback_only(served):
    server = served["server"]
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to probe")
    ports = (server.http_port, server.grpc_port, server.metrics_port)
    for port in ports:
        assert reachable("127.0.0.1", port)
    # The probe itself works: a socket listening on the address is seen as reachable.
    with socket.socket(socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET) as control:
        control.bind((addresses[0], 0))
        control.listen()
        assert reachable(addresses[0], control.getsockname()[1])
    for address in addresses:
        for port in ports:
            assert not reachable(address, port), f"Triton port {port} is open on {address}"


# ----------------------------------------------------------------------------- errors and life cycle


def test_missing_or_empty_repository_is_a_clear_error(tmp_path):
    with pytest.raises(CDCError, match="does not exist"):
        check_repository(tmp_path / "nowhere")
    with pytest.raises(CDCError, match="holds no model"):
        check_repository(tmp_path)
    (tmp_path / "cdc" / "1").mkdir(parents=True)  # a model folder without config.pbtxt
    with pytest.raises(CDCError, match="holds no model"):
        TritonServer(tmp_path).start()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CDCError, match="not a folder"):
        check_repository(tmp_path / "file")


def test_cli_serve_reports_a_missing_repository(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cdc_serve.cli", "serve", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.triton
def test_model_that_fails_to_load_gives_the_log_tail(tmp_path, triton_binary):
    version = make_tiny_repository(tmp_path / "repo", "broken", instance_kind="KIND_CPU")
    (version / "model.py").write_text("raise RuntimeError('deliberately broken model.py')\n")
    make_tiny_repository(tmp_path / "repo", "fine", instance_kind="KIND_CPU")
    server = TritonServer(tmp_path / "repo", binary=triton_binary, startup_timeout=120)
    with pytest.raises(CDCError) as caught, server:
        pass
    assert server.process.poll() is not None
    # one line naming the model and Triton's reason, not the server's log and its tables
    message = str(caught.value)
    assert "\n" not in message and "+---" not in message and "'fine'" not in message
    assert "exited with status" in message
    assert (
        "model 'broken' version 1: Internal: RuntimeError: deliberately broken model.py" in message
    )
    assert str(server.log_path) in message


@pytest.mark.slow
@pytest.mark.triton
def test_busy_port_is_a_clear_error(tmp_path, triton_binary):
    make_tiny_repository(tmp_path / "repo", "tiny", instance_kind="KIND_CPU")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(CDCError, match=f"port {port} on 127.0.0.1 is already in use"):
            TritonServer(tmp_path / "repo", http_port=port, binary=triton_binary).start()


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_runs_until_signalled(tmp_path, triton_binary, stop_signal):
    repo = tmp_path / "repo"
    make_tiny_repository(repo, "tiny", instance_kind="KIND_CPU")
    with CliServe(repo) as serve:
        output = serve.output()
        assert f"http://127.0.0.1:{serve.http_port}" in output, output
        assert f"127.0.0.1:{serve.grpc_port}" in output
        assert "models:  tiny" in output
        assert "Python backend" not in output  # a python-backend model needs no shadow
        assert http_get(f"http://127.0.0.1:{serve.http_port}/v2/health/ready") == 200
        code = serve.stop(stop_signal)
    assert code == 0, serve.output()
    assert "stopped" in serve.output()
    assert not reachable("127.0.0.1", serve.http_port), "the server outlived cdc-serve serve"


@pytest.mark.slow
@pytest.mark.triton
def test_cli_serve_runs_onnxruntime_exports_through_the_python_backend(tmp_path, triton_binary):
    """The default export (onnxruntime backend) of both formats on the pip server: one line
    says so, nothing in the repository changes, and the answers are onnxruntime's."""
    repo = tmp_path / "repo"
    current = make_tiny_repository(repo, "tiny", backend="onnxruntime")
    previous = make_tiny_repository(repo, "old", backend="onnxruntime", format_version=1)
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    with CliServe(repo) as serve:
        output = serve.output()
        for name in ("tiny", "old"):
            assert (
                f"{name}: configured for the onnxruntime backend, which this tritonserver "
                "lacks; serving the same model.onnx through the Python backend" in output
            )
        x = images(5, seed=9)
        session = ort.InferenceSession(str(current / "model.onnx"), providers=["CPUExecutionProvider"])  # fmt: skip
        assert_same_answer(curl_infer(serve.http_url, "tiny", x, outputs=OUTPUTS), session, x)
        old = ort.InferenceSession(str(previous / "model.onnx"), providers=["CPUExecutionProvider"])  # fmt: skip
        xf = x.astype(np.float32) / 255
        got = curl_infer(serve.http_url, "old", xf, outputs=("probs",))["probs"]
        np.testing.assert_allclose(got, old.run(["probs"], {"input": xf})[0], atol=TOLERANCE)
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == before


def _backend_shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")}


@pytest.mark.slow
@pytest.mark.triton
def test_a_killed_server_leaves_no_python_backend_shared_memory(tmp_path, triton_binary):
    """An HTTP client keeps its connection open, so Triton's shutdown waits past stop()'s
    grace and the server is killed: the stub's shared memory is removed all the same."""
    import tritonclient.http as tc

    make_tiny_repository(tmp_path / "repo", "tiny", instance_kind="KIND_CPU")
    before = _backend_shm()
    server = TritonServer(tmp_path / "repo", binary=triton_binary).start().wait_ready()
    client = tc.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready()  # the keep-alive connection stays open
        assert len(_backend_shm() - before) == 1  # one region for the one model instance
        server.stop(timeout=1)
        assert server.process.returncode == -signal.SIGKILL  # it really was killed
    finally:
        client.close()
        server.stop()
    assert _backend_shm() - before == set()


@pytest.mark.slow
@pytest.mark.triton
def test_lost_port_race_is_retried(tmp_path, triton_binary, monkeypatch):
    """An automatically chosen port taken before Triton binds it: the server retries."""
    import cdc_serve.serve as serve_module

    make_tiny_repository(tmp_path / "repo", "tiny", instance_kind="KIND_CPU")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        handed_out = []

        def first_a_taken_port(host="127.0.0.1"):
            port = taken if not handed_out else free_port(host)
            handed_out.append(port)
            return port

        monkeypatch.setattr(serve_module, "free_port", first_a_taken_port)
        before = _backend_shm()
        with TritonServer(tmp_path / "repo", binary=triton_binary) as server:
            assert handed_out[0] == taken and server.http_port != taken
            assert server.is_ready()
        assert _backend_shm() - before == set()  # nor did the attempt that lost the port
