"""Scoring a folder of small image files with ``cdc-serve predict``, side by side (issue 14).

The folder: the 10,000 Fashion-MNIST test images, each in random colours, resized to a
random side of 20-120 px and saved as JPEG or PNG in turn
(:func:`benchmarks.photo_folder.fmnist_folder`). The model: the ``quick`` preset's
network on 1 x 28 x 28 with random weights, exported as the served graph (what
``cdc-serve export`` writes).

Contenders, each a whole pass over the folder, timed in alternating rounds:

- **Pillow loop**: one thread opening each file, converting it to grayscale and resizing
  it to 28 x 28 (bilinear); no scoring, no output (the goal's yardstick);
- **predict**: :func:`cdc_serve.predict.predict` as the CLI runs it (image files decoded
  on every core, by helper processes and the scoring process; scoring in process with
  onnxruntime, rows written to a CSV file);
- **predict, 1 process**: the same with decoding in the scoring process;
- **predict --engine ray** (with the ray extra): the same rows from Ray Data actors, one
  per core, each decoding its files and holding one onnxruntime session, on a local Ray
  started once before its rounds; the seconds to start and stop that Ray are measured
  apart and added back for the rate a single CLI run gets (Ray's overhead on one machine).

The goal's rounds (Pillow loop, predict, predict in 1 process) run first, with no Ray
alive: an idle local Ray takes about 7 % of a core (measured), which would cost the
contender on every core more than the one-thread loop. Ray's rounds follow, alternating
with predict again, so Ray is set against the local engine under the same conditions.

Goal: predict >= 1.6x the Pillow loop's images/s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import BenchSettings, Section, cpu_cores, fmt_rate, fmt_ratio, md_table, met

GOAL = 1.6


def build_model_dir(folder: Path) -> Path:
    """The quick preset's network (random weights) as a served model folder."""
    from benchmarks.model import build_model, quick_preset
    from benchmarks.triton_load import served_onnx
    from cdc_serve.contract import META_FILE, ONNX_FILE
    from cdc_serve_training.heads import CalibratedInference

    folder.mkdir(parents=True, exist_ok=True)
    inference = CalibratedInference(build_model(quick_preset()).eval()).eval()
    served_onnx(inference, folder / ONNX_FILE).write(folder / META_FILE)
    return folder


def _pillow_loop(files: list[Path], size: int = 28):
    from PIL import Image

    def work(n: int) -> int:
        for _ in range(n):
            for path in files:
                with Image.open(path) as img:
                    np.asarray(img.convert("L").resize((size, size), Image.BILINEAR))
        return n * len(files)

    return work


def _predict(folder: Path, model: Path, out: Path, count: int, workers: int | None):
    from cdc_serve.predict import predict

    def work(n: int) -> int:
        for _ in range(n):
            summary = predict([folder], model=model, output=out, decode_workers=workers)
            assert summary.n == count and summary.n_errors == 0, summary
        return n * count

    return work


def _predict_ray(folder: Path, model: Path, out: Path, count: int):
    from cdc_serve.predict import predict

    def work(n: int) -> int:
        for _ in range(n):
            summary = predict([folder], model=model, output=out, engine="ray")
            assert summary.n == count and summary.n_errors == 0, summary
        return n * count

    return work


def _start_ray():
    """A local Ray as ``predict --engine ray`` starts one, and the seconds that took; None
    without the ray extra."""
    import time

    try:
        from cdc_serve.ray_engine import ray_session, require_ray

        require_ray()
    except Exception:  # noqa: BLE001  the ray extra is not installed: no Ray row
        return None
    session = ray_session(None)
    started = time.perf_counter()
    session.__enter__()
    return session, time.perf_counter() - started


def _stop_ray(session) -> float:
    import time

    started = time.perf_counter()
    session.__exit__(None, None, None)
    return time.perf_counter() - started


def run(settings: BenchSettings) -> Section:
    from benchmarks.common import interleaved
    from benchmarks.photo_folder import fmnist_folder

    n = 1000 if settings.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="cdc-bench-predict-") as tmp:
        folder = fmnist_folder(Path(tmp) / "files", n)
        files = sorted(folder.iterdir())
        model = build_model_dir(Path(tmp) / "model")
        out = Path(tmp) / "preds.csv"
        contenders = {
            "pillow": _pillow_loop(files),
            "predict": _predict(folder, model, out, n, None),
            "predict_1": _predict(folder, model, out, n, 1),
        }
        found = interleaved(contenders, settings, units=dict.fromkeys(contenders, 1))
        rate = {name: m.throughput for name, m in found.items()}
        ray = _start_ray()
        ray_seconds = None
        if ray is not None:
            beside_ray = {
                "predict_local": contenders["predict"],
                "predict_ray": _predict_ray(folder, model, out, n),
            }
            try:
                found = interleaved(beside_ray, settings, units=dict.fromkeys(beside_ray, 1))
            finally:
                ray_seconds = ray[1] + _stop_ray(ray[0])
            rate.update({name: m.throughput for name, m in found.items()})
    ratio = rate["predict"] / rate["pillow"]
    cores = cpu_cores()
    rows = [
        ["Pillow loop: open, grayscale, resize to 28x28 (1 thread)", fmt_rate(rate["pillow"])],
        [
            f"cdc-serve predict (decoding on {cores} cores, the scoring process included)",
            fmt_rate(rate["predict"]),
        ],
        ["cdc-serve predict (decoding in the scoring process)", fmt_rate(rate["predict_1"])],
    ]
    if ray_seconds is not None:
        rate["predict_ray_cli"] = n / (n / rate["predict_ray"] + ray_seconds)
        rows += [
            ["cdc-serve predict, in Ray's rounds (the local engine beside an idle Ray)",
             fmt_rate(rate["predict_local"])],
            [f"cdc-serve predict --engine ray ({cores} actors; Ray already running)",
             fmt_rate(rate["predict_ray"])],
            [f"cdc-serve predict --engine ray, a CLI run (+ {ray_seconds:.1f} s to start and "
             "stop a local Ray)", fmt_rate(rate["predict_ray_cli"])],
        ]  # fmt: skip
    goals = [(f"predict over {n:,} small files >= {GOAL}x a Pillow loop", fmt_ratio(ratio),
              ratio >= GOAL)]  # fmt: skip
    markdown = "\n\n".join(
        [
            "## 5. Scoring a folder of small files (issue 14)",
            f"{n:,} Fashion-MNIST test images as JPEG/PNG files of 20-120 px in random colours; "
            f"the quick preset's model on 1x28x28 (random weights, onnxruntime in process); "
            f"{settings.rounds} alternating rounds of a whole pass each; {cores} cores. "
            "predict's time includes loading the model, listing the folder, scoring and "
            "writing the CSV; the Pillow loop only decodes and resizes.",
            md_table(["contender", "img/s"], rows),
            md_table(["goal", "measured", "met?"], [[g, m, met(ok)] for g, m, ok in goals]),
        ]
        + (
            [
                "The Ray rows score the same files into the same CSV; each run starts its pool "
                "of actors (each loads the model) and one task that lists the folder in order. "
                "They are timed in rounds of their own, after the goal's, alternating with the "
                "local engine while the local Ray is up."
            ]
            if ray_seconds is not None
            else []
        )  # fmt: skip
    )
    data = {"rates": rate, "ratio": ratio, "cores": cores, "ray_start_stop_s": ray_seconds}
    return Section("predict", markdown, goals, data)
