"""The MLP head, the dual-head model and the exported inference module."""

from __future__ import annotations

import torch

from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.heads import CalibratedInference, ClusteringModel, MLPHead


def test_mlp_head_layout_and_shapes():
    head = MLPHead(16, 8, 3)
    assert [name for name, _ in head.named_children()] == ["fc1", "bn", "fc2"]
    assert head(torch.randn(5, 16)).shape == (5, 3)
    assert head.num_classes == 3


def test_clustering_model_outputs_and_inference():
    backbone = build_backbone("smallcnn", 1, (28, 28))
    model = ClusteringModel(backbone, hidden_dim=32, num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    features, clu, cal = model(x)
    assert features.shape == (4, backbone.out_dim)
    assert clu.shape == cal.shape == (4, 10)
    assert (model.feature_dim, model.hidden_dim, model.num_classes) == (backbone.out_dim, 32, 10)
    keys = set(model.state_dict())
    assert {"clu_head.fc1.weight", "cal_head.bn.running_var", "cal_head.fc2.bias"} <= keys

    probs, embedding = CalibratedInference(model).eval()(x)
    assert torch.allclose(probs, torch.softmax(cal, dim=1))
    assert torch.allclose(embedding, features)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4))
