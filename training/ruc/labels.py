"""Where RUC's pseudo-labels come from: K-means, a cdc-serve model, or a labels file.

:func:`pseudo_labels_from` reads one source (``--labels-from``) and returns one label
per image with the confidences the source has (none for a labels file, so that only the
metric strategy applies); :func:`_labels_file` parses and checks a ``.npy``/``.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cdc_serve import CDCError

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
        from cdc_serve_training.checkpoint import load_model
        from cdc_serve_training.evaluation import infer

        if data is None:
            raise CDCError("pseudo-labels from a model.pth need the images (data=...)")
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
        clu_probs = torch.from_numpy(
            infer(model, data, torch.device(device), batch_size)["clu_probs"]
        )
        conf, labels = clu_probs.max(dim=1)
        return labels.long(), conf.float()
    raise CDCError(f"--labels-from {labels_from}: expected {LABEL_SOURCES}")


def _labels_file(path: Path, n: int, num_classes: int) -> Tensor:
    """Labels per sample index from ``.npy`` or ``.csv`` (one label per row, or
    ``index,label`` rows; an optional header line), validated."""
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            with path.open(newline="") as fh:
                rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
            if rows and not rows[0][-1].strip().lstrip("-").isdigit():
                rows = rows[1:]  # header
            if rows and len(rows[0]) >= 2:
                index = np.array([int(r[0]) for r in rows])
                if sorted(index.tolist()) != list(range(len(rows))):
                    raise CDCError(f"{path}: the index column must hold 0..N-1 once each")
                values = np.empty(len(rows), dtype=np.int64)
                values[index] = [int(r[-1]) for r in rows]
            else:
                values = np.array([int(r[0]) for r in rows], dtype=np.int64)
    except (ValueError, OSError) as exc:
        raise CDCError(f"cannot read labels from {path}: {exc}") from exc
    values = np.asarray(values)
    if values.ndim != 1:
        raise CDCError(f"{path}: expected one label per sample, got shape {values.shape}")
    integral = np.issubdtype(values.dtype, np.integer) or (
        np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))
    )
    if not integral:
        raise CDCError(f"{path}: labels must be integers, got {values.dtype}")
    if values.shape[0] != n:
        raise CDCError(f"{path}: {values.shape[0]} labels for {n} images (one per sample index)")
    if values.min() < 0 or values.max() >= num_classes:
        raise CDCError(
            f"{path}: labels must lie in 0..{num_classes - 1}, found {values.min()}..{values.max()}"
        )
    return torch.from_numpy(values.astype(np.int64))
