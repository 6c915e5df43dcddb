"""RUC: robust-learning refinement of any clustering's pseudo-labels.

Park et al., "Improving Unsupervised Image Clustering With Robust Learning" (CVPR 2021),
``../shared/papers/ruc-robust-unsupervised-clustering.txt``; equation numbers below are
the paper's. RUC is an add-on: it takes the pseudo-labels of an existing clustering
(K-means on a pretrained backbone's features, a CDC model's clustering head, or any
labels file), splits the samples into a *clean* set X (labelled data) and an *unclean*
set U (unlabelled data), and retrains two networks with MixMatch, label smoothing,
co-refinement and co-refurbishing. The final network's softmax is its confidence.

Read top-down:

1. clean-set selection (Sec. 3.1): :func:`select_clean`, :func:`knn_vote`,
   :func:`clean_set_quality` (the paper's Table 3);
2. the pure maths of the retraining (Sec. 3.2): :func:`sharpen`, :func:`label_smoothing`,
   :func:`soft_cross_entropy`, :func:`mixmatch`, :func:`co_refine`, :func:`guess_unclean`,
   :func:`co_refurbish`, :func:`tau2_at`, :func:`unsup_ramp`;
3. the configuration :class:`RUCConfig` (paper defaults) and :data:`QUICK_RUC` (CPU);
4. the training loop :func:`train_ruc` (Algorithm 1);
5. where the pseudo-labels come from: :func:`pseudo_labels_from`;
6. the pipeline stage :func:`run_ruc_stage`;
7. the strategy comparison :func:`compare_strategies` (``python -m cdc_serve_training.ruc``,
   docs/ABLATIONS.md).

Choices where the paper leaves room (each is also stated at its function):

* The two networks are deep copies of the pretrained backbone with *fresh, randomly
  initialised* MLP heads: App. A.2 re-initialises the last layer on purpose, "to avoid
  the model falling into the same local optimum as the original model".
* tau_2 follows the paper's schedule (0.9, +0.02 every 40 of 200 epochs), expressed as a
  fraction of training so that short CPU runs see the whole schedule; the reference
  code's fixed 0.99 is ``tau2_start=0.99, tau2_step=0``.
* K-means' soft assignment is no classifier confidence (its maximum stays far below
  tau_1 = 0.99), so for K-means pseudo-labels the confidence strategy keeps the most
  confident half of every cluster (``clean_fraction``, :data:`KMEANS_CLEAN_FRACTION`).
* Co-refurbishing runs at the end of every epoch (Sec. 3.2 "at the end of every epoch"),
  on un-augmented images.
* The returned model is network 2, the one trained last.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdc_serve import CDCError

STRATEGIES = ("confidence", "metric", "hybrid")
INIT_SOURCES = "kmeans | path/to/model.pth | labels.npy | labels.csv"

__all__ = [
    "QUICK_RUC",
    "STRATEGIES",
    "RUCConfig",
    "clean_set_quality",
    "compare_strategies",
    "co_refine",
    "co_refurbish",
    "guess_unclean",
    "KMEANS_CLEAN_FRACTION",
    "knn_vote",
    "label_smoothing",
    "mixmatch",
    "most_confident_per_class",
    "pseudo_labels_from",
    "run_ruc_stage",
    "select_clean",
    "selection_masks",
    "sharpen",
    "soft_cross_entropy",
    "strategies_markdown",
    "tau2_at",
    "train_ruc",
    "unsup_ramp",
]


# =========================================================================== 1. clean set


def knn_vote(
    embeddings: Tensor,
    labels: Tensor,
    k: int,
    *,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """kNN classifier y' = kNN(h(x)) of the metric-based strategy (Sec. 3.1).

    Each sample's ``k`` nearest neighbours by cosine similarity (dot product of the
    L2-normalised ``embeddings``), *excluding the sample itself*, vote with their
    ``labels``; the most frequent label wins (ties go to the lowest label). Rows are
    processed in chunks so that N = 70,000 fits in a few hundred MB on a CPU.

    Returns the voted label per sample (int64, N).
    """
    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise CDCError(f"kNN needs 1 <= k < number of samples; got k={k} for {n} samples")
    z = F.normalize(embeddings.float(), dim=1)
    labels = labels.to(z.device).long()
    c = int(num_classes or int(labels.max()) + 1)
    if chunk_size is None:  # about 32 M similarities (128 MB) per chunk
        chunk_size = max(1, (1 << 25) // n)
    votes = torch.empty(n, dtype=torch.long, device=z.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = z[start:stop] @ z.T
        rows = torch.arange(stop - start, device=z.device)
        sims[rows, rows + start] = -math.inf  # a sample does not vote for itself
        neighbours = sims.topk(k, dim=1).indices
        counts = F.one_hot(labels[neighbours], c).sum(dim=1)
        votes[start:stop] = counts.argmax(dim=1)
    return votes


def most_confident_per_class(labels: Tensor, confidences: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``ceil(fraction * n_c)`` most confident samples of every class c.

    The confidence strategy's rank form (:func:`select_clean` with ``clean_fraction``):
    for confidences that only *rank* samples, such as K-means' Student-t soft
    assignment, whose maximum rarely exceeds 0.3 so that tau_1 = 0.99 would keep nothing.
    Per class, so that no cluster drops out of the clean set. Ties keep the lower index.
    """
    if not 0.0 < fraction <= 1.0:
        raise CDCError(f"clean_fraction must lie in (0, 1], got {fraction}")
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        order = torch.sort(confidences[members], descending=True, stable=True).indices
        mask[members[order[: math.ceil(fraction * members.numel())]]] = True
    return mask


def select_clean(
    strategy: str,
    pseudo_labels: Tensor,
    confidences: Tensor | None,
    embeddings: Tensor | None,
    *,
    tau1: float = 0.99,
    k: int = 100,
    clean_fraction: float | None = None,
) -> Tensor:
    """Split the data into the clean set X (True) and the unclean set U (Sec. 3.1).

    * ``"confidence"``: max(y) >= tau_1, the clustering's own confidence (the paper
      writes ">"; with float confidences the two differ only on exact ties). With
      ``clean_fraction`` set, the most confident ``clean_fraction`` of every pseudo-label
      class instead (:func:`most_confident_per_class`);
    * ``"metric"``: argmax(kNN(h(x))) = argmax(y), the pseudo-label agrees with the vote
      of its ``k`` nearest neighbours on the L2-normalised embedding (:func:`knn_vote`);
    * ``"hybrid"``: both.

    Returns a bool mask of length N.
    """
    if strategy not in STRATEGIES:
        raise CDCError(f"unknown clean-set strategy {strategy!r}; choose one of {STRATEGIES}")
    labels = torch.as_tensor(pseudo_labels).long().cpu()
    n = labels.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    if strategy in ("confidence", "hybrid"):
        if confidences is None:
            raise CDCError(
                f"the {strategy!r} clean-set strategy needs confidences, and these "
                "pseudo-labels have none (a labels file gives labels only); use 'metric'"
            )
        conf = torch.as_tensor(confidences).float().cpu()
        if conf.shape != (n,):
            raise CDCError(f"confidences have shape {tuple(conf.shape)}, expected ({n},)")
        if clean_fraction is None:
            mask &= conf >= tau1
        else:
            mask &= most_confident_per_class(labels, conf, clean_fraction)
    if strategy in ("metric", "hybrid"):
        if embeddings is None:
            raise CDCError(f"the {strategy!r} strategy needs embeddings for the kNN vote")
        emb = torch.as_tensor(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise CDCError(f"embeddings have shape {tuple(emb.shape)}, expected ({n}, D)")
        mask &= knn_vote(emb, labels, k).cpu() == labels
    return mask


def clean_set_quality(mask: Tensor, pseudo_labels: Tensor, true_labels: Tensor) -> dict:
    """Precision, recall and F1 of a clean set, as in the paper's Tables 3 and 5.

    The paper reports them without formulas; its Fig. 4 (precision falls while recall
    rises as co-refurbishing grows the clean set) fixes the reading used here. A
    sample's pseudo-label is *correct* when it equals the true class after the Hungarian
    matching of pseudo-labels to classes over all N samples; the clean set is the
    positive prediction of "correct":

    * precision = |clean and correct| / |clean|  (how pure the clean set is),
    * recall    = |clean and correct| / |correct| (how many correct labels it keeps),
    * F1 = 2 P R / (P + R).

    Returns ``dict(precision, recall, f1, size)`` as fractions and the clean-set size.
    """
    from cdc_serve.metrics import hungarian_match

    mask_np = torch.as_tensor(mask).bool().cpu().numpy()
    pred = torch.as_tensor(pseudo_labels).long().cpu().numpy()
    true = torch.as_tensor(true_labels).long().cpu().numpy()
    if not mask_np.shape == pred.shape == true.shape:
        raise CDCError("mask, pseudo-labels and true labels must have the same length")
    correct = hungarian_match(true, pred)[pred] == true
    hits = int((mask_np & correct).sum())
    size = int(mask_np.sum())
    precision = hits / size if size else 0.0
    recall = hits / int(correct.sum()) if correct.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "size": size}


# =========================================================================== 2. the maths


def sharpen(p: Tensor, T: float) -> Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T) (MixMatch; RUC Eq. 12 and 14).

    T < 1 lowers the entropy and keeps the argmax; T = 1 is the identity. Computed as
    softmax(log(p) / T) so that small T does not underflow to 0/0.
    """
    tiny = torch.finfo(p.dtype).tiny
    return torch.softmax(p.clamp_min(tiny).log() / T, dim=1)


def label_smoothing(y: Tensor, eps: float) -> Tensor:
    """Eq. 8: y~ = (1 - eps) y + eps / (C - 1) (1 - y), for one-hot (or soft) y, N x C."""
    c = y.shape[1]
    return (1.0 - eps) * y + eps / (c - 1) * (1.0 - y)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """H(y, f(x)) with soft targets, averaged over the batch (Eq. 6 and 9)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mixmatch(
    x: Tensor, targets: Tensor, generator: torch.Generator | None = None, alpha: float = 4.0
) -> tuple[Tensor, Tensor, float, Tensor]:
    """MixUp step of MixMatch over a batch holding both X and U (Eq. 1-5).

    lambda ~ Beta(alpha, alpha) (Eq. 1), lambda' = max(lambda, 1 - lambda) (Eq. 2), and
    every row is mixed with the row of a random permutation of the whole batch using the
    *same* permutation and lambda' for inputs (Eq. 3) and targets (Eq. 4). Because
    lambda' >= 0.5 a mixed row stays closer to its own sample, so the first |X| rows can
    be scored as labelled and the rest as unlabelled.

    Returns ``(mixed_x, mixed_targets, lambda', permutation)``.
    """
    if x.shape[0] != targets.shape[0]:
        raise CDCError("mixmatch needs as many targets as inputs")
    # Beta sampling without a generator argument in torch: draw its seed from ours.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    mixed_x = lam * x + (1.0 - lam) * x[perm]
    mixed_t = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_x, mixed_t, lam, perm


def co_refine(y: Tensor, counter_probs: Tensor, T: float) -> Tensor:
    """Co-refined clean targets (Eq. 11-12).

    y_bar = Sharpen((1 - w) y + w f_c(x), T) where f_c is the counter network and w its
    confidence max f_c(x), min-max normalised over the batch (App. A.2). A batch whose
    confidences are all equal gets w = 0 (the pseudo-label unchanged before sharpening).
    """
    conf = counter_probs.max(dim=1).values
    spread = conf.max() - conf.min()
    w = (conf - conf.min()) / spread if spread > 0 else torch.zeros_like(conf)
    w = w.unsqueeze(1)
    return sharpen((1.0 - w) * y + w * counter_probs, T)


def guess_unclean(probs: Sequence[Tensor], T: float) -> Tensor:
    """Guessed targets of unclean samples (Eq. 13-14).

    q_bar = Sharpen(mean of the softmax outputs of both networks over the M weak views,
    T): ``probs`` holds the 2M tensors (N x C) f_theta(k)(u_m).
    """
    return sharpen(torch.stack(list(probs)).mean(dim=0), T)


def co_refurbish(
    probs: Tensor | Sequence[Tensor], mask: Tensor, labels: Tensor, tau2: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Co-refurbishing (Eq. 18-19): move confident unclean samples into the clean set.

    ``probs`` is one network's N x C softmax or a sequence/stack of several (one per
    network). Per sample the most confident network gives p (Eq. 18); an *unclean*
    sample (``mask`` False) with max(p) >= tau_2 joins the clean set with label
    argmax(p) (Eq. 19; the paper writes ">"). Clean samples are never touched.

    Returns new ``(mask, labels, moved_index)``; the inputs are not modified.
    """
    stack = torch.stack(list(probs)) if not isinstance(probs, Tensor) else probs
    if stack.ndim == 2:
        stack = stack.unsqueeze(0)
    conf, pred = stack.max(dim=2)  # networks x N
    best = conf.argmax(dim=0)  # the most confident network per sample
    cols = torch.arange(stack.shape[1], device=stack.device)
    conf, pred = conf[best, cols].cpu(), pred[best, cols].cpu()
    moved = (~mask.cpu()) & (conf >= tau2)
    new_mask = mask.cpu() | moved
    new_labels = labels.cpu().clone()
    new_labels[moved] = pred[moved]
    return new_mask, new_labels, moved.nonzero().flatten()


# =========================================================================== 3. config


@dataclass
class RUCConfig:
    """RUC hyper-parameters; defaults are the paper's (Sec. 4.1, App. A.2) for CIFAR-10.

    ``steps_per_epoch`` None means one pass over the clean set per epoch (batches of
    ``batch_size`` clean plus ``batch_size`` unclean samples); a number caps it (CPU runs).
    """

    epochs: int = 200
    batch_size: int = 200  # 200 for CIFAR-10/20, 100 for STL-10
    steps_per_epoch: int | None = None
    lr: float = 0.01  # SGD, cosine annealing to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_u: float = 25.0  # 25 / 50 / 100 for CIFAR-10 / STL-10 / CIFAR-20
    rampup_epochs: float = 16.0  # linear ramp of lambda_u (MixMatch/DivideMix practice)
    epsilon: float = 0.5  # label smoothing, Eq. 8
    temperature: float = 0.5  # sharpening T
    alpha: float = 4.0  # Beta(alpha, alpha) of MixMatch
    num_views: int = 2  # M weak views for label guessing
    tau1: float = 0.99  # confidence strategy: keep max(y) >= tau1 ...
    clean_fraction: float | None = None  # ... or, if set, the most confident share per class
    k: int = 100  # metric strategy
    strategy: str = "hybrid"
    tau2_start: float = 0.9  # refurbishing threshold schedule: start ...
    tau2_step: float = 0.02  # ... + step ...
    tau2_every: float = 0.2  # ... every this fraction of training (40 of 200 epochs)
    refurbish_max: int | None = None  # score at most this many unclean samples per epoch
    hidden_dim: int = 512  # MLP head width
    eval_batch_size: int = 1024

    def validate(self) -> RUCConfig:
        """Raise CDCError on impossible values; returns self."""
        if self.strategy not in STRATEGIES:
            raise CDCError(f"unknown RUC strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.epochs < 1 or self.batch_size < 2:
            raise CDCError("RUC needs epochs >= 1 and batch_size >= 2")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise CDCError("RUC steps_per_epoch must be >= 1 (or None for a full pass)")
        if not 0.0 <= self.epsilon < 1.0 or self.temperature <= 0 or self.alpha <= 0:
            raise CDCError("RUC needs 0 <= epsilon < 1, temperature > 0 and alpha > 0")
        if self.k < 1 or self.num_views < 1:
            raise CDCError("RUC needs k >= 1 and num_views >= 1")
        return self

    @classmethod
    def from_dict(cls, values: dict | RUCConfig | None) -> RUCConfig:
        """Build from a plain dict (a TrainConfig's ``ruc`` field); unknown keys -> CDCError."""
        if values is None:
            return cls()
        if isinstance(values, RUCConfig):
            return values
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise CDCError(f"unknown RUC settings: {sorted(unknown)}")
        return cls(**values).validate()

    def to_dict(self) -> dict:
        return asdict(self)


#: CPU preset: RUC on K-means pseudo-labels of all 70,000 Fashion-MNIST images with the
#: quick small CNN in a few minutes on 2 cores: 3 epochs of 30 steps per network with
#: batches of 64 clean + 64 unclean images, one weak view (M = 1) for the guesses, and
#: co-refurbishing scored on at most 8,192 unclean samples per epoch. Everything else
#: (lr, lambda_U, eps, T, alpha, tau_1, k, tau_2 schedule) as in the paper.
QUICK_RUC = RUCConfig(
    epochs=3,
    batch_size=64,
    steps_per_epoch=30,
    num_views=1,
    rampup_epochs=1.0,
    refurbish_max=8192,
    hidden_dim=128,
    eval_batch_size=1024,
)


def tau2_at(epoch: int, cfg: RUCConfig) -> float:
    """Refurbishing threshold tau_2 at (0-based) ``epoch``.

    Paper (Sec. 4.1): tau_2 starts at 0.9 and rises by 0.02 every 40 of 200 epochs; here
    "every 40 of 200" is the fraction ``tau2_every`` = 0.2 of ``cfg.epochs`` so a 4-epoch
    run walks the same schedule. Capped at 0.99, the reference implementation's value.
    """
    period = max(1, round(cfg.tau2_every * cfg.epochs))
    return min(cfg.tau2_start + cfg.tau2_step * (epoch // period), max(cfg.tau2_start, 0.99))


def unsup_ramp(progress_epochs: float, cfg: RUCConfig) -> float:
    """Linear ramp-up in [0, 1] of the unlabelled-loss weight lambda_U (Eq. 10)."""
    if cfg.rampup_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, progress_epochs / cfg.rampup_epochs)))


# =========================================================================== 4. training


class _Net(nn.Module):
    """One of the two RUC networks f_theta(k): a backbone and an MLP head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _make_head(in_dim: int, hidden: int, num_classes: int) -> nn.Module:
    from .heads import MLPHead

    return MLPHead(in_dim, hidden, num_classes)


def _feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "out_dim", None)
    if dim is None:
        raise CDCError("the RUC backbone must have an attribute out_dim (its feature size)")
    return int(dim)


@torch.no_grad()
def _predict(net: nn.Module, images: Tensor, augmenter, device, batch_size: int) -> Tensor:
    """Softmax of ``net`` over un-augmented ``images`` (uint8, CPU), in eval mode."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = augmenter.val(images[start : start + batch_size].to(device))
        out.append(F.softmax(net(x).float(), dim=1).cpu())
    net.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def _cosine_lr(cfg: RUCConfig, progress_epochs: float) -> float:
    """Cosine annealing of the learning rate from ``cfg.lr`` to 0 over ``cfg.epochs``."""
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(progress_epochs / cfg.epochs, 1.0)))


@dataclass
class _Run:
    """What every RUC step needs besides the two networks (one training run)."""

    images: Tensor  # uint8 N x C x H x W, CPU
    augmenter: Any  # val / weak / strong
    cfg: RUCConfig
    num_classes: int
    device: torch.device
    gen: torch.Generator  # CPU: batches, MixMatch
    aug_gen: torch.Generator  # on the device: augmentation parameters


def _train_one_epoch(
    run: _Run,
    net: _Net,
    counter: _Net,
    optimizer: torch.optim.Optimizer,
    mask: Tensor,
    labels: Tensor,
    epoch: int,
    steps: int,
) -> dict[str, float]:
    """One epoch of Algorithm 1 for network ``net`` with counter network ``counter``.

    Per step: B clean samples x (with pseudo-label y) and B unclean samples u;
    co-refined targets y_bar (Eq. 11-12) and guessed targets q_bar (Eq. 13-14) from
    ``M`` weak views; loss = label-smoothed CE on a strong view of x (Eq. 8-9) + soft CE
    on the mixed clean rows (Eq. 6) + lambda_U * ramp * MSE on the mixed unclean rows
    (Eq. 7), Eq. 10; one SGD step with the cosine learning rate.
    """
    cfg, aug, dev, gen, ag = run.cfg, run.augmenter, run.device, run.gen, run.aug_gen
    clean_idx = mask.nonzero().flatten()
    unclean_idx = (~mask).nonzero().flatten()
    bx = min(cfg.batch_size, clean_idx.numel())
    bu = min(cfg.batch_size, unclean_idx.numel())
    # clean batches: consecutive slices of fresh permutations of the clean set
    rounds = math.ceil(steps * bx / clean_idx.numel())
    order = torch.cat(
        [clean_idx[torch.randperm(clean_idx.numel(), generator=gen)] for _ in range(rounds)]
    )
    net.train()
    counter.eval()
    sums = dict.fromkeys(("loss", "loss_strong", "loss_x", "loss_u"), 0.0)
    for step in range(steps):
        progress = epoch + step / steps
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(cfg, progress)
        xi = order[step * bx : (step + 1) * bx]
        xb = run.images[xi].to(dev)
        y = F.one_hot(labels[xi], run.num_classes).float().to(dev)
        ui = unclean_idx[torch.randint(0, max(1, unclean_idx.numel()), (bu,), generator=gen)]
        ub = run.images[ui].to(dev)

        with torch.no_grad():  # co-refinement (Eq. 11-14)
            x_views = [aug.weak(xb, generator=ag) for _ in range(cfg.num_views)]
            u_views = [aug.weak(ub, generator=ag) for _ in range(cfg.num_views)] if bu else []
            counter_p = torch.stack([F.softmax(counter(v), 1) for v in x_views]).mean(0)
            y_bar = co_refine(y, counter_p, cfg.temperature)
            guesses = [F.softmax(m(v), 1) for v in u_views for m in (net, counter)]
            q_bar = guess_unclean(guesses, cfg.temperature) if bu else y_bar[:0]

        # label smoothing on a strong view of the clean samples (Eq. 8-9)
        logits_strong = net(aug.strong(xb, generator=ag))
        loss_strong = soft_cross_entropy(logits_strong, label_smoothing(y, cfg.epsilon))

        # MixMatch over the co-refined clean and unclean batches (Eq. 5-7)
        inputs = torch.cat(x_views + u_views)
        targets = torch.cat([y_bar] * cfg.num_views + [q_bar] * len(u_views))
        mixed_x, mixed_t, _, _ = mixmatch(inputs, targets, gen, cfg.alpha)
        logits = net(mixed_x)
        n_x = bx * cfg.num_views
        loss_x = soft_cross_entropy(logits[:n_x], mixed_t[:n_x])
        # Eq. 7 averaged over classes too, as MixMatch's code does (lambda_U's scale)
        loss_u = F.mse_loss(F.softmax(logits[n_x:], 1), mixed_t[n_x:]) if bu else 0 * loss_x
        loss = loss_strong + loss_x + cfg.lambda_u * unsup_ramp(progress, cfg) * loss_u  # Eq. 10

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in zip(sums, (loss, loss_strong, loss_x, loss_u), strict=True):
            sums[key] += float(value.detach())
    return {key: value / steps for key, value in sums.items()}


def selection_masks(
    labels: Tensor, confidences: Tensor | None, embeddings: Tensor | None, cfg: RUCConfig
) -> dict[str, Tensor]:
    """The clean-set mask of every strategy the inputs allow (:func:`select_clean`).

    ``confidence`` needs confidences, ``metric`` embeddings, ``hybrid`` both; the kNN
    vote is computed once and shared by ``metric`` and ``hybrid``.
    """
    options = {"tau1": cfg.tau1, "k": cfg.k, "clean_fraction": cfg.clean_fraction}
    masks: dict[str, Tensor] = {}
    if confidences is not None:
        masks["confidence"] = select_clean("confidence", labels, confidences, None, **options)
    if embeddings is not None:
        masks["metric"] = select_clean("metric", labels, None, embeddings, **options)
    if "confidence" in masks and "metric" in masks:
        masks["hybrid"] = masks["confidence"] & masks["metric"]
    return masks


def _quality_or_size(mask: Tensor, labels: Tensor, true_labels: Tensor | None) -> dict:
    if true_labels is None:
        return {"size": int(mask.sum())}
    return clean_set_quality(mask, labels, true_labels)


def train_ruc(
    backbone: nn.Module,
    data,
    pseudo_labels: Tensor,
    confidences: Tensor | None,
    embeddings: Tensor | None,
    augmenter,
    cfg: RUCConfig,
    device: torch.device | str = "cpu",
    *,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
    hidden_dim: int | None = None,
    checkpoint_path: Path | str | None = None,
    resume: bool = False,
    clean_masks: dict[str, Tensor] | None = None,
):
    """Refine ``pseudo_labels`` of ``data`` with RUC (Algorithm 1); returns (model, report).

    * ``backbone``: the pretrained encoder (``out_dim`` attribute); each network gets a
      deep copy plus a fresh randomly initialised MLP head (App. A.2).
    * ``data``: an ``ImageData`` (uint8 images; ``labels`` used only for reporting).
    * ``confidences`` (N) for the confidence/hybrid strategies, ``embeddings`` (N x D) for
      the metric/hybrid ones (:func:`select_clean`).
    * ``augmenter``: provides ``val``, ``weak`` and ``strong`` (``augment.Augmenter``).

    The two networks are trained in turn each epoch (network 1 with network 2 as the
    counter network, then the reverse); then co-refurbishing (:func:`co_refurbish`) with
    tau_2 = :func:`tau2_at`. With ``checkpoint_path`` the state is saved after every epoch
    and ``resume=True`` continues from it. ``clean_masks`` (from :func:`selection_masks`)
    skips recomputing the selections when one caller trains several strategies.

    Returns a ``heads.ClusteringModel`` whose backbone and ``cal_head`` are network 2's
    (its softmax is the confidence; ``clu_head`` is a copy of the same head) in eval
    mode on the CPU, and a JSON-able report: the clean-set quality of every strategy
    (precision/recall/F1 against ``data.labels`` when known, else sizes), the clean set
    after refurbishing, and a per-epoch history.
    """
    from .heads import ClusteringModel

    cfg = RUCConfig.from_dict(cfg).validate()
    device = torch.device(device)
    images = data.images
    n = images.shape[0]
    labels = torch.as_tensor(pseudo_labels).long().cpu()
    if labels.shape != (n,):
        raise CDCError(f"{labels.shape[0]} pseudo-labels for {n} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CDCError(f"pseudo-labels must lie in 0..{num_classes - 1}")
    true_labels = getattr(data, "labels", None)
    hidden = int(hidden_dim or cfg.hidden_dim)

    # --- Sec. 3.1: the clean set, and how every strategy would have chosen it
    strategy = cfg.strategy
    if strategy == "hybrid" and confidences is None:
        strategy = "metric"  # a labels file has no confidences: hybrid = what is available
    if clean_masks is None:
        clean_masks = selection_masks(labels, confidences, embeddings, cfg)
    masks = clean_masks
    if strategy not in masks:  # raises the clear error about the missing input
        select_clean(strategy, labels, confidences, embeddings, tau1=cfg.tau1, k=cfg.k)
    mask = masks[strategy].clone()
    if int(mask.sum()) < 2:
        raise CDCError(
            f"the {strategy!r} clean-set strategy kept {int(mask.sum())} of {n} samples; RUC "
            "needs at least 2 (lower tau1, set clean_fraction, or use another strategy)"
        )
    report: dict[str, Any] = {
        "strategy": strategy,
        "config": cfg.to_dict(),
        "selection": {s: _quality_or_size(m, labels, true_labels) for s, m in masks.items()},
        "history": [],
    }

    # --- two networks: copies of the pretrained backbone + fresh heads (App. A.2)
    dim = _feature_dim(backbone)
    with torch.random.fork_rng(devices=[]):  # seeded heads, global RNG left untouched
        torch.manual_seed(seed)
        heads = [_make_head(dim, hidden, num_classes) for _ in range(2)]
    nets = [_Net(copy.deepcopy(backbone), head).to(device) for head in heads]
    optimizers = [
        torch.optim.SGD(
            net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for net in nets
    ]
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    start_epoch = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume and ckpt is not None and ckpt.exists():
        from .checkpoint import load_training_state

        state = load_training_state(ckpt)
        for i in range(2):
            nets[i].load_state_dict(state["nets"][i])
            optimizers[i].load_state_dict(state["optimizers"][i])
        mask, labels = state["mask"], state["labels"]
        gen.set_state(state["gen"])
        aug_gen.set_state(state["aug_gen"].to(aug_gen.get_state().device))
        report["history"] = state["history"]
        start_epoch = int(state["epoch"]) + 1

    run = _Run(images, augmenter, cfg, num_classes, device, gen, aug_gen)
    epochs = range(start_epoch, cfg.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="RUC", initial=start_epoch, total=cfg.epochs, disable=None)
    for epoch in epochs:
        unclean_idx = (~mask).nonzero().flatten()
        row: dict[str, Any] = {"epoch": epoch + 1}
        # one pass over the (growing) clean set, or at most cfg.steps_per_epoch batches
        steps = math.ceil(int(mask.sum()) / cfg.batch_size)
        steps = min(steps, cfg.steps_per_epoch or steps)
        for k_net in range(2):  # Algorithm 1: "for k in {1, 2}"
            other = nets[1 - k_net]
            losses = _train_one_epoch(
                run, nets[k_net], other, optimizers[k_net], mask, labels, epoch, steps
            )
            row[f"net{k_net + 1}"] = losses
        # co-refurbishing at the end of the epoch (Eq. 18-19)
        tau2 = tau2_at(epoch, cfg)
        moved = torch.empty(0, dtype=torch.long)
        if cfg.refurbish_max is not None and unclean_idx.numel() > cfg.refurbish_max:
            pick = torch.randperm(unclean_idx.numel(), generator=gen)[: cfg.refurbish_max]
            unclean_idx = unclean_idx[pick.sort().values]  # a random subset (CPU budget)
        if unclean_idx.numel():
            sub = images[unclean_idx]
            probs = [_predict(net, sub, augmenter, device, cfg.eval_batch_size) for net in nets]
            sub_mask, sub_labels, moved = co_refurbish(
                probs, mask[unclean_idx], labels[unclean_idx], tau2
            )
            mask[unclean_idx] = sub_mask
            labels[unclean_idx] = sub_labels
        row.update(tau2=tau2, refurbished=int(moved.numel()))
        row["clean_set"] = _quality_or_size(mask, labels, true_labels)
        report["history"].append(row)
        if progress:
            epochs.set_postfix(
                loss=f"{row['net2']['loss']:.3f}", clean=row["clean_set"]["size"], tau2=tau2
            )
        if ckpt is not None:
            _save_state(ckpt, nets, optimizers, mask, labels, gen, aug_gen, report, epoch)

    report["final_clean_set"] = _quality_or_size(mask, labels, true_labels)
    final = nets[1].cpu().eval()
    model = ClusteringModel(final.backbone, hidden, num_classes)
    model.cal_head.load_state_dict(final.head.state_dict())
    model.clu_head.load_state_dict(final.head.state_dict())
    model.eval()
    return model, report


def _save_state(path: Path, nets, optimizers, mask, labels, gen, aug_gen, report, epoch) -> None:
    """Per-epoch checkpoint (atomic, weights_only-loadable) of what resuming needs."""
    from .checkpoint import save_training_state

    state = {
        "nets": [net.state_dict() for net in nets],
        "optimizers": [opt.state_dict() for opt in optimizers],
        "mask": mask,
        "labels": labels,
        "gen": gen.get_state(),
        "aug_gen": aug_gen.get_state().cpu(),
        "history": report["history"],
        "epoch": epoch,
    }
    save_training_state(path, state)


# =========================================================================== 5. pseudo-labels


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


def pseudo_labels_from(
    init_from: str | Path,
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
    if str(init_from) == "kmeans":
        from .evaluation import kmeans_clustering

        labels, probs = kmeans_clustering(torch.as_tensor(features), num_classes, seed=seed)
        return labels.long().cpu(), probs.max(dim=1).values.float().cpu()
    path = Path(init_from)
    if not path.exists():
        raise CDCError(f"--init-from {init_from}: no such file (expected {INIT_SOURCES})")
    if path.suffix in (".npy", ".csv"):
        return _labels_file(path, n, num_classes), None
    if path.suffix in (".pth", ".pt"):
        from .checkpoint import load_model
        from .evaluation import infer

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
    raise CDCError(f"--init-from {init_from}: expected {INIT_SOURCES}")


# =========================================================================== 6. pipeline stage


#: Share of every K-means cluster the confidence strategy keeps (rank form of tau_1):
#: K-means' Student-t soft assignment ranks samples but is no classifier confidence,
#: its maximum stays far below tau_1 = 0.99. Half of each cluster, fixed a priori.
KMEANS_CLEAN_FRACTION = 0.5


def run_ruc_stage(
    config, data, backbone, features, device, out, resume, augmenter=None
) -> tuple[nn.Module, dict]:
    """The pipeline's RUC stage in one call: pseudo-labels -> clean set -> train_ruc.

    ``config`` is a ``TrainConfig``: ``ruc`` (RUCConfig / dict / None = paper defaults),
    ``init_from`` (pseudo-label source, default ``"kmeans"``), ``seed``, ``progress``,
    ``eval_batch_size``. ``features`` are the pretrained backbone's features of ``data``
    (the K-means input and the metric strategy's embedding). Two adjustments to the
    configuration, both recorded in the report's ``config``: K-means pseudo-labels use
    the confidence strategy's rank form (``clean_fraction`` =
    :data:`KMEANS_CLEAN_FRACTION` unless set), and k is capped at N - 1 for tiny data.
    Checkpoints every epoch to ``out/ruc.ckpt`` (``resume`` continues from it).
    Returns ``(model, report)``; the report also has the pseudo-labels' own metrics.
    """
    cfg = RUCConfig.from_dict(getattr(config, "ruc", None)).validate()
    init_from = str(getattr(config, "init_from", None) or "kmeans")
    seed = int(getattr(config, "seed", 0))
    batch_size = int(getattr(config, "eval_batch_size", 1024))
    features = torch.as_tensor(features).float().cpu()
    labels, conf = pseudo_labels_from(
        init_from, features, data.num_classes, seed, data=data, device=device,
        batch_size=batch_size,
    )  # fmt: skip
    if init_from == "kmeans" and cfg.clean_fraction is None:
        cfg = replace(cfg, clean_fraction=KMEANS_CLEAN_FRACTION)
    cfg = replace(cfg, k=min(cfg.k, len(data) - 1))
    if augmenter is None:
        from .augment import Augmenter

        augmenter = Augmenter(data.size, data.mean, data.std)
    model, report = train_ruc(
        backbone, data, labels, conf, features, augmenter, cfg, device,
        num_classes=data.num_classes, seed=seed,
        progress=bool(getattr(config, "progress", True)),
        checkpoint_path=Path(out) / "ruc.ckpt", resume=resume,
    )  # fmt: skip
    report["init_from"] = init_from
    if data.labels is not None:
        from cdc_serve.metrics import evaluate_labels

        report["pseudo_labels"] = evaluate_labels(data.labels.numpy(), labels.numpy())
    return model, report


# =========================================================================== 7. strategy table


def compare_strategies(
    data,
    backbone: nn.Module,
    cfg: RUCConfig,
    device: torch.device | str = "cpu",
    *,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """RUC on K-means pseudo-labels of ``backbone``'s features, once per clean-set strategy.

    The paper's Table 1 (final ACC) and Table 3 (clean-set precision/recall/F1) on one
    labelled data set, plus NMI, ARI and ECE of the final network's softmax. The first
    row is the starting point: K-means with its Student-t soft assignment
    (``evaluation.kmeans_clustering``). Returns one dict per row.
    """
    from .augment import Augmenter
    from .evaluation import backbone_features, head_metrics, infer, kmeans_clustering

    if data.labels is None:
        raise CDCError("comparing strategies needs a labelled data set")
    device = torch.device(device)
    features = backbone_features(backbone, data, device, cfg.eval_batch_size).cpu()
    labels, probs = kmeans_clustering(features, data.num_classes, seed=seed)
    conf = probs.max(dim=1).values  # as pseudo_labels_from("kmeans", ...)
    rows = [{"method": "K-means (Student-t soft assignment)", **head_metrics(data.labels, probs)}]
    if cfg.clean_fraction is None:
        cfg = replace(cfg, clean_fraction=KMEANS_CLEAN_FRACTION)
    augmenter = Augmenter(data.size, data.mean, data.std)
    masks = selection_masks(labels, conf, features, cfg)
    for strategy in strategies:
        model, report = train_ruc(
            backbone, data, labels, conf, features, augmenter, replace(cfg, strategy=strategy),
            device, num_classes=data.num_classes, seed=seed, progress=progress,
            clean_masks=masks,
        )  # fmt: skip
        cal = infer(model, data, device, cfg.eval_batch_size)["cal_probs"]
        rows.append(
            {
                "method": f"K-means + RUC ({strategy})",
                "clean": report["selection"][strategy],
                "clean_final": report["final_clean_set"],
                **head_metrics(data.labels, cal),
            }
        )
    return rows


def strategies_markdown(rows: list[dict]) -> str:
    """The rows of :func:`compare_strategies` as a Markdown table (percentages)."""
    head = (
        "| method | clean set | precision | recall | F1 | clean after refurbishing "
        "| ACC | NMI | ARI | ECE |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        c, f = r.get("clean"), r.get("clean_final")
        clean = (
            [f"{c['size']}", f"{100 * c['precision']:.1f}", f"{100 * c['recall']:.1f}",
             f"{100 * c['f1']:.1f}", f"{f['size']} (P {100 * f['precision']:.1f})"]
            if c else ["-"] * 5
        )  # fmt: skip
        metrics = [f"{100 * r[key]:.1f}" for key in ("acc", "nmi", "ari", "ece")]
        lines.append("| " + " | ".join([r["method"], *clean, *metrics]) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cdc_serve_training.ruc --backbone-pt runs/X/backbone.pt``: the strategy table.

    RUC on K-means pseudo-labels of the backbone's features with each clean-set strategy
    (:func:`compare_strategies`), printed as Markdown. A missing ``backbone.pt`` is
    pretrained first with ``moco.QUICK_MOCO`` (small CNN) and saved there.
    """
    import argparse
    import json
    import time

    from .backbones import build_backbone
    from .checkpoint import safe_load
    from .data import load_dataset

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--backbone-pt", required=True, help="backbone.pt of a run (pretrained here if missing)"
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--preset", choices=("quick", "paper"), default="quick")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = load_dataset(args.dataset, limit=args.limit, seed=args.seed)
    path = Path(args.backbone_pt)
    if not path.exists():  # pretrain the quick backbone (moco.QUICK_MOCO) and keep it
        from .augment import Augmenter
        from .checkpoint import atomic_save
        from .moco import QUICK_MOCO, pretrain_moco

        torch.manual_seed(args.seed)
        backbone = build_backbone("smallcnn", data.channels, data.size)
        augmenter = Augmenter(data.size, data.mean, data.std)
        backbone = pretrain_moco(
            backbone, data, augmenter, QUICK_MOCO, args.device, seed=args.seed,
            checkpoint_path=path.with_name("pretrain.ckpt"), resume=True,
        )  # fmt: skip
        state = {"backbone": "smallcnn", "epochs": QUICK_MOCO.epochs}
        atomic_save({**state, "state_dict": backbone.state_dict()}, path)
        print(f"pretrained {path} in {time.perf_counter() - start:.0f} s")
    state = safe_load(path)
    backbone = build_backbone(state["backbone"], data.channels, data.size)
    backbone.load_state_dict(state["state_dict"])
    cfg = replace(QUICK_RUC if args.preset == "quick" else RUCConfig())
    if args.epochs:
        cfg.epochs = args.epochs
    rows = compare_strategies(
        data, backbone, cfg, args.device, strategies=args.strategies, seed=args.seed
    )
    print(strategies_markdown(rows))
    print(f"{len(data)} images, {time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
