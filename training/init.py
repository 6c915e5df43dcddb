"""Prototype-based initialisation of the clustering and calibration heads (paper Sec. 3.3).

A randomly initialised head throws away what the pretrained backbone knows (paper
Fig. 1-f: K-means on MoCo features 50.7 %, a random head 10.4 % on CIFAR-20). Instead,
each Linear layer of the head starts as the K-means prototypes of its own input
(Eq. 6), so that by Proposition 1 the layer's argmax reproduces the K-means assignment:

1. ``z`` = row-wise z-score + L2 normalisation of the backbone features of the whole
   data set (no augmentation); K-means with ``H`` clusters -> ``W1`` (``H x D``).
2. Hidden activations ``h = relu(bn(features @ W1^T))`` with the BatchNorm's statistics
   set from the data; normalised the same way; K-means with ``C`` clusters -> ``W2``.
3. "Orthogonalisation" (reference implementation): each prototype matrix ``W`` (``n x
   d``) is refined by treating its rows as ``n`` classes -- logits
   ``5 * cos(normalize(relu(W)), normalize(W'))``, targets ``arange(n)``, cross-entropy,
   SGD (lr 0.1, momentum 0.9, weight decay 1e-4, cosine schedule) -- which pushes the
   prototypes apart.

Both heads get the same ``W1``, ``W2`` (biases 0) and BatchNorm statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdc_serve import CDCError
from cdc_serve_training.heads import ClusteringModel, MLPHead
from cdc_serve_training.kmeans import kmeans


def zscore_l2(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise z-score (zero mean, unit std per sample), then L2-normalise each row."""
    x = x.float()
    x = x - x.mean(dim=1, keepdim=True)
    x = x / (x.std(dim=1, keepdim=True) + eps)
    return F.normalize(x, dim=1)


def orthogonalize(
    W: torch.Tensor,
    steps: int = 2000,
    lr: float = 0.1,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    scale: float = 5.0,
) -> torch.Tensor:
    """Refine prototypes ``W`` (``n x d``) so that each row is told apart from the others.

    Cross-entropy of ``scale * cos(normalize(relu(W)), normalize(W'))`` against
    ``arange(n)``, minimised over ``W'`` (starting at ``W``) by SGD with a cosine
    schedule, as the reference implementation does. Returns ``W'`` (detached).
    """
    if steps <= 0:
        return W.detach().clone()
    inputs = F.normalize(torch.relu(W.detach().float()), dim=1)
    refined = W.detach().float().clone().requires_grad_(True)
    targets = torch.arange(W.shape[0], device=W.device)
    optimizer = torch.optim.SGD([refined], lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        logits = scale * inputs @ F.normalize(refined, dim=1).T
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return refined.detach()


def prototypes(
    x: torch.Tensor,
    k: int,
    *,
    n_iter: int = 100,
    generator: torch.Generator | None = None,
    n_init: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: ``(Kmeans_k(zscore_l2(x)), assignments)`` -- ``k`` prototypes (``k x D``) and labels.

    ``n_init`` K-means runs from different k-means++ draws; the lowest-inertia one is kept.
    """
    if k > x.shape[0]:
        raise CDCError(f"cannot build {k} prototypes from {x.shape[0]} samples")
    return kmeans(zscore_l2(x), k, n_iter=n_iter, generator=generator, n_init=n_init)


@torch.no_grad()
def _set_batchnorm_from_data(bn: torch.nn.BatchNorm1d, h: torch.Tensor) -> None:
    bn.reset_parameters()  # weight 1, bias 0
    bn.running_mean.copy_(h.mean(dim=0))
    bn.running_var.copy_(h.var(dim=0, unbiased=True))


def prototype_init(
    head: MLPHead,
    features: torch.Tensor,
    num_classes: int,
    *,
    hidden: int,
    ortho_steps: int = 2000,
    ortho_lr: float = 0.1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    kmeans_iters: int = 100,
    max_samples: int | None = None,
    kmeans_restarts: int = 1,
) -> None:
    """Initialise ``head`` in place from the backbone ``features`` (``N x D``) of the whole data set.

    Sets ``fc1.weight = W1``, ``fc2.weight = W2`` (biases 0) and the BatchNorm's running
    statistics from the data (see the module docstring). ``generator`` (or ``seed``)
    makes the two K-means runs reproducible. ``max_samples`` runs the two K-means on a
    seeded random subset of that many rows (a CPU shortcut; the BatchNorm statistics
    always use every row). ``kmeans_restarts`` is each K-means's ``n_init``.
    """
    if head.fc1.out_features != hidden or head.fc2.out_features != num_classes:
        raise CDCError(
            f"head shape ({head.fc1.out_features} hidden, {head.fc2.out_features} classes) "
            f"does not match hidden={hidden}, classes={num_classes}"
        )
    if features.shape[1] != head.fc1.in_features:
        raise CDCError(
            f"features are {features.shape[1]}-d, the head expects {head.fc1.in_features}"
        )
    if generator is None and seed is not None:
        generator = torch.Generator(device=features.device).manual_seed(seed)
    features = features.float()
    sample = features
    if max_samples is not None and max_samples < features.shape[0]:
        source = generator.device if generator is not None else features.device
        pick = torch.randperm(features.shape[0], generator=generator, device=source)[:max_samples]
        sample = features[pick.to(features.device)]
    with torch.no_grad():
        w1, _ = prototypes(
            sample, hidden, n_iter=kmeans_iters, generator=generator, n_init=kmeans_restarts
        )
    w1 = orthogonalize(w1, ortho_steps, ortho_lr)
    with torch.no_grad():
        head.fc1.weight.copy_(w1)
        head.fc1.bias.zero_()
        h = features @ w1.T
        _set_batchnorm_from_data(head.bn, h)
        stats = (head.bn.running_mean, head.bn.running_var)
        hidden_act = torch.relu(F.batch_norm(sample @ w1.T, *stats))
        w2, _ = prototypes(
            hidden_act,
            num_classes,
            n_iter=kmeans_iters,
            generator=generator,
            n_init=kmeans_restarts,
        )
    w2 = orthogonalize(w2, ortho_steps, ortho_lr)
    with torch.no_grad():
        head.fc2.weight.copy_(w2)
        head.fc2.bias.zero_()


def init_heads(
    model: ClusteringModel,
    features: torch.Tensor,
    *,
    method: str = "prototype",
    hidden: int,
    ortho_steps: int = 2000,
    ortho_lr: float = 0.1,
    kmeans_iters: int = 100,
    max_samples: int | None = None,
    kmeans_restarts: int = 1,
    seed: int = 0,
) -> None:
    """Initialise both heads: prototypes (Sec. 3.3) or PyTorch's random init (Table 2-I ablation).

    With ``"prototype"`` the clustering head is initialised and the calibration head
    gets a copy of it; with ``"random"`` both heads get the same seeded random weights.
    """
    if method == "prototype":
        generator = torch.Generator(device=features.device).manual_seed(seed)
        prototype_init(
            model.clu_head,
            features,
            model.num_classes,
            hidden=hidden,
            ortho_steps=ortho_steps,
            ortho_lr=ortho_lr,
            generator=generator,
            kmeans_iters=kmeans_iters,
            max_samples=max_samples,
            kmeans_restarts=kmeans_restarts,
        )
    elif method == "random":
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for module in (model.clu_head.fc1, model.clu_head.bn, model.clu_head.fc2):
            module.reset_parameters()
        torch.random.set_rng_state(state)
    else:
        raise CDCError(f"unknown head initialisation {method!r}; use prototype or random")
    model.cal_head.load_state_dict(model.clu_head.state_dict())
