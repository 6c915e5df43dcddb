"""The pipeline's RUC stage: pseudo-labels -> clean set -> :func:`~.loop.train_ruc`.

:func:`run_ruc_stage` is what ``pipeline.train`` calls for ``--method ruc``; it reads
its settings from the ``TrainConfig`` (``config.model.hidden`` is the heads' hidden
size H of the run) and adapts two of them to the data, as the report's ``config`` records.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cdc_serve_training.config import RUCConfig
from cdc_serve_training.ruc.clean_set import KMEANS_CLEAN_FRACTION
from cdc_serve_training.ruc.labels import is_model_file, pseudo_labels_from
from cdc_serve_training.ruc.loop import train_ruc


def run_ruc_stage(
    config, data, backbone, features, device, out, resume, augmenter=None
) -> tuple[nn.Module, dict]:
    """The pipeline's RUC stage in one call: pseudo-labels -> clean set -> train_ruc.

    ``config`` is a ``TrainConfig``: ``ruc`` (RUCConfig / dict / None = paper defaults),
    ``labels_from`` (pseudo-label source, default ``"kmeans"``), the head width
    ``model.hidden``, ``seed``, ``progress``, ``eval_batch_size``. ``features`` are
    the pretrained backbone's features of ``data`` (the K-means input and the metric
    strategy's embedding). Two adjustments to the configuration, both recorded in the
    report's ``config``: K-means pseudo-labels and a model's clustering head use the
    confidence strategy's rank form (``clean_fraction`` = ``clean_set.KMEANS_CLEAN_FRACTION``
    unless set: the most confident half of every cluster), and k is capped at N - 1 for
    tiny data. Neither source's confidence is a saturated classifier's: on the quick CDC
    model of all 70,000 Fashion-MNIST images, tau_1 = 0.99 kept 6,246 images of one
    cluster and 6 of another, and RUC trained on that clean set lost 4 clusters.
    Checkpoints every epoch to ``out/ruc.ckpt`` (``resume`` continues from it). Returns
    ``(model, report)``; the report also has the pseudo-labels' own metrics.
    """
    cfg = RUCConfig.from_dict(config.ruc).validate()
    labels_from = str(config.labels_from or "kmeans")
    seed, batch_size = int(config.seed), int(config.eval_batch_size)
    features = torch.as_tensor(features).float().cpu()
    labels, conf = pseudo_labels_from(
        labels_from, features, data.num_classes, seed, data=data, device=device,
        batch_size=batch_size,
    )  # fmt: skip
    if (labels_from == "kmeans" or is_model_file(labels_from)) and cfg.clean_fraction is None:
        cfg = replace(cfg, clean_fraction=KMEANS_CLEAN_FRACTION)
    cfg = replace(cfg, k=min(cfg.k, len(data) - 1))
    if augmenter is None:
        from cdc_serve_training.augment import Augmenter

        augmenter = Augmenter(data.size, data.mean, data.std)
    model, report = train_ruc(
        backbone, data, labels, conf, features, augmenter, cfg, device,
        num_classes=data.num_classes, hidden=config.model.hidden, seed=seed,
        eval_batch_size=batch_size, labels_from=labels_from,
        progress=bool(config.progress),
        checkpoint_path=Path(out) / "ruc.ckpt", resume=resume,
    )  # fmt: skip
    report["labels_from"] = labels_from
    if data.labels is not None:
        from cdc_serve.metrics import evaluate_labels

        report["pseudo_labels"] = evaluate_labels(data.labels.numpy(), labels.numpy())
    return model, report
