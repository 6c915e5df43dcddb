"""MoCo-v2: the loss falls on a tiny dataset, checkpoint/resume equals an uninterrupted run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.checkpoint import safe_load
from cdc_serve_training.config import MocoConfig
from cdc_serve_training.data import ImageData
from cdc_serve_training.moco import extract_features, info_nce, learning_rate, pretrain_moco
from cdc_serve_training.presets import PAPER_MOCO, QUICK_MOCO

TINY = MocoConfig(
    epochs=2, batch_size=16, lr=0.1, queue_size=48, proj_hidden=32, proj_dim=16,
    warmup_epochs=0.5, shuffle_bn_splits=2,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n: int = 64, seed: int = 0) -> ImageData:
    """Four classes of 12x12 images: a bright square in one of the four quadrants, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, 12, 12), generator=g)
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * 6 : r * 6 + 6, col * 6 : col * 6 + 6] += 180
    return ImageData(x.clamp(0, 255).to(torch.uint8), labels, 4, "tiny", (0.3,), (0.3,))


def run(cfg: MocoConfig, data: ImageData, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = build_backbone("smallcnn", 1, data.size)
    aug = Augmenter(data.size, data.mean, data.std)
    return pretrain_moco(backbone, data, aug, cfg, "cpu", seed=0, progress=False, **kwargs)


def test_loss_decreases_on_a_tiny_dataset() -> None:
    cfg = replace(TINY, epochs=8, lr=0.3)
    net = run(cfg, tiny_data(96))
    losses = [h["loss"] for h in net.moco_history]
    assert len(losses) == 8
    # From epoch 2 on the queue holds real keys (the random start is easier to beat).
    assert sum(losses[-2:]) / 2 < sum(losses[1:3]) / 2 - 0.1
    assert not net.training


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    data = tiny_data(64)
    straight = run(TINY, data)
    ckpt = tmp_path / "moco.pt"
    _interrupt_after_epoch_one(data, ckpt)
    resumed = run(TINY, data, checkpoint_path=ckpt, resume=True)
    assert safe_load(ckpt)["epoch"] == 2
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in resumed.moco_history] == [h["loss"] for h in straight.moco_history]


def _interrupt_after_epoch_one(data: ImageData, path: Path) -> None:
    """Run the 2-epoch schedule and stop it right after its first checkpoint is written."""

    class Stop(Exception):
        pass

    import cdc_serve_training.moco as moco

    real_save = moco.save_stage

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Stop

    moco.save_stage = save_then_stop
    try:
        with pytest.raises(Stop):
            run(TINY, data, checkpoint_path=path)
    finally:
        moco.save_stage = real_save
    assert safe_load(path)["epoch"] == 1


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    data = tiny_data(32)
    ckpt = tmp_path / "moco.pt"
    run(replace(TINY, epochs=1), data, checkpoint_path=ckpt)
    with pytest.raises(CDCError, match="temperature"):
        run(replace(TINY, temperature=0.5), data, checkpoint_path=ckpt, resume=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CDCError, match="not a readable MoCo checkpoint"):
        run(TINY, data, checkpoint_path=ckpt, resume=True)


def test_symmetric_loss_and_features() -> None:
    data = tiny_data(32)
    net = run(replace(TINY, epochs=1, symmetric=True), data)
    feats = extract_features(net, data, Augmenter(data.size, data.mean, data.std), "cpu", 10)
    assert feats.shape == (32, net.out_dim) and torch.isfinite(feats).all()


def test_info_nce_prefers_the_positive_key() -> None:
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    assert info_nce(q, q, queue, 0.2) < info_nce(q, -q, queue, 0.2)


def test_schedule_and_config_checks() -> None:
    cfg = MocoConfig(epochs=10, batch_size=512, lr=0.5, warmup_epochs=1)
    assert learning_rate(cfg, 0, 100) == pytest.approx(1.0 / 100)
    assert learning_rate(cfg, 99, 100) == pytest.approx(1.0)
    assert learning_rate(cfg, 999, 100) < 1e-3
    assert PAPER_MOCO.epochs == 1000 and PAPER_MOCO.queue_size == 32768
    assert QUICK_MOCO.epochs < PAPER_MOCO.epochs
    with pytest.raises(CDCError, match="larger than"):
        run(replace(TINY, batch_size=128), tiny_data(32))
    with pytest.raises(CDCError, match="crop_scale"):
        MocoConfig(crop_scale=(0.5, 0.2)).validate(1000)


def test_crop_scale_from_json_lists_resumes(tmp_path: Path) -> None:
    """A config read back from JSON (lists, not tuples) still resumes its own checkpoint."""
    data, ckpt = tiny_data(32), tmp_path / "moco.pt"
    run(replace(TINY, epochs=1, crop_scale=(0.4, 1.0)), data, checkpoint_path=ckpt)
    net = run(
        replace(TINY, epochs=2, crop_scale=[0.4, 1.0]), data, checkpoint_path=ckpt, resume=True
    )
    assert [h["epoch"] for h in net.moco_history] == [1, 2]
