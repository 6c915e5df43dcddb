"""The paper's Table 2 (ablations) on one data set, written as Markdown (``cdc-serve ablations``).

One full CDC run pretrains the backbone; every ablation row reuses that backbone
(``backbone.pt`` copied into its run folder, then ``pipeline.train(..., resume=True)``
skips pretraining) and changes one thing (``presets.ABLATIONS``) from the paper's method,
CDC from the prototype init:

- I    random head initialisation: right after init, and after CDC ("w/o Init. + CDC");
       the proposed prototype init right after init
- II   fixed thresholds 0.99 / 0.95 / 0.9 / 0.8 instead of the dynamic selection (Eq. 4)
- III  a single head trained on its own selections (Clu)
- IV   a single head with both losses (Clu + Cal)
- V    the calibration loss without stop-gradient

The report ends with the paper's claims and whether they held here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cdc_serve import CDCError
from cdc_serve_training.pipeline import train
from cdc_serve_training.presets import make_config

KEYS = ("acc", "nmi", "ari", "ece")


def _run(name: str, ablation: str | None, common: dict, runs: Path, backbone: Path | None) -> dict:
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    if backbone is not None and not (out / "backbone.pt").exists():
        shutil.copy2(backbone, out / "backbone.pt")
    config = make_config(ablation=ablation, out=str(out), **common)
    start = time.perf_counter()
    train(config, resume=True)
    metrics = json.loads((out / "metrics.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    return {
        "metrics": metrics["heads"],
        "init": log.get("init_metrics"),
        "seconds": time.perf_counter() - start,
        "timings": log.get("timings_s", {}),
    }


def _cells(values: dict | None) -> str:
    if not values:
        return " | ".join("-" for _ in KEYS)
    return " | ".join(f"{100 * values[k]:.1f}" for k in KEYS)


# ACC differences below this (one point) are read as a tie: one seeded run per row cannot
# tell them apart (docs/BENCHMARKS.md shows seeds moving ACC by several points).
TIE = 0.01


def _claims(results: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the claims of the paper's Sec. 4.3.

    The verdict is "held", "did not hold", or "tie" when an ACC comparison the claim rests
    on differs by less than :data:`TIE`.
    """
    cdc = results["cdc"]["metrics"]
    cal, clu = cdc["cal"], cdc["clu"]
    rnd = results["random-init"]
    claims = []

    def add(text: str, held: bool, evidence: str, acc_gap: float | None = None) -> None:
        tie = acc_gap is not None and abs(acc_gap) < TIE
        verdict = "tie" if tie else ("held" if held else "did not hold")
        claims.append((text, verdict, evidence))

    add(
        "I. The prototype initialisation transfers the backbone's clustering ability to the "
        "head (far better than a random head right after init)",
        results["cdc"]["init"]["acc"] > rnd["init"]["acc"] + 0.05,
        f"ACC after init {100 * results['cdc']['init']['acc']:.1f} vs random "
        f"{100 * rnd['init']['acc']:.1f}",
    )
    add(
        "I. CDC from the proposed init beats CDC from a random init (w/o Init. + CDC)",
        cal["acc"] > rnd["metrics"]["cal"]["acc"],
        f"ACC {100 * cal['acc']:.1f} vs {100 * rnd['metrics']['cal']['acc']:.1f}",
        cal["acc"] - rnd["metrics"]["cal"]["acc"],
    )
    fixed = {k: v for k, v in results.items() if k.startswith("fixed-")}
    best_fixed = max(fixed, key=lambda k: fixed[k]["metrics"]["cal"]["acc"])
    add(
        "II. The dynamic, class-wise selection (Eq. 4) beats every fixed threshold in ACC",
        all(cal["acc"] >= v["metrics"]["cal"]["acc"] for v in fixed.values()),
        f"ACC {100 * cal['acc']:.1f} vs best fixed ({best_fixed}) "
        f"{100 * fixed[best_fixed]['metrics']['cal']['acc']:.1f}",
    )
    for key, label in (("single-head-clu", "III. Single head (Clu)"),
                       ("single-head-clu+cal", "IV. Single head (Clu+Cal)")):  # fmt: skip
        other = results[key]["metrics"]["cal"]
        add(
            f"{label} is worse than the dual head in both ACC and ECE",
            cal["acc"] >= other["acc"] and cal["ece"] < other["ece"],
            f"ACC {100 * cal['acc']:.1f} vs {100 * other['acc']:.1f}, "
            f"ECE {100 * cal['ece']:.1f} vs {100 * other['ece']:.1f}",
        )
    nosg = results["no-stop-gradient"]["metrics"]["cal"]
    add(
        "V. Without stop-gradient the clustering performance degrades",
        cal["acc"] > nosg["acc"],
        f"ACC {100 * cal['acc']:.1f} vs {100 * nosg['acc']:.1f}",
        cal["acc"] - nosg["acc"],
    )
    add(
        "Table 1. The calibration head is better calibrated than the clustering head "
        "at a similar accuracy",
        cal["ece"] < clu["ece"] and abs(cal["acc"] - clu["acc"]) < 0.02,
        f"ECE cal {100 * cal['ece']:.1f} vs clu {100 * clu['ece']:.1f}; "
        f"ACC {100 * cal['acc']:.1f} vs {100 * clu['acc']:.1f}",
    )
    return claims


def render(
    results: dict,
    *,
    dataset: str,
    preset: str,
    device: str,
    total_s: float,
    limit: int | None = None,
) -> str:
    """The Markdown report."""
    cdc = results["cdc"]
    rows = [
        ("", "MoCo-v2 + K-means (baseline)", cdc["metrics"]["kmeans"]),
        ("I", "After random init.", results["random-init"]["init"]),
        ("I", "After proposed init.", cdc["init"]),
        ("I", "w/o Init. + CDC", results["random-init"]["metrics"]["cal"]),
        ("II", "Fixed thre. (0.99)", results["fixed-0.99"]["metrics"]["cal"]),
        ("II", "Fixed thre. (0.95)", results["fixed-0.95"]["metrics"]["cal"]),
        ("II", "Fixed thre. (0.90)", results["fixed-0.9"]["metrics"]["cal"]),
        ("II", "Fixed thre. (0.80)", results["fixed-0.8"]["metrics"]["cal"]),
        ("II", "**CDC-Cal (ours)**", cdc["metrics"]["cal"]),
        ("", "CDC-Clu (ours, clustering head)", cdc["metrics"]["clu"]),
        ("III", "Single-head (Clu)", results["single-head-clu"]["metrics"]["cal"]),
        ("IV", "Single-head (Clu+Cal)", results["single-head-clu+cal"]["metrics"]["cal"]),
        ("V", "Cal (w/o stop gradient)", results["no-stop-gradient"]["metrics"]["cal"]),
    ]
    lines = [
        f"## CDC: the paper's Table 2 on {dataset} (issue 3)",
        "",
        f"Written by `cdc-serve ablations --dataset {dataset} --preset {preset}"
        f"{f' --limit {limit}' if limit else ''}` "
        f"(device: {device}, {total_s / 60:.1f} minutes in all). One MoCo-v2 backbone "
        "(the first run's) is shared by every row; each row changes one thing. "
        f"Metrics in percent on {f'a seeded subset of {limit} images' if limit else 'all images'}; "
        "the prediction of every trained "
        "row is its calibration head (for the single-head rows, the one head).",
        "",
        "| Type | Setting | ACC | NMI | ARI | ECE |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {t} | {name} | {_cells(values)} |" for t, name, values in rows]
    lines += ["", "## The paper's claims", ""]
    for text, verdict, evidence in _claims(results):
        lines.append(f"- **{verdict}**: {text} ({evidence}).")
    lines += [
        "",
        "Run times per row (seconds): "
        + ", ".join(f"{name} {r['seconds']:.0f}" for name, r in results.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def run_ablations(
    *,
    dataset: str,
    preset: str,
    out: str | Path,
    runs: str | Path,
    data_root: str | Path | None = None,
    device: str = "auto",
    limit: int | None = None,
) -> Path:
    """Train every Table 2 variant on ``dataset`` and write the Markdown report to ``out``."""
    from cdc_serve_training.presets import ABLATIONS

    runs = Path(runs)
    common = {
        "preset": preset,
        "dataset": dataset,
        "data_root": str(data_root) if data_root else None,
        "device": device,
        "limit": limit,
        # one initialisation per row: Table 2 compares training variants, and a row
        # without a trained calibration head has no estimate to choose by
        "restarts": 1,
        # every row is the paper's method (its prototype init) with one change, whatever
        # a preset's own head init
        "head_init": "prototype",
    }
    make_config(out=str(runs / "cdc"), **common)  # bad input fails before any training
    start = time.perf_counter()
    results = {"cdc": _run("cdc", None, common, runs, None)}
    backbone = runs / "cdc" / "backbone.pt"
    if not backbone.exists():
        raise CDCError(f"the first run left no {backbone}")
    for name in ABLATIONS:
        results[name] = _run(name, name, common, runs, backbone)
    from cdc_serve_training.pipeline import resolve_device

    text = render(
        results,
        dataset=dataset,
        preset=preset,
        device=str(resolve_device(device)),
        total_s=time.perf_counter() - start,
        limit=limit,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice(out.read_text() if out.exists() else "", text))
    return out


START, END = "<!-- ablations:cdc:start -->", "<!-- ablations:cdc:end -->"


def splice(document: str, block: str) -> str:
    """``document`` with the text between the CDC markers replaced by ``block``.

    Everything outside the markers (hand-written text, the RUC section) is kept; the
    block is appended when the markers are absent.
    """
    wrapped = f"{START}\n{block.rstrip()}\n{END}"
    if START in document and END in document:
        head, rest = document.split(START, 1)
        return head + wrapped + rest.split(END, 1)[1]
    return (document.rstrip() + "\n\n" if document.strip() else "") + wrapped + "\n"
