"""``cdc-serve predict --engine ray``: a real local Ray (2 CPUs) and real onnxruntime give the
local engine's rows, in the same order, in CSV and Parquet; the same summary; resume; and
one clear error without the ray extra.

One Ray is started for the module (``ray_cluster``); the engine finds it running and uses
it. ``test_cli_starts_and_stops_its_own_ray`` runs the command in a subprocess, where the
engine starts (and stops) a Ray of its own. The local engine decodes in this process
(``decode_workers=1``): a process with Ray's threads running should not fork workers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from folders import digit_folder
from predict_rows import assert_same_rows, typed_rows
from tiny_export import make_exported_model
from typer.testing import CliRunner

from cdc_serve import CDCError
from cdc_serve.cli import app
from cdc_serve.idx import read_idx
from cdc_serve.predict import predict

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_IMAGES = FMNIST / "t10k-images-idx3-ubyte.gz"
FMNIST_LABELS = FMNIST / "t10k-labels-idx1-ubyte.gz"
N_DIGITS = 30  # the folder's good files; it also holds 3 broken ones


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'cdc-serve[ray]'")
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'cdc-serve[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_28(tmp_path_factory):
    """A tiny export with Fashion-MNIST's input, 1 x 28 x 28."""
    return make_exported_model(tmp_path_factory.mktemp("repo"), size=(28, 28))


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> tuple[list[Path], Path]:
    """A folder of digits with a zero-byte, a truncated and a not-an-image file, an empty
    folder and the Fashion-MNIST test IDX file; and labels aligned with the rows."""
    if not FMNIST_IMAGES.is_file():
        pytest.skip(
            f"{FMNIST_IMAGES} is missing (make data, or apt-get install dataset-fashion-mnist)"
        )
    root = tmp_path_factory.mktemp("inputs")
    folder, digit_labels = digit_folder(root / "digits", N_DIGITS, broken=True)
    (root / "empty").mkdir()
    labels = np.concatenate([digit_labels, [0, 0, 0], [0], read_idx(FMNIST_LABELS)])
    np.save(root / "labels.npy", labels.astype(np.int64))
    return [folder, root / "empty", FMNIST_IMAGES], root / "labels.npy"


class Interrupt(Exception):
    pass


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def same_summary(got, want) -> None:
    for key, value in want.to_dict().items():
        if key not in ("seconds", "model", "output"):
            assert got.to_dict()[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_ray_gives_the_local_rows_and_summary(ray_cluster, model_28, mixed_inputs, tmp_path,
                                              suffix):  # fmt: skip
    inputs, labels = mixed_inputs
    local = tmp_path / f"local{suffix}"
    want = predict(inputs, model=model_28, output=local, reject_below=0.7, labels=labels,
                   decode_workers=1)  # fmt: skip
    out = tmp_path / f"ray{suffix}"
    printed = cli(*inputs, "--model", model_28, "--engine", "ray", "--output", out,
                  "--reject-below", "0.7", "--labels", labels, "--batch-size", "512")  # fmt: skip
    rows, local_rows = typed_rows(out), typed_rows(local)
    assert len(rows) == N_DIGITS + 3 + 1 + 10_000
    assert_same_rows(rows, local_rows)
    errors = {Path(r["source"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"zz-empty.png", "zz-truncated.jpg", "zz-text.png", "empty"}
    assert "empty file" in errors["zz-empty.png"] and "no image files" in errors["empty"]
    assert "on Ray, 2 actors" in printed and f"scored {len(rows)} inputs" in printed
    # The printed summary is the local one, line for line, but for the model and the time.
    local_text = want.format().splitlines()[1:]
    assert [line for line in printed.splitlines()[1:] if not line.startswith("output:")] == [
        line for line in local_text if not line.startswith("output:")
    ]
    assert want.true_accuracy_all is not None and want.n_errors == 4
    assert not Path(f"{out}.partial").exists()


@pytest.mark.slow
def test_ray_resumes_an_interrupted_run(ray_cluster, model_28, tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (700, 28, 28), np.uint8)
    np.save(tmp_path / "x.npy", x)
    full = tmp_path / "full.jsonl"
    predict([tmp_path / "x.npy"], model=model_28, output=full, batch_size=100)
    out = tmp_path / "run.jsonl"

    def stop(written: int) -> None:
        if written >= 300:
            raise Interrupt

    with pytest.raises(Interrupt):
        predict([tmp_path / "x.npy"], model=model_28, output=out, batch_size=100, on_chunk=stop)
    counts: list[int] = []
    summary = predict([tmp_path / "x.npy"], model=model_28, output=out, batch_size=100,
                      resume=True, engine="ray", on_chunk=counts.append)  # fmt: skip
    assert summary.n == 700 and summary.n_resumed == 300 and counts[-1] == 400
    assert typed_rows(out) == typed_rows(full)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ray_actors_score_on_a_triton_server(ray_cluster, triton_server, tmp_path, protocol):
    """--url: each actor holds a Triton client; the rows equal onnxruntime in process."""
    from conftest import make_tiny_repository

    make_tiny_repository(tmp_path / "repo", "tiny", max_batch=16)
    server = triton_server(tmp_path / "repo")
    try:
        folder, _ = digit_folder(tmp_path / "digits", 20, broken=True)
        np.save(
            tmp_path / "x.npy", np.random.default_rng(3).integers(0, 256, (300, 8, 8), np.uint8)
        )
        inputs = [folder, tmp_path / "x.npy"]
        want = tmp_path / "local.csv"
        predict(inputs, model=tmp_path / "repo" / "tiny", output=want, decode_workers=1)
        url = server.http_url if protocol == "http" else server.grpc_url
        got = tmp_path / "ray.csv"
        summary = predict(inputs, url=url, protocol=protocol, model_name="tiny", engine="ray",
                          output=got, batch_size=64)  # fmt: skip
    finally:
        server.stop()
    assert_same_rows(typed_rows(got), typed_rows(want), tolerance=1e-5)
    assert summary.n == 323 and summary.n_errors == 3 and f"[{protocol}: " in summary.model


@pytest.mark.slow
def test_cli_starts_and_stops_its_own_ray(model_28, tmp_path):
    """The default: a local Ray for the run, quiet; the terminal shows cdc-serve's lines only."""
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'cdc-serve[ray]'")
    np.save(tmp_path / "x.npy", np.random.default_rng(2).integers(0, 256, (64, 28, 28), np.uint8))
    out = tmp_path / "p.csv"
    done = subprocess.run(
        [sys.executable, "-m", "cdc_serve.cli", "predict", str(tmp_path / "x.npy"), "--model",
         str(model_28), "--engine", "ray", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # nothing from Ray in the terminal
    assert "scored 64 inputs" in done.stdout and "on Ray" in done.stdout
    assert len(typed_rows(out)) == 64


# -- without the extra, and options that need it --------------------------------------------------


def test_engine_ray_without_the_extra_is_one_clear_error(model_28, tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(CDCError, match=r"needs Ray Data: pip install 'cdc-serve\[ray\]'"):
        predict([tmp_path / "x.npy"], model=model_28, engine="ray")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.npy"), "--model",
                                      str(model_28), "--engine", "ray"])  # fmt: skip
    assert result.exit_code == 2 and "pip install 'cdc-serve[ray]'" in result.output
    assert "Traceback" not in result.output


def test_ray_options_need_engine_ray(model_28, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CDCError, match="need --engine ray"):
        predict([tmp_path / "x.npy"], model=model_28, ray_address="127.0.0.1:6379")
    with pytest.raises(CDCError, match="engine must be one of local, ray"):
        predict([tmp_path / "x.npy"], model=model_28, engine="spark")


def test_an_actors_error_is_one_line():
    """An actor's exception reaches the driver as Ray's remote traceback, as text."""
    from cdc_serve.ray_engine import _reason

    remote = (
        "ray::MapWorker(MapBatches(Scorer)).submit() (pid=925, ip=10.0.0.2)\n"
        '  File "/x/transport.py", line 9, in run\n    raise CDCError(...)\n'
        "cdc_serve.CDCError: Triton at x:8001 unreachable after 5 retries\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    assert _reason(Exception(remote)) == "Triton at x:8001 unreachable after 5 retries"
    other = remote.replace("cdc_serve.CDCError: Triton", "ValueError: Triton")
    assert _reason(Exception(other)).startswith("the Ray run failed in an actor (ValueError: ")
    assert _reason(RuntimeError("")) == "the Ray run failed (RuntimeError: no message)"


def test_ray_client_addresses_are_refused(model_28, tmp_path):
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'cdc-serve[ray]'")
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CDCError, match="Ray Client addresses do not run Ray Data"):
        predict([tmp_path / "x.npy"], model=model_28, engine="ray",
                ray_address="ray://127.0.0.1:10001")  # fmt: skip


def test_cdc_serve_imports_without_ray_or_pyarrow():
    """Ray and pyarrow are optional: no cdc_serve module imports them at module level."""
    code = (
        "import importlib, pkgutil, sys, cdc_serve\n"
        "for m in pkgutil.iter_modules(cdc_serve.__path__):\n"
        "    if m.name != 'triton_python_model': importlib.import_module(f'cdc_serve.{m.name}')\n"
        "import cdc_serve.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
