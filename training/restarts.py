"""Label-free model selection: ``--restarts N`` trains N initialisations and keeps one.

CDC's calibration head predicts its own accuracy: its mean confidence over the training
images is an estimate of the clustering's accuracy that needs no label
(``metrics.json``'s ``label_free.estimated_accuracy``). A run that ends in a poor local
optimum (two look-alike classes merged early, docs/BENCHMARKS.md) expects less of
itself, so training several initialisations and keeping the one that expects the most
turns "the seed decides" into a choice the tool makes without labels. None of the
reference implementations offers it.

Per candidate ``i = 0 .. N-1``, on one pretrained backbone (MoCo-v2 runs once):

1. seed ``seed + i`` (:func:`candidate_seed`): candidate 0 is the plain run, the others
   reseed the random streams;
2. a copy of the pretrained backbone and both heads initialised from its features
   (``init-<i>.pt``; the prototypes' K-means draws from the candidate's seed);
3. CDC, Algorithm 1 (``cdc-<i>.ckpt``, resumable like a plain run's ``cdc.ckpt``);
4. the calibration head over the training images: the estimate, its mean confidence
   (:func:`estimate_accuracy`); with labels, also the true ACC and ECE, for the log only.

The candidate with the highest estimate (the first one on a tie) becomes the run's model;
``train_log.json`` lists every candidate under ``restarts``. Under torchrun every
process trains every candidate, rank 0 judges them and broadcasts its estimates.
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch

from cdc_serve_training import distributed
from cdc_serve_training.evaluation import head_metrics, infer

CRITERION = "mean calibrated confidence on the training images"


def candidate_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index`` of a run with ``seed`` (candidate 0: the run's)."""
    return seed + index


def estimate_accuracy(cal_probs: np.ndarray) -> float:
    """The calibration head's own estimate of its accuracy: its mean confidence."""
    return float(np.asarray(cal_probs, dtype=np.float64).max(axis=1).mean())


def stage_restarts(run) -> None:
    """4.-5. ``--restarts N``: init + CDC N times on one backbone; the highest estimate wins.

    Leaves the chosen model, its history, its init metrics and its predictions (reused by
    the evaluate stage) in ``run``, and every candidate's figures in
    ``run.log["restarts"]``.
    """
    from cdc_serve_training.pipeline import initialised_model, train_cdc_stage

    config, n = run.config, run.config.restarts
    rows: list[dict] = []
    best = None
    for i in range(n):
        seed = candidate_seed(config.seed, i)
        _say(f"restart {i + 1}/{n}: initialisation and CDC with seed {seed}", config.progress)
        started = time.perf_counter()
        if i > 0:  # candidate 0 draws on as a plain run does: the same model, to the bit
            torch.manual_seed(seed)
        model = initialised_model(run, copy.deepcopy(run.backbone), seed, run.out / f"init-{i}.pt")
        init_metrics = run.log.get("init_metrics")
        history = train_cdc_stage(run, model, seed, run.out / f"cdc-{i}.ckpt")
        row, result = _judge(run, model)
        row.update(candidate=i, seed=seed, seconds=round(time.perf_counter() - started, 1))
        rows.append(row)
        _say(_describe(row), config.progress)
        if best is None or row["estimate"] > best[0]["estimate"]:
            best = (row, model, history, init_metrics, result)
    row, run.model, run.log["history"], run.log["init_metrics"], run.result = best
    run.log["restarts"] = {"criterion": CRITERION, "chosen": row["candidate"], "candidates": rows}
    _say(f"restarts: keeping candidate {row['candidate']} (seed {row['seed']}), the highest "
         f"estimated accuracy", config.progress)  # fmt: skip


def _judge(run, model) -> tuple[dict, dict | None]:
    """A candidate's estimate (rank 0's, on every process) and, on rank 0, its predictions."""
    result, row = None, {}
    estimate = torch.zeros(1, dtype=torch.float64)
    if distributed.is_main():
        result = infer(model, run.data, run.device, run.config.eval_batch_size)
        estimate[0] = estimate_accuracy(result["cal_probs"])
        if run.data.labels is not None:
            metrics = head_metrics(run.data.labels, result["cal_probs"])
            row.update(acc=round(metrics["acc"], 6), ece=round(metrics["ece"], 6))
    row["estimate"] = round(float(distributed.broadcast(estimate)[0]), 6)
    return row, result


def _describe(row: dict) -> str:
    truth = f" (true ACC {row['acc']:.4f}, ECE {row['ece']:.4f})" if "acc" in row else ""
    return (
        f"restart {row['candidate'] + 1}: estimated accuracy {row['estimate']:.4f}{truth} "
        f"in {row['seconds']:.0f} s"
    )


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
