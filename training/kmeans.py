"""K-means (Lloyd) with k-means++ initialisation, in torch, on whatever device the data is.

CDC runs K-means in two places: once on the whole dataset's features (the
"MoCo-v2 + K-means" baseline and the prototype initialisation of Sec. 3.3, up to
N = 70,000 x D = 512 with k = 512), and on every training batch to form the mini-clusters
of the calibration loss (Eq. 1; B = 1,000 samples, K = 500). Both stay on the device that
holds the features: distances come from one matrix product
``||x||^2 - 2 x c^T + ||c||^2`` (chunked over rows for large N, the ``||x||^2`` term dropped
for the argmin), centres are updated with ``index_add_``.

Empty clusters are re-seeded deterministically with the points farthest from their centres.
"""

from __future__ import annotations

import math

import torch

from cdc_serve import CDCError

# Rows per distance block: bounds the N x K distance matrix held at once (~64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _check(x: torch.Tensor, k: int) -> None:
    if x.dim() != 2:
        raise CDCError(f"K-means needs an N x D matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1:
        raise CDCError(f"K-means needs k >= 1 clusters, got {k}")
    if k > n:
        raise CDCError(f"K-means cannot make k={k} clusters from only {n} samples (k > N)")
    if not torch.isfinite(x.sum()):  # one reduction instead of an N x D boolean mask
        raise CDCError("K-means input contains NaN or infinite values")


def _uniform(generator: torch.Generator | None, device: torch.device, *shape: int) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)


def nearest(
    x: torch.Tensor, centres: torch.Tensor, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centre of each row of ``x`` and the squared distance to it."""
    c_sq = centres.square().sum(dim=1)
    if x_sq is None:
        x_sq = x.square().sum(dim=1)
    n, k = x.shape[0], centres.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        block = x[start : start + rows]
        # ||c||^2 - 2 x c^T in one fused call; ||x||^2 only shifts each row.
        d = torch.addmm(c_sq.unsqueeze(0), block, centres.T, beta=1.0, alpha=-2.0)
        best, idx = d.min(dim=1)
        labels[start : start + rows] = idx
        dist[start : start + rows] = (best + x_sq[start : start + rows]).clamp_min_(0)
    return labels, dist


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` and ``b`` (one matrix product)."""
    d = torch.addmm(b.square().sum(dim=1).unsqueeze(0), a, b.T, beta=1.0, alpha=-2.0)
    return d.add_(a.square().sum(dim=1, keepdim=True)).clamp_min_(0)


# Up to this many rows k-means++ precomputes the N x N distance matrix (64 MB in float32).
_GRAM_MAX_ROWS = 4096


def kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    n_local_trials: int | None = None,
) -> torch.Tensor:
    """k-means++ initial centres (Arthur & Vassilvitskii 2007), ``k x D``.

    Greedy variant as scikit-learn's: at each step ``2 + log(k)`` candidates are drawn with
    probability proportional to the squared distance to the chosen centres, and the one
    lowering the total most is kept. All random numbers are drawn up front and the loop
    never reads a value back to the host, so it runs at the device's pace; for N up to
    4,096 (the per-batch mini-clusters) the N x N distances are computed once.
    Deterministic for a seeded ``generator``.
    """
    _check(x, k)
    n, device = x.shape[0], x.device
    trials = n_local_trials or 2 + int(math.log(k))
    u = _uniform(generator, device, k * trials + 1).to(x.dtype)
    table = pairwise_sq_distances(x, x) if n <= _GRAM_MAX_ROWS else None

    # index_select, not table[index]: on the CPU advanced indexing is many times slower and,
    # with several threads on a busy machine, waits for its threads on every one of k steps
    def distances_to(index: torch.Tensor) -> torch.Tensor:
        if table is not None:
            return table.index_select(0, index)
        return pairwise_sq_distances(x.index_select(0, index), x)

    chosen = torch.empty(k, dtype=torch.long, device=device)
    chosen[0] = (u[0] * n).long().clamp_max(n - 1)
    closest = distances_to(chosen[:1])[0]
    for i in range(1, k):
        # Inverse-CDF sampling of `trials` candidates, proportional to `closest`.
        cdf = torch.cumsum(closest, 0)
        draws = u[1 + (i - 1) * trials : 1 + i * trials] * cdf[-1]
        cand = torch.searchsorted(cdf, draws).clamp_max_(n - 1)
        new_closest = torch.minimum(closest.unsqueeze(0), distances_to(cand))
        best = torch.argmin(new_closest.sum(dim=1))
        chosen[i] = cand[best]
        closest = new_closest[best]
    return x.index_select(0, chosen)


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of ``x`` (k x D).

    On the CPU a sparse (k x N) one-hot matrix product is many times faster than
    ``index_add_`` with several threads; on the GPU ``index_add_`` is the fast path.
    """
    if x.device.type == "cpu":
        n = x.shape[0]
        index = torch.stack([labels, torch.arange(n, device=x.device)])
        one_hot = torch.sparse_coo_tensor(
            index, torch.ones(n, dtype=x.dtype), (k, n), check_invariants=False
        )
        return torch.sparse.mm(one_hot, x)
    return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)


def update_centres(
    x: torch.Tensor, labels: torch.Tensor, k: int, dist: torch.Tensor, old: torch.Tensor
) -> torch.Tensor:
    """Mean of each cluster; empty clusters take the points farthest from their centres."""
    sums = _cluster_sums(x, labels, k)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    centres = sums / counts.clamp_min(1).unsqueeze(1)
    empty = counts == 0
    n_empty = int(empty.sum().item())
    if n_empty:
        far = torch.topk(dist, n_empty).indices  # deterministic: largest distances first
        centres[empty] = x[far]
    return centres


def kmeans(
    x: torch.Tensor,
    k: int,
    n_iter: int = 30,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    init: str | torch.Tensor = "k-means++",
    n_init: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means on the rows of ``x`` (N x D, float, any device).

    Args:
        k: number of clusters (at most N, else CDCError).
        n_iter: maximum number of Lloyd iterations (assignment + update).
        tol: stop when the centres move less than ``tol`` times the mean per-feature
            variance of ``x`` (squared Frobenius norm, scikit-learn's criterion), or when the
            assignments no longer change. ``tol=0`` stops only on unchanged assignments.
        generator: seeds the k-means++ / random initialisation.
        init: ``"k-means++"``, ``"random"`` (k distinct rows) or a ``k x D`` tensor.
        n_init: runs from different initialisations (drawn one after the other from
            ``generator``); the one with the lowest :func:`inertia` is returned, as
            scikit-learn's ``n_init``. Must be 1 for a tensor ``init``.

    Returns:
        ``(centres k x D, labels N int64)``; labels are the assignment to the returned centres.
    """
    _check(x, k)
    if not x.is_floating_point():
        raise CDCError(f"K-means needs floating-point features, got {x.dtype}")
    if not isinstance(n_init, int) or n_init < 1:
        raise CDCError(f"n_init must be a positive integer, got {n_init!r}")
    if n_init > 1 and isinstance(init, torch.Tensor):
        raise CDCError("n_init > 1 needs a drawn init ('k-means++' or 'random'), not a tensor")
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(n_init):
        centres, labels = _lloyd(x, k, n_iter, tol, _initial_centres(x, k, init, generator))
        cost = inertia(x, centres, labels) if n_init > 1 else 0.0
        if best is None or cost < best[0]:
            best = (cost, centres, labels)
    assert best is not None
    return best[1], best[2]


def _initial_centres(
    x: torch.Tensor, k: int, init: str | torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, x.shape[1]):
            raise CDCError(f"K-means init must be {k} x {x.shape[1]}, got {tuple(init.shape)}")
        return init.to(device=x.device, dtype=x.dtype).clone()
    if init == "k-means++":
        return kmeans_plusplus(x, k, generator)
    if init == "random":
        source = generator.device if generator is not None else x.device
        pick = torch.randperm(x.shape[0], generator=generator, device=source)[:k].to(x.device)
        return x[pick].clone()
    raise CDCError(f"unknown K-means init {init!r}; use 'k-means++', 'random' or a tensor")


def _lloyd(
    x: torch.Tensor, k: int, n_iter: int, tol: float, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centres`` (see :func:`kmeans` for ``n_iter`` and ``tol``)."""
    x_sq = x.square().sum(dim=1)
    threshold = tol * float(x.var(dim=0).mean()) if tol > 0 else 0.0
    labels, dist = nearest(x, centres, x_sq)
    for _ in range(n_iter):
        new_centres = update_centres(x, labels, k, dist, centres)
        shift = float((new_centres - centres).square().sum())
        centres = new_centres
        new_labels, dist = nearest(x, centres, x_sq)
        unchanged = bool(torch.equal(new_labels, labels))
        labels = new_labels
        if unchanged or shift <= threshold:
            break
    return centres, labels


def inertia(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the rows of ``x`` to their assigned centres."""
    return float((x - centres[labels]).square().sum())
