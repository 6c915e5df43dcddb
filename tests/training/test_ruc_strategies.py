"""RUC's strategy table (training/ruc/strategies.py) end to end on a few digits."""

from __future__ import annotations

import json

import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training import ruc


def test_run_strategy_comparison_writes_the_table(tmp_path):
    from cdc_serve_training.backbones import build_backbone
    from cdc_serve_training.checkpoint import atomic_save

    torch.manual_seed(0)
    backbone = build_backbone("smallcnn", 1, (8, 8))
    backbone_pt = atomic_save(
        {"backbone": "smallcnn", "state_dict": backbone.state_dict()}, tmp_path / "backbone.pt"
    )
    table = ruc.run_strategy_comparison(
        "digits", None, backbone_pt, tmp_path / "out", limit=300, seed=0, device="cpu",
        epochs=1, strategies=["metric"], progress=False,
    )  # fmt: skip
    assert table == tmp_path / "out" / "strategies.md"
    text = table.read_text()
    assert "| K-means + RUC (metric) |" in text and "300 images" in text
    rows = json.loads((tmp_path / "out" / "strategies.json").read_text())
    assert [row["method"] for row in rows] == [
        "K-means (Student-t soft assignment)",
        "K-means + RUC (metric)",
    ]
    with pytest.raises(CDCError, match="no backbone at"):
        ruc.run_strategy_comparison("digits", None, tmp_path / "none.pt", tmp_path / "o")
    with pytest.raises(CDCError, match="unknown RUC strategies"):
        ruc.run_strategy_comparison("digits", None, backbone_pt, tmp_path / "o", strategies=["x"])
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(CDCError, match="no backbone.pt"):
        ruc.run_strategy_comparison("digits", None, tmp_path / "junk.pt", tmp_path / "o")


def test_cli_study_pretrains_a_backbone_then_reuses_it(tmp_path):
    """`cdc-serve ablations --study ruc-strategies` without --backbone: pretrain, then reuse."""
    from typer.testing import CliRunner

    from cdc_serve.cli import app

    args = ["ablations", "--study", "ruc-strategies", "--dataset", "digits", "--limit", "300",
            "--epochs", "1", "--runs", str(tmp_path), "--device", "cpu"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "K-means + RUC (hybrid)" in first.output and (tmp_path / "backbone.pt").exists()
    stamp = (tmp_path / "backbone.pt").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output and (tmp_path / "backbone.pt").stat().st_mtime_ns == stamp
    bad = CliRunner().invoke(app, [*args[:2], "table3"])
    assert bad.exit_code == 2 and "table3" in bad.output
