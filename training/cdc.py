"""Calibrated Deep Clustering: the losses (paper Eq. 1, 2, 4, 5) and the training loop (Algorithm 1).

Per batch of ``B`` images (Algorithm 1; reference-facts.md "Training step"):

1. Without gradients: backbone features of the un-augmented ("val") view and of a weak
   view; clustering-head probabilities of the val view; calibration-head
   probabilities of the weak view.
2. Pseudo-labels: the calibration head's argmax on the weak view, a class-wise dynamic
   share of them kept (Eq. 4, :func:`select_pseudo_labels`).
3. Mini-clusters: K-means with ``K`` clusters on the L1-normalised val features; the
   calibration target of a sample is the mean clustering-head prediction of its
   mini-cluster (Eq. 1, :func:`calibration_targets`).
4. Per sub-batch of ``B_s`` images: cross-entropy of the clustering head on strong views
   of the selected samples (Eq. 5), which trains backbone + clustering head; and the
   calibration loss (Eq. 1) plus ``w_en`` times the negative entropy (Eq. 2) on the
   *detached* val features, which trains the calibration head only (stop-gradient).

Several processes (torchrun, ``distributed.py``): ``B`` and ``B_s`` are global, each
process holds ``B_s / W`` rows of every sub-batch (the global batch and its sub-batches
hold the rows they hold in one process). Step 1
runs on each process's rows; steps 2-3 are made by rank 0 on the global batch (every
process's no-gradient predictions gathered) and broadcast, so Eq. 4's ``floor(B / C)``
per class and the ``K`` mini-clusters are those of one process seeing the whole batch;
step 4 runs under DDP, its losses weighted so that the averaged gradient is that of the
global sub-batch (the clustering loss by each process's share of the selected samples,
the entropy of Eq. 2 through ``distributed.batch_mean``). BatchNorm is SyncBatchNorm on
CUDA, per process on the CPU (``distributed.synced_batchnorm``). A sub-batch's clustering loss
runs when every process has two selected samples in it (one process: two in all).

The ablations of Table 2 are options of :class:`~cdc_serve_training.config.CDCConfig`:
``selection="fixed"`` (a global threshold instead of Eq. 4), ``heads="clu"`` (one head,
no calibration loss, selecting with its own confidence), ``heads="clu+cal"`` (one head
trained with both losses) and ``stop_gradient=False`` (the calibration loss also trains
the backbone). Random head initialisation is handled by the pipeline (``init.py``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cdc_serve import CDCError
from cdc_serve_training import distributed
from cdc_serve_training.checkpoint import fingerprint, load_stage, save_stage
from cdc_serve_training.config import CDCConfig
from cdc_serve_training.heads import ClusteringModel
from cdc_serve_training.kmeans import kmeans

# ----------------------------------------------------------------------------------------------
# The losses and the selection, as pure functions
# ----------------------------------------------------------------------------------------------


def calibration_targets(
    clu_probs: torch.Tensor, mini_cluster_labels: torch.Tensor, k: int, kind: str = "mean"
) -> torch.Tensor:
    """Per-sample target of Eq. 1: ``q_hat_k``, the mean clustering-head prediction of its mini-cluster.

    ``clu_probs`` is ``B x C`` (softmax of the clustering head), ``mini_cluster_labels``
    the K-means assignment (``B`` ints in ``[0, k)``). Returns ``B x C``.

    ``kind="votes"`` averages the clustering head's one-hot argmax instead: the share of
    the mini-cluster that the head assigns to each cluster, which is Eq. 1 for a head
    whose predictions have become one-hot. An option measured against Eq. 1 in
    docs/BENCHMARKS.md (issue 17); the presets use ``mean``.
    """
    if kind == "votes":
        clu_probs = F.one_hot(clu_probs.argmax(dim=1), clu_probs.shape[1]).to(clu_probs.dtype)
    elif kind != "mean":
        raise CDCError(f"unknown calibration target {kind!r}; use mean or votes")
    labels = mini_cluster_labels.long()
    sums = torch.zeros(k, clu_probs.shape[1], dtype=clu_probs.dtype, device=clu_probs.device)
    sums.index_add_(0, labels, clu_probs)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(clu_probs.dtype)
    return (sums / counts[:, None])[labels]


def calibration_loss(cal_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``-1/B sum_i q_hat_k(i) . log p_i^cal``, a soft cross-entropy."""
    return -(targets * F.log_softmax(cal_logits.float(), dim=1)).sum(dim=1).mean()


def negative_entropy_loss(cal_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``sum_j pbar_j log pbar_j`` with ``pbar`` the batch-mean prediction.

    Minimising it spreads the batch over all clusters. The paper writes a ``1/C``
    factor; the reference implementation sums over the classes, as here (``w_en = 1``
    was tuned with the sum).
    """
    return negative_entropy(cal_probs.float().mean(dim=0))


def negative_entropy(mean_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of a batch-mean prediction ``pbar`` (``C``): ``sum_j pbar_j log pbar_j``."""
    return (mean_probs * torch.log(mean_probs.clamp_min(1e-8))).sum()


def select_pseudo_labels(
    cal_probs_weak: torch.Tensor, num_classes: int, label_by: str = "argmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: class-wise dynamic selection of pseudo-labels from the calibration head.

    For every class ``c``: ``TOP(c)`` are the ``floor(B / C)`` samples with the highest
    probability in column ``c``; ``M(c) = floor(sum over TOP(c) of the samples'
    confidence)`` (the confidence being a sample's largest probability, as the
    reference code does); the first ``M(c)`` samples of ``TOP(c)`` are kept. A
    well-calibrated head thus keeps more samples of the classes it has learnt well and
    fewer of the others.

    ``label_by="argmax"`` (the paper and the reference): a kept sample's pseudo-label is
    its argmax. ``label_by="column"``: it is the class ``c`` whose ``TOP(c)`` kept it (the
    one with the highest probability if several did), as SPICE labels its per-class
    selections; a class that is nobody's argmax then still gets samples and cannot die
    out during a short, high-learning-rate schedule.

    Returns ``(index, labels)``: sorted, distinct row indices into the batch and their
    pseudo-labels.
    """
    probs = cal_probs_weak.float()
    per_class = probs.shape[0] // num_classes
    if per_class == 0:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, empty
    confidence = probs.max(dim=1).values
    top = probs.topk(per_class, dim=0).indices  # per_class x C, best first in each column
    # floor of the sum; the small epsilon keeps float32 round-off (e.g. 8.9999995) from
    # dropping a sample
    m = torch.floor(confidence[top].sum(dim=0) + 1e-5).long()
    keep = torch.arange(per_class, device=probs.device)[:, None] < m[None, :]
    kept = torch.zeros_like(probs, dtype=torch.bool)
    columns = torch.arange(num_classes, device=probs.device).expand_as(top)
    kept[top[keep], columns[keep]] = True
    index = torch.nonzero(kept.any(dim=1)).flatten()
    if label_by == "argmax":
        labels = probs.argmax(dim=1)
    elif label_by == "column":
        labels = torch.where(kept, probs, torch.full_like(probs, -1.0)).argmax(dim=1)
    else:
        raise CDCError(f"unknown pseudo-label rule {label_by!r}; use argmax or column")
    return index, labels[index]


def select_fixed_threshold(
    probs: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation (Table 2-II): keep every sample whose confidence is at least ``threshold``."""
    confidence, labels = probs.float().max(dim=1)
    index = torch.nonzero(confidence >= threshold).flatten()
    return index, labels[index]


def clustering_loss(clu_logits_strong: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: cross-entropy of the clustering head on strong views of the selected samples."""
    return F.cross_entropy(clu_logits_strong.float(), labels)


# ----------------------------------------------------------------------------------------------
# The training loop (Algorithm 1)
# ----------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The random stream of one epoch, derived from (seed, epoch) so that resume is exact."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    return generator


def _heads(model: ClusteringModel, cfg: CDCConfig):
    """(selection head, calibration-trained head or None) for the head variant."""
    if cfg.heads == "dual":
        return model.cal_head, model.cal_head
    if cfg.heads == "clu":  # Table 2-III: one head, no calibration loss
        return model.clu_head, None
    return model.clu_head, model.clu_head  # "clu+cal", Table 2-IV: one head, both losses


def _optimizer(model: ClusteringModel, cfg: CDCConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr_encoder},
        {"params": list(model.clu_head.parameters()), "lr": cfg.lr_heads},
    ]
    if cfg.heads == "dual":
        groups.append({"params": list(model.cal_head.parameters()), "lr": cfg.lr_heads})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def cdc_fingerprint(cfg: CDCConfig, *, seed: int, n_images: int) -> dict:
    """What a CDC checkpoint must agree with to be resumed (``epochs`` may grow).

    ``cal_target`` counts only when it is not the paper's ``mean``, so that checkpoints
    written before the option existed still resume.
    """
    settings = asdict(cfg)
    if settings["cal_target"] == "mean":
        del settings["cal_target"]
    return fingerprint("cdc", settings, seed=seed, n_images=n_images)


def train_cdc(
    model: ClusteringModel,
    data,
    augmenter,
    cfg: CDCConfig,
    device: torch.device,
    *,
    seed: int = 0,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    amp: bool = False,
) -> dict:
    """Train ``model`` in place per Algorithm 1; return the per-epoch history.

    ``data`` is an :class:`~cdc_serve_training.data.ImageData`, ``augmenter`` an
    :class:`~cdc_serve_training.augment.Augmenter`. A checkpoint is written after every
    epoch to ``checkpoint_path``; with ``resume=True`` training continues from it (same
    settings, seed, data size and number of processes; ``epochs`` may grow) and ends with
    the same weights as an uninterrupted run (bit-identical on CPU).
    """
    n = len(data)
    B = cfg.batch_size
    if n < B:
        raise CDCError(f"CDC batch size B={B} is larger than the data set ({n} images)")
    distributed.check_divides(cfg.sub_batch_size, "the CDC sub-batch B_s", "--sub-batch-size")
    progress = progress and distributed.is_main()
    _to_device(model, device)
    optimizer = _optimizer(model, cfg)
    # per epoch: the means of _train_batch's figures, and the epoch's wall time (summed
    # over resumed runs, it is the training time of the whole schedule)
    history: dict[str, list[float]] = {key: [] for key in (*_BATCH_STATS, "seconds")}
    stage = cdc_fingerprint(cfg, seed=seed, n_images=n)
    start_epoch = 0
    state = load_stage(checkpoint_path, stage, device) if resume and checkpoint_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], int(state["epoch"])
        if progress:
            tqdm.write(f"CDC: resuming from {checkpoint_path} after epoch {start_epoch}/"
                       f"{cfg.epochs}", file=sys.stderr)  # fmt: skip

    images = data.images.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    with distributed.synced_batchnorm(model, device=device):
        _, cal_head = _heads(model, cfg)
        step = distributed.wrap(_SubBatch(model, cal_head, cfg.stop_gradient, autocast), device,
                                find_unused_parameters=True)  # fmt: skip
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            generator = epoch_generator(distributed.rank_seed(seed), epoch, device)
            means = _train_epoch(model, images, augmenter, cfg, data.num_classes, optimizer,
                                 generator, autocast, epoch, progress, step)  # fmt: skip
            distributed.average_batchnorm_stats(model)
            for key in _BATCH_STATS:
                history[key].append(means[key])
            history["seconds"].append(round(time.perf_counter() - started, 3))
            if progress:
                tqdm.write(
                    f"CDC epoch {epoch + 1}/{cfg.epochs}: loss_clu {history['loss_clu'][-1]:.4f} "
                    f"loss_cal {history['loss_cal'][-1]:.4f} loss_en {history['loss_en'][-1]:.4f} "
                    f"selected {100 * history['selected'][-1]:.1f}% "
                    f"({history['seconds'][-1]:.0f} s)",
                    file=sys.stderr,
                )
            if checkpoint_path is not None:
                save_stage(checkpoint_path, stage, epoch + 1, model=model.state_dict(),
                           optimizer=optimizer.state_dict(), history=history)  # fmt: skip

    if cfg.heads != "dual":  # single head: both outputs are that head
        model.cal_head.load_state_dict(model.clu_head.state_dict())
    model.eval()
    return history


def _train_epoch(
    model, images, augmenter, cfg: CDCConfig, num_classes, optimizer, generator, autocast,
    epoch: int, progress: bool, step=None,
) -> dict[str, float]:  # fmt: skip
    """One epoch: the batches of a random order of ``images``; the means of their figures.

    The order is rank 0's (the same on every process); each process trains on its share
    of every global batch (``distributed.shard``); the figures are the processes' means.
    """
    B = cfg.batch_size
    n_batches = len(images) // B
    order = torch.randperm(len(images), generator=generator, device=images.device)
    order = distributed.broadcast(order)
    select_head, cal_head = _heads(model, cfg)
    model.train()
    sums = {key: 0.0 for key in _BATCH_STATS}
    bar = tqdm(
        range(n_batches),
        desc=f"CDC {epoch + 1}/{cfg.epochs}",
        disable=None if progress else True,
        file=sys.stderr,
        leave=False,
    )
    n_sub = B // cfg.sub_batch_size
    for b in bar:
        x = images[distributed.shard(order[b * B : (b + 1) * B], n_sub)]
        stats = _train_batch(
            model, x, augmenter, cfg, num_classes, select_head, cal_head, optimizer, generator,
            autocast, step,
        )  # fmt: skip
        for key, value in stats.items():
            sums[key] += value
        bar.set_postfix(
            clu=f"{stats['loss_clu']:.3f}",
            cal=f"{stats['loss_cal']:.3f}",
            sel=f"{100 * stats['selected']:.0f}%",
        )
    bar.close()
    return distributed.average({key: sums[key] / max(n_batches, 1) for key in _BATCH_STATS})


_BATCH_STATS = ("loss_clu", "loss_cal", "loss_en", "selected")  # what _train_batch returns


def _train_batch(
    model: ClusteringModel,
    x: torch.Tensor,
    augmenter,
    cfg: CDCConfig,
    num_classes: int,
    select_head,
    cal_head,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    autocast,
    step: nn.Module | None = None,
) -> dict[str, float]:
    """One batch of Algorithm 1; returns the batch's mean losses and selected share.

    ``x`` is this process's share of the global batch (all of it in one process);
    ``step`` the sub-batch forward of step 4 (:class:`_SubBatch`, under DDP with several
    processes; by default a plain one). The losses are summed on the device and read once
    at the end, so the step waits for the device only where the selection's size decides
    what runs next.
    """
    W, B_s = distributed.world_size(), cfg.sub_batch_size // distributed.world_size()
    step = step or _SubBatch(model, cal_head, cfg.stop_gradient, autocast)

    # 1. predictions without gradients (this process's rows)
    with torch.no_grad(), autocast:
        x_val = _channels_last(augmenter.val(x))
        features_val = model.backbone(x_val).float()
        clu_probs = torch.softmax(model.clu_head(features_val).float(), dim=1)
        features_weak = model.backbone(_channels_last(augmenter.weak(x, generator=generator)))
        select_probs = torch.softmax(select_head(features_weak).float(), dim=1)

    # 2.-3. pseudo-labels (Eq. 4) and mini-cluster targets (Eq. 1) of the global batch
    n_sub = x.shape[0] // B_s
    labels, targets = _global_labels_and_targets(
        cfg, num_classes, n_sub, select_probs, features_val, clu_probs, cal_head is not None,
        generator,
    )  # fmt: skip
    chosen_per = (labels >= 0).view(n_sub, W, B_s).sum(dim=2).tolist()  # [sub-batch][process]
    selected = sum(map(sum, chosen_per))
    labels = distributed.shard(labels, n_sub)
    targets = None if targets is None else distributed.shard(targets, n_sub)

    # 4. sub-batches: clustering loss (Eq. 5) and calibration loss (Eq. 1 + w_en Eq. 2)
    zero = torch.zeros((), device=x.device)
    totals = {"loss_clu": zero, "loss_cal": zero, "loss_en": zero}
    for s in range(n_sub):
        part = slice(s * B_s, (s + 1) * B_s)
        optimizer.zero_grad(set_to_none=True)
        counts = chosen_per[s]
        strong = None
        if min(counts) > 1:  # BatchNorm needs two samples (per process): a lone one waits
            chosen = torch.nonzero(labels[part] >= 0).flatten() + s * B_s
            with autocast:
                strong = _channels_last(augmenter.strong(x[chosen], generator=generator))
        if strong is None and cal_head is None:
            continue
        clu_logits, cal_logits = step(
            strong, features_val[part] if cfg.stop_gradient else x_val[part]
        )
        loss = zero
        if clu_logits is not None:  # weighted by this process's share of the selected samples
            loss_clu = clustering_loss(clu_logits, labels[chosen]) * (
                counts[distributed.rank()] * W / sum(counts)
            )
            loss = loss + loss_clu
            totals["loss_clu"] = totals["loss_clu"] + loss_clu.detach() / n_sub
        if cal_logits is not None:
            loss_cal = calibration_loss(cal_logits, targets[part])
            loss_en = negative_entropy(distributed.batch_mean(torch.softmax(cal_logits, dim=1)))
            loss = loss + loss_cal + cfg.w_en * loss_en
            totals["loss_cal"] = totals["loss_cal"] + loss_cal.detach() / n_sub
            totals["loss_en"] = totals["loss_en"] + loss_en.detach() / n_sub
        loss.backward()
        optimizer.step()
    values = torch.stack(list(totals.values())).tolist()  # the step's one read of the losses
    stats = dict(zip(totals, values, strict=True))
    stats["selected"] = selected / (x.shape[0] * W)
    if not math.isfinite(stats["loss_clu"] + stats["loss_cal"]):
        raise CDCError(
            "CDC training diverged (a loss became NaN or infinite); lower the learning rates"
        )
    return stats


def _global_labels_and_targets(
    cfg: CDCConfig, num_classes, n_sub: int, select_probs, features_val, clu_probs,
    with_targets: bool, generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Steps 2-3 on the global batch: pseudo-labels (``-1``: not selected) and targets.

    Every process's rows are gathered (no gradients) in the global batch's order (its
    ``n_sub`` sub-batches); rank 0 selects (Eq. 4, or a fixed threshold for the ablation)
    and runs the mini-cluster K-means on the L1-normalised val features, drawing from its
    own stream, and broadcasts the result. One process: the batch's own selection and
    targets. Returns ``B`` labels and ``B x C`` targets (None without a
    calibration-trained head), in the global batch's order.
    """
    select_probs = distributed.all_gather(select_probs, n_sub)
    B = select_probs.shape[0]
    labels = torch.full((B,), -1, dtype=torch.long, device=select_probs.device)
    targets = None
    if with_targets:
        features = distributed.all_gather(F.normalize(features_val, p=1, dim=1), n_sub)
        clu_probs = distributed.all_gather(clu_probs, n_sub)
        targets = torch.zeros_like(clu_probs)
    if distributed.is_main():
        if cfg.selection == "dynamic":
            selected, pseudo = select_pseudo_labels(select_probs, num_classes, cfg.label_by)
        else:
            selected, pseudo = select_fixed_threshold(select_probs, cfg.fixed_threshold)
        labels[selected] = pseudo
        if with_targets:
            k = min(cfg.mini_clusters, B)
            _, mini = kmeans(features, k, n_iter=cfg.kmeans_iters, generator=generator)
            targets = calibration_targets(clu_probs, mini, k, cfg.cal_target)
    labels = distributed.broadcast(labels)
    return labels, None if targets is None else distributed.broadcast(targets)


class _SubBatch(nn.Module):
    """Step 4's forward with gradients, one module so that DDP sees what it trains.

    ``forward(strong, val)`` returns ``(clu_logits, cal_logits)``: the clustering head on
    the strong views of the selected samples (None when ``strong`` is None), and the
    calibration-trained head (None without one) on ``val``, the detached val features
    (stop-gradient) or, for the Table 2-V ablation, the val views through the backbone.
    """

    def __init__(self, model: ClusteringModel, cal_head, stop_gradient: bool, autocast) -> None:
        super().__init__()
        self.backbone, self.clu_head, self.cal_head = model.backbone, model.clu_head, cal_head
        self.stop_gradient, self.autocast = stop_gradient, autocast

    def forward(self, strong: torch.Tensor | None, val: torch.Tensor):
        clu_logits = cal_logits = None
        if strong is not None:
            with self.autocast:
                clu_logits = self.clu_head(self.backbone(strong))
        if self.cal_head is not None:
            features = val
            if not self.stop_gradient:  # the calibration loss reaches the backbone
                with self.autocast:
                    features = self.backbone(val).float()
            cal_logits = self.cal_head(features).float()
        return clu_logits, cal_logits


def _to_device(model: ClusteringModel, device: torch.device) -> ClusteringModel:
    """``model`` on ``device`` in channels-last layout (views follow: :func:`_channels_last`).

    Channels-last convolutions are faster on GPUs (tensor cores) and on CPUs with oneDNN
    too: a quick-preset CDC step took ~15 % less time on the 2-core test machine
    (alternating rounds), and MoCo-v2 pretraining already trains this way.
    """
    return model.to(device, memory_format=torch.channels_last)


def _channels_last(views: torch.Tensor) -> torch.Tensor:
    """Views in the model's input layout (see :func:`_to_device`)."""
    return views.contiguous(memory_format=torch.channels_last)
