"""Scoring runs on onnxruntime alone: importing the serving side must not load torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import cdc_serve

# Every module of the serving package (the Python-backend model.py runs inside Triton,
# where it imports Triton's own utilities: it is checked by the Triton tests instead).
MODULES = sorted(
    f"cdc_serve.{m.name}"
    for m in pkgutil.iter_modules(cdc_serve.__path__)
    if m.name != "triton_python_model"
)


def test_cdc_serve_imports_without_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'cdc_serve_training'))\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"torch was imported: {result.stdout}{result.stderr}"
