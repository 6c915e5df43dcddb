"""The MLP head and the dual-head clustering network of CDC (paper Sec. 3, Fig. 2).

Both heads have the same shape (paper Sec. 4.1, reference implementation):

    MLPHead:  fc1 = Linear(D, H)  ->  bn = BatchNorm1d(H)  ->  ReLU  ->  fc2 = Linear(H, C)

with ``D`` the backbone's feature size, ``H`` the hidden size and ``C`` the number of
clusters. The sub-modules are named ``fc1``, ``bn`` and ``fc2``, so a checkpoint's keys
read ``clu_head.fc1.weight``, ``cal_head.bn.running_mean`` and so on.

``ClusteringModel`` is ``backbone`` + ``clu_head`` (trained on pseudo-labels, Eq. 5) +
``cal_head`` (trained to be calibrated, Eq. 1-3). ``CalibratedInference`` is what gets
exported: ``x -> backbone -> cal_head -> softmax``, returning ``(probs, embedding)``.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """``Linear(D, H) -> BatchNorm1d(H) -> ReLU -> Linear(H, C)``; returns logits."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``relu(bn(fc1(features)))``."""
        return torch.relu(self.bn(self.fc1(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(features))

    @property
    def num_classes(self) -> int:
        return self.fc2.out_features


class ClusteringModel(nn.Module):
    """Backbone with a clustering head and a calibration head (paper Fig. 2).

    ``forward(x)`` returns ``(features, clu_logits, cal_logits)``. The backbone must
    have an ``out_dim`` attribute (every backbone of ``backbones.build_backbone`` has).
    """

    def __init__(self, backbone: nn.Module, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        feature_dim = int(backbone.out_dim)
        self.backbone = backbone
        self.clu_head = MLPHead(feature_dim, hidden_dim, num_classes)
        self.cal_head = MLPHead(feature_dim, hidden_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.out_dim)

    @property
    def hidden_dim(self) -> int:
        return self.clu_head.fc1.out_features

    @property
    def num_classes(self) -> int:
        return self.clu_head.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.clu_head(features), self.cal_head(features)


class CalibratedInference(nn.Module):
    """The served graph: ``probs = softmax(cal_head(backbone(x)))`` and ``embedding = backbone(x)``.

    The final prediction and its confidence come from the calibration head (paper
    Sec. 3.4, "Final Prediction").
    """

    def __init__(self, model: ClusteringModel) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.cal_head = model.cal_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        probs = torch.softmax(self.cal_head(embedding), dim=1)
        return probs, embedding
