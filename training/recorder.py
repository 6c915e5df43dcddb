"""What a training run records about itself: time, memory and device, per pipeline stage.

``StageRecorder`` is the one helper around every stage of ``pipeline.train``::

    recorder = StageRecorder(device)
    with recorder.stage("pretrain"):
        ...
    recorder.timings        # {"pretrain": 180.2, ...} wall seconds per stage
    recorder.peak_rss_mib   # {"pretrain": 1234, ...} the process's peak RSS after each stage
    recorder.peak_gpu_mib   # on CUDA: {"pretrain": {"allocated": ..., "reserved": ...}}

On CUDA each stage ends with a synchronisation, so that queued kernels are charged to
the stage that launched them, then its peak memory of tensors (allocated) and of
torch's caching allocator (reserved; nvidia-smi adds the CUDA context to it) is read
and reset. :func:`print_summary` prints the heads' metrics and these figures.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class StageRecorder:
    """Wall time, peak resident memory and (on CUDA) peak GPU memory of each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.peak_rss_mib: dict[str, int | None] = {}
        self.peak_gpu_mib: dict[str, dict[str, int]] = {}
        self._cpu_start = time.process_time()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gpu_mib[name] = {
                "allocated": round(torch.cuda.max_memory_allocated(self.device) / 2**20),
                "reserved": round(torch.cuda.max_memory_reserved(self.device) / 2**20),
            }
            torch.cuda.reset_peak_memory_stats(self.device)
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.peak_rss_mib[name] = peak_rss_mib()

    def log(self) -> dict:
        """The ``train_log.json`` fields of the run so far."""
        log = {
            "timings_s": dict(self.timings),
            "total_s": round(sum(self.timings.values()), 2),
            "cpu_s": round(time.process_time() - self._cpu_start, 2),  # all threads
            "peak_rss_mib": peak_rss_mib(),
            "peak_rss_mib_by_stage": dict(self.peak_rss_mib),
            "device": str(self.device),
            "device_name": device_name(self.device),
        }
        if self.peak_gpu_mib:
            log["peak_gpu_memory_mib"] = dict(self.peak_gpu_mib)
        return log


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (Linux) or platform's processor."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_rss_mib() -> int | None:
    """This process's peak resident memory so far (MiB), where the OS reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024) if sys.platform != "darwin" else round(kib / 2**20)


def print_summary(metrics: dict, recorder: StageRecorder) -> None:
    """The heads' metrics (percent), the time per stage and, on a GPU, its peak memory."""
    from rich.console import Console
    from rich.table import Table

    keys = ("acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95")
    table = Table(title=f"{metrics['dataset']} ({metrics['split']}, n={metrics['n']}), percent")
    table.add_column("head")
    for key in keys:
        table.add_column(key, justify="right")
    for head, values in metrics.get("heads", {}).items():
        table.add_row(head, *(f"{100 * values[k]:.2f}" if k in values else "-" for k in keys))
    console = Console(stderr=True)
    if metrics.get("heads"):
        console.print(table)
    free = metrics.get("label_free")
    if free:
        console.print(
            f"{metrics['dataset']}: {free['n']:,} images in {len(free['cluster_sizes'])} clusters "
            f"({free['empty_clusters']} empty; sizes {free['cluster_sizes']}); estimated accuracy "
            f"{100 * free['estimated_accuracy']:.1f} % (mean calibrated confidence), "
            f"{100 * free['confident_share']:.1f} % of the images at or above "
            f"{free['confident_threshold']}"
        )
    timings = recorder.timings
    console.print(
        "time: "
        + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings.items())
        + f" (total {sum(timings.values()):.0f}s)"
    )
    if recorder.peak_gpu_mib:
        console.print(
            f"peak GPU memory, allocated/reserved ({device_name(recorder.device)}): "
            + ", ".join(
                f"{stage} {mib['allocated']:,}/{mib['reserved']:,} MiB"
                for stage, mib in recorder.peak_gpu_mib.items()
            )
        )
