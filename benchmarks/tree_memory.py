"""Peak resident memory of a command and all its child processes, sampled while it runs.

``python -m benchmarks.tree_memory -- COMMAND ...`` runs the command, sums the resident
set (``VmRSS`` of ``/proc/PID/status``) of the process and every descendant every 0.1 s,
and prints the command's exit status, its wall time and the peak sum in MiB as JSON on
stderr's last line. Shared pages (libraries, memory-mapped files) count once per process
that maps them, so the figure is an upper bound of what the tree really holds. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(root: int) -> float:
    """The summed resident memory of ``root`` and its descendants, now."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _rss_kib(pid)
        todo += tree.get(pid, [])
    return total / 1024


def main() -> None:
    command = sys.argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise SystemExit("usage: python -m benchmarks.tree_memory -- COMMAND ...")
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mib(process.pid))
        time.sleep(0.1)
    report = {"returncode": process.returncode, "seconds": round(time.perf_counter() - start, 1),
              "peak_tree_rss_mib": round(peak)}  # fmt: skip
    print(json.dumps(report), file=sys.stderr)
    raise SystemExit(process.returncode)


if __name__ == "__main__":
    main()
