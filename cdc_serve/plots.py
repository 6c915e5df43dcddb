"""Reliability diagrams and confidence histograms as PNG files.

The pictures of the CDC paper's Fig. 1 / Fig. 7 (reliability diagrams) and Fig. 3,
second row (confidence of correct vs misclassified samples), drawn from the numbers
of :mod:`cdc_serve.metrics` so that what is plotted is what is reported.

matplotlib is used through its object API (``Figure`` + the Agg canvas): this module
never imports ``pyplot``, never calls ``matplotlib.use`` and leaves matplotlib's global
state (backend, rcParams, open figures) untouched, so it is safe in servers, threads
and tests.

Every PNG has a fixed pixel size, given by the constants below (figure inches x
``DPI``, saved without ``bbox_inches="tight"``):

* :func:`reliability_diagram`: ``RELIABILITY_SIZE_PX`` = 500 x 500 px
* :func:`confidence_histogram`: ``HISTOGRAM_SIZE_PX`` = 600 x 400 px
* :func:`side_by_side`: ``SIDE_BY_SIDE_SIZE_PX`` = 1000 x 500 px
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cdc_serve import CDCError, metrics

DPI = 100
RELIABILITY_SIZE_PX = (500, 500)
HISTOGRAM_SIZE_PX = (600, 400)
SIDE_BY_SIDE_SIZE_PX = (1000, 500)

_ACC_COLOR = "#1f5fbf"  # accuracy bars
_GAP_COLOR = "#e0413a"  # gap between accuracy and confidence
_CORRECT_COLOR = "#2a9d4b"
_WRONG_COLOR = "#d1495b"


def _check_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise CDCError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _new_figure(size_px: tuple[int, int], ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def _display_bins(table: list[dict[str, Any]], n_bins: int) -> list[dict[str, Any]]:
    """The first ``n_bins`` rows of a reliability table, the ``[1, 1]`` row folded into the last.

    ECE keeps confidences of exactly 1.0 in a bin of their own (torchmetrics'
    convention); a zero-width bar cannot be drawn, so the diagram shows them in the
    top bin ``[(n-1)/n, 1]``.
    """
    rows = [dict(r) for r in table[:n_bins]]
    if len(table) > n_bins:
        top, ones = rows[-1], table[n_bins]
        n = top["count"] + ones["count"]
        conf = ((top["confidence"] or 0.0) * top["count"] + ones["confidence"] * ones["count"]) / n
        acc = ((top["accuracy"] or 0.0) * top["count"] + ones["accuracy"] * ones["count"]) / n
        top.update(count=n, confidence=conf, accuracy=acc, gap=conf - acc)
    return rows


def _draw_reliability(ax: Axes, y_true: Any, probs: Any, n_bins: int, title: str | None) -> None:
    """Accuracy bars per confidence bin, gap bars up/down to the mean confidence, diagonal."""
    table = metrics.reliability_table(y_true, probs, n_bins=n_bins)
    summary = metrics.evaluate_probs(y_true, probs, n_bins=n_bins)
    confidence, _ = metrics.confidence_and_correct(y_true, probs)
    rows = [r for r in _display_bins(table, n_bins) if r["count"] > 0]
    lo = np.array([r["lo"] for r in rows])
    width = 1.0 / n_bins
    acc = np.array([r["accuracy"] for r in rows])
    conf = np.array([r["confidence"] for r in rows])

    ax.bar(
        lo,
        acc,
        width=width,
        align="edge",
        color=_ACC_COLOR,
        edgecolor="black",
        linewidth=0.8,
        label="Accuracy",
        zorder=2,
    )
    # Gap bar: from the accuracy to the bin's mean confidence (above it = overconfident).
    ax.bar(
        lo,
        conf - acc,
        bottom=acc,
        width=width,
        align="edge",
        color=_GAP_COLOR,
        alpha=0.35,
        edgecolor=_GAP_COLOR,
        hatch="//",
        linewidth=0.8,
        label="Gap",
        zorder=3,
    )
    ax.plot(
        [0, 1],
        [0, 1],
        linestyle="--",
        color="0.35",
        linewidth=1.2,
        label="Perfect calibration",
        zorder=4,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.grid(True, color="0.88", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    text = (
        f"ACC  = {100 * summary['acc']:.1f}%\n"
        f"Conf = {100 * float(confidence.mean()):.1f}%\n"
        f"ECE  = {100 * summary['ece']:.1f}%"
    )
    ax.text(
        0.97,
        0.04,
        text,
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        family="monospace",
        fontsize=10,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"},
        zorder=5,
    )


def reliability_diagram(
    y_true: Any, probs: Any, path: str | Path, n_bins: int = 15, title: str | None = None
) -> Path:
    """Write a reliability diagram (paper Fig. 1 style) to ``path``; returns the path.

    Blue bars: accuracy after the Hungarian matching in each of ``n_bins`` equal-width
    confidence bins (empty bins are left blank). Red hatched bars: the gap from the
    accuracy to the bin's mean confidence (a bar reaching above the blue one means
    overconfidence). Dashed diagonal: perfect calibration. The box prints ACC, mean
    confidence and ECE (same numbers as :func:`cdc_serve.metrics.evaluate_probs`).
    A 500 x 500 px PNG (``RELIABILITY_SIZE_PX``). Bad input raises CDCError.
    """
    fig, (ax,) = _new_figure(RELIABILITY_SIZE_PX)
    _draw_reliability(ax, y_true, probs, n_bins, title)
    fig.tight_layout()
    return _save(fig, path)


def side_by_side(
    y_true: Any,
    probs_left: Any,
    probs_right: Any,
    path: str | Path,
    titles: tuple[str, str] = ("Clustering head", "Calibration head"),
    n_bins: int = 15,
) -> Path:
    """Two reliability diagrams next to each other (e.g. clustering vs calibration head).

    Same drawing as :func:`reliability_diagram` for each probability array, against the
    same ``y_true``. A 1000 x 500 px PNG (``SIDE_BY_SIDE_SIZE_PX``).
    """
    fig, axes = _new_figure(SIDE_BY_SIDE_SIZE_PX, ncols=2)
    for ax, probs, title in zip(axes, (probs_left, probs_right), titles, strict=True):
        _draw_reliability(ax, y_true, probs, n_bins, title)
    fig.tight_layout()
    return _save(fig, path)


def confidence_histogram(
    y_true: Any, probs: Any, path: str | Path, n_bins: int = 20, title: str | None = None
) -> Path:
    """Write the confidence distribution of correct vs wrong predictions (paper Fig. 3, row 2).

    Two overlaid histograms over ``n_bins`` equal-width bins on [0, 1], as fractions of
    all samples (the two together sum to 1), for predictions correct / wrong after the
    Hungarian matching. Vertical lines mark the mean confidence and the accuracy; the
    legend reports the failure-rejection AUROC. A 600 x 400 px PNG (``HISTOGRAM_SIZE_PX``).
    """
    n_bins = _check_bins(n_bins)
    confidence, correct = metrics.confidence_and_correct(y_true, probs)
    n = confidence.size
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    clipped = np.clip(confidence, 0.0, 1.0)
    auroc = metrics.failure_auroc(correct, confidence)
    acc = float(correct.mean())

    fig, (ax,) = _new_figure(HISTOGRAM_SIZE_PX)
    weights = np.full(n, 1.0 / n)
    ax.hist(
        clipped[correct],
        bins=edges,
        weights=weights[correct],
        color=_CORRECT_COLOR,
        alpha=0.6,
        edgecolor="black",
        linewidth=0.5,
        label=f"Correct ({int(correct.sum())})",
    )
    ax.hist(
        clipped[~correct],
        bins=edges,
        weights=weights[~correct],
        color=_WRONG_COLOR,
        alpha=0.6,
        edgecolor="black",
        linewidth=0.5,
        label=f"Wrong ({int((~correct).sum())})",
    )
    ax.axvline(
        float(confidence.mean()),
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"Mean confidence {100 * float(confidence.mean()):.1f}%",
    )
    ax.axvline(
        acc, color=_ACC_COLOR, linestyle=":", linewidth=1.8, label=f"Accuracy {100 * acc:.1f}%"
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("Confidence (max probability)")
    ax.set_ylabel("Fraction of samples")
    ax.grid(True, axis="y", color="0.88", linewidth=0.6)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title)
    auroc_text = "n/a" if np.isnan(auroc) else f"{100 * auroc:.1f}%"
    ax.plot([], [], " ", label=f"Failure AUROC {auroc_text}")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)
