"""Batch scoring: inputs of every kind, bad inputs as error rows, resume, summary, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment
from test_preprocess import png_claiming_size
from tiny_export import make_exported_model

from cdc_serve import CDCError
from cdc_serve.client import Client
from cdc_serve.idx import write_idx
from cdc_serve.predict import COLUMNS, predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_exported_model(tmp_path_factory.mktemp("repo"))


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def read_rows(path: Path) -> list[dict]:
    if ".csv" in path.name:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def image_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` PNGs spread over nested folders (names chosen so sorted order is known)."""
    for i in range(n):
        sub = root / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise((8, 8), seed + i)).save(sub / f"img{i:04d}.png")
    return root


# -- inputs of every kind ------------------------------------------------------------------


def test_folder_npy_and_idx(model_dir, tmp_path):
    folder = image_folder(tmp_path / "imgs", 7)
    (folder / "d0" / "readme.txt").write_text("not an image, skipped in folders")
    arr = noise((5, 8, 8), seed=100)
    np.save(tmp_path / "a.npy", arr)
    write_idx(tmp_path / "b-images-idx3-ubyte.gz", noise((4, 8, 8), seed=200))
    out = tmp_path / "preds.csv"
    summary = predict([folder, tmp_path / "a.npy", tmp_path / "b-images-idx3-ubyte.gz"],
                      model=model_dir, output=out, batch_size=3)  # fmt: skip
    rows = read_rows(out)
    assert list(rows[0]) == list(COLUMNS)
    assert len(rows) == 16 == summary.n and summary.n_errors == 0
    sources = [r["source"] for r in rows]
    pngs = sorted(str(p) for p in folder.rglob("*.png"))
    assert sorted(sources[:7]) == pngs
    assert sources[:7] == sorted(sources[:7], key=lambda s: Path(s).parts)  # walk order
    assert sources[7:12] == [f"{tmp_path / 'a.npy'}[{i}]" for i in range(5)]
    assert sources[12:] == [f"{tmp_path / 'b-images-idx3-ubyte.gz'}[{i}]" for i in range(4)]
    assert not Path(f"{out}.partial").exists()
    # The rows agree with the client on the same images.
    with Client(model=model_dir) as client:
        want = client.predict(arr)
    for row, p in zip(rows[7:12], want, strict=True):
        assert int(row["cluster_id"]) == p.cluster_id
        assert abs(float(row["confidence"]) - p.confidence) < 1e-6
        assert row["rejected"] == str(p.rejected).lower() and row["ood"] == str(p.ood).lower()
        assert abs(float(row["ood_score"]) - p.ood_score) < 1e-4 * max(1, abs(p.ood_score))


def test_jsonl_output_and_same_source_once(model_dir, tmp_path):
    image_folder(tmp_path / "imgs", 4)
    one = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    out = tmp_path / "p.jsonl"
    predict([tmp_path / "imgs", one, tmp_path / "imgs"], model=model_dir, output=out)
    rows = read_rows(out)
    assert len(rows) == 4 and len({r["source"] for r in rows}) == 4
    assert set(rows[0]) == set(COLUMNS)
    assert isinstance(rows[0]["cluster_id"], int) and isinstance(rows[0]["ood"], bool)
    assert rows[0]["error"] is None


# -- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_become_error_rows(model_dir, tmp_path):
    d = tmp_path / "in"
    image_folder(d / "good", 5)
    (d / "empty_folder").mkdir()
    (d / "bad").mkdir()
    (d / "bad" / "zero.png").write_bytes(b"")
    Image.fromarray(noise((64, 64))).save(d / "bad" / "trunc.png")
    data = (d / "bad" / "trunc.png").read_bytes()
    (d / "bad" / "trunc.png").write_bytes(data[: len(data) // 2])
    (d / "bad" / "text.jpg").write_text("hello, I am text\n")
    png_claiming_size(d / "bad" / "huge.png", 100_000, 100_000)
    rgba = np.dstack([noise((8, 8, 3)), np.full((8, 8), 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(d / "bad" / "rgba.png")
    Image.fromarray(noise((8, 8)).astype(np.uint16) * 257).save(d / "bad" / "deep16.png")
    np.save(d / "wrong_shape.npy", np.zeros((4, 10)))
    with_nan = noise((3, 8, 8)).astype(np.float32)
    with_nan[1, 2, 2] = np.nan
    np.save(d / "nan.npy", with_nan)
    (d / "not_really.npy").write_bytes(b"garbage")
    out = tmp_path / "preds.csv"
    inputs = [d / "good", d / "empty_folder", d / "bad", d / "wrong_shape.npy", d / "nan.npy",
              d / "not_really.npy"]  # fmt: skip
    summary = predict(inputs, model=model_dir, output=out, batch_size=2)
    rows = {r["source"]: r for r in read_rows(out)}
    errors = {Path(s).name: r["error"] for s, r in rows.items() if r["error"]}
    assert "no image files" in errors["empty_folder"]
    assert "empty file" in errors["zero.png"]
    assert "trunc.png" in errors["trunc.png"]
    assert "not an image" in errors["text.jpg"]
    assert "too large" in errors["huge.png"]
    assert "wrong array shape" in errors["wrong_shape.npy"]
    assert "NaN" in errors["nan.npy[1]"]
    assert "not_really.npy" in errors["not_really.npy"]
    assert len(errors) == 8 == summary.n_errors
    # Every valid input has its row: 5 good PNGs, the RGBA and 16-bit PNGs, 2 nan.npy rows.
    valid = [r for r in rows.values() if not r["error"]]
    assert len(valid) == 9 and all(r["cluster_id"] != "" for r in valid)
    for name in ("rgba.png", "deep16.png", "nan.npy[0]", "nan.npy[2]"):
        assert any(s.endswith(name) and not r["error"] for s, r in rows.items())
    assert summary.n == len(rows) == 17


def test_errors_before_starting(model_dir, tmp_path):
    Image.fromarray(noise((8, 8))).save(tmp_path / "a.png")
    with pytest.raises(CDCError, match="model not found"):
        predict([tmp_path / "a.png"], model=tmp_path / "no_model")
    with pytest.raises(CDCError, match="input not found"):
        predict([tmp_path / "a.png", tmp_path / "missing.png"], model=model_dir)
    with pytest.raises(CDCError, match=".csv or .jsonl"):
        predict([tmp_path / "a.png"], model=model_dir, output=tmp_path / "p.xlsx")
    with pytest.raises(CDCError, match="needs --output"):
        predict([tmp_path / "a.png"], model=model_dir, resume=True)
    with pytest.raises(CDCError, match="--model"):
        predict([tmp_path / "a.png"])
    with pytest.raises(CDCError, match="unreachable"):
        predict([tmp_path / "a.png"], url="127.0.0.1:9", protocol="grpc")


# -- streaming and resume ------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_chunks_are_bounded(model_dir, tmp_path):
    np.save(tmp_path / "many.npy", noise((50, 8, 8)))
    seen = []
    with Client(model=model_dir) as client:
        original = client.score_images

        def spy(batch):
            seen.append(len(batch))
            return original(batch)

        client.score_images = spy
        summary = predict([tmp_path / "many.npy"], client=client, batch_size=8)
    assert summary.n == 50 and max(seen) <= 8 and sum(seen) == 50


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_after_interruption(model_dir, tmp_path, suffix):
    np.save(tmp_path / "x.npy", noise((40, 8, 8), seed=3))
    image_folder(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    inputs = [tmp_path / "x.npy", tmp_path / "imgs"]
    full = tmp_path / f"full{suffix}"
    predict(inputs, model=model_dir, output=full, batch_size=5)

    out = tmp_path / f"resumed{suffix}"
    partial = Path(f"{out}.partial")

    def stop_after_three(written: int) -> None:
        if written >= 15:
            raise Interrupt

    with pytest.raises(Interrupt):
        predict(inputs, model=model_dir, output=out, batch_size=5, on_chunk=stop_after_three)
    assert not out.exists() and len(read_rows(partial)) == 15
    # A kill in the middle of a write leaves half a line: resume drops it and redoes that row.
    partial.write_bytes(partial.read_bytes() + b'{"source": "half a li')
    counts = []
    summary = predict(inputs, model=model_dir, output=out, batch_size=5, resume=True,
                      on_chunk=counts.append)  # fmt: skip
    assert counts[-1] == 47 - 15  # only the remaining rows were scored
    assert summary.n == 47 and summary.n_resumed == 15 and summary.n_errors == 1
    assert not partial.exists()
    assert read_rows(out) == read_rows(full)  # every input exactly once, same order, same values
    # Resuming a finished run scores nothing and keeps the file.
    counts.clear()
    again = predict(
        inputs, model=model_dir, output=out, batch_size=5, resume=True, on_chunk=counts.append
    )
    assert again.n == 47 and set(counts) == {0} and read_rows(out) == read_rows(full)


@pytest.mark.slow
def test_resume_after_kill_of_the_cli(model_dir, tmp_path):
    """SIGKILL a real `cdc-serve predict` mid-run, then `--resume`: each input exactly once."""
    n = 30000
    np.save(tmp_path / "big.npy", noise((n, 8, 8), seed=9))
    out = tmp_path / "p.csv"
    partial = Path(f"{out}.partial")
    cmd = [sys.executable, "-m", "cdc_serve.cli", "predict", str(tmp_path / "big.npy"),
           "--model", str(model_dir), "--output", str(out), "--batch-size", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if partial.exists() and partial.stat().st_size > 20_000:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists(), "the run finished before it could be killed"
    done_before = len(read_rows(partial))
    assert 0 < done_before < n
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert [r["source"] for r in rows] == [f"{tmp_path / 'big.npy'}[{i}]" for i in range(n)]
    assert f"({done_before}" in result.stdout or "from the earlier run" in result.stdout


# -- summary and labels ------------------------------------------------------------------------


def test_summary_and_true_accuracy(model_dir, tmp_path):
    images = noise((60, 8, 8), seed=4)
    np.save(tmp_path / "x.npy", images)
    with Client(model=model_dir, reject_below=0.6) as client:
        preds = client.predict(images)
    cluster = np.array([p.cluster_id for p in preds])
    conf = np.array([p.confidence for p in preds])
    # Labels: the cluster IDs permuted, with 15 of them changed.
    labels = (cluster + 2) % 5
    labels[:15] = (labels[:15] + 1) % 5
    write_idx(tmp_path / "labels-idx1-ubyte", labels.astype(np.uint8))
    summary = predict([tmp_path / "x.npy"], model=model_dir, reject_below=0.6,
                      labels=tmp_path / "labels-idx1-ubyte")  # fmt: skip
    accepted = conf >= 0.6
    assert summary.n == 60 and summary.n_rejected == int((~accepted).sum())
    assert summary.share_rejected == pytest.approx((~accepted).mean())
    assert summary.estimated_accuracy_accepted == pytest.approx(conf[accepted].mean(), abs=1e-6)
    assert summary.estimated_accuracy_all == pytest.approx(conf.mean(), abs=1e-6)
    counts = np.zeros((5, 5))
    np.add.at(counts, (cluster, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    mapping = dict(zip(rows, cols, strict=True))
    correct = np.array([mapping[c] for c in cluster]) == labels
    assert summary.true_accuracy_all == pytest.approx(correct.mean())
    assert summary.true_accuracy_accepted == pytest.approx(correct[accepted].mean())
    assert summary.true_accuracy_rejected == pytest.approx(correct[~accepted].mean())
    text = summary.format()
    assert "rejected" in text and f"{summary.true_accuracy_all:.3f}" in text
    assert f"{summary.estimated_accuracy_accepted:.3f}" in text
    np.save(tmp_path / "short.npy", labels[:10])
    short = predict([tmp_path / "x.npy"], model=model_dir, labels=tmp_path / "short.npy")
    assert short.true_accuracy_all is None and "labels ignored" in short.format()


def test_cli_predict(model_dir, tmp_path):
    from typer.testing import CliRunner

    from cdc_serve.cli import app

    np.save(tmp_path / "x.npy", noise((12, 8, 8)))
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(tmp_path / "x.npy"), "--model", str(model_dir),
                                 "--output", str(tmp_path / "p.csv"), "--reject-below", "0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "scored 12 inputs" in result.output and len(read_rows(tmp_path / "p.csv")) == 12
    result = runner.invoke(
        app, ["predict", str(tmp_path / "x.npy"), "--model", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2 and "model not found" in result.output


def test_empty_array_and_float_idx(model_dir, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), np.uint8))
    unit = noise((3, 8, 8), seed=11)
    write_idx(tmp_path / "f-ubyte", unit.astype(np.float32) / 255)  # floats in 0..1
    out = tmp_path / "p.csv"
    summary = predict([tmp_path / "empty.npy", tmp_path / "f-ubyte"], model=model_dir, output=out)
    rows = read_rows(out)
    assert "holds no images" in rows[0]["error"] and summary.n == 4 and summary.n_errors == 1
    with Client(model=model_dir) as client:
        want = [p.cluster_id for p in client.predict(unit)]
    assert [int(r["cluster_id"]) for r in rows[1:]] == want


def test_worker_processes_decode_as_this_process_does(model_dir, tmp_path):
    """Image files decoded by the worker processes give the same rows, error rows included,
    as decoding in the scoring process, for PNGs, JPEGs (large ones at reduced scale) and
    broken files."""
    folder = image_folder(tmp_path / "imgs", 40)
    for i, side in enumerate((9, 64, 300, 1200)):
        Image.fromarray(noise((side, side + 7, 3), seed=i)).save(folder / f"photo{i}.jpg")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a JPEG")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}.csv"
        summary = predict([folder], model=model_dir, output=outs[workers], batch_size=4,
                          decode_workers=workers)  # fmt: skip
        assert summary.n == 46 and summary.n_errors == 2
    assert outs[1].read_text() == outs[2].read_text()
    # a command run starts its helpers before onnxruntime loads (forked, no fork server)
    cli = tmp_path / "cli.csv"
    cmd = [sys.executable, "-m", "cdc_serve.cli", "predict", str(folder), "--model",
           str(model_dir), "--output", str(cli), "--batch-size", "4"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.read_text() == outs[1].read_text()


def test_decode_pool_uses_its_processes_and_keeps_the_order(tmp_path):
    import multiprocessing

    from cdc_serve.decode_pool import SLOTS, TASK, DecodePool
    from cdc_serve.preprocess import load_image

    files = [str(p) for p in sorted(image_folder(tmp_path / "imgs", 6 * TASK + 5).rglob("*.png"))]
    files.insert(7, str(tmp_path / "missing.png"))
    with DecodePool(1, (6, 6), workers=2) as pool:
        assert len(multiprocessing.active_children()) == 1  # one helper; this process decodes too
        first, second = pool.submit(files[:50]), pool.submit(files[50:])
        assert pool._decode_ahead()  # a task decoded ahead waits for its job's collect
        got = pool.collect(first) + pool.collect(second)
        for _ in range(SLOTS + 1):  # the job slots are reused once collected
            assert len(pool.collect(pool.submit(files[:3]))) == 3
        waiting = [pool.submit(files[:1]) for _ in range(SLOTS)]
        with pytest.raises(CDCError, match="at most"):
            pool.submit(files[:1])
        assert all(len(pool.collect(job)) == 1 for job in waiting)
    assert isinstance(got[7], str) and "missing.png" in got[7]
    want = [load_image(f, 1, (6, 6)) for f in files[:7] + files[8:]]
    assert all((a == b).all() for a, b in zip(got[:7] + got[8:], want, strict=True))


def test_scoring_shares_the_cores_only_with_image_decoders(tmp_path):
    from cdc_serve import usable_cores
    from cdc_serve.predict import _scoring_threads

    (tmp_path / "imgs").mkdir()
    idx = tmp_path / "x-images-idx3-ubyte"
    shared = {"threads": max(1, usable_cores() // 4), "spinning": False}
    all_cores = {"threads": None, "spinning": True}
    assert _scoring_threads([tmp_path / "imgs"], 2, "local") == shared
    assert _scoring_threads([idx, tmp_path / "a.JPG"], 2, "local") == shared
    assert _scoring_threads([idx], 2, "local") == all_cores  # arrays: no decoders
    assert _scoring_threads([tmp_path / "imgs"], 1, "local") == all_cores  # decoding here
    assert _scoring_threads([tmp_path / "imgs"], 2, "ray") == all_cores  # the actors' own
    assert _scoring_threads([tmp_path / "imgs"], 2, "local", "localhost:8001") == {}  # Triton
