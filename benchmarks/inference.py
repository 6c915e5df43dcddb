"""Benchmark 1: inference throughput of the exported model (images/s).

Contenders, all on the same ONNX export of the ``quick`` preset's model (SmallCNN +
calibration head on 1x28x28, random weights: throughput does not depend on them):

- PyTorch eager: ``CalibratedInference`` under ``torch.inference_mode()``;
- onnxruntime in-process: default ``SessionOptions``, and tuned ones (graph
  optimisation level ALL, intra-op threads = usable cores);
- Triton (the ``tritonserver`` that pip installs, Python backend running the same
  ``model.onnx`` through onnxruntime, dynamic batching) over HTTP and gRPC, with several
  concurrent clients (threads, one ``tritonclient`` client each, inputs encoded once),
  so the loop measures the server rather than client-side work.

"Batch b" is the images per call (per request for Triton, where ``CONCURRENCY`` clients
each keep one request of b images in flight). The Triton goal compares gRPC at the same
*total* batch: ``CONCURRENCY`` clients x (256 / ``CONCURRENCY``) images against
onnxruntime at batch 256. The peak fraction divides the model's FLOP/s (conv + linear
layers counted with forward hooks) by a large float32 matrix product's measured rate.
"""

from __future__ import annotations

import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import (
    BenchSettings,
    Measurement,
    Section,
    Work,
    cpu_cores,
    fmt_rate,
    fmt_ratio,
    interleaved,
    md_table,
    met,
    peak_matmul_gflops,
    repeat,
)
from benchmarks.model import CHANNELS, NUM_CLASSES, SIZE, build_model, count_flops, quick_preset

BATCHES = (1, 32, 256)
CONCURRENCY = 4
MODEL_NAME = "bench"
GOAL_ORT = 1.5  # onnxruntime >= 1.5x PyTorch eager at batch 256 (CPU)
GOAL_TRITON = 0.7  # Triton gRPC >= 0.7x in-process onnxruntime at the same total batch


# ----------------------------------------------------------------------------- contenders


def eager_work(inference, batch: np.ndarray, device: str) -> Work:
    import torch

    x = torch.from_numpy(batch).to(device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def call():
        with torch.inference_mode():
            inference(x)

    return repeat(call, batch.shape[0])


def ort_session(path: Path, tuned: bool):
    """An onnxruntime CPU session: library defaults, or the tuned options of this benchmark."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if tuned:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = cpu_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_work(session, batch: np.ndarray) -> Work:
    feed = {"input": batch}
    return repeat(lambda: session.run(["probs", "embedding"], feed), batch.shape[0])


class TritonLoad:
    """``concurrency`` threads, each with its own tritonclient, sending the same request.

    ``work(n)`` makes every thread send ``n`` requests of ``batch`` images (one in flight
    per thread) and returns the images processed.
    """

    def __init__(self, protocol: str, url: str, batch: np.ndarray, concurrency: int):
        self.protocol, self.url, self.batch, self.concurrency = protocol, url, batch, concurrency
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"bench-{protocol}")

    def _client(self):
        if not hasattr(self.local, "client"):
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(self.url)
                inp = tc.InferInput("input", list(self.batch.shape), "FP32")
                inp.set_data_from_numpy(self.batch)
                outs = [tc.InferRequestedOutput(n) for n in ("probs", "embedding")]
            else:
                import tritonclient.http as tc

                client = tc.InferenceServerClient(self.url, concurrency=1)
                inp = tc.InferInput("input", list(self.batch.shape), "FP32")
                inp.set_data_from_numpy(self.batch, binary_data=True)
                outs = [tc.InferRequestedOutput(n, binary_data=True) for n in ("probs", "embedding")]
            self.local.client, self.local.inputs, self.local.outputs = client, [inp], outs
        return self.local

    def infer_once(self):
        c = self._client()
        return c.client.infer(MODEL_NAME, c.inputs, outputs=c.outputs)

    def _loop(self, n: int) -> int:
        for _ in range(n):
            self.infer_once()
        return n * self.batch.shape[0]

    def work(self, n: int) -> int:
        futures = [self.pool.submit(self._loop, n) for _ in range(self.concurrency)]
        return sum(f.result() for f in futures)

    def close(self):
        self.pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- Triton


def build_triton_repo(repo: Path, onnx_path: Path, embedding_dim: int) -> Path:
    """A model repository with the Python-backend model (what the pip ``tritonserver`` serves)."""
    from cdc_serve.triton import add_model_version, meta_parameters

    # plain metadata: the served model.py reads only the ONNX file and the parameters
    meta = {
        "name": MODEL_NAME,
        "method": "cdc",
        "dataset": "random",
        "num_classes": NUM_CLASSES,
        "channels": CHANNELS,
        "input_size": [SIZE, SIZE],
        "mean": [0.5] * CHANNELS,
        "std": [0.5] * CHANNELS,
        "embedding_dim": embedding_dim,
    }
    params = {**meta_parameters(meta), "ort_intra_op_threads": str(cpu_cores())}
    return add_model_version(
        repo,
        MODEL_NAME,
        onnx_path,
        meta,
        backend="python",
        max_batch=max(BATCHES),
        instance_kind="KIND_CPU",
        parameters=params,
    )


def _server_version(http_url: str) -> str:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(http_url)
    try:
        return str(client.get_server_metadata().get("version", "unknown"))
    finally:
        client.close()


# ----------------------------------------------------------------------------- the benchmark


def run(settings: BenchSettings, *, triton: bool = True) -> Section:
    """Measure every path at every batch size and return the Markdown section."""
    import torch

    from cdc_serve.export import export_onnx
    from cdc_serve_training.heads import CalibratedInference

    torch.set_num_threads(cpu_cores())
    sizes = quick_preset()
    model = build_model(sizes).eval()
    inference = CalibratedInference(model).eval()
    rng = np.random.default_rng(0)
    batches = {b: rng.standard_normal((b, CHANNELS, SIZE, SIZE)).astype(np.float32) for b in BATCHES}
    flops_per_image = count_flops(inference, torch.from_numpy(batches[1]))
    notes: list[str] = []

    tmp = tempfile.TemporaryDirectory(prefix="cdc-bench-inference-")
    results: dict[str, dict[int, Measurement]] = {}
    data: dict = {"flops_per_image": flops_per_image, "model_sizes": vars(sizes)}
    try:
        onnx_path = Path(tmp.name) / "model.onnx"
        export_onnx(inference, batches[32], onnx_path)
        sessions = {"default": ort_session(onnx_path, False), "tuned": ort_session(onnx_path, True)}
        # the exported graph must agree with PyTorch before its speed means anything
        with torch.inference_mode():
            ref = inference(torch.from_numpy(batches[32]))[0].numpy()
        diff = float(np.abs(sessions["tuned"].run(["probs"], {"input": batches[32]})[0] - ref).max())
        data["ort_max_abs_diff"] = diff

        labels = {
            "eager": "PyTorch eager (CPU)",
            "ort_default": "onnxruntime, default SessionOptions",
            "ort": f"onnxruntime, opt level ALL, {cpu_cores()} intra-op threads",
        }
        for b, batch in batches.items():
            contenders = {
                "eager": eager_work(inference, batch, "cpu"),
                "ort_default": ort_work(sessions["default"], batch),
                "ort": ort_work(sessions["tuned"], batch),
            }
            for name, m in interleaved(contenders, settings).items():
                results.setdefault(name, {})[b] = m

        if settings.device == "cuda":
            gpu_inference = CalibratedInference(build_model(sizes).eval().cuda()).eval()
            gpu_inference = gpu_inference.to(memory_format=torch.channels_last)
            labels["eager_cuda"] = "PyTorch eager (CUDA, channels-last)"
            for b, batch in batches.items():
                m = interleaved(
                    {"eager_cuda": eager_work(gpu_inference, batch, "cuda")},
                    settings,
                    sync=torch.cuda.synchronize,
                )
                results.setdefault("eager_cuda", {})[b] = m["eager_cuda"]

        if triton:
            triton_rows = _run_triton(settings, onnx_path, model, batches, sessions, results, data)
            labels.update(triton_rows)
    except Exception as exc:
        notes.append(f"inference benchmark stopped early: {type(exc).__name__}: {exc}")
    finally:
        tmp.cleanup()

    peaks = peak_matmul_gflops("cpu", BenchSettings.make(quick=settings.quick, device="cpu"))
    if settings.device == "cuda":
        peaks.update(peak_matmul_gflops("cuda", settings))
    data["peak_gflops"] = peaks
    return _section(settings, labels, results, peaks, flops_per_image, data, notes)


def _run_triton(settings, onnx_path, model, batches, sessions, results, data) -> dict[str, str]:
    """Start tritonserver, time HTTP and gRPC with ``CONCURRENCY`` clients beside onnxruntime."""
    from cdc_serve.serve import TritonServer

    labels: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cdc-bench-repo-") as repo:
        build_triton_repo(Path(repo), onnx_path, int(model.backbone.out_dim))
        with TritonServer(Path(repo), http_port=0, grpc_port=0) as server:
            data["tritonserver"] = _server_version(server.http_url)
            urls = {"http": server.http_url, "grpc": server.grpc_url}
            for b, batch in batches.items():
                loads = {p: TritonLoad(p, urls[p], batch, CONCURRENCY) for p in urls}
                try:
                    _check_triton(loads["grpc"], sessions["tuned"], batch)
                    contenders = {
                        "ort": ort_work(sessions["tuned"], batch),
                        "triton_http": loads["http"].work,
                        "triton_grpc": loads["grpc"].work,
                    }
                    m = interleaved(contenders, settings)
                finally:
                    for load in loads.values():
                        load.close()
                results.setdefault("triton_http", {})[b] = m["triton_http"]
                results.setdefault("triton_grpc", {})[b] = m["triton_grpc"]
                results.setdefault("ort_beside_triton", {})[b] = m["ort"]
            # the goal: the same total batch, split over the concurrent clients
            total = max(BATCHES)
            per = batches[total][: total // CONCURRENCY]
            load = TritonLoad("grpc", urls["grpc"], per, CONCURRENCY)
            try:
                m = interleaved(
                    {"ort": ort_work(sessions["tuned"], batches[total]), "split": load.work},
                    settings,
                )
            finally:
                load.close()
            data["split"] = {
                "clients": CONCURRENCY,
                "per_request": total // CONCURRENCY,
                "triton_grpc": m["split"].throughput,
                "ort_256": m["ort"].throughput,
            }
    labels["triton_http"] = f"Triton HTTP, python backend, {CONCURRENCY} clients x batch"
    labels["triton_grpc"] = f"Triton gRPC, python backend, {CONCURRENCY} clients x batch"
    labels["ort_beside_triton"] = "onnxruntime tuned (timed beside Triton)"
    return labels


def _check_triton(load: TritonLoad, session, batch: np.ndarray) -> None:
    """Triton's answer must equal in-process onnxruntime's (same model file)."""
    result = load.pool.submit(load.infer_once).result()
    probs = result.as_numpy("probs")
    expected = session.run(["probs"], {"input": batch})[0]
    if probs is None or probs.shape != expected.shape or not np.allclose(probs, expected, atol=1e-5):
        raise RuntimeError("Triton's probs differ from in-process onnxruntime's")


# ----------------------------------------------------------------------------- Markdown


def _section(settings, labels, results, peaks, flops_per_image, data, notes) -> Section:
    big = max(BATCHES)
    cpu_peak = max((v for k, v in peaks.items() if "cpu" in k), default=None)
    headers = ["path"] + [f"batch {b} (img/s)" for b in BATCHES] + [
        f"GFLOP/s at {big}",
        "% of CPU peak" if settings.device == "cpu" else "% of peak (own device)",
    ]
    rows = []
    best_name, best_rate = None, 0.0
    for name, label in labels.items():
        if name not in results:
            continue
        rates = {b: results[name][b].throughput for b in BATCHES if b in results[name]}
        rate_big = rates.get(big)
        gflops = rate_big * flops_per_image / 1e9 if rate_big else None
        if "cuda" in name:
            peak = max((v for k, v in peaks.items() if "cuda" in k), default=None)
        else:
            peak = cpu_peak
            if rate_big and rate_big > best_rate and name != "ort_beside_triton":
                best_name, best_rate = name, rate_big
        rows.append(
            [label]
            + [fmt_rate(rates.get(b)) for b in BATCHES]
            + [
                f"{gflops:.1f}" if gflops else "n/a",
                f"{100 * gflops / peak:.1f} %" if gflops and peak else "n/a",
            ]
        )
        data.setdefault("images_per_s", {})[name] = {str(b): r for b, r in rates.items()}

    goals = []
    eager = results.get("eager", {}).get(big)
    ort = results.get("ort", {}).get(big)
    if eager and ort:
        ratio = ort.throughput / eager.throughput
        goals.append(
            (
                f"onnxruntime >= {GOAL_ORT}x PyTorch eager at batch {big} (CPU)",
                fmt_ratio(ratio),
                ratio >= GOAL_ORT,
            )
        )
    split = data.get("split")
    if split:
        ratio = split["triton_grpc"] / split["ort_256"]
        goals.append(
            (
                f"Triton gRPC, {split['clients']} clients x {split['per_request']} images >= "
                f"{GOAL_TRITON}x in-process onnxruntime at batch {big}",
                fmt_ratio(ratio),
                ratio >= GOAL_TRITON,
            )
        )
    else:
        goals.append(
            (f"Triton gRPC >= {GOAL_TRITON}x in-process onnxruntime", "not measured", None)
        )

    lines = [
        "## 1. Inference throughput of the exported model",
        "",
        f"Measured {'(--quick) ' if settings.quick else ''}on {settings.device}; "
        f"{settings.rounds} alternating rounds of about {settings.round_seconds:g} s per "
        "contender, median round reported. Model: the `quick` preset's "
        f"{data['model_sizes']['backbone']} + MLP calibration head "
        f"(hidden {data['model_sizes']['hidden_dim']}) on {CHANNELS}x{SIZE}x{SIZE}, random weights, "
        f"{flops_per_image / 1e6:.2f} MFLOP per image (conv + linear layers). "
        f"Triton rows: {CONCURRENCY} client threads each keep one request of `batch` images in "
        "flight (dynamic batching merges them up to 256).",
        "",
        md_table(headers, rows) if rows else "(nothing measured)",
        "",
        md_table(
            ["goal", "measured", "met?"], [[g, m, met(ok)] for g, m, ok in goals]
        ),
        "",
        "Measured float32 matrix-product peak: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        + ".",
    ]
    if best_name and cpu_peak:
        frac = best_rate * flops_per_image / 1e9 / cpu_peak
        lines.append(
            f"The fastest CPU path at batch {big} ({labels[best_name]}) reaches "
            f"**{100 * frac:.1f} %** of that peak."
        )
        data["best_cpu_path"] = {"path": best_name, "fraction_of_peak": frac}
    if "ort_max_abs_diff" in data:
        lines.append(
            f"Sanity: onnxruntime's probs match PyTorch's within {data['ort_max_abs_diff']:.1e}; "
            "Triton's answers were checked against onnxruntime's before timing."
        )
    if "tritonserver" in data:
        lines.append(f"tritonserver version {data['tritonserver']} (from its metadata endpoint).")
    missed = [g for g, _, ok in goals if ok is False]
    if missed:
        lines.append("")
        lines.append("**Missed:** " + "; ".join(missed) + ".")
    lines += [f"- {n}" for n in notes]
    return Section("inference", "\n".join(lines), goals, data)
