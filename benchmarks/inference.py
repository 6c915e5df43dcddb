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

import sys
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
    cuda_peak_gflops,
    fmt_rate,
    fmt_ratio,
    interleaved,
    matmul_contenders,
    md_table,
    met,
    repeat,
)
from benchmarks.model import CHANNELS, NUM_CLASSES, SIZE, build_model, count_flops, quick_preset

BATCHES = (1, 32, 256)
CONCURRENCY = 4
MODEL_NAME = "bench"
GOAL_ORT = 1.5  # onnxruntime >= 1.5x PyTorch eager at batch 256 (CPU)
GOAL_TRITON = 0.7  # Triton gRPC >= 0.7x in-process onnxruntime at the same total batch
QUEUE_DELAY_US = 100  # the dynamic batcher's wait for more requests (config.pbtxt default)


# ----------------------------------------------------------------------------- contenders


def eager_work(inference, batch: np.ndarray, device: str, threads: int | None = None) -> Work:
    """PyTorch eager calls at this batch; on CPU with ``threads`` intra-op threads."""
    import torch

    x = torch.from_numpy(batch).to(device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def call():
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            inference(x)

    return repeat(call, batch.shape[0])


def ort_session(path: Path, options: str):
    """An onnxruntime CPU session with library defaults ("default"), the tuned options
    ("tuned": graph optimisation level ALL, intra-op threads = usable cores, sequential
    execution) or the tuned ones with idle threads not spinning ("nospin")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if options in ("tuned", "nospin"):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = cpu_cores()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options == "nospin":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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
                outs = [
                    tc.InferRequestedOutput(n, binary_data=True) for n in ("probs", "embedding")
                ]
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


def build_triton_repo(
    repo: Path, onnx_path: Path, embedding_dim: int, queue_delay_us: int = QUEUE_DELAY_US
) -> Path:
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
        max_queue_delay_us=queue_delay_us,
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

    from cdc_serve_training.heads import CalibratedInference
    from cdc_serve_training.onnx_export import export_onnx

    cores = cpu_cores()
    torch.set_num_threads(cores)
    sizes = quick_preset()
    model = build_model(sizes).eval()
    inference = CalibratedInference(model).eval()
    rng = np.random.default_rng(0)
    batches = {
        b: rng.standard_normal((b, CHANNELS, SIZE, SIZE)).astype(np.float32) for b in BATCHES
    }
    flops_per_image = count_flops(inference, torch.from_numpy(batches[1]))
    notes: list[str] = []
    labels = {
        "eager": f"PyTorch eager (CPU, {cores} threads)",
        "eager_1t": "PyTorch eager (CPU, 1 thread)",
        "ort_default": "onnxruntime, default SessionOptions",
        "ort": f"onnxruntime tuned: opt level ALL, {cores} intra-op threads",
        "ort_nospin": "onnxruntime tuned + allow_spinning=0",
    }
    results: dict[str, dict[int, Measurement]] = {}
    data: dict = {"flops_per_image": flops_per_image, "model_sizes": vars(sizes), "peak_gflops": {}}

    tmp = tempfile.TemporaryDirectory(prefix="cdc-bench-inference-")
    try:
        onnx_path = Path(tmp.name) / "model.onnx"
        export_onnx(inference, batches[32], onnx_path)
        sessions = {k: ort_session(onnx_path, k) for k in ("default", "tuned", "nospin")}
        # the exported graph must agree with PyTorch before its speed means anything
        with torch.inference_mode():
            ref = inference(torch.from_numpy(batches[32]))[0].numpy()
        diff = float(
            np.abs(sessions["tuned"].run(["probs"], {"input": batches[32]})[0] - ref).max()
        )
        data["ort_max_abs_diff"] = diff

        matmuls, matmul_flop = matmul_contenders(settings)
        for b, batch in batches.items():
            contenders = {
                "eager": eager_work(inference, batch, "cpu", cores),
                "eager_1t": eager_work(inference, batch, "cpu", 1),
                "ort_default": ort_work(sessions["default"], batch),
                "ort": ort_work(sessions["tuned"], batch),
                "ort_nospin": ort_work(sessions["nospin"], batch),
            }
            if b == max(BATCHES):  # the peak, timed in the same rounds
                contenders.update(matmuls)
            print(f"[bench]   inference batch {b}", file=sys.stderr, flush=True)
            for name, m in interleaved(contenders, settings).items():
                if name.startswith("matmul_"):
                    key = f"{name.removeprefix('matmul_')} (cpu, fp32)"
                    data["peak_gflops"][key] = m.throughput * matmul_flop / 1e9
                else:
                    results.setdefault(name, {})[b] = m
        torch.set_num_threads(cores)

        if settings.device == "cuda":
            gpu_model = build_model(sizes).eval().cuda().to(memory_format=torch.channels_last)
            gpu_inference = CalibratedInference(gpu_model).eval()
            labels["eager_cuda"] = "PyTorch eager (CUDA, channels-last)"
            for b, batch in batches.items():
                m = interleaved(
                    {"eager_cuda": eager_work(gpu_inference, batch, "cuda")},
                    settings,
                    sync=torch.cuda.synchronize,
                )
                results.setdefault("eager_cuda", {})[b] = m["eager_cuda"]
            data["peak_gflops"]["torch (cuda, fp32, no TF32)"] = cuda_peak_gflops(settings)

        if triton:
            labels.update(_run_triton(settings, onnx_path, model, batches, sessions, results, data))
    except Exception as exc:  # report what was measured, and why the rest was not
        notes.append(f"inference benchmark stopped early: {type(exc).__name__}: {exc}")
    finally:
        tmp.cleanup()
    return _section(settings, labels, results, data, notes)


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
                "ort": m["ort"].throughput,
                "queue_delay_us": QUEUE_DELAY_US,
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
    if (
        probs is None
        or probs.shape != expected.shape
        or not np.allclose(probs, expected, atol=1e-5)
    ):
        raise RuntimeError("Triton's probs differ from in-process onnxruntime's")


# ----------------------------------------------------------------------------- Markdown


def _section(settings, labels, results, data, notes) -> Section:
    big = max(BATCHES)
    peaks = data["peak_gflops"]
    flops_per_image = data["flops_per_image"]
    cpu_peak = max((v for k, v in peaks.items() if "cpu" in k), default=None)
    gpu_peak = max((v for k, v in peaks.items() if "cuda" in k), default=None)
    headers = (
        ["path"]
        + [f"batch {b} (img/s)" for b in BATCHES]
        + [
            f"GFLOP/s at {big}",
            "% of measured peak",
        ]
    )
    rows = []
    best_name, best_rate = None, 0.0
    for name, label in labels.items():
        if name not in results:
            continue
        rates = {b: results[name][b].throughput for b in BATCHES if b in results[name]}
        rate_big = rates.get(big)
        gflops = rate_big * flops_per_image / 1e9 if rate_big else None
        peak = gpu_peak if "cuda" in name else cpu_peak
        if "cuda" not in name and rate_big and rate_big > best_rate and name != "ort_beside_triton":
            best_name, best_rate = name, rate_big
        rows.append(
            [label]
            + [fmt_rate(rates.get(b)) for b in BATCHES]
            + [
                f"{gflops:.1f}" if gflops else "n/a",
                f"{100 * gflops / peak:.0f} %" if gflops and peak else "n/a",
            ]
        )
        data.setdefault("images_per_s", {})[name] = {str(b): r for b, r in rates.items()}

    goals = []
    eagers = [results[n][big] for n in ("eager", "eager_1t") if big in results.get(n, {})]
    ort = results.get("ort", {}).get(big)
    if eagers and ort:
        eager = max(m.throughput for m in eagers)
        ratio = ort.throughput / eager
        same_threads = results.get("eager", {}).get(big)
        if same_threads:
            data["ort_vs_eager_same_threads"] = ort.throughput / same_threads.throughput
        goals.append(
            (
                f"onnxruntime (tuned) >= {GOAL_ORT}x PyTorch eager (its faster thread setting) "
                f"at batch {big}, CPU",
                fmt_ratio(ratio),
                ratio >= GOAL_ORT,
            )
        )
    split = data.get("split")
    if split:
        ratio = split["triton_grpc"] / split["ort"]
        goals.append(
            (
                f"Triton gRPC, {split['clients']} clients x {split['per_request']} images >= "
                f"{GOAL_TRITON}x in-process onnxruntime (tuned) at batch {big}",
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
        f"Measured {'with --quick ' if settings.quick else ''}on {settings.device}: "
        f"{settings.rounds} alternating rounds of about {settings.round_seconds:g} s per "
        "contender, median round reported. Model: the `quick` preset's "
        f"{data['model_sizes']['backbone']} + MLP calibration head "
        f"(hidden {data['model_sizes']['hidden_dim']}) on {CHANNELS}x{SIZE}x{SIZE}, random "
        f"weights, {flops_per_image / 1e6:.2f} MFLOP per image (conv + linear layers, counted "
        f"with forward hooks). Triton rows: {CONCURRENCY} client threads each keep one request "
        "of `batch` images in flight; the server's dynamic batcher merges them (up to 256).",
        "",
        md_table(headers, rows) if rows else "(nothing measured)",
        "",
        md_table(["goal", "measured", "met?"], [[g, m, met(ok)] for g, m, ok in goals]),
        "",
    ]
    if split:
        lines.append(
            f"Same total batch: {split['clients']} gRPC clients x {split['per_request']} images "
            f"reach {fmt_rate(split['triton_grpc'])} img/s against {fmt_rate(split['ort'])} img/s "
            f"for in-process onnxruntime at batch {big} (timed in alternating rounds; server "
            f"dynamic batching with max_queue_delay {split['queue_delay_us']} us)."
        )
    if peaks:
        lines.append(
            "Measured float32 matrix-product peak (timed in the same rounds as batch "
            f"{big}): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) + "."
        )
    if best_name and cpu_peak:
        frac = best_rate * flops_per_image / 1e9 / cpu_peak
        lines.append(
            f"The fastest CPU path at batch {big} ({labels[best_name]}) reaches "
            f"**{100 * frac:.0f} %** of that peak."
        )
        data["best_cpu_path"] = {"path": best_name, "fraction_of_peak": frac}
    if "ort_max_abs_diff" in data:
        lines.append(
            f"Sanity: onnxruntime's probs match PyTorch's within {data['ort_max_abs_diff']:.1e}; "
            "Triton's answers were checked against onnxruntime's before timing."
        )
    if "tritonserver" in data:
        lines.append(f"tritonserver {data['tritonserver']} (from its metadata endpoint).")
    if "ort_vs_eager_same_threads" in data:
        lines.append(
            f"Against PyTorch eager with the same {cpu_cores()} threads, onnxruntime (tuned) is "
            f"{fmt_ratio(data['ort_vs_eager_same_threads'])} at batch {big}."
        )
    e_many, e_one = results.get("eager", {}).get(1), results.get("eager_1t", {}).get(1)
    if e_many and e_one and e_one.throughput > 3 * e_many.throughput:
        lines.append(
            f"PyTorch eager at batch 1 is {e_one.throughput / e_many.throughput:.0f}x faster with "
            f"1 thread than with {cpu_cores()}: on a busy machine (see the load average) its "
            "intra-op threads wait for each other at every operator; the goal uses the faster "
            "setting."
        )
    missed = [g for g, _, ok in goals if ok is False]
    if missed:
        lines += ["", "**Missed:** " + "; ".join(missed) + "."]
    lines += [f"- {n}" for n in notes]
    return Section("inference", "\n".join(lines), goals, data)
