"""Prototype initialisation of the heads (paper Sec. 3.3, Proposition 1) on synthetic blobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from cdc_serve import CDCError
from cdc_serve_training.heads import ClusteringModel, MLPHead
from cdc_serve_training.init import init_heads, orthogonalize, prototype_init, prototypes, zscore_l2
from cdc_serve_training.kmeans import kmeans


def blobs(n_per: int = 60, k: int = 4, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """``k`` well-separated, non-negative Gaussian blobs (like post-ReLU features)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(k, dim, generator=g) * 4
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + spread * torch.randn(k * n_per, dim, generator=g)
    return x.clamp_min(0), labels


def test_zscore_l2_rows_are_centred_unit_vectors():
    z = zscore_l2(torch.rand(10, 7) * 5 + 3)
    assert torch.allclose(z.mean(dim=1), torch.zeros(10), atol=1e-6)
    assert torch.allclose(z.norm(dim=1), torch.ones(10), atol=1e-5)


def test_orthogonalize_pushes_prototypes_apart():
    g = torch.Generator().manual_seed(0)
    W = F.normalize(torch.randn(6, 8, generator=g) + 2.0, dim=1)  # similar rows
    refined = orthogonalize(W, steps=300, lr=0.1)

    def max_cos(m):
        c = F.normalize(m, dim=1) @ F.normalize(m, dim=1).T
        return (c - 2 * torch.eye(len(m))).max().item()

    assert refined.shape == W.shape
    assert max_cos(refined) < max_cos(W)


@pytest.mark.parametrize("ortho_steps", [0, 200])
def test_proposition_1_linear_layer_reproduces_kmeans(ortho_steps):
    # W = K-means prototypes of z  =>  argmax_j (W z)_j is z's K-means cluster.
    x, _ = blobs()
    centres, assignment = prototypes(x, 4, generator=torch.Generator().manual_seed(1))
    W = orthogonalize(centres, steps=ortho_steps)
    predicted = (zscore_l2(x) @ W.T).argmax(dim=1)
    assert torch.equal(predicted, assignment)


def test_initialised_head_reproduces_kmeans_assignments():
    x, truth = blobs(k=4)
    head = MLPHead(16, 12, 4)
    prototype_init(head, x, 4, hidden=12, ortho_steps=100, seed=0, kmeans_iters=50)
    head.eval()
    with torch.no_grad():
        head_labels = head(x).argmax(dim=1)
    _, km_labels = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    # the same partition, up to relabelling of the clusters
    assert adjusted_rand_score(km_labels.numpy(), head_labels.numpy()) == pytest.approx(1.0)
    assert adjusted_rand_score(truth.numpy(), head_labels.numpy()) == pytest.approx(1.0)
    assert torch.count_nonzero(head.fc1.bias) == 0 and torch.count_nonzero(head.fc2.bias) == 0


class Identity(torch.nn.Module):
    out_dim = 16

    def forward(self, x):
        return x


def test_init_heads_gives_both_heads_the_same_weights():
    x, truth = blobs(k=4)
    model = ClusteringModel(Identity(), hidden_dim=12, num_classes=4)
    init_heads(model, x, method="prototype", hidden=12, ortho_steps=50, seed=0)
    for (_, a), (_, b) in zip(
        model.clu_head.state_dict().items(), model.cal_head.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        _, clu, _ = model(x)
    assert adjusted_rand_score(truth.numpy(), clu.argmax(1).numpy()) == pytest.approx(1.0)

    random_model = ClusteringModel(Identity(), hidden_dim=12, num_classes=4)
    init_heads(random_model, x, method="random", hidden=12, seed=0)
    assert not torch.equal(random_model.clu_head.fc1.weight, model.clu_head.fc1.weight)
    assert torch.equal(random_model.clu_head.fc1.weight, random_model.cal_head.fc1.weight)


def test_prototype_init_rejects_mismatched_head():
    x, _ = blobs()
    with pytest.raises(CDCError, match="head shape"):
        prototype_init(MLPHead(16, 8, 4), x, 4, hidden=12)
