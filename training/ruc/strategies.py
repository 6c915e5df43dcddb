"""RUC's three clean-set strategies side by side (paper Tables 1 and 3; docs/ABLATIONS.md).

Read top-down:

- :func:`run_strategy_comparison`: the whole table from a dataset name and a pretrained
  ``backbone.pt``, written to a folder (what ``cdc-serve ablations`` runs for RUC);
- :func:`compare_strategies`: K-means pseudo-labels of the backbone's features, then
  RUC once per strategy; one row of metrics each;
- :func:`strategies_markdown`: the rows as a Markdown table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training.config import RUCConfig
from cdc_serve_training.ruc.clean_set import KMEANS_CLEAN_FRACTION, STRATEGIES, selection_masks
from cdc_serve_training.ruc.loop import train_ruc


def run_strategy_comparison(
    dataset: str,
    data_root: str | Path | None,
    backbone_pt: str | Path | None,
    out: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    preset: str = "quick",
    epochs: int | None = None,
    strategies: Sequence[str] = STRATEGIES,
    progress: bool = True,
) -> Path:
    """RUC on K-means pseudo-labels of ``backbone_pt``'s features, once per strategy.

    The settings are the preset's (``presets.make_config(method="ruc")``): its RUC
    section (``QUICK_RUC`` for ``quick``), its head width and eval batch size;
    ``epochs`` overrides the RUC epochs. ``backbone_pt`` is the ``backbone.pt`` of a
    ``cdc-serve train`` run (its backbone's name and weights); ``None`` pretrains one
    with the preset's MoCo-v2 settings into ``out`` (``pipeline.pretrained_backbone``,
    reused from there by the next call). Writes
    ``out/strategies.json`` (the rows of :func:`compare_strategies`) and
    ``out/strategies.md`` (the table, the image count and the run time); returns the
    Markdown file's path.
    """
    from cdc_serve_training.data import load_dataset
    from cdc_serve_training.pipeline import resolve_device
    from cdc_serve_training.presets import make_config

    start = time.perf_counter()
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise CDCError(f"unknown RUC strategies {unknown}; use some of {', '.join(STRATEGIES)}")
    config = make_config(
        preset=preset, dataset=dataset, out=str(out), method="ruc",
        data_root=str(data_root) if data_root else None, device=device, seed=seed,
        limit=limit, epochs=epochs,
    )  # fmt: skip
    if backbone_pt is not None and not Path(backbone_pt).exists():
        raise CDCError(
            f"no backbone at {backbone_pt}: pass the backbone.pt of a `cdc-serve train` run "
            "(it lies in the run's --out folder), or none to pretrain one"
        )
    d = config.data
    data = load_dataset(d.name, d.root, d.split, d.download, d.limit, config.seed)
    device = resolve_device(config.device)
    if backbone_pt is None:
        from cdc_serve_training.pipeline import pretrained_backbone

        Path(out).mkdir(parents=True, exist_ok=True)
        backbone = pretrained_backbone(config, data, device, resume=True)
    else:
        backbone = _load_backbone(Path(backbone_pt), data)
    rows = compare_strategies(
        data, backbone, config.ruc, device, hidden=config.model.hidden,
        eval_batch_size=config.eval_batch_size, strategies=strategies, seed=seed,
        progress=progress,
    )  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategies.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = out / "strategies.md"
    seconds = time.perf_counter() - start
    table.write_text(strategies_markdown(rows) + f"\n{len(data)} images, {seconds:.0f} s in all\n")
    return table


def _load_backbone(path: Path, data) -> nn.Module:
    """The backbone of a run's ``backbone.pt`` (``{"backbone": name, "state_dict": ...}``)."""
    from cdc_serve_training.backbones import build_backbone
    from cdc_serve_training.checkpoint import safe_load

    state = safe_load(path)
    if not isinstance(state, dict) or not {"backbone", "state_dict"} <= set(state):
        raise CDCError(
            f"{path} is no backbone.pt (a backbone name and its weights); pass the one "
            "that `cdc-serve train` writes into its --out folder"
        )
    norm = state.get("input_norm", "dataset")
    backbone = build_backbone(state["backbone"], data.channels, data.size, input_norm=norm)
    try:
        backbone.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CDCError(
            f"{path} does not fit {data.name}'s {data.channels}x{list(data.size)} images "
            f"({first}); pass a backbone pretrained on this dataset"
        ) from None
    return backbone


def compare_strategies(
    data,
    backbone: nn.Module,
    cfg: RUCConfig,
    device: torch.device | str = "cpu",
    *,
    hidden: int,
    eval_batch_size: int = 1024,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """RUC on K-means pseudo-labels of ``backbone``'s features, once per clean-set strategy.

    The paper's Table 1 (final ACC) and Table 3 (clean-set precision/recall/F1) on one
    labelled data set, plus NMI, ARI and ECE of the final network's softmax. The first
    row is the starting point: K-means with its Student-t soft assignment
    (``evaluation.kmeans_clustering``). ``hidden`` is the RUC heads' width,
    ``eval_batch_size`` the batch of feature extraction and inference. Returns one dict
    per row.
    """
    from cdc_serve_training.augment import Augmenter
    from cdc_serve_training.evaluation import (
        backbone_features,
        head_metrics,
        infer,
        kmeans_clustering,
    )

    if data.labels is None:
        raise CDCError("comparing strategies needs a labelled data set")
    device = torch.device(device)
    features = backbone_features(backbone, data, device, eval_batch_size).cpu()
    labels, probs = kmeans_clustering(features, data.num_classes, seed=seed)
    conf = probs.max(dim=1).values  # as pseudo_labels_from("kmeans", ...)
    rows = [{"method": "K-means (Student-t soft assignment)", **head_metrics(data.labels, probs)}]
    if cfg.clean_fraction is None:
        cfg = replace(cfg, clean_fraction=KMEANS_CLEAN_FRACTION)
    augmenter = Augmenter(data.size, data.mean, data.std)
    masks = selection_masks(labels, conf, features, cfg)
    for strategy in strategies:
        model, report = train_ruc(
            backbone, data, labels, conf, features, augmenter, replace(cfg, strategy=strategy),
            device, num_classes=data.num_classes, hidden=hidden, seed=seed,
            eval_batch_size=eval_batch_size, progress=progress, clean_masks=masks,
        )  # fmt: skip
        cal = infer(model, data, device, eval_batch_size)["cal_probs"]
        rows.append(
            {
                "method": f"K-means + RUC ({strategy})",
                "clean": report["selection"][strategy],
                "clean_final": report["final_clean_set"],
                **head_metrics(data.labels, cal),
            }
        )
    return rows


def strategies_markdown(rows: list[dict]) -> str:
    """The rows of :func:`compare_strategies` as a Markdown table (percentages)."""
    head = (
        "| method | clean set | precision | recall | F1 | clean after refurbishing "
        "| ACC | NMI | ARI | ECE |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        c, f = r.get("clean"), r.get("clean_final")
        clean = (
            [f"{c['size']}", f"{100 * c['precision']:.1f}", f"{100 * c['recall']:.1f}",
             f"{100 * c['f1']:.1f}", f"{f['size']} (P {100 * f['precision']:.1f})"]
            if c else ["-"] * 5
        )  # fmt: skip
        metrics = [f"{100 * r[key]:.1f}" for key in ("acc", "nmi", "ari", "ece")]
        lines.append("| " + " | ".join([r["method"], *clean, *metrics]) + " |")
    return head + "\n".join(lines) + "\n"
