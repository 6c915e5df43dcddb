"""`cdc-serve serve --poll` picks up a new version mid-run, and a request the server
refuses becomes error rows with Triton's reason while the run goes on (real tritonserver).
"""

from __future__ import annotations

import csv
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import CliServe, make_tiny_repository

from cdc_serve.client import Client
from cdc_serve.predict import predict
from cdc_serve.serve import TritonServer

pytestmark = [pytest.mark.slow, pytest.mark.triton]

MAX_BATCH = 16
N = 3000


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _answers(model_dir: Path, x: np.ndarray) -> tuple[list[int], np.ndarray]:
    with Client(model=model_dir) as local:
        preds = local.predict(x)
    return [p.cluster_id for p in preds], np.array([p.ood_score for p in preds])


def _index(http_url: str, timeout: float = 60) -> dict[str, str]:
    """The versions of "cdc" and their states, once none is still UNLOADING (the old
    version drains its last requests after the new one is READY)."""
    request = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}")
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(request, timeout=10) as r:
            states = {m["version"]: m["state"] for m in json.load(r) if m["name"] == "cdc"}
        if "UNLOADING" not in states.values() or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_version_exported_mid_run_is_served_and_no_row_is_lost(tmp_path, triton_binary, protocol):
    """The default export (onnxruntime backend, shadowed on the pip server) served with
    --poll; version 2 is exported while `predict --url` scores 3,000 images without
    retries (any failed request would stop the run): every row arrives, each answered by
    version 1 or 2, and the run ends on version 2."""
    repo = tmp_path / "repo"
    make_tiny_repository(repo, "cdc", backend="onnxruntime", max_batch=MAX_BATCH, seed=0)
    x = np.random.default_rng(4).integers(0, 256, (N, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    old = _answers(repo / "cdc" / "1", x)
    out, exported_at = tmp_path / "p.csv", []

    with CliServe(repo, "--poll", "--poll-interval", "0.5") as serve:
        assert "watching" in serve.output(), serve.output()

        def during_the_run(written: int) -> None:
            if not exported_at:
                make_tiny_repository(
                    repo, "cdc", backend="onnxruntime", max_batch=MAX_BATCH, seed=1
                )
                exported_at.append(written)
            if written >= N - 4 * MAX_BATCH * 4:  # the last chunks: only once v2 serves
                assert serve.wait_for("reloaded cdc: serving version 2", timeout=120), (
                    serve.output()
                )
            time.sleep(0.03)  # a run of a few seconds, so that the switch falls inside it

        url = serve.grpc_url if protocol == "grpc" else serve.http_url
        summary = predict([tmp_path / "x.npy"], url=url, protocol=protocol, model_name="cdc",
                          output=out, batch_size=MAX_BATCH, retries=0, on_chunk=during_the_run)  # fmt: skip
        assert _index(serve.http_url) == {"1": "UNAVAILABLE", "2": "READY"}
    new = _answers(repo / "cdc" / "2", x)
    assert summary.n == N and summary.n_errors == 0
    rows = _rows(out)
    assert [r["source"] for r in rows] == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(N)]
    score = np.array([float(r["ood_score"]) for r in rows])
    by_old = np.isclose(score, old[1], rtol=0, atol=1e-5)
    by_new = np.isclose(score, new[1], rtol=0, atol=1e-5)
    assert (by_old | by_new).all()  # every row is one version's answer
    assert by_old[: exported_at[0]].all() and by_new[-4 * MAX_BATCH :].all()
    assert [int(r["cluster_id"]) for r in rows[-64:]] == new[0][-64:]


def _other_model(repo: Path, change: str) -> None:
    """A model "tiny" that takes another input than the one the client was bound to."""
    if change == "shape":
        from tiny_export import write_tiny_graph

        from cdc_serve.triton import add_model_version

        path, meta = write_tiny_graph(repo.parent / "src9" / "model.onnx", size=(9, 9))
        add_model_version(repo, "tiny", path, meta.to_dict(), "python", MAX_BATCH)
    else:  # datatype: an export of the previous format takes float32
        make_tiny_repository(repo, "tiny", max_batch=MAX_BATCH, format_version=1)


@pytest.mark.parametrize("change", ["shape", "datatype"])
def test_a_refused_request_gives_error_rows_and_the_run_goes_on(tmp_path, triton_server, change):
    """The server is replaced mid-run by one whose model takes another shape (datatype):
    each refused request's rows carry Triton's reason as one line; the run finishes."""
    make_tiny_repository(tmp_path / "a", "tiny", max_batch=MAX_BATCH)
    _other_model(tmp_path / "b", change)
    server = triton_server(tmp_path / "a")
    np.save(tmp_path / "x.npy", np.zeros((400, 8, 8), np.uint8))
    replaced: list[TritonServer] = []

    def replace_once(written: int) -> None:
        if not replaced:
            server.stop()
            replaced.append(TritonServer(tmp_path / "b", http_port=server.http_port,
                                         grpc_port=server.grpc_port, metrics_port=server.metrics_port,
                                         binary=server.binary).start().wait_ready())  # fmt: skip

    try:
        summary = predict([tmp_path / "x.npy"], url=server.grpc_url, protocol="grpc",
                          model_name="tiny", output=tmp_path / "p.csv", batch_size=MAX_BATCH,
                          on_chunk=replace_once)  # fmt: skip
    finally:
        for s in replaced:
            s.stop()
    rows = _rows(tmp_path / "p.csv")
    first = 4 * MAX_BATCH  # one chunk: batch x concurrency
    assert summary.n == 400 and summary.n_errors == 400 - first
    assert all(r["error"] == "" for r in rows[:first])
    errors = {r["error"] for r in rows[first:]}
    assert len(errors) >= 1 and all("\n" not in e and "request rejected" in e for e in errors)
    # Triton's own words: the shape, or (previous format) the outputs and datatype it has
    expected = ("unexpected shape",) if change == "shape" else ("expects 'FP32'", "unexpected inference output")  # fmt: skip
    assert all(any(text in e for text in expected) for e in errors), errors
    assert summary.first_error in errors and "refused requests" in summary.format()


def test_a_new_version_that_fails_to_load_is_one_line_and_the_old_one_serves(
    tmp_path, triton_binary
):
    repo = tmp_path / "repo"
    make_tiny_repository(repo, "cdc", max_batch=MAX_BATCH)
    with CliServe(repo, "--poll", "--poll-interval", "0.5") as serve:
        broken = make_tiny_repository(repo, "cdc", max_batch=MAX_BATCH, seed=1)
        (broken / "model.py").write_text("raise RuntimeError('deliberately broken v2')\n")
        assert serve.wait_for("error: Triton could not load model 'cdc'", timeout=60), (
            serve.output()
        )
        (line,) = [x for x in serve.lines if x.startswith("error:")]
        assert "RuntimeError: deliberately broken v2" in line and "importlib" not in line
        assert "the versions served before stay served" in line
        assert _index(serve.http_url)["1"] == "READY"
