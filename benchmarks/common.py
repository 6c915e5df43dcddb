"""Shared pieces of the benchmarks: interleaved timing, the machine's description, Markdown.

Timing rule: contenders that are compared by a ratio are timed in *alternating rounds*
(A, B, C, A, B, C, ...) and each one's median round is reported, so that a burst of load
from another process slows every contender rather than one of them.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """What every benchmark needs to know about the run."""

    quick: bool = False
    device: str = "cpu"  # "cpu" or "cuda" (resolved from --device auto by run.py)
    rounds: int = 5  # alternating rounds per comparison
    round_seconds: float = 0.6  # target length of one contender's round
    notes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, *, quick: bool, device: str) -> BenchSettings:
        if quick:
            return cls(quick=True, device=device, rounds=2, round_seconds=0.15)
        return cls(quick=False, device=device)


# ----------------------------------------------------------------------------- timing

# A contender does ``n`` units of work when called and returns how many items it processed.
Work = Callable[[int], int]


@dataclass
class Measurement:
    """Per-round (seconds, items) of one contender; throughput is taken from the median round."""

    name: str
    rounds: list[tuple[float, int]]

    @property
    def seconds(self) -> float:
        """Median seconds per round (a round is calibrated to a fixed length: compare
        contenders by ``throughput`` or ``seconds_per_item``, not by this)."""
        return statistics.median(s for s, _ in self.rounds)

    @property
    def seconds_per_item(self) -> float:
        """Median time of one item (unit of work): what "time per run" tables report."""
        return 1.0 / self.throughput

    @property
    def throughput(self) -> float:
        """Median items per second over the rounds."""
        return statistics.median(n / s for s, n in self.rounds if s > 0)

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-round throughputs: a noise indicator."""
        rates = [n / s for s, n in self.rounds if s > 0]
        med = statistics.median(rates)
        return (max(rates) - min(rates)) / med if med > 0 else 0.0


def repeat(fn: Callable[[], object], items_per_call: int = 1) -> Work:
    """A contender that calls ``fn`` ``n`` times and reports ``n * items_per_call`` items."""

    def work(n: int) -> int:
        for _ in range(n):
            fn()
        return n * items_per_call

    return work


def _time_once(work: Work, n: int, sync: Callable[[], None] | None) -> tuple[float, int]:
    if sync:
        sync()
    start = time.perf_counter()
    items = work(n)
    if sync:
        sync()
    return time.perf_counter() - start, items


def calibrate(
    work: Work, target_seconds: float, sync: Callable[[], None] | None = None, max_n: int = 100_000
) -> int:
    """The number of units that makes one call of ``work`` last about ``target_seconds``.

    Calls ``work(1)`` once as a warm-up, then doubles ``n`` until a call is long enough.
    """
    _time_once(work, 1, sync)  # warm-up: first-call allocations, lazy initialisation
    n = 1
    while True:
        seconds, _ = _time_once(work, n, sync)
        if seconds >= target_seconds / 4 or n >= max_n:
            scaled = int(n * target_seconds / max(seconds, 1e-9))
            return max(1, min(max_n, scaled))
        n *= 2


def interleaved(
    contenders: dict[str, Work],
    settings: BenchSettings,
    units: dict[str, int] | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, Measurement]:
    """Time the contenders in alternating rounds.

    ``units[name]`` is how many units each round of ``name`` runs; missing ones are
    calibrated to ``settings.round_seconds``.
    """
    units = dict(units or {})
    for name, work in contenders.items():
        if name not in units:
            units[name] = calibrate(work, settings.round_seconds, sync)
    rounds: dict[str, list[tuple[float, int]]] = {name: [] for name in contenders}
    for _ in range(settings.rounds):
        for name, work in contenders.items():
            rounds[name].append(_time_once(work, units[name], sync))
    return {name: Measurement(name, r) for name, r in rounds.items()}


# ----------------------------------------------------------------------------- the machine


def cpu_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str) -> dict[str, str]:
    """CPU, memory, OS, date and (on CUDA) the GPU's name."""
    mem = memory_gib()
    info = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": cpu_model(),
        "CPU cores (usable)": str(cpu_cores()),
        "memory": f"{mem:.1f} GiB" if mem else "unknown",
        "OS": f"{platform.system()} {platform.release()}",
        "device": device,
    }
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return info


def versions() -> dict[str, str]:
    """Versions of the interpreter and the libraries the benchmarks exercise."""
    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "torchvision",
        "onnxruntime",
        "onnx",
        "numpy",
        "scikit-learn",
        "pillow",
        "tritonclient",
        "nvidia-pytriton",
    ):
        out[name] = package_version(name)
    return out


def matmul_contenders(settings: BenchSettings) -> tuple[dict[str, Work], float]:
    """Large float32 matrix products with torch and numpy (all usable cores) and their FLOP.

    They are timed in the same alternating rounds as the contenders whose fraction of
    the peak is reported, so that background load lowers both alike. A contender's
    throughput x the returned FLOP per product is the measured GFLOP/s x 1e9.
    """
    import numpy as np
    import torch

    n = 1024 if settings.quick else 2048
    rng = np.random.default_rng(0)
    a_n = rng.standard_normal((n, n), dtype=np.float32)
    b_n = rng.standard_normal((n, n), dtype=np.float32)
    a_t, b_t = torch.from_numpy(a_n.copy()), torch.from_numpy(b_n.copy())
    contenders = {
        "matmul_torch": repeat(lambda: torch.mm(a_t, b_t)),
        "matmul_numpy": repeat(lambda: a_n @ b_n),
    }
    return contenders, 2.0 * n**3


def cuda_peak_gflops(settings: BenchSettings) -> float:
    """The GPU's measured float32 matrix-product rate, GFLOP/s (TF32 disabled: true float32)."""
    import torch

    n = 4096 if settings.quick else 8192
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        m = interleaved(
            {"torch": repeat(lambda: torch.mm(a, b))}, settings, sync=torch.cuda.synchronize
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return m["torch"].throughput * 2.0 * n**3 / 1e9


# ----------------------------------------------------------------------------- Markdown


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table; numbers are written as given (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_rate(x: float | None) -> str:
    """Images/s (or items/s) with a sensible number of digits."""
    if x is None:
        return "n/a"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


@dataclass
class Section:
    """One benchmark's Markdown (between its own markers) and its goal verdicts."""

    name: str
    markdown: str
    goals: list[tuple[str, str, bool | None]] = field(default_factory=list)  # (goal, measured, met)
    data: dict = field(default_factory=dict)  # raw figures, for --json


def profile_top_ops(
    fn: Callable[[], object], top: int = 5, runs: int = 2
) -> list[tuple[str, float]]:
    """The ``top`` torch operators by self CPU time over ``runs`` calls of ``fn`` (torch.profiler).

    Returns (operator, share of the profiled self CPU time) pairs; a cheap "why" for a report.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def fmt_profile(ops: list[tuple[str, float]]) -> str:
    return ", ".join(f"`{name}` {100 * share:.0f} %" for name, share in ops)
