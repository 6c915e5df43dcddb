"""``--restarts N``: N initialisations on one backbone, the highest label-free estimate kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pipeline import _tiny_run

from cdc_serve_training.checkpoint import load_model
from cdc_serve_training.pipeline import train
from cdc_serve_training.restarts import candidate_seed, estimate_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_estimate_is_the_mean_confidence():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]], dtype=np.float32)
    assert estimate_accuracy(probs) == pytest.approx((0.9 + 0.6 + 0.5) / 3)


def test_candidate_zero_is_the_plain_run():
    assert [candidate_seed(7, i) for i in range(3)] == [7, 8, 9]


@pytest.mark.slow
def test_restarts_keep_the_highest_estimate(tmp_path):
    plain = _tiny_run(tmp_path / "plain")
    train(plain)
    plain_metrics = json.loads((tmp_path / "plain" / "run" / "metrics.json").read_text())

    config = _tiny_run(tmp_path / "restarts", restarts=3)
    out = tmp_path / "restarts" / "run"
    train(config)
    log = json.loads((out / "train_log.json").read_text())
    candidates = log["restarts"]["candidates"]
    assert [c["seed"] for c in candidates] == [0, 1, 2]
    estimates = [c["estimate"] for c in candidates]
    chosen = log["restarts"]["chosen"]
    assert chosen == int(np.argmax(estimates))
    # candidate 0 is the plain run, to the last bit: same estimate, same accuracy
    assert candidates[0]["estimate"] == round(plain_metrics["label_free"]["estimated_accuracy"], 6)
    assert candidates[0]["acc"] == round(plain_metrics["heads"]["cal"]["acc"], 6)
    # the saved model is the chosen candidate
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_free"]["estimated_accuracy"] == pytest.approx(estimates[chosen], abs=1e-6)
    assert metrics["heads"]["cal"]["acc"] == pytest.approx(candidates[chosen]["acc"], abs=1e-6)
    assert len(set(estimates)) > 1  # the candidates differ
    for i in range(3):
        assert (out / f"init-{i}.pt").is_file() and (out / f"cdc-{i}.ckpt").is_file()

    # --resume: every candidate is done; the same choice and the same model come back
    model, _ = load_model(out / "model.pth")
    train(config, resume=True)
    again, _ = load_model(out / "model.pth")
    resumed = json.loads((out / "train_log.json").read_text())["restarts"]["candidates"]
    assert [{**c, "seconds": 0} for c in resumed] == [{**c, "seconds": 0} for c in candidates]
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert (a == b).all(), name


@pytest.mark.slow
def test_restarts_resumed_with_other_settings_are_refused(tmp_path):
    from cdc_serve import CDCError

    config = _tiny_run(tmp_path, restarts=2)
    config.cdc.epochs = 1
    train(config)
    again = _tiny_run(tmp_path, restarts=2)
    again.cdc.epochs, again.cdc.w_en = 1, 2.0
    with pytest.raises(CDCError, match=r"cdc-0.ckpt.*other CDC settings \(w_en 12.0 -> 2.0\)"):
        train(again, resume=True)


@pytest.mark.slow
def test_a_standard_run_resumed_with_other_settings_is_refused(tmp_path):
    from cdc_serve import CDCError

    config = _tiny_run(tmp_path, preset="standard", restarts=2)
    config.cdc.epochs = 1
    train(config)
    out = tmp_path / "run"
    assert json.loads((out / "train_log.json").read_text())["config"]["preset"] == "standard"
    quick = _tiny_run(tmp_path, restarts=2)
    with pytest.raises(CDCError, match=r"backbone.pt.*other backbone settings \(preset "
                       r"'standard' -> 'quick'\)"):  # fmt: skip
        train(quick, resume=True)
    finer = _tiny_run(tmp_path, preset="standard", restarts=2, mini_clusters=4)
    finer.cdc.epochs = 1
    with pytest.raises(CDCError, match=r"cdc-0.ckpt.*other CDC settings \(mini_clusters"):
        train(finer, resume=True)
