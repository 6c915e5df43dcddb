"""``metrics.json``: the one document every run writes (training, ``cdc-serve evaluate``).

``metrics_document`` builds it from the heads' metrics (``cdc_serve.metrics``), with the
label-free figures a model gives about itself (:func:`label_free_summary`) where there
are no labels; ``write_metrics`` writes it, NaN as ``null``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cdc_serve import CDCError
from cdc_serve.metrics import json_ready

METRICS_FILE = "metrics.json"
#: The keys of a head in metrics.json (:func:`evaluate_probs`), in the printed order.
HEAD_KEYS = ("acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95")
#: The K-means baseline row has no probabilities of its own to reject failures with.
KMEANS_KEYS = ("acc", "nmi", "ari", "ece")


def label_free_summary(probs: np.ndarray, threshold: float = 0.8) -> dict[str, Any]:
    """What a clustering says about itself without labels (``metrics.json``'s ``label_free``).

    ``probs`` is the calibration head's ``N x C`` softmax. Returns the image count, the
    size of every cluster (argmax), the number of empty clusters, the mean confidence
    (a calibrated model's estimate of its accuracy) and the share of images whose
    confidence is at least ``threshold``, with that threshold.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise CDCError(f"label_free_summary: probs must be N x C, got shape {probs.shape}")
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    sizes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) if len(probs) else (
        np.zeros(probs.shape[1], dtype=np.int64))  # fmt: skip
    return {
        "n": int(len(probs)),
        "cluster_sizes": [int(v) for v in sizes],
        "empty_clusters": int((sizes == 0).sum()),
        "estimated_accuracy": float(confidence.mean()) if len(probs) else float("nan"),
        "confident_share": float((confidence >= threshold).mean()) if len(probs) else float("nan"),
        "confident_threshold": float(threshold),
    }


def metrics_document(
    dataset: str,
    split: str,
    n: int,
    heads: dict[str, dict[str, float]],
    ood: dict[str, dict[str, float]] | None = None,
    ood_dataset: str | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (fractions in [0, 1])::

        {"dataset": str, "split": str, "n": int,
         "heads": {head: {metric: float}},                     # kmeans, clu, cal
         "ood": {"dataset": str, "scores": {score: {"auroc": float, "fpr95": float}}}}

    ``ood`` (from ``cdc-serve evaluate --ood-dataset``) is left out when empty.
    """
    document: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "n": int(n),
        "heads": {head: {k: float(v) for k, v in values.items()} for head, values in heads.items()},
    }
    if ood:
        document["ood"] = {"dataset": ood_dataset, "scores": ood}
    return document


def write_metrics(path: str | os.PathLike, document: dict[str, Any]) -> Path:
    """Write ``document`` as ``metrics.json`` at ``path`` (a file, or a folder to put it in).

    NaN values (undefined AUROC / FPR95) become ``null``: JSON has no NaN.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    path.write_text(json.dumps(json_ready(document), indent=2) + "\n", encoding="utf-8")
    return path
