"""Benchmark 1: inference throughput of the exported model (images/s).

Contenders, all on the same ONNX export of the ``quick`` preset's model (SmallCNN +
calibration head on 1x28x28, random weights: throughput does not depend on them):

- PyTorch eager: ``CalibratedInference`` under ``torch.inference_mode()``;
- onnxruntime in-process: default ``SessionOptions``, and tuned ones (graph
  optimisation level ALL, intra-op threads = usable cores);
- Triton (the ``tritonserver`` that pip installs, Python backend running the same
  ``model.onnx`` through onnxruntime, dynamic batching) over HTTP and gRPC, with several
  concurrent clients (threads, one ``tritonclient`` client each, inputs encoded once),
  so the loop measures the server rather than client-side work; and over gRPC with the
  input in a system shared-memory region per client (``cdc_serve.shm``, what the client
  library does when the server is on loopback).

"Batch b" is the images per call (per request for Triton, where ``CONCURRENCY`` clients
each keep one request of b images in flight). The Triton goal compares gRPC at the same
*total* batch: ``CONCURRENCY`` clients x (256 / ``CONCURRENCY``) images against
onnxruntime at batch 256, both ways of carrying the input. As context (not a goal), the
same split runs on a ResNet-18 variant of the model. The peak fraction divides the
model's FLOP/s (conv + linear layers counted with forward hooks) by a large float32
matrix product's measured rate.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
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
from benchmarks.model import CHANNELS, SIZE, build_model, count_flops, quick_preset
from benchmarks.triton_load import (
    MEAN,
    MODEL_NAME,
    QUEUE_DELAY_US,
    REQUESTED,
    STD,
    TritonLoad,
    build_triton_repo,
    served_onnx,
    server_version,
)
from cdc_serve.contract import INPUT_NAME, ONNX_FILE, PROBS

BATCHES = (1, 32, 256)
CONCURRENCY = 4
LARGE_BACKBONE = "resnet18"  # context for the Triton goal: the same split on a bigger model
LARGE_NAME = f"bench_{LARGE_BACKBONE}"
GOAL_ORT = 1.5  # onnxruntime >= 1.5x PyTorch eager at batch 256 (CPU)
GOAL_TRITON = {  # Triton gRPC / in-process onnxruntime at the same total batch
    "triton_grpc_shm": (0.7, "input in shared memory (the client's default on loopback)"),
    "triton_grpc": (0.85, "tensors inside the messages"),  # issue 18 (0.7 in issue 7)
}


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
    """The served graph on uint8 ``batch``, asked for what the client library asks for."""
    feed = {INPUT_NAME: batch}
    return repeat(lambda: session.run(REQUESTED, feed), batch.shape[0])


# ----------------------------------------------------------------------------- the benchmark


def run(settings: BenchSettings, *, triton: bool = True) -> Section:
    """Measure every path at every batch size and return the Markdown section."""
    import torch

    from cdc_serve.preprocess import normalise_with
    from cdc_serve_training.heads import CalibratedInference

    cores = cpu_cores()
    torch.set_num_threads(cores)
    sizes = quick_preset()
    model = build_model(sizes).eval()
    inference = CalibratedInference(model).eval()
    rng = np.random.default_rng(0)
    # uint8 images for the served graph (onnxruntime, Triton), their normalised floats for PyTorch
    batches = {b: rng.integers(0, 256, (b, CHANNELS, SIZE, SIZE)).astype(np.uint8) for b in BATCHES}
    floats = {b: normalise_with(x, MEAN, STD) for b, x in batches.items()}
    flops_per_image = count_flops(inference, torch.from_numpy(floats[1]))
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
        onnx_path = Path(tmp.name) / ONNX_FILE
        meta = served_onnx(inference, onnx_path)
        sessions = {k: ort_session(onnx_path, k) for k in ("default", "tuned", "nospin")}
        # the exported graph must agree with PyTorch before its speed means anything
        with torch.inference_mode():
            ref = inference(torch.from_numpy(floats[32]))[0].numpy()
        diff = float(
            np.abs(sessions["tuned"].run([PROBS], {INPUT_NAME: batches[32]})[0] - ref).max()
        )
        data["ort_max_abs_diff"] = diff

        matmuls, matmul_flop = matmul_contenders(settings)
        for b, batch in batches.items():
            contenders = {
                "eager": eager_work(inference, floats[b], "cpu", cores),
                "eager_1t": eager_work(inference, floats[b], "cpu", 1),
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
            for b, x in floats.items():
                m = interleaved(
                    {"eager_cuda": eager_work(gpu_inference, x, "cuda")},
                    settings,
                    sync=torch.cuda.synchronize,
                )
                results.setdefault("eager_cuda", {})[b] = m["eager_cuda"]
            data["peak_gflops"]["torch (cuda, fp32, no TF32)"] = cuda_peak_gflops(settings)

        if triton:
            large = None if settings.quick else _large_model(sizes, floats, Path(tmp.name))
            labels.update(
                _run_triton(settings, onnx_path, meta, batches, sessions, results, data, large)
            )
    except Exception as exc:  # report what was measured, and why the rest was not
        notes.append(f"inference benchmark stopped early: {type(exc).__name__}: {exc}")
    finally:
        tmp.cleanup()
    return _section(settings, labels, results, data, notes)


def _large_model(sizes, floats, folder: Path) -> dict:
    """The ``LARGE_BACKBONE`` variant of the benchmark model, exported beside the small one."""
    import torch

    from cdc_serve_training.heads import CalibratedInference

    model = build_model(replace(sizes, backbone=LARGE_BACKBONE)).eval()
    inference = CalibratedInference(model).eval()
    path = folder / f"{LARGE_NAME}.onnx"
    return {
        "path": path,
        "meta": served_onnx(inference, path, LARGE_NAME),
        "session": ort_session(path, "tuned"),
        "flops": count_flops(inference, torch.from_numpy(floats[1])),
    }


def _run_triton(
    settings, onnx_path, meta, batches, sessions, results, data, large=None
) -> dict[str, str]:
    """Start tritonserver, time HTTP and gRPC with ``CONCURRENCY`` clients beside onnxruntime.

    ``large`` (a dict with the ONNX ``path``, its ``meta``, ``session`` and ``flops`` per
    image) adds the goal's split measurement on a bigger model, as context.
    """
    from cdc_serve.serve import TritonServer

    labels: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cdc-bench-repo-") as repo:
        build_triton_repo(Path(repo), onnx_path, meta)
        if large is not None:
            build_triton_repo(Path(repo), large["path"], large["meta"])
        with TritonServer(Path(repo), http_port=0, grpc_port=0) as server:
            data["tritonserver"] = server_version(server.http_url)
            urls = {"http": server.http_url, "grpc": server.grpc_url}
            for b, batch in batches.items():
                loads = {
                    "triton_http": TritonLoad("http", urls["http"], batch, CONCURRENCY),
                    "triton_grpc": TritonLoad("grpc", urls["grpc"], batch, CONCURRENCY),
                    "triton_grpc_shm": TritonLoad(
                        "grpc", urls["grpc"], batch, CONCURRENCY, shared_memory=True
                    ),
                }
                try:
                    for load in loads.values():
                        _check_triton(load, sessions["tuned"], batch)
                    contenders = {"ort": ort_work(sessions["tuned"], batch)}
                    contenders.update({name: load.work for name, load in loads.items()})
                    m = interleaved(contenders, settings)
                finally:
                    for load in loads.values():
                        load.close()
                for name in loads:
                    results.setdefault(name, {})[b] = m[name]
                results.setdefault("ort_beside_triton", {})[b] = m["ort"]
            # the goal: the same total batch, split over the concurrent clients
            data["split"] = _split(settings, urls["grpc"], sessions["tuned"], batches)
            if large is not None:  # context: the same split on a model with more compute
                data["split_large"] = {
                    **_split(settings, urls["grpc"], large["session"], batches, LARGE_NAME),
                    "backbone": LARGE_BACKBONE,
                    "mflop_per_image": large["flops"] / 1e6,
                }
    labels["triton_http"] = f"Triton HTTP, python backend, {CONCURRENCY} clients x batch"
    labels["triton_grpc"] = f"Triton gRPC, python backend, {CONCURRENCY} clients x batch"
    labels["triton_grpc_shm"] = (
        f"Triton gRPC + shared-memory input, python backend, {CONCURRENCY} clients x batch"
    )
    labels["ort_beside_triton"] = "onnxruntime tuned (timed beside Triton)"
    return labels


def _split(settings, grpc_url, session, batches, model_name=MODEL_NAME) -> dict:
    """``CONCURRENCY`` gRPC clients x (256 / ``CONCURRENCY``) images against in-process
    onnxruntime at batch 256, in alternating rounds: the Triton goal's comparison."""
    total = max(BATCHES)
    per = batches[total][: total // CONCURRENCY]
    loads = {
        "triton_grpc": TritonLoad("grpc", grpc_url, per, CONCURRENCY, model_name),
        "triton_grpc_shm": TritonLoad(
            "grpc", grpc_url, per, CONCURRENCY, model_name, shared_memory=True
        ),
    }
    try:
        for load in loads.values():
            _check_triton(load, session, per)
        contenders = {"ort": ort_work(session, batches[total])}
        contenders.update({name: load.work for name, load in loads.items()})
        m = interleaved(contenders, settings)
    finally:
        for load in loads.values():
            load.close()
    return {
        "clients": CONCURRENCY,
        "per_request": total // CONCURRENCY,
        "ort": m["ort"].throughput,
        "queue_delay_us": QUEUE_DELAY_US,
        **{name: m[name].throughput for name in loads},
    }


def _check_triton(load: TritonLoad, session, batch: np.ndarray) -> None:
    """Triton's answer must equal in-process onnxruntime's (same model file)."""
    result = load.pool.submit(load.infer_once).result()
    expected = dict(zip(REQUESTED, session.run(REQUESTED, {INPUT_NAME: batch}), strict=True))
    for name, want in expected.items():
        got = None if result.as_numpy(name) is None else result.as_numpy(name).reshape(want.shape)
        same = got is not None and (
            np.allclose(got, want, rtol=0, atol=1e-5)
            if want.dtype.kind == "f"
            else np.array_equal(got, want)
        )
        if not same:
            raise RuntimeError(f"Triton's {name} differs from in-process onnxruntime's")


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
    for key, (goal, how) in GOAL_TRITON.items():
        text = (
            f"Triton gRPC, {CONCURRENCY} clients x {big // CONCURRENCY} images, {how} >= "
            f"{goal}x in-process onnxruntime (tuned) at batch {big}"
        )
        ratio = split[key] / split["ort"] if split else None
        goals.append((text, fmt_ratio(ratio) if split else "not measured", split and ratio >= goal))

    lines = [
        "## 1. Inference throughput of the exported model",
        "",
        f"Measured {'with --quick ' if settings.quick else ''}on {settings.device}: "
        f"{settings.rounds} alternating rounds of about {settings.round_seconds:g} s per "
        "contender, median round reported. Model: the `quick` preset's "
        f"{data['model_sizes']['backbone']} + MLP calibration head "
        f"(hidden {data['model_sizes']['hidden_dim']}) on {CHANNELS}x{SIZE}x{SIZE}, random "
        f"weights, {flops_per_image / 1e6:.2f} MFLOP per image (conv + linear layers, counted "
        f"with forward hooks). onnxruntime and Triton run the served graph (uint8 images in, "
        "normalised in the graph, the Mahalanobis OOD score computed in it) and are asked for "
        f"what the client library asks for ({', '.join(REQUESTED)}); PyTorch runs the network "
        f"on the normalised floats. Triton rows: {CONCURRENCY} client threads each keep one "
        "request of `batch` images in flight; the server's dynamic batcher merges them (up to "
        "256).",
        "",
        md_table(headers, rows) if rows else "(nothing measured)",
        "",
        md_table(["goal", "measured", "met?"], [[g, m, met(ok)] for g, m, ok in goals]),
        "",
    ]
    if split:
        lines.append(
            f"Same total batch: {split['clients']} gRPC clients x {split['per_request']} images "
            f"reach {fmt_rate(split['triton_grpc_shm'])} img/s with the input in system shared "
            f"memory and {fmt_rate(split['triton_grpc'])} img/s with it inside the messages, "
            f"against {fmt_rate(split['ort'])} img/s for in-process onnxruntime at batch {big} "
            "(timed in alternating rounds; server dynamic batching with max_queue_delay "
            f"{split['queue_delay_us']} us). Shared memory spares the copies into and out of "
            "the message; the request still goes over gRPC."
        )
    large = data.get("split_large")
    if large:
        lines.append(
            f"For scale, the same split on a {large['backbone']} backbone "
            f"({large['mflop_per_image']:.0f} MFLOP per image): {fmt_rate(large['triton_grpc'])} "
            f"img/s over gRPC against {fmt_rate(large['ort'])} img/s in-process "
            f"({fmt_ratio(large['triton_grpc'] / large['ort'])}). Triton's cost is per request "
            "(gRPC, the hop to the Python-backend stub), so it weighs on the small model and "
            "fades on a bigger one; the goal rows above are the small model's."
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
