"""K-means in torch: blobs recovered, seeded determinism, agreement with scikit-learn, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from cdc_serve import CDCError
from cdc_serve_training.kmeans import inertia, kmeans, kmeans_plusplus, nearest


def blobs(n_per: int = 50, k: int = 5, d: int = 8, spread: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + spread * torch.randn(k * n_per, d, generator=g)
    return x, labels


def test_recovers_well_separated_blobs() -> None:
    x, truth = blobs()
    centres, labels = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (5, 8) and labels.dtype == torch.int64
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == pytest.approx(1.0)
    # Labels are the nearest centres.
    assert torch.equal(nearest(x, centres)[0], labels)


def test_kmeans_plusplus_is_deterministic_with_a_generator() -> None:
    x, _ = blobs(seed=1)
    a = kmeans_plusplus(x, 7, torch.Generator().manual_seed(3))
    b = kmeans_plusplus(x, 7, torch.Generator().manual_seed(3))
    c = kmeans_plusplus(x, 7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Centres are data points, all distinct, and spread over all five blobs.
    rows = {tuple(r.tolist()) for r in x}
    assert all(tuple(r.tolist()) in rows for r in a)
    assert len({tuple(r.tolist()) for r in a}) == 7


def test_kmeans_plusplus_large_n_path_matches_gram_path(monkeypatch) -> None:
    """The chunked path used for N > 4096 picks the same centres as the N x N table."""
    import cdc_serve_training.kmeans as km

    x, _ = blobs(n_per=40, seed=2)
    a = kmeans_plusplus(x, 6, torch.Generator().manual_seed(0))
    monkeypatch.setattr(km, "_GRAM_MAX_ROWS", 10)
    b = kmeans_plusplus(x, 6, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_inertia_agrees_with_sklearn_on_the_same_init() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 16, generator=g)
    init = kmeans_plusplus(x, 20, torch.Generator().manual_seed(1))
    centres, labels = kmeans(x, 20, n_iter=50, tol=0, init=init)
    ref = KMeans(20, init=init.numpy(), n_init=1, max_iter=50, tol=0, algorithm="lloyd").fit(
        x.numpy()
    )
    assert inertia(x, centres, labels) == pytest.approx(ref.inertia_, rel=1e-3)
    assert adjusted_rand_score(ref.labels_, labels.numpy()) > 0.99


def test_empty_clusters_are_reseeded() -> None:
    x, _ = blobs(n_per=20, k=3)
    # Two initial centres far away from every point: their clusters start empty.
    init = torch.cat([x[:1], torch.full((2, x.shape[1]), 1e4)])
    centres, labels = kmeans(x, 3, init=init)
    assert torch.isfinite(centres).all()
    assert torch.bincount(labels, minlength=3).min() > 0


def test_k_equal_n_and_many_small_clusters() -> None:
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    centres, labels = kmeans(x, 40, generator=torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == list(range(40))
    assert inertia(x, centres, labels) == pytest.approx(0.0, abs=1e-6)
    centres, labels = kmeans(x, 20, generator=torch.Generator().manual_seed(0))
    assert labels.max() < 20 and centres.shape == (20, 4)


@pytest.mark.parametrize(
    ("x", "k", "init"),
    [
        (torch.randn(10, 3), 11, "k-means++"),
        (torch.randn(10, 3), 0, "k-means++"),
        (torch.randn(10), 2, "k-means++"),
        (torch.tensor([[0.0, np.nan], [1.0, 1.0]]), 1, "k-means++"),
        (torch.randn(10, 3), 2, "spectral"),
        (torch.randn(10, 3), 2, torch.randn(3, 3)),
        (torch.arange(20).view(10, 2), 2, "k-means++"),
    ],
)
def test_bad_input_raises_cdcerror(x, k, init) -> None:
    with pytest.raises(CDCError):
        kmeans(x, k, init=init)


def test_random_init_and_float64() -> None:
    x, truth = blobs(seed=5)
    centres, labels = kmeans(
        x.double(), 5, init="random", generator=torch.Generator().manual_seed(0)
    )
    assert centres.dtype == torch.float64
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) > 0.5


def test_n_init_keeps_the_lowest_inertia_of_the_same_draws() -> None:
    # overlapping blobs and random starts: single runs end in different local optima
    x, _ = blobs(n_per=40, k=8, d=4, spread=4.0, seed=3)
    draws = torch.Generator().manual_seed(0)
    singles = [inertia(x, *kmeans(x, 8, init="random", generator=draws)) for _ in range(6)]
    assert len({round(c, 3) for c in singles}) > 1  # the restarts really differ
    best = kmeans(x, 8, init="random", n_init=6, generator=torch.Generator().manual_seed(0))
    assert inertia(x, *best) == pytest.approx(min(singles))


@pytest.mark.parametrize(
    ("n_init", "init", "message"),
    [
        (0, "k-means++", "n_init must be a positive integer"),
        (2.0, "k-means++", "n_init must be a positive integer"),
        (2, torch.zeros(3, 2), "n_init > 1 needs a drawn init"),
    ],
)
def test_bad_n_init_raises_cdcerror(n_init, init, message) -> None:
    with pytest.raises(CDCError, match=message):
        kmeans(torch.randn(10, 2), 3, init=init, n_init=n_init)
