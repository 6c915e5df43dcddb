"""The pure maths of RUC's retraining (paper Sec. 3.2), one function per equation.

Read top-down, in the order a training step uses them:

- :func:`sharpen` (Eq. 12 and 14) and :func:`label_smoothing` (Eq. 8);
- :func:`soft_cross_entropy` (Eq. 6 and 9) and :func:`unlabelled_loss` (Eq. 7);
- :func:`mixmatch`, the MixUp step of MixMatch (Eq. 1-5);
- :func:`co_refine` (Eq. 11-12) and :func:`guess_unclean` (Eq. 13-14), co-refinement;
- :func:`co_refurbish` (Eq. 18-19), at the end of every epoch;
- the schedules: :func:`tau2_at` (tau_2, Sec. 4.1), :func:`unsup_ramp` (the ramp of
  lambda_U in Eq. 10) and :func:`cosine_lr` (App. A.2).

Nothing here holds state or draws random numbers except :func:`mixmatch`, which draws
from the generator it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdc_serve import CDCError
from cdc_serve_training.config import RUCConfig


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


def unlabelled_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. 7: squared error between the mixed guesses and the network's softmax.

    Averaged over the classes too, as MixMatch's code does (lambda_U's scale assumes it).
    """
    return F.mse_loss(F.softmax(logits, 1), targets)


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


def cosine_lr(cfg: RUCConfig, progress_epochs: float) -> float:
    """Cosine annealing of the learning rate from ``cfg.lr`` to 0 over ``cfg.epochs`` (App. A.2)."""
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(progress_epochs / cfg.epochs, 1.0)))
