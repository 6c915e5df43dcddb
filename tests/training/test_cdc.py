"""CDC losses, selection and training loop (paper Eq. 1, 2, 4, 5, Algorithm 1) on small synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.cdc import (
    _heads,
    _optimizer,
    _train_batch,
    calibration_loss,
    calibration_targets,
    clustering_loss,
    negative_entropy_loss,
    select_fixed_threshold,
    select_pseudo_labels,
    train_cdc,
)
from cdc_serve_training.config import CDCConfig
from cdc_serve_training.data import ImageData
from cdc_serve_training.heads import ClusteringModel


class TinyBackbone(nn.Module):
    """A few-parameter conv net with ``out_dim`` (the backbone contract) for fast tests."""

    def __init__(self, in_channels: int = 1, out_dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def blob_images(n: int = 120, num_classes: int = 3, size: int = 8, seed: int = 0) -> ImageData:
    """Three kinds of 8x8 images (bright left / middle / right band) plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 40, (n, 1, size, size), generator=g)
    band = size // num_classes
    for c in range(num_classes):
        images[labels == c, :, :, c * band : (c + 1) * band] += 180
    return ImageData(
        images=images.clamp(0, 255).to(torch.uint8),
        labels=labels,
        num_classes=num_classes,
        name="blobs",
        mean=(0.3,),
        std=(0.3,),
    )


# ---------------------------------------------------------------------------- Eq. 4


def test_select_pseudo_labels_hand_made_batch():
    # B = 8, C = 2 -> floor(B / C) = 4 candidates per class.
    probs = torch.tensor(
        [
            [0.95, 0.05],  # 0
            [0.90, 0.10],  # 1
            [0.85, 0.15],  # 2
            [0.80, 0.20],  # 3
            [0.02, 0.98],  # 4
            [0.03, 0.97],  # 5
            [0.60, 0.40],  # 6
            [0.55, 0.45],  # 7
        ]
    )
    # Class 0: TOP = rows 0, 1, 2, 3; confidences .95 + .90 + .85 + .80 = 3.50 -> M = 3: rows 0, 1, 2.
    # Class 1: TOP = rows 4 (.98), 5 (.97), 7 (.45), 6 (.40); confidences (each row's max)
    #          .98 + .97 + .55 + .60 = 3.10 -> M = 3: rows 4, 5, 7.  Row 7's label is its
    #          argmax, 0.  Row 3 (confidence .80) is left out: class 0 is full.
    index, labels = select_pseudo_labels(probs, 2)
    assert index.tolist() == [0, 1, 2, 4, 5, 7]
    assert labels.tolist() == [0, 0, 0, 1, 1, 0]
    # labelled by the column that kept it, row 7 becomes class 1
    index, labels = select_pseudo_labels(probs, 2, label_by="column")
    assert index.tolist() == [0, 1, 2, 4, 5, 7]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_select_pseudo_labels_adapts_per_class():
    # A confident class keeps more samples than an unsure one (class-wise dynamic threshold).
    probs = torch.tensor(
        [[0.99, 0.01], [0.98, 0.02], [0.97, 0.03], [0.96, 0.04], [0.95, 0.05]]  # rows 0-4
        + [[0.01, 0.99], [0.45, 0.55], [0.44, 0.56], [0.43, 0.57], [0.42, 0.58]]  # rows 5-9
    )
    index, labels = select_pseudo_labels(probs, 2)  # floor(10 / 2) = 5 candidates per class
    # class 0: rows 0-4, .99 + .98 + .97 + .96 + .95 = 4.85 -> M = 4: rows 0-3
    # class 1: rows 5, 9, 8, 7, 6, .99 + .58 + .57 + .56 + .55 = 3.25 -> M = 3: rows 5, 9, 8
    assert index.tolist() == [0, 1, 2, 3, 5, 8, 9]
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_select_pseudo_labels_handles_float_round_off():
    probs = torch.tensor([[0.9, 0.1]] * 10 + [[0.1, 0.9]] * 10)
    index, _ = select_pseudo_labels(probs, 2)  # sums 9.0 in float32 -> M = 9 per class
    assert index.numel() == 18


def test_select_fixed_threshold():
    probs = torch.tensor([[0.99, 0.01], [0.5, 0.5], [0.04, 0.96]])
    index, labels = select_fixed_threshold(probs, 0.95)
    assert index.tolist() == [0, 2]
    assert labels.tolist() == [0, 1]


# ---------------------------------------------------------------------------- Eq. 1, 2, 5


def test_calibration_targets_are_mini_cluster_means():
    clu = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    mini = torch.tensor([0, 0, 1, 1, 1])  # mini-cluster 2 is empty
    targets = calibration_targets(clu, mini, k=3)
    expected = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.4, 0.6], [0.4, 0.6], [0.4, 0.6]])
    assert torch.allclose(targets, expected, atol=1e-6)
    # votes: the share of each mini-cluster's argmaxes (two of three say 1 in the second)
    votes = calibration_targets(clu, mini, k=3, kind="votes")
    expected = torch.tensor(
        [[1.0, 0.0], [1.0, 0.0], [1 / 3, 2 / 3], [1 / 3, 2 / 3], [1 / 3, 2 / 3]]
    )
    assert torch.allclose(votes, expected, atol=1e-6)
    with pytest.raises(CDCError, match="unknown calibration target 'median'"):
        calibration_targets(clu, mini, k=3, kind="median")


def test_calibration_target_counts_in_the_fingerprint_only_when_not_the_papers():
    from cdc_serve_training.cdc import cdc_fingerprint

    paper = cdc_fingerprint(CDCConfig(), seed=0, n_images=10)
    assert "cal_target" not in paper  # checkpoints from before the option still resume
    votes = cdc_fingerprint(CDCConfig(cal_target="votes"), seed=0, n_images=10)
    assert votes == {**paper, "cal_target": "votes"}


def test_calibration_loss_is_soft_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    logp = torch.log_softmax(logits, dim=1)
    expected = -(0.8 * logp[0, 0] + 0.2 * logp[0, 1] + 0.4 * logp[1, 0] + 0.6 * logp[1, 1]) / 2
    assert calibration_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # a one-hot target makes it the ordinary cross-entropy (Eq. 5's form)
    hard = torch.tensor([0, 1])
    assert calibration_loss(logits, torch.eye(2)[hard]).item() == pytest.approx(
        clustering_loss(logits, hard).item(), rel=1e-6
    )


def test_negative_entropy_is_smallest_for_balanced_batches():
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert negative_entropy_loss(balanced).item() == pytest.approx(-math.log(2), rel=1e-6)
    assert negative_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- stop-gradient


def _one_step(stop_gradient: bool):
    torch.manual_seed(0)
    data = blob_images(n=60)
    model = ClusteringModel(TinyBackbone(), hidden_dim=6, num_classes=3)
    cfg = CDCConfig(
        batch_size=60, sub_batch_size=30, mini_clusters=6, selection="fixed",
        fixed_threshold=1.0, stop_gradient=stop_gradient, lr_heads=1e-2, lr_encoder=1e-2,
    )  # fmt: skip
    augmenter = Augmenter(data.size, data.mean, data.std)
    before = {k: v.clone() for k, v in model.named_parameters()}
    select_head, cal_head = _heads(model, cfg)
    model.train()
    stats = _train_batch(
        model, data.images, augmenter, cfg, 3, select_head, cal_head, _optimizer(model, cfg),
        torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False),
    )  # fmt: skip
    assert stats["selected"] == 0.0  # threshold 1.0: only the calibration loss acts
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    return changed


def test_calibration_loss_leaves_backbone_untouched():
    changed = _one_step(stop_gradient=True)
    assert any(k.startswith("cal_head.") for k in changed)
    assert not any(k.startswith("backbone.") for k in changed)
    assert not any(k.startswith("clu_head.") for k in changed)


def test_without_stop_gradient_the_backbone_moves():
    changed = _one_step(stop_gradient=False)
    assert any(k.startswith("backbone.") for k in changed)


def test_calibration_gradient_does_not_reach_backbone():
    model = ClusteringModel(TinyBackbone(), hidden_dim=6, num_classes=3)
    x = torch.randn(12, 1, 8, 8)
    with torch.no_grad():
        features = model.backbone(x)
    loss = calibration_loss(model.cal_head(features), torch.full((12, 3), 1 / 3))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.cal_head.parameters())


# ---------------------------------------------------------------------------- the loop


def _run(tmp_path, epochs: int, resume: bool, cfg_kwargs=None):
    torch.manual_seed(0)
    data = blob_images(n=120)
    model = ClusteringModel(TinyBackbone(), hidden_dim=6, num_classes=3)
    cfg = CDCConfig(
        epochs=epochs, batch_size=40, sub_batch_size=20, mini_clusters=8, lr_heads=1e-2,
        lr_encoder=1e-3, **(cfg_kwargs or {}),
    )  # fmt: skip
    augmenter = Augmenter(data.size, data.mean, data.std)
    history = train_cdc(
        model, data, augmenter, cfg, torch.device("cpu"), seed=3,
        checkpoint_path=tmp_path / "cdc.ckpt", resume=resume, progress=False,
    )  # fmt: skip
    return model, history


def test_resume_is_bit_identical(tmp_path):
    straight, history = _run(tmp_path / "a", epochs=3, resume=False)
    _run(tmp_path / "b", epochs=1, resume=False)  # interrupted after one epoch
    resumed, resumed_history = _run(tmp_path / "b", epochs=3, resume=True)
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # the per-epoch wall times differ; every other figure is the same
    assert len(history.pop("seconds")) == len(resumed_history.pop("seconds")) == 3
    assert history == resumed_history
    assert len(history["selected"]) == 3 and all(0 < s <= 1 for s in history["selected"])


def test_resume_with_other_settings_names_what_changed(tmp_path):
    _run(tmp_path, epochs=1, resume=False)
    with pytest.raises(CDCError, match=r"other CDC settings \(w_en 1.0 -> 4.0\); delete it"):
        _run(tmp_path, epochs=2, resume=True, cfg_kwargs={"w_en": 4.0})
    _run(tmp_path, epochs=2, resume=True)  # more epochs alone may resume


@pytest.mark.parametrize("heads", ["clu", "clu+cal"])
def test_single_head_variants_share_one_head(tmp_path, heads):
    model, history = _run(tmp_path, epochs=1, resume=False, cfg_kwargs={"heads": heads})
    for (_, a), (_, b) in zip(
        model.clu_head.state_dict().items(), model.cal_head.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b)
    if heads == "clu":
        assert history["loss_cal"] == [0.0]


def test_a_single_selected_sample_does_not_break_batchnorm(tmp_path, monkeypatch):
    """A fixed threshold (Table 2-II) can select one sample in a sub-batch: no crash."""
    from cdc_serve_training import cdc

    def one_sample(probs, *args, **kwargs):
        return torch.tensor([0]), probs[:1].argmax(dim=1)

    monkeypatch.setattr(cdc, "select_pseudo_labels", one_sample)
    model, history = _run(tmp_path, epochs=1, resume=False)
    assert history["loss_clu"] == [0.0]  # the lone sample waits: no clustering step
    assert all(torch.isfinite(p).all() for p in model.parameters())
