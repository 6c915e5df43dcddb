"""RUC (training/ruc/) on small synthetic data: selection, MixMatch, refurbishing, training."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training import ruc
from cdc_serve_training.ruc import (
    RUCConfig,
    clean_set_quality,
    co_refine,
    co_refurbish,
    guess_unclean,
    knn_vote,
    label_smoothing,
    loop,
    mixmatch,
    select_clean,
    sharpen,
    tau2_at,
)

# --------------------------------------------------------------------------- selection


def _two_groups() -> tuple[torch.Tensor, torch.Tensor]:
    """Six points near direction (1, 0) and six near (0, 1); sample 2 is mislabelled 1."""
    a = torch.tensor([[1.0, 0.01 * i] for i in range(6)])
    b = torch.tensor([[0.01 * i, 1.0] for i in range(6)])
    emb = torch.cat([a, b]) * torch.arange(1, 13).float().unsqueeze(1)  # norms must not matter
    labels = torch.tensor([0] * 6 + [1] * 6)
    labels[2] = 1
    return emb, labels


def test_knn_vote_hand_made_and_excludes_self():
    emb, labels = _two_groups()
    votes = knn_vote(emb, labels, k=3)
    # every sample's 3 nearest neighbours lie in its own group; group A votes 0 (its
    # neighbours other than sample 2 are labelled 0), group B votes 1
    assert votes.tolist() == [0] * 6 + [1] * 6
    # with k = 1 the vote is the single nearest *other* sample: sample 3's nearest
    # neighbours are 2 and 4 (equal angles); sample 2 itself must not vote for itself
    assert knn_vote(emb, labels, k=1)[2].item() == 0


def test_knn_vote_matches_sklearn_and_chunking():
    from sklearn.neighbors import NearestNeighbors

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 8, generator=gen)
    labels = torch.randint(0, 4, (300,), generator=gen)
    k = 7
    nn_ = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(emb.numpy())
    idx = nn_.kneighbors(emb.numpy(), return_distance=False)[:, 1:]  # drop self
    expected = [np.bincount(labels.numpy()[row], minlength=4).argmax() for row in idx]
    assert knn_vote(emb, labels, k).tolist() == expected
    assert knn_vote(emb, labels, k, chunk_size=13).tolist() == expected


def test_select_clean_three_strategies_hand_made():
    emb, labels = _two_groups()
    conf = torch.full((12,), 0.995)
    conf[[2, 7, 8]] = torch.tensor([0.999, 0.5, 0.99])  # 8 sits exactly on tau1

    confidence = select_clean("confidence", labels, conf, None, tau1=0.99)
    metric = select_clean("metric", labels, None, emb, k=3)
    hybrid = select_clean("hybrid", labels, conf, emb, tau1=0.99, k=3)

    assert confidence.tolist() == [i != 7 for i in range(12)]  # >= tau1 keeps sample 8
    assert metric.tolist() == [i != 2 for i in range(12)]  # the mislabelled sample
    assert hybrid.tolist() == [i not in (2, 7) for i in range(12)]
    assert confidence.dtype == torch.bool


def test_confidence_strategy_rank_form_keeps_top_share_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    conf = torch.tensor([0.10, 0.40, 0.30, 0.20, 0.05, 0.01, 0.02, 0.03])
    # half of every class, rounded up: {1, 2} of class 0, {4, 6} of class 1, {7} of class 2
    expected = [False, True, True, False, True, False, True, True]
    mask = select_clean("confidence", labels, conf, None, clean_fraction=0.5)
    assert mask.tolist() == expected
    # an absolute tau1 on the same (K-means-like, low) confidences would keep nothing
    assert not select_clean("confidence", labels, conf, None, tau1=0.99).any()
    assert select_clean("confidence", labels, conf, None, clean_fraction=1.0).all()
    with pytest.raises(CDCError, match="clean_fraction"):
        select_clean("confidence", labels, conf, None, clean_fraction=0.0)


def test_select_clean_errors():
    emb, labels = _two_groups()
    with pytest.raises(CDCError, match="unknown clean-set strategy"):
        select_clean("loss", labels, None, emb)
    with pytest.raises(CDCError, match="needs confidences"):
        select_clean("hybrid", labels, None, emb)
    with pytest.raises(CDCError, match="needs embeddings"):
        select_clean("metric", labels, None, None)
    with pytest.raises(CDCError, match="k < number of samples"):
        select_clean("metric", labels, None, emb, k=12)
    with pytest.raises(CDCError, match="shape"):
        select_clean("confidence", labels, torch.ones(5), None)


def test_clean_set_quality_uses_hungarian_matching():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # cluster ids are swapped (cluster 1 = class 0) and sample 3 is wrong
    pseudo = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    # correct after matching: all but sample 3 -> 7 correct samples
    mask = torch.tensor([True, True, False, True, True, False, False, False])
    q = clean_set_quality(mask, pseudo, true)
    assert q["size"] == 4
    assert q["precision"] == pytest.approx(3 / 4)  # samples 0, 1, 4 correct; 3 wrong
    assert q["recall"] == pytest.approx(3 / 7)
    assert q["f1"] == pytest.approx(2 * (3 / 4) * (3 / 7) / (3 / 4 + 3 / 7))


# --------------------------------------------------------------------------- the maths


def test_sharpen_properties():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(50, 6, generator=gen), dim=1)
    s = sharpen(p, 0.5)
    assert torch.allclose(s.sum(1), torch.ones(50))
    assert torch.equal(s.argmax(1), p.argmax(1))

    def entropy(q):
        return -(q * q.log()).sum(1)

    assert (entropy(s) < entropy(p)).all()
    assert torch.allclose(sharpen(p, 1.0), p)
    # a tiny T tends to the one-hot argmax without under-flowing to 0/0
    assert torch.allclose(sharpen(p, 1e-3), torch.nn.functional.one_hot(p.argmax(1), 6).float())
    # T = 0.5 squares and renormalises
    q = torch.tensor([[0.6, 0.4]])
    assert torch.allclose(sharpen(q, 0.5), torch.tensor([[0.36, 0.16]]) / 0.52)


def test_label_smoothing_eq8():
    y = torch.nn.functional.one_hot(torch.tensor([2]), 4).float()
    assert torch.allclose(label_smoothing(y, 0.5), torch.tensor([[1 / 6, 1 / 6, 0.5, 1 / 6]]))


def test_mixmatch_lambda_and_same_permutation_for_targets():
    n = 16
    # inputs that identify their row exactly: x_i = e_i, and targets = inputs, so the
    # mixed targets equal the mixed inputs only if the same permutation and lambda mix both
    x = torch.eye(n)
    gen = torch.Generator().manual_seed(0)
    lams = []
    for _ in range(200):
        mixed_x, mixed_t, lam, perm = mixmatch(x, x.clone(), gen, alpha=4.0)
        lams.append(lam)
        assert torch.allclose(mixed_x, mixed_t)
        assert torch.allclose(mixed_x, lam * x + (1 - lam) * x[perm])
        assert sorted(perm.tolist()) == list(range(n))
    assert min(lams) >= 0.5 and max(lams) <= 1.0
    # lambda' = max(l, 1-l) with l ~ Beta(4, 4): E = 0.5 + E|l - 0.5| ~ 0.63, not constant
    assert 0.58 < float(np.mean(lams)) < 0.68 and np.std(lams) > 0.03
    # images and soft targets of different shapes are mixed alike
    imgs = torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2)
    targets = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    mixed_x, mixed_t, lam, perm = mixmatch(imgs, targets, torch.Generator().manual_seed(5))
    assert torch.allclose(mixed_x[:, 0, 0, 0], lam * torch.arange(n) + (1 - lam) * perm)
    assert torch.allclose(mixed_t, lam * targets + (1 - lam) * targets[perm])
    # reproducible from the generator
    again = mixmatch(imgs, targets, torch.Generator().manual_seed(5))
    assert again[2] == lam and torch.equal(again[3], perm)


def test_co_refine_weights_by_normalised_counter_confidence():
    y = torch.nn.functional.one_hot(torch.tensor([0, 0, 0]), 3).float()
    counter = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.4, 0.3, 0.3]])
    out = co_refine(y, counter, T=0.5)
    # most confident counter prediction (0.8): w = 1 -> sharpened counter prediction
    assert torch.allclose(out[0], sharpen(counter[:1], 0.5)[0])
    # least confident (0.4): w = 0 -> the pseudo-label itself
    assert torch.allclose(out[2], y[2])
    w = (0.5 - 0.4) / (0.8 - 0.4)
    assert torch.allclose(out[1], sharpen(((1 - w) * y[1:2] + w * counter[1:2]), 0.5)[0])
    assert torch.allclose(out.sum(1), torch.ones(3))


def test_guess_unclean_is_sharpened_mean():
    a = torch.tensor([[0.7, 0.3]])
    b = torch.tensor([[0.5, 0.5]])
    assert torch.allclose(
        guess_unclean([a, b, a, b], 0.5), sharpen(torch.tensor([[0.6, 0.4]]), 0.5)
    )


def test_co_refurbish_moves_only_unclean_samples_above_threshold():
    net1 = torch.tensor(
        [
            [0.95, 0.05],  # 0: clean already, stays with its label
            [0.10, 0.90],  # 1: unclean, 0.90 = tau2 -> moves, label 1
            [0.60, 0.40],  # 2: unclean, net2 is more confident (0.97) -> label 0 from net2
            [0.30, 0.70],  # 3: unclean, both below tau2 -> stays unclean
            [0.89, 0.11],  # 4: unclean, just below -> stays
        ]
    )
    net2 = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.97, 0.03], [0.5, 0.5], [0.5, 0.5]])
    mask = torch.tensor([True, False, False, False, False])
    labels = torch.tensor([0, 0, 1, 0, 1])
    new_mask, new_labels, moved = co_refurbish([net1, net2], mask, labels, tau2=0.9)
    assert new_mask.tolist() == [True, True, True, False, False]
    assert new_labels.tolist() == [0, 1, 0, 0, 1]
    assert moved.tolist() == [1, 2]
    # inputs untouched; a single network's probs work too
    assert mask.tolist() == [True, False, False, False, False] and labels.tolist() == [
        0,
        0,
        1,
        0,
        1,
    ]
    m1, _, moved1 = co_refurbish(net1, mask, labels, tau2=0.9)
    assert m1.tolist() == [True, True, False, False, False] and moved1.tolist() == [1]


def test_tau2_schedule_follows_paper():
    cfg = RUCConfig(epochs=200)
    assert tau2_at(0, cfg) == pytest.approx(0.9)
    assert tau2_at(39, cfg) == pytest.approx(0.9)
    assert tau2_at(40, cfg) == pytest.approx(0.92)
    assert tau2_at(199, cfg) == pytest.approx(0.98)
    short = RUCConfig(epochs=5)
    assert [round(tau2_at(e, short), 4) for e in range(5)] == [0.9, 0.92, 0.94, 0.96, 0.98]
    fixed = RUCConfig(epochs=5, tau2_start=0.99, tau2_step=0.0)  # reference implementation
    assert {tau2_at(e, fixed) for e in range(5)} == {0.99}


def test_config_from_dict_and_validation():
    assert RUCConfig.from_dict({"epochs": 3}).epochs == 3
    assert RUCConfig.from_dict(None) == RUCConfig()
    with pytest.raises(CDCError, match="unknown RUC settings"):
        RUCConfig.from_dict({"epoch": 3})
    with pytest.raises(CDCError, match="strategy"):
        RUCConfig(strategy="loss").validate()
    d = RUCConfig()
    assert (d.epochs, d.lr, d.momentum, d.weight_decay, d.lambda_u) == (200, 0.01, 0.9, 5e-4, 25)
    assert (d.epsilon, d.temperature, d.alpha, d.tau1, d.k, d.strategy) == (
        0.5,
        0.5,
        4.0,
        0.99,
        100,
        "hybrid",
    )


# --------------------------------------------------------------------------- labels files


def test_labels_from_npy_and_csv(tmp_path):
    feats = torch.zeros(4, 2)
    np.save(tmp_path / "l.npy", np.array([0, 2, 1, 2]))
    labels, conf = ruc.pseudo_labels_from(tmp_path / "l.npy", feats, 3)
    assert labels.tolist() == [0, 2, 1, 2] and conf is None

    (tmp_path / "a.csv").write_text("0\n2\n1\n2\n")
    assert ruc.pseudo_labels_from(str(tmp_path / "a.csv"), feats, 3)[0].tolist() == [0, 2, 1, 2]
    (tmp_path / "b.csv").write_text("index,label\n3,2\n0,0\n2,1\n1,2\n")
    assert ruc.pseudo_labels_from(tmp_path / "b.csv", feats, 3)[0].tolist() == [0, 2, 1, 2]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("short.npy", np.array([0, 1, 2]), "3 labels for 4 images"),
        ("range.npy", np.array([0, 1, 3, 1]), r"must lie in 0\.\.2"),
        ("neg.npy", np.array([0, -1, 1, 1]), r"must lie in 0\.\.2"),
        ("float.npy", np.array([0.5, 1, 1, 1]), "integers"),
        ("2d.npy", np.zeros((4, 2), dtype=np.int64), "one label per sample"),
        ("bad.csv", "0\nx\n1\n1\n", "cannot read labels"),
        ("dup.csv", "0,1\n0,1\n2,1\n3,1\n", "index column"),
        ("missing.npy", None, "no such file"),
        ("labels.txt", "0\n1\n1\n1\n", "expected kmeans"),
    ],
)
def test_labels_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CDCError, match=message):
        ruc.pseudo_labels_from(path, torch.zeros(4, 2), 3)


# --------------------------------------------------------------------------- training


class TinyBackbone(nn.Module):
    """Conv-BN-ReLU + global pooling: a backbone small enough for a unit test."""

    def __init__(self, channels: int = 1, out_dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, out_dim, 3, padding=1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


def _synthetic(n_per_class: int = 40, seed: int = 0):
    """Three classes of 12x12 grey images: a bright top half, left half or centre square."""
    from cdc_serve_training.data import ImageData

    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, 12, 12)
    masks[0, :6] = 1
    masks[1, :, :6] = 1
    masks[2, 3:9, 3:9] = 1
    labels = torch.arange(3).repeat_interleave(n_per_class)
    noise = torch.rand(len(labels), 12, 12, generator=gen) * 60
    images = (masks[labels] * 180 + noise).clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return ImageData(
        images=images, labels=labels, num_classes=3, name="synthetic", mean=(0.4,), std=(0.3,)
    )


def _noisy_inputs(data, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    pseudo = data.labels.clone()
    flip = torch.rand(n, generator=gen) < 0.2
    pseudo[flip] = (pseudo[flip] + 1) % 3
    conf = torch.where(flip, 0.6, 0.995) + 0.004 * torch.rand(n, generator=gen)
    embeddings = data.images.float().flatten(1)
    return pseudo, conf, embeddings


TINY = RUCConfig(epochs=2, batch_size=16, steps_per_epoch=3, k=5)
# the run-wide settings train_ruc takes explicitly: head width, inference batch
WIDTHS = {"hidden": 16, "eval_batch_size": 64}


def test_train_ruc_tiny_end_to_end():
    from cdc_serve_training.augment import Augmenter
    from cdc_serve_training.heads import ClusteringModel

    data = _synthetic(n_per_class=20)
    pseudo, conf, emb = _noisy_inputs(data)
    augmenter = Augmenter(data.size, data.mean, data.std)
    backbone = TinyBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    given = pseudo.clone()
    refurbishing = RUCConfig(**{**TINY.to_dict(), "tau2_start": 0.0, "tau2_step": 0.0})
    model, report = ruc.train_ruc(
        backbone, data, pseudo, conf, emb, augmenter, refurbishing, "cpu", num_classes=3,
        progress=False, **WIDTHS,
    )  # fmt: skip
    assert isinstance(model, ClusteringModel) and not model.training
    x = augmenter.val(data.images[:5])
    features, clu, cal = model(x)
    assert features.shape == (5, 8) and clu.shape == cal.shape == (5, 3)
    assert torch.allclose(clu, cal)  # clu_head is a copy of the final network's head
    assert torch.isfinite(cal).all()
    # the pretrained backbone passed in is copied, never trained in place, and the
    # caller's pseudo-labels are the input clustering still (refurbishing works on a copy)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert torch.equal(pseudo, given)
    assert report["final_clean_set"]["size"] > report["selection"]["hybrid"]["size"]
    # all three strategies are reported with Table 3's measures
    assert set(report["selection"]) == {"confidence", "metric", "hybrid"}
    for quality in report["selection"].values():
        assert set(quality) == {"precision", "recall", "f1", "size"}
    # the confidences mark exactly the flipped labels: the confidence strategy is exact
    assert report["selection"]["confidence"]["precision"] == 1.0
    assert report["selection"]["confidence"]["recall"] == 1.0
    assert len(report["history"]) == 2
    for row in report["history"]:
        assert math.isfinite(row["net1"]["loss"]) and math.isfinite(row["net2"]["loss"])
        assert row["clean_set"]["size"] >= report["selection"]["hybrid"]["size"]


def test_train_ruc_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    from cdc_serve_training.augment import Augmenter

    data = _synthetic(n_per_class=20)
    pseudo, conf, emb = _noisy_inputs(data)
    augmenter = Augmenter(data.size, data.mean, data.std)
    args = (data, pseudo, conf, emb, augmenter, TINY, "cpu")
    backbone = TinyBackbone()  # train_ruc copies it: every run starts from the same weights
    full, _ = ruc.train_ruc(backbone, *args, num_classes=3, progress=False, **WIDTHS)

    save = loop._save_state

    def save_then_crash(*a, **kw):
        save(*a, **kw)
        raise KeyboardInterrupt

    ckpt = tmp_path / "ruc.pt"
    monkeypatch.setattr(loop, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ruc.train_ruc(
            backbone, *args, num_classes=3, progress=False, checkpoint_path=ckpt, **WIDTHS
        )
    monkeypatch.setattr(loop, "_save_state", save)
    resumed, report = ruc.train_ruc(
        backbone, *args, num_classes=3, progress=False, checkpoint_path=ckpt, resume=True,
        **WIDTHS,
    )  # fmt: skip
    assert len(report["history"]) == 2
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


ONE_EPOCH = RUCConfig(**{**TINY.to_dict(), "epochs": 1, "steps_per_epoch": 1})


def _train_into(checkpoint, *, cfg=ONE_EPOCH, n_per_class=20, resume=False, **options):
    """One tiny RUC run that checkpoints to ``checkpoint``; ``options`` override train_ruc's."""
    from cdc_serve_training.augment import Augmenter

    data = _synthetic(n_per_class=n_per_class)
    pseudo, conf, emb = _noisy_inputs(data)
    augmenter = Augmenter(data.size, data.mean, data.std)
    settings = {"num_classes": 3, "seed": 0, "labels_from": "kmeans", **WIDTHS, **options}
    return ruc.train_ruc(
        TinyBackbone(), data, pseudo, conf, emb, augmenter, cfg, "cpu", progress=False,
        checkpoint_path=checkpoint, resume=resume, **settings,
    )  # fmt: skip


def test_train_ruc_checkpoint_counts_epochs_done_and_epochs_may_grow(tmp_path):
    from cdc_serve_training.checkpoint import safe_load

    ckpt = tmp_path / "ruc.ckpt"
    _train_into(ckpt)
    state = safe_load(ckpt)
    assert state["epoch"] == 1 and state["fingerprint"]["stage"] == "ruc"
    assert "epochs" not in state["fingerprint"]
    # more epochs on resume: training continues with the second epoch
    _, report = _train_into(
        ckpt, cfg=RUCConfig(**{**ONE_EPOCH.to_dict(), "epochs": 2}), resume=True
    )
    assert [row["epoch"] for row in report["history"]] == [1, 2]
    assert safe_load(ckpt)["epoch"] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cfg": RUCConfig(**{**ONE_EPOCH.to_dict(), "lr": 0.02})}, "lr 0.01 -> 0.02"),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"n_per_class": 10}, "n_images 60 -> 30"),
        ({"hidden": 8}, "hidden 16 -> 8"),
        ({"labels_from": "labels.npy"}, "labels_from 'kmeans' -> 'labels.npy'"),
        ({"num_classes": 4}, "num_classes 3 -> 4"),
    ],
)
def test_train_ruc_resume_refuses_a_checkpoint_of_another_run(tmp_path, change, message):
    ckpt = tmp_path / "ruc.ckpt"
    _train_into(ckpt)
    with pytest.raises(CDCError, match=re.escape(message)) as error:
        _train_into(ckpt, resume=True, **change)
    assert str(error.value).startswith(f"cannot resume from {ckpt}")
    assert "train into another --out" in str(error.value)


def test_train_ruc_input_errors():
    from cdc_serve_training.augment import Augmenter

    data = _synthetic(n_per_class=10)
    pseudo, conf, emb = _noisy_inputs(data)
    aug = Augmenter(data.size, data.mean, data.std)
    with pytest.raises(CDCError, match="pseudo-labels for"):
        ruc.train_ruc(
            TinyBackbone(), data, pseudo[:5], conf, emb, aug, TINY, num_classes=3, **WIDTHS
        )
    by_confidence = RUCConfig(**{**TINY.to_dict(), "strategy": "confidence"})
    with pytest.raises(CDCError, match="needs confidences"):
        ruc.train_ruc(
            TinyBackbone(), data, pseudo, None, emb, aug, by_confidence, num_classes=3, **WIDTHS
        )
    with pytest.raises(CDCError, match="kept 0 of 30 samples"):
        ruc.train_ruc(
            TinyBackbone(), data, pseudo, conf * 0, emb, aug, TINY, num_classes=3, progress=False,
            **WIDTHS,
        )  # fmt: skip


def test_pseudo_labels_from_model_pth_uses_clustering_head(tmp_path):
    from cdc_serve_training.checkpoint import arch_of, build_model, save_model
    from cdc_serve_training.evaluation import infer

    data = _synthetic(n_per_class=10)
    arch = {
        "backbone": "smallcnn",
        "in_channels": 1,
        "input_size": [12, 12],
        "feature_dim": 128,
        "hidden_dim": 16,
        "num_classes": 3,
    }
    torch.manual_seed(0)
    model = build_model(arch).eval()
    with torch.no_grad():  # make the two heads disagree, so the test sees which one is used
        model.cal_head.fc2.weight.mul_(-1)
    path = save_model(
        tmp_path / "model.pth",
        model,
        method="cdc",
        arch=arch_of(model, "smallcnn", 1, [12, 12]),
        preprocess=data.preprocess(),
        config={},
        dataset="synthetic",
        metrics={},
        ood={},
    )
    labels, conf = ruc.pseudo_labels_from(path, None, 3, data=data)
    out = infer(model, data, torch.device("cpu"))
    clu = torch.from_numpy(out["clu_probs"])
    assert labels.tolist() == clu.argmax(1).tolist()
    assert torch.allclose(conf, clu.max(1).values)
    with pytest.raises(CDCError, match="clusters into 3 classes, the data has 4"):
        ruc.pseudo_labels_from(path, None, 4, data=data)
    with pytest.raises(CDCError, match="need the images"):
        ruc.pseudo_labels_from(path, torch.zeros(30, 2), 3)


def test_train_ruc_hybrid_without_confidences_uses_metric():
    from cdc_serve_training.augment import Augmenter

    data = _synthetic(n_per_class=10)
    pseudo, _, emb = _noisy_inputs(data)
    aug = Augmenter(data.size, data.mean, data.std)
    one_step = RUCConfig(**{**TINY.to_dict(), "epochs": 1, "steps_per_epoch": 1})
    _, report = ruc.train_ruc(
        TinyBackbone(), data, pseudo, None, emb, aug, one_step, num_classes=3, progress=False,
        **WIDTHS,
    )  # fmt: skip
    assert report["strategy"] == "metric" and set(report["selection"]) == {"metric"}


def test_run_ruc_stage_from_kmeans(tmp_path):
    from types import SimpleNamespace

    data = _synthetic(n_per_class=10)
    backbone = TinyBackbone()
    features = data.images.float().flatten(1)
    config = SimpleNamespace(
        ruc=RUCConfig(**{**TINY.to_dict(), "epochs": 1, "steps_per_epoch": 1}),
        labels_from="kmeans",
        seed=0,
        progress=False,
        eval_batch_size=64,
        model=SimpleNamespace(hidden=16),
    )
    model, report = ruc.run_ruc_stage(config, data, backbone, features, "cpu", tmp_path, False)
    assert (tmp_path / "ruc.ckpt").exists()
    assert report["labels_from"] == "kmeans" and report["strategy"] == "hybrid"
    # K-means confidences use the per-cluster rank form
    assert report["config"]["clean_fraction"] == ruc.KMEANS_CLEAN_FRACTION
    assert report["selection"]["confidence"]["size"] == pytest.approx(15, abs=3)
    assert set(report["pseudo_labels"]) >= {"acc", "nmi", "ari"}
    assert model(torch.zeros(2, 1, 12, 12))[2].shape == (2, 3)


def test_config_names_the_moved_settings():
    with pytest.raises(CDCError, match="unknown RUC settings.*model.hidden and eval_batch_size"):
        RUCConfig.from_dict({"hidden_dim": 128, "eval_batch_size": 1024})
    assert tuple(s.value for s in ruc.RUCStrategy) == ruc.STRATEGIES


@pytest.mark.slow
def test_ruc_from_a_model_starts_from_its_backbone(tmp_path, one_thread):
    """``--init-from model.pth``: no second pretraining, a clean set from every cluster,
    and the reported input clustering is that model's clustering head, as it was before
    RUC refurbished its labels."""
    import json

    from test_pipeline import _tiny_run

    from cdc_serve_training.pipeline import train

    cdc_model = train(_tiny_run(tmp_path / "cdc"))
    cdc_metrics = json.loads((cdc_model.parent / "metrics.json").read_text())
    config = _tiny_run(tmp_path / "ruc", method="ruc", labels_from=str(cdc_model))
    config.ruc.epochs, config.ruc.steps_per_epoch = 1, 4
    out = train(config).parent
    assert not (out / "backbone.pt").exists() and not (out / "pretrain.ckpt").exists()
    report = json.loads((out / "train_log.json").read_text())["ruc_report"]
    assert report["pseudo_labels"]["acc"] == pytest.approx(cdc_metrics["heads"]["clu"]["acc"])
    # a clustering head's confidence is no saturated classifier's: the clean set is the
    # most confident share of every cluster (with tau_1 = 0.99 it was empty here)
    assert report["config"]["clean_fraction"] == ruc.KMEANS_CLEAN_FRACTION
    assert report["selection"]["confidence"]["size"] > 0
    with pytest.raises(CDCError, match="has a smallcnn backbone: train RUC on it with"):
        train(_tiny_run(tmp_path / "bad", method="ruc", labels_from=str(cdc_model),
                        backbone="resnet18"))  # fmt: skip
