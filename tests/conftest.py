"""Shared pytest fixtures.

Triton helpers (used by tests/serving/test_serve.py and any test that needs a real server):

- ``make_tiny_onnx(path, ...)`` writes a small core ONNX graph (``input`` -> ``probs``,
  ``embedding``) without torch: Flatten -> MatMul -> Add gives the embedding, MatMul ->
  Add -> Softmax the probabilities; weights from a seed. It is the previous export
  format's graph; ``tests/serving/tiny_export.py`` wraps it into the current one.
- ``make_tiny_repository(repo, ...)`` adds a tiny model (current format by default) to a
  Triton repository with :func:`cdc_serve.triton.add_model_version` (python backend by
  default).
- fixture ``triton_binary``: the ``tritonserver`` to use; skips only where it cannot
  exist (not Linux x86-64).
- fixture ``triton_server``: a factory ``triton_server(repo, **kwargs) -> TritonServer``
  that starts a real server on free loopback ports and waits until it is ready; every
  server it started is stopped at the end of the session (stop one earlier with
  ``server.stop()``, e.g. at the end of a module-scoped fixture).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:  # the Hypothesis profiles "ci" (default) and "long", chosen by $HYPOTHESIS_PROFILE
    from fuzzing import register_profiles

    register_profiles()
except ImportError:  # hypothesis is not installed: only the fuzzed reader suites need it
    pass

TRITON_PLATFORM_OK = sys.platform.startswith("linux") and platform.machine().lower() in (
    "x86_64",
    "amd64",
)
TRITON_SKIP_REASON = (
    f"the tritonserver binary exists only for Linux x86-64 (nvidia-pytriton); "
    f"this is {sys.platform} {platform.machine()}"
)


def make_tiny_onnx(
    path: Path,
    num_classes: int = 5,
    input_chw: tuple[int, int, int] = (1, 8, 8),
    embedding_dim: int = 6,
    seed: int = 0,
) -> Path:
    """Write a small core graph (float32 normalised ``input`` -> ``probs``, ``embedding``;
    dynamic batch axis) to ``path``: the previous export format's graph, and what
    ``cdc_serve.served_graph.serving_graph`` wraps into the current one."""
    import onnx

    model = tiny_core_model(num_classes, input_chw, embedding_dim, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_core_model(
    num_classes: int = 5,
    input_chw: tuple[int, int, int] = (1, 8, 8),
    embedding_dim: int = 6,
    seed: int = 0,
):
    """The tiny core graph as an ``onnx.ModelProto`` (see :func:`make_tiny_onnx`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, h, w = input_chw
    weights = {
        "w_embed": rng.normal(0, 0.5, size=(c * h * w, embedding_dim)),
        "b_embed": rng.normal(0, 0.5, size=(embedding_dim,)),
        "w_cls": rng.normal(0, 0.5, size=(embedding_dim, num_classes)),
        "b_cls": rng.normal(0, 0.5, size=(num_classes,)),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_embed"], ["embed_raw"]),
        helper.make_node("Add", ["embed_raw", "b_embed"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w_cls"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "b_cls"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cdc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", embedding_dim]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.15
    onnx.checker.check_model(model)
    return model


def tiny_meta(num_classes: int = 5, input_chw: tuple[int, int, int] = (1, 8, 8)) -> dict[str, Any]:
    """A plain metadata dict for the tiny core graph (the previous format; tests that need
    the real ModelMeta pass their own)."""
    return {
        "format_version": 1,
        "num_classes": num_classes,
        "input_chw": list(input_chw),
        "preprocess": {
            "input_size": list(input_chw[1:]),
            "channels": input_chw[0],
            "mean": [0.5] * input_chw[0],
            "std": [0.25] * input_chw[0],
        },
        "project_version": "test",
    }


def make_tiny_repository(
    repo: Path,
    name: str = "tiny",
    backend: str = "python",
    max_batch: int = 16,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    format_version: int = 2,
    **config_kwargs: Any,
) -> Path:
    """Add a tiny model (weights from ``seed``) as a new version of ``repo/name``; returns its folder.

    ``format_version`` 2 (the default) is the current export: uint8 ``input`` and the
    whole answer out; 1 is the previous format, the bare core graph; both with a real
    ``cdc_meta.json`` whose OOD parameters are fitted on noise (``tiny_export.py``).
    """
    from tiny_export import write_tiny_graph

    from cdc_serve.triton import add_model_version

    repo = Path(repo)
    source = repo.parent / f".onnx-{name}-{seed}-v{format_version}" / "tiny.onnx"
    onnx_path, real = write_tiny_graph(source, seed=seed, format_version=format_version)
    meta = meta or real.to_dict()
    return add_model_version(repo, name, onnx_path, meta, backend, max_batch, **config_kwargs)


@pytest.fixture
def one_thread():
    """Torch on one thread: small convolutions run fastest so, above all on a busy 2-core
    machine (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def triton_binary():
    """The tritonserver binary (skips only where it cannot exist: not Linux x86-64)."""
    if not TRITON_PLATFORM_OK:
        pytest.skip(TRITON_SKIP_REASON)
    from cdc_serve.serve import find_tritonserver

    return find_tritonserver()


@pytest.fixture(scope="session")
def triton_server(triton_binary):
    """Factory: ``triton_server(repo, **kwargs)`` -> a started, ready TritonServer on loopback."""
    from cdc_serve.serve import TritonServer

    started: list[TritonServer] = []

    def start(repository: Path, **kwargs: Any) -> TritonServer:
        kwargs.setdefault("binary", triton_binary)
        server = TritonServer(repository, **kwargs)
        started.append(server)
        server.start()
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def curl_infer(
    http_url: str, model: str, x: np.ndarray, outputs: tuple[str, ...] = ("probs",)
) -> dict[str, np.ndarray]:
    """POST ``x`` as plain KServe-v2 JSON to ``/v2/models/<model>/infer`` with ``curl``
    (``x`` uint8 images for current exports, float32 for the previous format)."""
    import json
    import shutil
    import subprocess

    curl = shutil.which("curl")
    assert curl, "curl is needed for this test (apt-get install curl)"
    datatype = {"uint8": "UINT8", "float32": "FP32"}[str(x.dtype)]
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": datatype,
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": name} for name in outputs],
    }
    done = subprocess.run(
        [curl, "-sS", "--fail-with-body", "-X", "POST", "-H", "Content-Type: application/json",
         "--data-binary", "@-", f"http://{http_url}/v2/models/{model}/infer"],
        input=json.dumps(body), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    types = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}
    return {
        o["name"]: np.asarray(o["data"], dtype=types[o["datatype"]]).reshape(o["shape"])
        for o in json.loads(done.stdout)["outputs"]
    }


class CliServe:
    """``cdc-serve serve REPO [args]`` in a subprocess on free loopback ports.

    A context manager: on entry it waits until the command prints its model list (or
    exits: then ``process.returncode`` is set), on exit it sends SIGTERM and waits.
    A thread collects the output; :meth:`wait_for` waits until a line contains a text.
    """

    def __init__(self, repo: Path, *args: str, timeout: float = 180.0) -> None:
        from cdc_serve.serve import free_port

        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.http_port, self.grpc_port, self.metrics_port = sorted(ports)
        self.args = [str(repo), "--http-port", str(self.http_port), "--grpc-port",
                     str(self.grpc_port), "--metrics-port", str(self.metrics_port), *args]  # fmt: skip
        self.timeout = timeout
        self.lines: list[str] = []
        self.process = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float | None = None) -> bool:
        """True once a printed line contains ``text``; False if the command ended or time ran out."""
        import time

        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return True
            if self.process.poll() is not None and not self._reader.is_alive():
                return any(text in line for line in self.lines)
            time.sleep(0.05)
        return False

    def __enter__(self) -> CliServe:
        import subprocess
        import threading

        self.process = subprocess.Popen(
            [sys.executable, "-m", "cdc_serve.cli", "serve", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")), daemon=True
        )
        self._reader.start()
        self.wait_for("models:")
        return self

    def stop(self, sig: int | None = None) -> int:
        """Signal the command (SIGTERM by default), wait for it; its exit status."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if sig is None else sig)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        return self.process.returncode

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
