"""Scoring runs on onnxruntime alone: importing the serving side must not load torch."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "cdc_serve.cli", "cdc_serve.client", "cdc_serve.predict", "cdc_serve.export",
    "cdc_serve.evaluate", "cdc_serve.serve", "cdc_serve.triton", "cdc_serve.metrics",
    "cdc_serve.plots", "cdc_serve.ood", "cdc_serve.preprocess", "cdc_serve.modelmeta",
    "cdc_serve.contract", "cdc_serve.datasets", "cdc_serve.transport", "cdc_serve.shm",
    "cdc_serve.predict_output", "cdc_serve.predict_summary", "cdc_serve.idx",
]  # fmt: skip


def test_cdc_serve_imports_without_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'cdc_serve_training'))\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"torch was imported: {result.stdout}{result.stderr}"
