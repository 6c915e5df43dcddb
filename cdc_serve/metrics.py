"""Clustering, calibration, failure-rejection and OOD metrics.

Every number cdc-serve reports comes from this module: training, ``cdc-serve evaluate``
and the benchmarks all call it. It needs numpy and scipy only (no torch).

Conventions
-----------
* Labels are 1-D arrays of non-negative integers. ``y_true`` holds ground-truth
  classes ``0..C-1``; ``y_pred`` holds cluster ids ``0..K-1``. Cluster ids carry no
  meaning until they are matched to classes (:func:`hungarian_match`).
* ``probs`` is an ``N x K`` array of cluster probabilities (rows sum to 1).
  The prediction of a row is its argmax (ties go to the lowest cluster id), the
  *confidence* is its maximum.
* "Correct" always means "correct after the Hungarian matching".
* All metrics are fractions (ACC 0.853, not 85.3 %). Multiply by 100 to compare with
  the CDC paper's tables.
* Bad input (shape mismatch, empty arrays, NaN/inf, negative probabilities, rows not
  summing to 1 within 1e-3, negative labels) raises :class:`cdc_serve.CDCError`.

Definitions follow the CDC paper (Sec. 3.2 for ECE, Sec. 4 "Evaluation Metrics")
and the authors' evaluation code: Hungarian ACC with scipy's ``linear_sum_assignment``,
NMI and ARI as scikit-learn computes them, ECE with 15 equal-width bins on
probabilities whose columns are reordered by the matching (as torchmetrics'
``calibration_error`` computes it), and AUROC / AURC / FPR95 for failure rejection
(Zhu et al., 2022) with "correct" as the positive event and the confidence as the score.

``metrics.json`` (written by ``cdc-serve train`` and ``cdc-serve evaluate``) has one
home too, at the end of this module: :func:`metrics_document` shapes it and
:func:`write_metrics` writes it (NaN as ``null``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from cdc_serve import CDCError

#: Rows of ``probs`` must sum to 1 within this tolerance.
ROW_SUM_TOLERANCE = 1e-3
#: Fraction of positives kept by the threshold of the FPR95 metrics.
TPR_LEVEL = 0.95

__all__ = [
    "ROW_SUM_TOLERANCE",
    "aurc",
    "ari",
    "cluster_acc",
    "confidence_and_correct",
    "contingency_matrix",
    "ece",
    "evaluate_labels",
    "evaluate_probs",
    "expected_calibration_error",
    "failure_auroc",
    "fpr_at_95_tpr",
    "hungarian_match",
    "match_probs",
    "nmi",
    "ood_auroc",
    "ood_fpr95",
    "reliability_table",
]


# --------------------------------------------------------------------------- validation


def _labels(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array of non-negative labels, or CDCError."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise CDCError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size == 0:
        raise CDCError(f"{name} is empty: metrics need at least one sample")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise CDCError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    )
    if not integral:
        raise CDCError(f"{name} must hold integer labels; found non-integer values")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise CDCError(f"{name} must hold non-negative labels; found {int(arr.min())}")
    return arr


def _scores(values: Any, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array of finite numbers, or CDCError."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise CDCError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise CDCError(f"{name} is empty: metrics need at least one sample")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise CDCError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise CDCError(f"{name} contains NaN or infinite values")
    return arr


def _correct_flags(values: Any) -> np.ndarray:
    """``correct`` as a 1-D bool array (accepts bools or 0/1), or CDCError."""
    arr = _scores(values, "correct")
    if not np.all((arr == 0) | (arr == 1)):
        raise CDCError("correct must hold booleans or 0/1 values")
    return arr == 1


def _probs(values: Any) -> np.ndarray:
    """``values`` as an ``N x K`` float64 probability array, or CDCError."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise CDCError(f"probs must be a 2-D array (samples x clusters), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CDCError(f"probs is empty (shape {arr.shape}): metrics need at least one sample")
    if not np.issubdtype(arr.dtype, np.number):
        raise CDCError(f"probs must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[0])
        raise CDCError(f"probs contains NaN or infinite values (first in row {bad})")
    if arr.min() < 0:
        bad = int(np.flatnonzero(arr.min(axis=1) < 0)[0])
        raise CDCError(
            f"probs contains negative values (first in row {bad}): pass probabilities, not logits"
        )
    row_err = np.abs(arr.sum(axis=1) - 1.0)
    if row_err.max() > ROW_SUM_TOLERANCE:
        bad = int(np.argmax(row_err))
        raise CDCError(
            f"probs rows must sum to 1 (tolerance {ROW_SUM_TOLERANCE}); row {bad} sums to "
            f"{arr[bad].sum():.6g}: pass softmax probabilities, not logits"
        )
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise CDCError(
            f"{name_a} and {name_b} have different numbers of samples: {a.shape[0]} vs {b.shape[0]}"
        )


def _n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise CDCError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


# --------------------------------------------------------------------------- clustering


def contingency_matrix(
    y_true: Any, y_pred: Any, num_classes: int | None = None, num_clusters: int | None = None
) -> np.ndarray:
    """Counts ``M[k, c]`` = number of samples in cluster ``k`` with true class ``c``.

    Shape ``K x C`` with ``K = max(y_pred) + 1`` (at least ``num_clusters``) and
    ``C = max(y_true) + 1`` (at least ``num_classes``). Ids that never occur give
    all-zero rows/columns, which change none of the metrics.
    """
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    _same_length(t, p, "y_true", "y_pred")
    n_classes = max(int(t.max()) + 1, int(num_classes or 0))
    n_clusters = max(int(p.max()) + 1, int(num_clusters or 0))
    counts = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    return counts


def hungarian_match(
    y_true: Any, y_pred: Any, num_classes: int | None = None, num_clusters: int | None = None
) -> np.ndarray:
    """One-to-one matching of clusters to classes that maximises the correct count.

    Solves the assignment problem on the contingency matrix (:func:`contingency_matrix`)
    with ``scipy.optimize.linear_sum_assignment`` (maximisation). Returns ``mapping``,
    an int64 array of length ``K`` (number of clusters, at least ``num_clusters``) with
    ``mapping[cluster] = class``.

    When there are more clusters than classes (``K > C``) only ``C`` clusters can be
    matched; every other cluster maps to ``-1`` and its samples count as wrong. When
    there are fewer clusters than classes, every cluster is matched and some classes
    are never predicted. ``num_classes`` (default ``max(y_true) + 1``) adds classes
    that do not occur in ``y_true``.
    """
    counts = contingency_matrix(y_true, y_pred, num_classes, num_clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def cluster_acc(y_true: Any, y_pred: Any) -> float:
    """Clustering accuracy ACC = max over one-to-one maps m of (1/N) sum_i [y_i = m(k_i)].

    The best map m is the Hungarian matching (:func:`hungarian_match`); samples in
    clusters left unmatched (more clusters than classes) count as wrong.
    """
    counts = contingency_matrix(y_true, y_pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def _entropy_from_counts(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def nmi(y_true: Any, y_pred: Any) -> float:
    """Normalised mutual information, NMI = I(Y; K) / ((H(Y) + H(K)) / 2).

    The arithmetic-mean normalisation of scikit-learn's
    ``normalized_mutual_info_score`` (its default), computed from the contingency
    matrix. Conventions as in scikit-learn: 1.0 when both labelings put all samples
    in a single group, 0.0 when the mutual information is 0 (e.g. a single predicted
    cluster against several classes).
    """
    counts = contingency_matrix(y_true, y_pred).astype(np.float64)
    n = counts.sum()
    n_k = counts.sum(axis=1)  # cluster sizes
    n_c = counts.sum(axis=0)  # class sizes
    h_true, h_pred = _entropy_from_counts(n_c), _entropy_from_counts(n_k)
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    if h_true == 0.0 or h_pred == 0.0:  # one labeling is a single group: I = 0 exactly
        return 0.0
    # I = sum_kc (n_kc / n) log(n * n_kc / (n_k n_c)), only non-zero cells contribute.
    k, c = np.nonzero(counts)
    n_kc = counts[k, c]
    mi = float(np.sum((n_kc / n) * (np.log(n_kc) + math.log(n) - np.log(n_k[k]) - np.log(n_c[c]))))
    if mi <= 0.0:
        return 0.0
    return float(min(mi / ((h_true + h_pred) / 2.0), 1.0))


def ari(y_true: Any, y_pred: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie, 1985), as scikit-learn's ``adjusted_rand_score``.

    With pair counts ``S = sum_kc C(n_kc, 2)``, ``A = sum_c C(n_c, 2)``,
    ``B = sum_k C(n_k, 2)`` and ``T = C(N, 2)``:
    ``ARI = (S - A B / T) / ((A + B) / 2 - A B / T)``. Ranges over [-0.5, 1]
    (0 for chance-level labelings). Defined as 1.0 when the denominator is 0, which
    happens only when both labelings agree perfectly (both a single group, or both all
    singletons), as scikit-learn does.
    """
    counts = contingency_matrix(y_true, y_pred).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float(np.sum(x * (x - 1.0) / 2.0))

    n = counts.sum()
    s = pairs(counts)
    a = pairs(counts.sum(axis=0))
    b = pairs(counts.sum(axis=1))
    total = n * (n - 1.0) / 2.0
    expected = a * b / total if total > 0 else 0.0
    denom = (a + b) / 2.0 - expected
    if denom == 0.0:
        return 1.0
    return float((s - expected) / denom)


def evaluate_labels(y_true: Any, y_pred: Any) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of hard cluster assignments, as plain Python floats."""
    return {
        "acc": cluster_acc(y_true, y_pred),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
    }


# --------------------------------------------------------------------------- probabilities


def match_probs(y_true: Any, probs: Any, num_classes: int | None = None) -> np.ndarray:
    """Reorder the columns of ``probs`` so that column ``j`` is the probability of class ``j``.

    The matching is the Hungarian matching (:func:`hungarian_match`) of the argmax
    predictions to ``y_true``. The result has ``max(K, C)`` columns: columns
    ``0..C-1`` are classes (a class no cluster was matched to gets a zero column);
    clusters left unmatched (``K > C``) follow in columns ``C, C+1, ...`` in increasing
    cluster order, so rows still sum to 1 and a prediction in such a column is never
    correct. ``C`` is ``max(y_true) + 1`` or ``num_classes`` if larger.
    """
    p = _probs(probs)
    t = _labels(y_true, "y_true")
    _same_length(t, p, "y_true", "probs")
    n_clusters = p.shape[1]
    mapping = hungarian_match(t, p.argmax(axis=1), num_classes=num_classes, num_clusters=n_clusters)
    n_classes = max(int(t.max()) + 1, int(num_classes or 0))
    column = mapping.copy()
    unmatched = np.flatnonzero(mapping < 0)
    column[unmatched] = n_classes + np.arange(unmatched.size)
    out = np.zeros((p.shape[0], max(n_clusters, n_classes)), dtype=np.float64)
    out[:, column] = p
    return out


def confidence_and_correct(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: confidence (max probability) and whether the matched prediction is correct.

    The prediction is the argmax cluster mapped through :func:`hungarian_match`;
    samples of unmatched clusters are wrong. These two arrays feed ECE, the
    reliability table and the failure-rejection metrics.
    """
    p = _probs(probs)
    t = _labels(y_true, "y_true")
    _same_length(t, p, "y_true", "probs")
    pred_cluster = p.argmax(axis=1)
    mapping = hungarian_match(t, pred_cluster, num_clusters=p.shape[1])
    return p.max(axis=1), mapping[pred_cluster] == t


def _bin_sums(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, confidence sums and correct counts over ``n_bins + 1`` bins.

    Bin ``b < n_bins`` is ``[b / n_bins, (b + 1) / n_bins)``; bin ``n_bins`` holds the
    confidences equal to exactly 1.0. This is torchmetrics' binning
    (``torch.bucketize(..., right=True) - 1`` on ``linspace(0, 1, n_bins + 1)``), which
    the CDC authors' ECE uses.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Confidences a hair above 1 (allowed by the row-sum tolerance) join the 1.0 bin.
    idx = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, n_bins)
    count = np.bincount(idx, minlength=n_bins + 1).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins + 1)
    correct_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins + 1)
    return count, conf_sum, correct_sum


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Expected calibration error, ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)| (paper Sec. 3.2).

    Confidence = max probability; accuracy = correct after the Hungarian matching.
    ``n_bins`` equal-width bins ``[b/n, (b+1)/n)`` over [0, 1]; a confidence of exactly
    1.0 forms a bin of its own. Identical to torchmetrics'
    ``calibration_error(matched_probs, y_true, task="multiclass", n_bins=n_bins, norm="l1")``
    on :func:`match_probs` output (up to argmax ties). Empty bins contribute 0.
    """
    n_bins = _n_bins(n_bins)
    confidence, correct = confidence_and_correct(y_true, probs)
    _, conf_sum, correct_sum = _bin_sums(confidence, correct, n_bins)
    return float(np.sum(np.abs(correct_sum - conf_sum)) / confidence.size)


#: Short alias of :func:`expected_calibration_error`.
ece = expected_calibration_error


def reliability_table(y_true: Any, probs: Any, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per-bin calibration statistics behind ECE and the reliability diagram.

    One dict per bin with ``lo``, ``hi`` (bin edges; the bin is ``[lo, hi)``),
    ``count`` (int), ``confidence`` (mean confidence), ``accuracy`` (fraction correct
    after matching) and ``gap`` (``confidence - accuracy``, > 0 means overconfident).
    Empty bins have ``count`` 0 and ``None`` for the three means (JSON-safe).
    The table has ``n_bins`` rows, plus a last row with ``lo == hi == 1.0`` only when
    some confidences equal exactly 1.0 (their own bin, see
    :func:`expected_calibration_error`). ECE equals
    ``sum(row["count"] * abs(row["gap"])) / N`` over the non-empty rows.
    """
    n_bins = _n_bins(n_bins)
    confidence, correct = confidence_and_correct(y_true, probs)
    count, conf_sum, correct_sum = _bin_sums(confidence, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bounds = [(float(edges[b]), float(edges[b + 1])) for b in range(n_bins)] + [(1.0, 1.0)]
    rows: list[dict[str, Any]] = []
    for b, (lo, hi) in enumerate(bounds):
        n_b = int(count[b])
        if b == n_bins and n_b == 0:
            break
        row: dict[str, Any] = {"lo": lo, "hi": hi, "count": n_b}
        if n_b:
            conf, acc = float(conf_sum[b] / n_b), float(correct_sum[b] / n_b)
            row.update(confidence=conf, accuracy=acc, gap=conf - acc)
        else:
            row.update(confidence=None, accuracy=None, gap=None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- rejection


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie).

    Mann-Whitney U statistic with average ranks; NaN if either group is empty.
    """
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = TPR_LEVEL) -> float:
    """Fraction of negatives with score >= t, t = the highest threshold keeping >= tpr of positives.

    With positives sorted by decreasing score, ``t`` is the ``ceil(tpr * n_pos)``-th
    one; tied scores are all kept (``>=``). NaN if either group is empty.
    """
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # ceil(tpr * n) in exact integer arithmetic (0.95 * 20 must give 19, not 20).
    percent = round(tpr * 100)
    k = max(1, (percent * pos.size + 99) // 100)
    threshold = np.sort(pos)[::-1][k - 1]
    return float(np.mean(neg >= threshold))


def _rejection_inputs(correct: Any, confidence: Any) -> tuple[np.ndarray, np.ndarray]:
    ok = _correct_flags(correct)
    conf = _scores(confidence, "confidence")
    _same_length(ok, conf, "correct", "confidence")
    return ok, conf


def failure_auroc(correct: Any, confidence: Any) -> float:
    """AUROC of separating correct from wrong predictions by confidence.

    Positive event = correct (after matching), score = confidence. Equals
    scikit-learn's ``roc_auc_score(correct, confidence)`` (ties count one half).
    NaN when all predictions are correct or all are wrong (the ROC is undefined).
    """
    ok, conf = _rejection_inputs(correct, confidence)
    return _auroc(conf[ok], conf[~ok])


def aurc(correct: Any, confidence: Any) -> float:
    """Area under the risk-coverage curve (Geifman & El-Yaniv, 2017; lower is better).

    Sort samples by decreasing confidence; the selective risk at coverage ``k / N`` is
    the error rate among the ``k`` most confident samples;
    ``AURC = (1/N) sum_{k=1..N} risk_k``.
    Ties: tied samples are accepted together in an unknown order, so within a tie group
    the errors are spread evenly (the expected AURC over all orders of the tied
    samples); the result does not depend on the input order.
    All correct gives 0.0, all wrong gives 1.0.
    """
    ok, conf = _rejection_inputs(correct, confidence)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, err_sorted = conf[order], (~ok[order]).astype(np.float64)
    # Tie groups of equal confidence, in decreasing confidence order.
    _, start, size = np.unique(-conf_sorted, return_index=True, return_counts=True)
    group_err = np.add.reduceat(err_sorted, start)
    err_before = np.concatenate([[0.0], np.cumsum(group_err)[:-1]])
    group_of = np.repeat(np.arange(start.size), size)
    pos_in_group = np.arange(conf.size) - start[group_of] + 1
    cum_err = err_before[group_of] + pos_in_group * group_err[group_of] / size[group_of]
    risk = cum_err / np.arange(1, conf.size + 1)
    return float(risk.mean())


def fpr_at_95_tpr(correct: Any, confidence: Any) -> float:
    """FPR95: fraction of wrong predictions still accepted when 95 % of correct ones are.

    Positives = correct predictions, score = confidence. The threshold ``t`` is the
    highest one with TPR >= 0.95 (the ``ceil(0.95 n_correct)``-th highest confidence
    among correct predictions); FPR95 = fraction of wrong predictions with confidence
    >= t. NaN when all predictions are correct or all are wrong.
    """
    ok, conf = _rejection_inputs(correct, confidence)
    return _fpr_at_tpr(conf[ok], conf[~ok])


# --------------------------------------------------------------------------- OOD


def _ood_inputs(score_in: Any, score_out: Any) -> tuple[np.ndarray, np.ndarray]:
    return _scores(score_in, "score_in"), _scores(score_out, "score_out")


def ood_auroc(score_in: Any, score_out: Any) -> float:
    """AUROC of separating in-distribution (positive) from OOD samples (paper App. C.5).

    Scores where HIGHER means more in-distribution (e.g. max softmax probability, or
    ``-ood_score`` of :mod:`cdc_serve.ood`). Ties count one half.
    """
    s_in, s_out = _ood_inputs(score_in, score_out)
    return _auroc(s_in, s_out)


def ood_fpr95(score_in: Any, score_out: Any) -> float:
    """Fraction of OOD samples accepted by the threshold that keeps 95 % of in-distribution.

    Scores where HIGHER means more in-distribution. The threshold ``t`` is the
    ``ceil(0.95 n_in)``-th highest in-distribution score; FPR95 = fraction of OOD
    samples with score >= t.
    """
    s_in, s_out = _ood_inputs(score_in, score_out)
    return _fpr_at_tpr(s_in, s_out)


# --------------------------------------------------------------------------- summary


def evaluate_probs(y_true: Any, probs: Any, n_bins: int = 15) -> dict[str, float]:
    """All metrics of a probabilistic clustering, as plain Python floats (fractions).

    Keys: ``acc``, ``nmi``, ``ari`` (of the argmax clusters), ``ece`` (``n_bins`` bins),
    ``auroc``, ``aurc``, ``fpr95`` (failure rejection). ARI lies in [-0.5, 1]; the
    others in [0, 1]. ``auroc`` and ``fpr95`` are NaN when all predictions are correct
    or all are wrong. This is the content of ``metrics.json``.
    """
    p = _probs(probs)
    t = _labels(y_true, "y_true")
    _same_length(t, p, "y_true", "probs")
    y_pred = p.argmax(axis=1)
    confidence, correct = confidence_and_correct(t, p)
    out = evaluate_labels(t, y_pred)
    out["ece"] = expected_calibration_error(t, p, n_bins=n_bins)
    out["auroc"] = failure_auroc(correct, confidence)
    out["aurc"] = aurc(correct, confidence)
    out["fpr95"] = fpr_at_95_tpr(correct, confidence)
    return out


def json_ready(values):
    """``values`` with every NaN float replaced by ``None`` (JSON has no NaN), recursively."""
    if isinstance(values, dict):
        return {k: json_ready(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [json_ready(v) for v in values]
    if isinstance(values, float) and math.isnan(values):
        return None
    return values
