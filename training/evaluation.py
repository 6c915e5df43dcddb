"""Features and probabilities of a model over a data set, the K-means baseline, and metrics.json.

The metrics themselves (ACC after Hungarian matching, NMI, ARI, ECE with 15 bins,
AUROC / AURC / FPR95 of failure rejection) and the shape of ``metrics.json`` come from
:mod:`cdc_serve.metrics`, shared with ``cdc-serve evaluate``; this module only gathers
the inputs.

:func:`normalize_images` is the torch twin of :func:`cdc_serve.preprocess.normalise_with`
(``(x / 255 - mean[c]) / std[c]``), the model's input on training's device;
``tests/serving/test_preprocess.py`` checks that the two agree.

The K-means baseline is the paper's "MoCo-v2 + K-means" row: K-means (k-means++ init;
optionally the best of a few restarts by inertia) on the L2-normalised backbone features. K-means
gives no probabilities, so for its ECE the soft assignment of DEC (Xie et al. 2016) is
used: a Student-t kernel ``q_ij ~ (1 + ||z_i - mu_j||^2)^-1`` (one degree of freedom)
normalised over the clusters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cdc_serve.metrics_json import HEAD_KEYS, KMEANS_KEYS, metrics_document
from cdc_serve_training.kmeans import kmeans

__all__ = [
    "HEAD_KEYS",
    "KMEANS_KEYS",
    "backbone_features",
    "head_metrics",
    "infer",
    "infer_images",
    "kmeans_baseline",
    "kmeans_clustering",
    "metrics_json",
    "normalize_images",
    "student_t_assignment",
]


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``N x C x H x W`` -> float32 ``(x / 255 - mean) / std`` (the model's input)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


@torch.no_grad()
def backbone_features(
    backbone: torch.nn.Module, data, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Backbone features (``N x D`` float32, on ``device``) of every image, no augmentation."""
    backbone.eval().to(device)
    parts = []
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        parts.append(backbone(normalize_images(x, data.mean, data.std)).float())
    return torch.cat(parts)


@torch.no_grad()
def infer(model, data, device: torch.device, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Run ``model`` (a ClusteringModel, eval mode) over ``data``: features, clu_probs, cal_probs (numpy)."""
    model.eval().to(device)
    parts: dict[str, list[np.ndarray]] = {"features": [], "clu_probs": [], "cal_probs": []}
    for start in range(0, len(data), batch_size):
        x = normalize_images(
            data.images[start : start + batch_size].to(device), data.mean, data.std
        )
        features, clu_logits, cal_logits = model(x)
        parts["features"].append(features.float().cpu().numpy())
        parts["clu_probs"].append(torch.softmax(clu_logits.float(), 1).cpu().numpy())
        parts["cal_probs"].append(torch.softmax(cal_logits.float(), 1).cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}


def infer_images(
    model, images: np.ndarray, preprocess: dict, batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """:func:`infer` on uint8 ``N x C x H x W`` images, normalised as the model was trained."""
    from cdc_serve_training.data import ImageData

    data = ImageData(
        images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        labels=None,
        num_classes=model.num_classes,
        name="images",
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
    )
    with torch.no_grad():
        return infer(model, data, torch.device("cpu"), batch_size)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def head_metrics(labels, probs) -> dict[str, float]:
    """acc, nmi, ari, ece, auroc, aurc, fpr95 of one head's probabilities (fractions in [0, 1])."""
    from cdc_serve.metrics import evaluate_probs

    values = evaluate_probs(_as_numpy(labels), _as_numpy(probs))
    return {k: float(values[k]) for k in HEAD_KEYS}


def student_t_assignment(
    z: torch.Tensor, centres: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """DEC's soft assignment: ``q_ij ~ (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha + 1) / 2)``."""
    d2 = torch.cdist(z, centres).pow(2)
    q = (1.0 + d2 / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def kmeans_clustering(
    features: torch.Tensor, num_classes: int, seed: int = 0, restarts: int = 1, n_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means on the L2-normalised features, best of ``restarts`` by inertia: (labels, soft probs)."""
    z = F.normalize(features.float(), dim=1)
    best = None
    for r in range(restarts):
        generator = torch.Generator(device=z.device).manual_seed(seed * 101 + r)
        centres, labels = kmeans(z, num_classes, n_iter=n_iter, generator=generator)
        inertia = (z - centres[labels]).pow(2).sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    _, centres, labels = best
    return labels, student_t_assignment(z, centres)


def kmeans_baseline(features, labels, num_classes: int, seed: int = 0) -> dict[str, float]:
    """The "backbone + K-means" row: acc, nmi, ari and the ECE of the Student-t soft assignment."""
    from cdc_serve.metrics import evaluate_probs

    features = torch.as_tensor(features)
    _, probs = kmeans_clustering(features, num_classes, seed=seed)
    values = evaluate_probs(_as_numpy(labels), probs.cpu().numpy())
    return {k: float(values[k]) for k in KMEANS_KEYS}


def metrics_json(dataset: str, split: str, n: int, kmeans: dict, clu: dict, cal: dict) -> dict:
    """The metrics.json document of a training run (:func:`cdc_serve.metrics_json.metrics_document`)."""
    heads = {
        "kmeans": {k: kmeans[k] for k in KMEANS_KEYS},
        "clu": {k: clu[k] for k in HEAD_KEYS},
        "cal": {k: cal[k] for k in HEAD_KEYS},
    }
    return metrics_document(dataset, split, n, heads)
