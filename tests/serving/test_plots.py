"""The PNGs of cdc_serve.plots decode, have the documented size and show what they should."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cdc_serve import CDCError, plots


def overconfident(seed=0, n=1500, k=10):
    """Labels and sharp probabilities whose argmax is right about 60 % of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), pred] += rng.uniform(2, 9, n)
    p = np.exp(logits)
    return y, (p / p.sum(axis=1, keepdims=True))[:, rng.permutation(k)]


def load(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.convert("RGB")


def count_near(image, rgb, tol=12):
    arr = np.asarray(image, dtype=int)
    return int(np.sum(np.all(np.abs(arr - np.array(rgb)) <= tol, axis=-1)))


def hex_rgb(color):
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def test_reliability_diagram_png(tmp_path):
    y, p = overconfident()
    out = plots.reliability_diagram(y, p, tmp_path / "sub" / "rel.png", title="test")
    assert out == tmp_path / "sub" / "rel.png"
    im = load(out)
    assert im.size == (500, 500) == plots.RELIABILITY_SIZE_PX
    assert np.asarray(im).var() > 0
    # accuracy bars are drawn in their solid colour
    assert count_near(im, hex_rgb(plots._ACC_COLOR)) > 2000


def test_reliability_diagram_with_empty_bins_and_confidence_one(tmp_path):
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[[0, 1, 2, 0, 2, 1]]  # confidences all exactly 1.0, most bins empty
    im = load(plots.reliability_diagram(y, p, tmp_path / "one.png", n_bins=10))
    assert im.size == (500, 500)
    assert count_near(im, hex_rgb(plots._ACC_COLOR)) > 0  # the top bin's bar


def test_side_by_side_png(tmp_path):
    y, p = overconfident(1)
    soft = np.sqrt(p) / np.sqrt(p).sum(axis=1, keepdims=True)
    im = load(plots.side_by_side(y, p, soft, tmp_path / "both.png"))
    assert im.size == (1000, 500) == plots.SIDE_BY_SIDE_SIZE_PX
    assert np.asarray(im).var() > 0


def test_confidence_histogram_png(tmp_path):
    y, p = overconfident(2)
    im = load(plots.confidence_histogram(y, p, tmp_path / "hist.png", title="hist"))
    assert im.size == (600, 400) == plots.HISTOGRAM_SIZE_PX
    assert np.asarray(im).var() > 0


def test_confidence_histogram_all_correct(tmp_path):
    y = np.array([0, 1, 1, 0])
    p = np.eye(2)[y] * 0.6 + 0.2  # all correct: failure AUROC undefined, plotted as n/a
    im = load(plots.confidence_histogram(y, p, tmp_path / "ok.png"))
    assert im.size == (600, 400)


def test_bad_input_raises_and_writes_nothing(tmp_path):
    y, p = overconfident(3, n=20, k=3)
    p[0, 0] = np.nan
    with pytest.raises(CDCError, match="NaN"):
        plots.reliability_diagram(y, p, tmp_path / "bad.png")
    with pytest.raises(CDCError, match="n_bins"):
        plots.confidence_histogram(y, p, tmp_path / "bad2.png", n_bins=0)
    assert not list(tmp_path.iterdir())


def test_pyplot_and_global_backend_are_never_touched(tmp_path):
    # In a fresh interpreter: drawing must not import pyplot nor pick a global backend.
    code = f"""
import sys, numpy as np, matplotlib
from cdc_serve import plots
before = dict.__getitem__(matplotlib.rcParams, "backend")
y = np.array([0, 1, 1, 0]); p = np.eye(2)[y] * 0.6 + 0.2
plots.reliability_diagram(y, p, {str(tmp_path / "a.png")!r})
plots.confidence_histogram(y, p, {str(tmp_path / "b.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") == before, "backend changed"
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
