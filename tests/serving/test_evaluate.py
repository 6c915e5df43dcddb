"""`cdc-serve evaluate` on a model.pth and on its export; an RUC model through the same path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdc_serve import CDCError
from cdc_serve.cli import app
from cdc_serve.client import Client
from cdc_serve.evaluate import evaluate
from cdc_serve.export import export_model
from cdc_serve_training.data import load_dataset
from cdc_serve_training.pipeline import train
from cdc_serve_training.presets import make_config


def _tiny_config(tmp_path, method: str, **kwargs):
    """A minutes-free run on 600 digits: 1 MoCo epoch, 2 CDC (or RUC) epochs."""
    config = make_config(
        preset="quick", dataset="digits", out=str(tmp_path / method), method=method,
        limit=600, pretrain_epochs=1, epochs=2, **kwargs,
    )  # fmt: skip
    config.progress = False
    config.init.ortho_steps = 20
    config.moco.queue_size = 512
    return config


@pytest.fixture(scope="module")
def cdc_model(tmp_path_factory):
    return train(_tiny_config(tmp_path_factory.mktemp("cdc"), "cdc"))


@pytest.mark.slow
def test_evaluate_pth_and_export_agree(cdc_model, tmp_path):
    report = evaluate(
        cdc_model, dataset="digits", split="test", ood_dataset="fashion-mnist", out=tmp_path / "pth"
    )
    assert set(report.heads) == {"clu", "cal"}
    for values in report.heads.values():
        assert set(values) == {"acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95"}
    written = json.loads((tmp_path / "pth" / "metrics.json").read_text())
    assert written["dataset"] == "digits"
    assert written["n"] == report.n == len(load_dataset("digits", split="test"))
    assert set(written["ood"]["scores"]) >= {"msp", "mahalanobis"}
    for name in ("reliability_cal.png", "confidence_cal.png", "reliability_clu.png"):
        with Image.open(tmp_path / "pth" / name) as image:
            image.load()
            assert image.size[0] >= 400 and image.size[1] >= 300

    exported = export_model(cdc_model, out=tmp_path / "repo", name="digits")
    onnx_report = evaluate(
        exported.version_dir, dataset="digits", split="test", out=tmp_path / "onnx"
    )
    assert set(onnx_report.heads) == {"cal"}  # the export carries the calibration head only
    for key, value in report.heads["cal"].items():
        assert onnx_report.heads["cal"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key


def test_evaluate_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing.pth")])
    assert result.exit_code == 2 and "no model at" in result.output
    with pytest.raises(CDCError, match="no model"):
        evaluate(tmp_path / "nothing", dataset="digits")


@pytest.mark.slow
def test_ruc_model_exports_and_predicts_through_the_same_client(tmp_path):
    """`--method ruc --labels-from kmeans`: a model.pth that exports and scores like CDC's."""
    config = _tiny_config(tmp_path, "ruc", labels_from="kmeans")
    model_path = train(config)
    metrics = json.loads((model_path.parent / "metrics.json").read_text())
    assert set(metrics["heads"]["cal"]) >= {"acc", "ece", "auroc"}

    exported = export_model(model_path, out=tmp_path / "repo", name="ruc")
    assert exported.max_abs_diff <= 1e-5
    data = load_dataset("digits", split="test")
    with Client(model=tmp_path / "repo" / "ruc", reject_below=0.5) as client:
        assert client.meta.method == "ruc"
        predictions = client.predict(data.images[:50, 0].numpy())
    assert len(predictions) == 50 and all(p.error is None for p in predictions)
    ids = np.array([p.cluster_id for p in predictions])
    assert ids.min() >= 0 and ids.max() < 10
    assert all(
        0.0 < p.confidence <= 1.0 and p.rejected == (p.confidence < 0.5) for p in predictions
    )
