"""``cdc-serve predict`` and ``cdc-serve evaluate`` of an exported model run without torch.

Two proofs, on a tiny exported model (tests/serving/tiny_export.py) and small data sets:

- fast: the CLI runs in a subprocess whose import system refuses ``torch``,
  ``torchvision`` and ``cdc_serve_training`` (a ``sys.meta_path`` finder that raises
  and records every attempt); no attempt may happen and none of them may be loaded;
- slow: a fresh virtualenv gets ``pip install <repo>`` without the ``train`` extra, so
  torch is not installed at all, and its ``cdc-serve`` runs both commands.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datafiles import fake_fmnist
from tiny_export import make_exported_model

from cdc_serve.idx import write_idx
from cdc_serve.metrics_json import HEAD_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "torchvision", "cdc_serve_training")

# Runs the CLI with torch & co. made unimportable; writes what was attempted to argv[1].
GUARDED_CLI = r"""
import json, sys

BLOCKED = __BLOCKED__
attempts = []


class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"this test forbids importing {name}")
        return None


sys.meta_path.insert(0, RefuseTorch())
record, *args = sys.argv[1:]
sys.argv = ["cdc-serve", *args]
code = 0
try:
    from cdc_serve.cli import app

    app()
except SystemExit as exc:
    code = exc.code or 0
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    with open(record, "w") as f:
        json.dump({"attempts": attempts, "loaded": loaded}, f)
sys.exit(code)
""".replace("__BLOCKED__", repr(BLOCKED))


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict:
    """An exported model (1 x 8 x 8, with OOD statistics), a labelled IDX file and a dataset."""
    root = tmp_path_factory.mktemp("no-torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    return {
        "root": root,
        "model": make_exported_model(root / "repo"),
        "images": write_idx(root / "images-idx3-ubyte", images),
        "labels": write_idx(root / "labels-idx1-ubyte", (np.arange(12) % 5).astype(np.uint8)),
        "fmnist": fake_fmnist(root / "fmnist"),  # 28 x 28 images: evaluate resizes them to 8 x 8
    }


def _commands(w: dict, out: Path) -> dict[str, list[str]]:
    return {
        "predict": ["predict", str(w["images"]), "--model", str(w["model"]), "--output",
                    str(out / "preds.csv"), "--labels", str(w["labels"]), "--no-progress"],
        "evaluate": ["evaluate", str(w["model"]), "--dataset", "fashion-mnist", "--data-root",
                     str(w["fmnist"]), "--split", "test", "--ood-dataset", "digits",
                     "--out", str(out / "eval")],
    }  # fmt: skip


def _check_outputs(out: Path, printed: dict[str, str]) -> None:
    with open(out / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(not r["error"] and r["cluster_id"] for r in rows)
    assert "scored 12 inputs" in printed["predict"] and "true accuracy" in printed["predict"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["dataset"] == "fashion-mnist" and metrics["n"] == 20
    assert list(metrics["heads"]) == ["cal"] and set(metrics["heads"]["cal"]) == set(HEAD_KEYS)
    assert metrics["ood"]["dataset"] == "digits"
    assert {"msp", "mahalanobis"} <= set(metrics["ood"]["scores"])
    assert (out / "eval" / "reliability_cal.png").stat().st_size > 0
    assert "fashion-mnist (test, n=20)" in printed["evaluate"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MPLBACKEND"] = "Agg"
    return env


def test_predict_and_evaluate_never_import_torch(workload, tmp_path):
    printed = {}
    for name, args in _commands(workload, tmp_path).items():
        record = tmp_path / f"{name}-imports.json"
        done = subprocess.run(
            [sys.executable, "-c", GUARDED_CLI, str(record), *args],
            capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300,
        )  # fmt: skip
        imports = json.loads(record.read_text())
        assert imports == {"attempts": [], "loaded": []}, f"{name} tried to import {imports}"
        assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
        printed[name] = done.stdout
    _check_outputs(tmp_path, printed)


def _pip_unreachable(output: str) -> bool:
    signs = ("No matching distribution found", "Could not fetch", "NewConnectionError",
             "Temporary failure in name resolution", "Network is unreachable")  # fmt: skip
    return any(sign in output for sign in signs)


@pytest.mark.slow
def test_a_virtualenv_without_torch_predicts_and_evaluates(workload, tmp_path):
    """``pip install <repo>`` (no extras) into a fresh venv: torch is absent, both commands work."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("cdc_serve", "training"):
        shutil.copytree(
            REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, env=_env(), timeout=900,
    )  # fmt: skip
    if install.returncode != 0 and _pip_unreachable(install.stdout + install.stderr):
        pytest.skip(f"pip cannot reach a package index here: {install.stderr[-500:]}")
    assert install.returncode == 0, install.stdout + install.stderr

    probe = f"import importlib.util as u; print([m for m in {BLOCKED[:2]!r} if u.find_spec(m)])"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", f"torch is installed in the fresh venv: {found.stdout}"

    printed = {}
    for name, args in _commands(workload, tmp_path).items():
        done = subprocess.run(
            [str(venv / "bin" / "cdc-serve"), *args],
            capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"{name} failed without torch:\n{done.stdout}\n{done.stderr}"
        printed[name] = done.stdout
    _check_outputs(tmp_path, printed)
