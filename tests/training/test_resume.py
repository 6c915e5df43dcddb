"""One resume scheme for every stage: same settings continue, anything else is refused clearly.

Each stage's checkpoint carries a fingerprint (``checkpoint.fingerprint``) of the settings,
the seed and the number of images; only the epoch count may grow. Per stage (MoCo-v2,
``backbone.pt``, ``init.pt``, CDC; RUC in test_ruc.py): a changed setting, another seed
and another data size each give the one CDCError naming what changed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_cdc import TinyBackbone, blob_images
from test_moco import tiny_data

from cdc_serve import CDCError
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.cdc import train_cdc
from cdc_serve_training.checkpoint import (
    changed_settings,
    fingerprint,
    load_stage,
    safe_load,
    save_stage,
)
from cdc_serve_training.config import CDCConfig, MocoConfig
from cdc_serve_training.heads import ClusteringModel
from cdc_serve_training.moco import pretrain_moco
from cdc_serve_training.pipeline import train
from cdc_serve_training.presets import make_config

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- the scheme


def test_fingerprint_is_flat_plain_and_ignores_epochs():
    fp = fingerprint(
        "cdc", {"epochs": 3, "w_en": 1.0, "aug": {"crop": (0.4, 1.0)}}, seed=2, n_images=10
    )
    assert fp == {
        "stage": "cdc", "seed": 2, "n_images": 10, "world_size": 1, "w_en": 1.0,
        "aug.crop": [0.4, 1.0],
    }  # fmt: skip
    again = fingerprint("cdc", {"epochs": 9, "w_en": 1.0, "aug": {"crop": [0.4, 1.0]}}, seed=2,
                        n_images=10)  # fmt: skip
    assert changed_settings(fp, again) == []


def test_changed_settings_names_every_difference():
    saved = {"seed": 0, "lr": 0.1, "gone": 1}
    wanted = {"seed": 1, "lr": 0.1, "new": 2}
    assert changed_settings(saved, wanted) == [
        "gone 1 -> (unset)", "new (unset) -> 2", "seed 0 -> 1",
    ]  # fmt: skip


def test_load_stage(tmp_path):
    fp = fingerprint("moco", {"lr": 0.5}, seed=0, n_images=100)
    assert load_stage(tmp_path / "none.ckpt", fp) is None
    save_stage(tmp_path / "a.ckpt", fp, 3, weights=torch.ones(2))
    state = load_stage(tmp_path / "a.ckpt", fp)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.ones(2))
    other = fingerprint("moco", {"lr": 0.5}, seed=0, n_images=99)
    with pytest.raises(CDCError, match=r"other MoCo settings \(n_images 100 -> 99\); delete it"):
        load_stage(tmp_path / "a.ckpt", other)
    torch.save({"epoch": 1}, tmp_path / "old.ckpt")  # an older cdc-serve's checkpoint
    with pytest.raises(CDCError, match="not a readable MoCo checkpoint.*older cdc-serve"):
        load_stage(tmp_path / "old.ckpt", fp)
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CDCError, match="not a readable MoCo checkpoint"):
        load_stage(tmp_path / "junk.ckpt", fp)


# ---------------------------------------------------------------------------- MoCo-v2

TINY_MOCO = MocoConfig(
    epochs=1, batch_size=16, lr=0.1, queue_size=48, proj_hidden=32, proj_dim=16,
    warmup_epochs=0.5, shuffle_bn_splits=2,
)  # fmt: skip


def _moco(cfg, data, ckpt, seed=0, resume=False):
    torch.manual_seed(0)
    backbone = build_backbone("smallcnn", 1, data.size)
    aug = Augmenter(data.size, data.mean, data.std)
    return pretrain_moco(
        backbone, data, aug, cfg, "cpu", seed=seed, checkpoint_path=ckpt, resume=resume,
        progress=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, r"seed 0 -> 1"),
        ({"n": 48}, r"n_images 32 -> 48"),
        ({"cfg": {"queue_size": 64}}, r"queue_size 48 -> 64"),
    ],
)
def test_moco_refuses_another_run(tmp_path, change, message):
    ckpt = tmp_path / "pretrain.ckpt"
    _moco(TINY_MOCO, tiny_data(32), ckpt)
    cfg = replace(TINY_MOCO, epochs=2, **change.get("cfg", {}))
    with pytest.raises(CDCError, match=rf"cannot resume .*other MoCo settings \({message}\)"):
        _moco(cfg, tiny_data(change.get("n", 32)), ckpt, seed=change.get("seed", 0), resume=True)
    # the same settings with more epochs continue from epoch 1
    net = _moco(replace(TINY_MOCO, epochs=2), tiny_data(32), ckpt, resume=True)
    assert [h["epoch"] for h in net.moco_history] == [1, 2]


# ---------------------------------------------------------------------------- CDC


def _cdc(tmp_path, epochs=1, seed=3, n=120, resume=False, **cfg_kwargs):
    torch.manual_seed(0)
    data = blob_images(n=n)
    model = ClusteringModel(TinyBackbone(), hidden_dim=6, num_classes=3)
    cfg = CDCConfig(epochs=epochs, batch_size=40, sub_batch_size=20, mini_clusters=8, **cfg_kwargs)
    return train_cdc(
        model, data, Augmenter(data.size, data.mean, data.std), cfg, torch.device("cpu"),
        seed=seed, checkpoint_path=tmp_path / "cdc.ckpt", resume=resume, progress=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [({"seed": 4}, "seed 3 -> 4"), ({"n": 160}, "n_images 120 -> 160"),
     ({"kmeans_iters": 5}, "kmeans_iters 20 -> 5")],
)  # fmt: skip
def test_cdc_refuses_another_run(tmp_path, change, message):
    _cdc(tmp_path)
    with pytest.raises(CDCError, match=rf"other CDC settings \({message}\); delete it"):
        _cdc(tmp_path, epochs=2, resume=True, **change)
    history = _cdc(tmp_path, epochs=2, resume=True)
    assert len(history["loss_clu"]) == 2


# ---------------------------------------------------------------------------- the pipeline


def _config(tmp_path, **kwargs):
    """300 digits, 1 MoCo epoch, 1 CDC epoch: a whole run in seconds."""
    base = dict(preset="quick", dataset="digits", out=str(tmp_path / "run"), limit=300,
                pretrain_epochs=1, epochs=1)  # fmt: skip
    base.update(kwargs)
    config = make_config(**base)
    config.progress = False
    config.moco.queue_size = 256
    config.init.max_samples = None
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    model = train(_config(tmp_path))
    return tmp_path, model


def test_pipeline_resume_with_the_same_settings_reuses_every_stage(finished_run):
    tmp_path, model = finished_run
    before = safe_load(model)["state_dict"]
    again = train(_config(tmp_path), resume=True)
    after = safe_load(again)["state_dict"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "edit", "message"),
    [
        ({"seed": 1}, None, r"other backbone settings \(seed 0 -> 1\)"),
        ({"limit": 280}, None, r"other backbone settings \(n_images 300 -> 280\)"),
        ({}, ("moco", "temperature", 0.5), r"other backbone settings \(moco.temperature"),
        ({}, ("init", "kmeans_iters", 7), r"other head-init settings \(init.kmeans_iters 50 -> 7"),
        ({}, ("cdc", "w_en", 1.0), r"other CDC settings \(w_en 12.0 -> 1.0\)"),
    ],
)
def test_pipeline_resume_refuses_another_run(finished_run, kwargs, edit, message):
    tmp_path, _ = finished_run
    config = _config(tmp_path, **kwargs)
    if edit is not None:
        section, key, value = edit
        setattr(getattr(config, section), key, value)
    with pytest.raises(CDCError, match=message):
        train(config, resume=True)
