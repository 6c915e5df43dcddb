"""``make_config`` validation, bad input before training, and a small end-to-end run."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training.pipeline import train
from cdc_serve_training.presets import ABLATIONS, make_config


def _config(tmp_path, **kwargs):
    base = {"preset": "quick", "dataset": "digits", "out": str(tmp_path / "run")}
    base.update(kwargs)
    return make_config(**base)


# ---------------------------------------------------------------------------- make_config


def test_quick_preset_is_valid(tmp_path):
    config = _config(tmp_path)
    assert config.model.backbone == "smallcnn"
    assert config.cdc.batch_size % config.cdc.sub_batch_size == 0
    assert config.cdc.mini_clusters <= config.cdc.batch_size
    paper = _config(tmp_path, preset="paper")
    assert (
        paper.model.backbone == "resnet34" and paper.moco.epochs == 1000 and paper.cdc.epochs == 100
    )
    assert (paper.cdc.batch_size, paper.cdc.sub_batch_size, paper.cdc.mini_clusters) == (
        1000,
        500,
        500,
    )
    assert json.dumps(config.to_dict())  # plain, JSON-able


def test_standard_preset_is_quick_with_three_restarts(tmp_path):
    quick, standard = _config(tmp_path), _config(tmp_path, preset="standard")
    assert (quick.restarts, standard.restarts) == (1, 3)
    assert standard.moco == quick.moco and standard.cdc == quick.cdc
    assert _config(tmp_path, preset="standard", restarts=1).restarts == 1  # --restarts wins
    assert _config(tmp_path, preset="paper").restarts == 1
    assert _config(tmp_path, preset="standard", method="ruc").restarts == 1  # RUC: one clustering


def test_head_init_is_the_presets_unless_given(tmp_path):
    for preset in ("quick", "standard", "paper"):
        assert _config(tmp_path, preset=preset).init.head_init == "prototype"
    assert _config(tmp_path, head_init="random").init.head_init == "random"
    # Table 2 pins the paper's init for every row; its random-init row still wins, and
    # a row that changes something else keeps the head it is given
    pinned = _config(tmp_path, head_init="prototype", ablation="random-init")
    assert pinned.init.head_init == "random"
    assert _config(tmp_path, head_init="random", ablation="fixed-0.9").init.head_init == "random"
    with pytest.raises(CDCError, match="unknown head initialisation 'kmeans'"):
        _config(tmp_path, head_init="kmeans")


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_builds(tmp_path, name):
    config = _config(tmp_path, ablation=name)
    assert config.ablation == name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "mnist-please"}, "unknown dataset 'mnist-please'.*fashion-mnist"),
        ({"preset": "huge"}, "unknown preset"),
        ({"ablation": "no-such-thing"}, "unknown ablation"),
        ({"method": "dec"}, "unknown method"),
        ({"split": "validation"}, "unknown split"),
        ({"backbone": "vgg"}, "unknown backbone"),
        ({"device": "tpu"}, "unknown device"),
        ({"limit": 0}, "positive"),
        ({"restarts": 0}, "--restarts 0: use 1"),
        ({"restarts": 2, "method": "ruc"}, "--restarts is for --method cdc"),
    ],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(CDCError, match=message):
        _config(tmp_path, **kwargs)


def test_batch_size_not_divisible_by_sub_batch(tmp_path):
    from cdc_serve_training.config import validate

    config = _config(tmp_path)
    config.cdc.batch_size, config.cdc.sub_batch_size = 1000, 300
    with pytest.raises(CDCError, match="B=1000 is not divisible by the sub-batch size B_s=300"):
        validate(config)


def test_more_mini_clusters_than_batch(tmp_path):
    from cdc_serve_training.config import validate

    config = _config(tmp_path)
    config.cdc.mini_clusters = config.cdc.batch_size + 1
    with pytest.raises(CDCError, match="mini-clusters K="):
        validate(config)


# ---------------------------------------------------------------------------- bad data: before training


def _nothing_trained(out):
    return not any(out.glob("*.ckpt")) and not (out / "backbone.pt").exists()


def test_data_root_without_files(tmp_path):
    config = _config(tmp_path, dataset="fashion-mnist", data_root=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CDCError) as info:
        train(config)
    assert "fashion-mnist" in str(info.value) and str(tmp_path / "empty") in str(info.value)
    assert _nothing_trained(tmp_path / "run")


def _write_idx(path, array: np.ndarray, corrupt: bool = False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    body = array.astype(np.uint8).tobytes()
    if corrupt:
        body = body[: len(body) // 3]  # truncated payload
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_corrupt_idx_files(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 10)):
        _write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)), corrupt=True
        )
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    config = _config(tmp_path, dataset="fashion-mnist", data_root=str(root))
    with pytest.raises(CDCError):
        train(config)
    assert _nothing_trained(tmp_path / "run")


def test_more_classes_than_images(tmp_path):
    config = _config(tmp_path, limit=6)  # digits has 10 classes
    with pytest.raises(CDCError, match="10 clusters requested but the data has only 6 images"):
        train(config)
    assert _nothing_trained(tmp_path / "run")


def test_batch_larger_than_data(tmp_path):
    config = _config(tmp_path, limit=300)
    config.cdc.batch_size, config.cdc.sub_batch_size, config.cdc.mini_clusters = 1000, 500, 100
    # set as by --batch-size etc.: a preset's batch adapts to small data, the user's does not
    config.set_by_user += ["batch_size", "sub_batch_size", "mini_clusters"]
    with pytest.raises(CDCError, match="batch size B=1000 is larger than the data"):
        train(config)
    assert _nothing_trained(tmp_path / "run")


# ---------------------------------------------------------------------------- end to end


def _tiny_run(tmp_path, **kwargs):
    config = _config(tmp_path, limit=600, pretrain_epochs=1, epochs=2, **kwargs)
    config.progress = False
    config.init.ortho_steps = 20
    config.moco.queue_size = 512
    return config


@pytest.mark.slow
def test_end_to_end_on_digits(tmp_path):
    from cdc_serve_training.checkpoint import load_model

    config = _tiny_run(tmp_path)
    model_path = train(config)
    assert model_path == tmp_path / "run" / "model.pth"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["split"] == "all" and metrics["n"] == 600
    assert set(metrics["heads"]) == {"kmeans", "clu", "cal"}
    assert set(metrics["heads"]["kmeans"]) == {"acc", "nmi", "ari", "ece"}
    for head in ("clu", "cal"):
        assert set(metrics["heads"][head]) == {"acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95"}
    for values in metrics["heads"].values():
        assert all(0.0 <= v <= 1.0 for v in values.values())
    # digits are easy: every head clusters far above chance (10 %)
    assert metrics["heads"]["cal"]["acc"] > 0.3

    model, info = load_model(model_path)
    assert info["method"] == "cdc" and info["dataset"] == "digits"
    assert info["arch"]["num_classes"] == 10 and info["preprocess"]["channels"] == 1
    assert info["metrics"] == metrics and info["ood"]
    assert info["config"]["cdc"]["epochs"] == 2
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert len(log["history"]["seconds"]) == 2 and all(t > 0 for t in log["history"]["seconds"])
    assert log["device"] == "cpu" and log["device_name"] and log["peak_rss_mib"] > 0
    assert "peak_gpu_memory_mib" not in log  # recorded on CUDA only

    # resume: every stage is already done, the result is the same model
    again = train(config, resume=True)
    model2, _ = load_model(again)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_ablation_report_states_which_claims_held():
    from cdc_serve_training.ablations import render

    def head(acc, ece):
        return {"acc": acc, "nmi": acc - 0.05, "ari": acc - 0.1, "ece": ece}

    def run(acc, ece, init=None):
        return {"metrics": {"kmeans": head(0.5, 0.3), "clu": head(acc, 0.2), "cal": head(acc, ece)},
                "init": init, "seconds": 1.0}  # fmt: skip

    results = {
        "cdc": run(0.70, 0.03, init=head(0.55, 0.2)),
        "random-init": run(0.60, 0.1, head(0.2, 0.1)),
    }
    for name in ("fixed-0.99", "fixed-0.95", "fixed-0.9", "fixed-0.8"):
        results[name] = run(0.65, 0.05)
    results["fixed-0.8"] = run(0.72, 0.05)  # one fixed threshold beats the dynamic selection
    results["single-head-clu"] = run(0.66, 0.2)
    results["single-head-clu+cal"] = run(0.68, 0.1)
    results["no-stop-gradient"] = run(0.64, 0.04)
    text = render(results, dataset="fashion-mnist", preset="quick", device="cpu", total_s=60)
    assert "| II | **CDC-Cal (ours)** | 70.0 | 65.0 | 60.0 | 3.0 |" in text
    assert "**did not hold**: II. The dynamic" in text
    assert "**held**: I. The prototype initialisation" in text
    assert "**held**: V. Without stop-gradient" in text
    results["no-stop-gradient"] = run(0.695, 0.04)  # half a point: no evidence either way
    text = render(results, dataset="fashion-mnist", preset="quick", device="cpu", total_s=60)
    assert "**tie**: V. Without stop-gradient" in text


def test_ablation_report_keeps_text_outside_its_markers():
    from cdc_serve_training.ablations import END, START, splice

    first = splice("# Ablations\n\nhand-written intro\n", "table v1")
    assert first.startswith("# Ablations\n\nhand-written intro") and "table v1" in first
    document = first + "\n## RUC\nstrategies table\n"
    second = splice(document, "table v2")
    assert "table v1" not in second and "table v2" in second
    assert "hand-written intro" in second and second.endswith("## RUC\nstrategies table\n")
    assert second.count(START) == second.count(END) == 1


def test_ablation_choices_match_their_settings():
    """The CLI's --ablation values (cdc_serve.choices) are exactly the presets' ABLATIONS."""
    from cdc_serve.choices import Ablation, values

    assert set(values(Ablation)) == set(ABLATIONS)
