"""``python -m benchmarks.run``: run the benchmarks of issue 7 and write ``docs/BENCHMARKS.md``.

Examples::

    python -m benchmarks.run --out docs/BENCHMARKS.md             # everything (make bench)
    python -m benchmarks.run --quick --only kmeans --out /tmp/b.md  # a smoke test
    python -m benchmarks.run --only training --device cuda         # on a GPU machine

This is not a test: it never fails on a slow result. A missed goal is reported as such
in the Markdown. Every ratio compares contenders timed in alternating rounds of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import BenchSettings, Section, machine_info, md_table, versions
from benchmarks.report import ORDER, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    parser.add_argument(
        "--only",
        default=",".join(ORDER),
        help=f"comma-separated subset of {','.join(ORDER)} (default: all)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="few, short rounds and small sizes: a smoke test"
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="K-means sizes B,K,D (default 1000,500,512; --quick uses 200,50,64)",
    )
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton contenders")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    return parser.parse_args(argv)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return device


def parse_sizes(text: str | None, quick: bool) -> tuple[int, int, int]:
    if text is None:
        return (200, 50, 64) if quick else (1000, 500, 512)
    try:
        b, k, d = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--sizes must be three integers B,K,D, got {text!r}") from None
    if not (1 <= k <= b and d >= 1):
        raise SystemExit(f"--sizes needs 1 <= K <= B and D >= 1, got {text!r}")
    return b, k, d


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def header_markdown(
    settings: BenchSettings, extra_versions: dict[str, str], load_at_start: str
) -> str:
    info = machine_info(settings.device)
    info["load average at start"] = load_at_start
    info["load average at end"] = load_average()
    vers = {**versions(), **extra_versions}
    return "\n".join(
        [
            "## Machine and versions",
            "",
            md_table(["", ""], [[k, v] for k, v in info.items()]),
            "",
            md_table(["package", "version"], [[k, v] for k, v in vers.items()]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in ORDER]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(ORDER)}")
    sizes = parse_sizes(args.sizes, args.quick)
    settings = BenchSettings.make(quick=args.quick, device=resolve_device(args.device))

    load_at_start = load_average()
    sections: list[Section] = []
    failed: list[str] = []
    for name in ORDER:
        if name not in only:
            continue
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            section = _run_one(name, settings, sizes, triton=not args.no_triton)
        except Exception as exc:  # record the failure in the report, then exit non-zero
            failed.append(name)
            traceback.print_exc()
            section = Section(
                name,
                f"## {name}\n\n**Failed** in this run: `{type(exc).__name__}: {exc}`",
                [(f"{name} benchmark ran", "failed", None)],
            )
        print(
            f"[bench] {name} done in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        sections.append(section)
        for goal, measured, ok in section.goals:
            verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
            print(f"[bench]   {goal}: {measured} ({verdict})", file=sys.stderr)

    extra = {}
    for s in sections:
        if "tritonserver" in s.data:
            extra["tritonserver"] = s.data["tritonserver"]
    extra.setdefault("tritonserver", "not started in this run")
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    path = write_report(
        args.out, header_markdown(settings, extra, load_at_start), sections, command.strip()
    )
    print(f"[bench] wrote {path}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({s.name: s.data for s in sections}, indent=2, default=str) + "\n",
            encoding="utf-8",
        )
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _run_one(name: str, settings: BenchSettings, sizes, *, triton: bool) -> Section:
    if name == "inference":
        from benchmarks import inference

        return inference.run(settings, triton=triton)
    if name == "kmeans":
        from benchmarks import kmeans_bench

        return kmeans_bench.run(settings, sizes)
    if name == "folders":
        from benchmarks import folder_bench

        return folder_bench.run(settings)
    if name == "predict":
        from benchmarks import predict_bench

        return predict_bench.run(settings)
    from benchmarks import training_bench

    return training_bench.run(settings)


if __name__ == "__main__":
    sys.exit(main())
