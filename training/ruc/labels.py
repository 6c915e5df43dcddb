"""Where RUC's pseudo-labels come from: K-means, a cdc-serve model, or a labels file.

:func:`pseudo_labels_from` reads one source (``--labels-from``) and returns one label
per image with the confidences the source has (none for a labels file, so that only the
metric strategy applies); :func:`_labels_file` parses and checks a ``.npy``/``.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cdc_serve import CDCError
from cdc_serve.datasets import parse_label, read_csv_rows
from cdc_serve.npy import read_npy

LABEL_SOURCES = "kmeans | path/to/model.pth | labels.npy | labels.csv"


def pseudo_labels_from(
    labels_from: str | Path,
    features: Tensor,
    num_classes: int,
    seed: int = 0,
    *,
    data=None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """Pseudo-labels (and confidences, when the source has them) for RUC.

    * ``"kmeans"``: K-means on the L2-normalised ``features`` (the pretrained backbone's,
      N x D) with the confidences of DEC's Student-t soft assignment,
      ``evaluation.kmeans_clustering`` -- exactly the K-means baseline the pipeline
      reports, so "RUC vs. its pseudo-labels" compares like with like;
    * ``path/to/model.pth``: a cdc-serve model's *clustering head* predictions on ``data``
      and their max probability (``checkpoint.load_model``);
    * ``labels.npy`` / ``labels.csv``: one label per sample index, no confidences
      (use the metric strategy).

    Returns ``(labels int64 N, confidences float32 N or None)``, on the CPU.
    """
    n = int(features.shape[0]) if features is not None else len(data)
    if str(labels_from) == "kmeans":
        from cdc_serve_training.evaluation import kmeans_clustering

        labels, probs = kmeans_clustering(torch.as_tensor(features), num_classes, seed=seed)
        return labels.long().cpu(), probs.max(dim=1).values.float().cpu()
    path = Path(labels_from)
    if not path.exists():
        raise CDCError(f"--labels-from {labels_from}: no such file (expected {LABEL_SOURCES})")
    if path.suffix in (".npy", ".csv"):
        return _labels_file(path, n, num_classes), None
    if path.suffix in (".pth", ".pt"):
        from cdc_serve_training.evaluation import infer

        if data is None:
            raise CDCError("pseudo-labels from a model.pth need the images (data=...)")
        model, _ = source_model(path, data, num_classes)
        clu_probs = torch.from_numpy(
            infer(model, data, torch.device(device), batch_size)["clu_probs"]
        )
        conf, labels = clu_probs.max(dim=1)
        return labels.long(), conf.float()
    raise CDCError(f"--labels-from {labels_from}: expected {LABEL_SOURCES}")


def is_model_file(labels_from: str | Path | None) -> bool:
    """Whether ``--labels-from`` names a cdc-serve model (whose backbone RUC then starts from)."""
    return labels_from is not None and Path(labels_from).suffix in (".pth", ".pt")


def source_model(path: str | Path, data, num_classes: int, backbone: str | None = None):
    """The cdc-serve model at ``path`` ``(model, meta)``, checked against the data (and
    against the run's ``backbone`` name when given)."""
    from cdc_serve_training.checkpoint import load_model

    model, meta = load_model(path)
    arch = meta["arch"]
    if int(arch["num_classes"]) != num_classes:
        raise CDCError(
            f"{path} clusters into {arch['num_classes']} classes, the data has {num_classes}"
        )
    if list(arch["input_size"]) != list(data.size) or arch["in_channels"] != data.channels:
        raise CDCError(
            f"{path} takes {arch['in_channels']}x{arch['input_size']} images, "
            f"the data has {data.channels}x{list(data.size)}"
        )
    if backbone is not None and arch.get("backbone") != backbone:
        raise CDCError(
            f"{path} has a {arch.get('backbone')} backbone: train RUC on it with "
            f"--backbone {arch.get('backbone')}"
        )
    return model, meta


def _labels_file(path: Path, n: int, num_classes: int) -> Tensor:
    """Labels per sample index from ``.npy`` or ``.csv`` (one label per row, or
    ``index,label`` rows; an optional header line), validated."""
    values = np.array(read_npy(path)) if path.suffix == ".npy" else _csv_labels(path)
    if values.ndim != 1:
        raise CDCError(f"{path}: expected one label per sample, got shape {values.shape}")
    integral = np.issubdtype(values.dtype, np.integer) or (
        np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))
    )
    if not integral:
        raise CDCError(f"{path}: labels must be integers, got {values.dtype}")
    if values.shape[0] != n:
        raise CDCError(f"{path}: {values.shape[0]} labels for {n} images (one per sample index)")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise CDCError(
            f"{path}: labels must lie in 0..{num_classes - 1}, found {values.min()}..{values.max()}"
        )
    return torch.from_numpy(values.astype(np.int64))


def _csv_labels(path: Path) -> np.ndarray:
    """The labels of a CSV file: one per row, or ``index,label`` rows (index 0..N-1 once each)."""
    rows = read_csv_rows(path)
    if rows and parse_label(rows[0][1][-1].lstrip("-")) is None:
        rows = rows[1:]  # header
    width = len(rows[0][1]) if rows else 1
    values = np.full(len(rows), -1, dtype=np.int64)
    for pos, (line, fields) in enumerate(rows):
        numbers = [parse_label(f) for f in fields]
        if len(fields) != width or None in numbers:
            what = (
                "one integer >= 0" if width == 1 else f"{width} integers >= 0 (index, ..., label)"
            )
            raise CDCError(
                f"cannot read labels from {path}, line {line}: expected {what}, got {str(fields)[:80]}"
            )
        index = numbers[0] if width > 1 else pos
        if index >= len(rows) or values[index] >= 0:
            raise CDCError(
                f"{path}, line {line}: the index column must hold 0..N-1 once each (found {index})"
            )
        values[index] = numbers[-1]
    return values
