"""Smoke test of ``python -m benchmarks.run``: it runs and writes its Markdown (no timing checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_kmeans_benchmark_writes_its_table_and_keeps_hand_written_text(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nHand-written intro.\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"
        "\n## Notes by hand\nkept\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--only",
            "kmeans",
            "--sizes",
            "120,12,16",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    # the generated block replaced the old one; the hand-written text around it is intact
    assert "Hand-written intro." in text and "## Notes by hand\nkept" in text
    assert "\nold\n" not in text
    assert text.count("<!-- bench:start -->") == 1 and text.count("<!-- bench:end -->") == 1
    block = text.split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    assert "<!-- bench:kmeans:start -->" in block and "<!-- bench:kmeans:end -->" in block
    # the machine, the versions and the K-means table with its goal columns
    assert "| CPU cores (usable) |" in block and "| scikit-learn |" in block
    assert "| implementation | device | time per run | iterations | inertia | speed-up |" in block
    assert "| goal | measured | met? |" in block
    assert "B = 120 points, K = 12 clusters, D = 16" in block
    kmeans_rows = [
        line
        for line in block.splitlines()
        if line.startswith("| project kmeans, same initial centres | cpu |")
    ]
    assert kmeans_rows, block


def test_bad_options_are_refused_before_any_benchmark_runs(tmp_path):
    out = tmp_path / "b.md"
    for args in (["--only", "nonsense"], ["--sizes", "10,20,3"], ["--sizes", "a,b"]):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        assert not out.exists()


def test_a_partial_run_replaces_its_own_section_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a folder of the repo, not installed
    from benchmarks.common import Section
    from benchmarks.report import write_report

    out = tmp_path / "BENCHMARKS.md"
    first = [
        Section(
            "inference",
            "## 1. inference v1\n\n| goal | measured | met? |\n|---|---|---|\n| goal A | 2.00x | yes |\n",
            [("goal A", "2.00x", True)],
        ),
        Section("kmeans", "## 2. kmeans v1", [("goal B", "1.00x", False)]),
    ]
    write_report(out, "## Machine", first, "python -m benchmarks.run")
    out.write_text("intro by hand\n\n" + out.read_text(encoding="utf-8") + "\noutro by hand\n")
    write_report(out, "## Machine", [Section("kmeans", "## 2. kmeans v2")], "run --only kmeans")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("intro by hand") and text.rstrip().endswith("outro by hand")
    assert "## 1. inference v1" in text  # kept from the first run
    assert "## 2. kmeans v2" in text and "kmeans v1" not in text
    assert "Sections kept from an earlier run (not re-measured now): inference." in text
    assert text.index("## 1. inference v1") < text.index("## 2. kmeans v2")
    # the goal summary keeps the earlier section's goals, marked as such
    assert "| inference (earlier run) | goal A | 2.00x | yes |" in text
