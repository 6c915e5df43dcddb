"""cdc_serve.metrics against independent references and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    roc_auc_score,
    roc_curve,
)

from cdc_serve import CDCError
from cdc_serve import metrics as m

TOL = 1e-6


def noisy_clustering(rng, n, n_classes, n_clusters, p_right=0.6):
    """y_true and a clustering that is a relabelled, noisy copy of it."""
    y = rng.integers(0, n_classes, n)
    relabel = rng.permutation(max(n_classes, n_clusters))[:n_classes] % n_clusters
    y_pred = np.where(rng.random(n) < p_right, relabel[y], rng.integers(0, n_clusters, n))
    return y, y_pred


def random_probs(rng, y_pred, n_clusters, sharpness=3.0):
    """Softmax probabilities whose argmax is mostly y_pred."""
    logits = rng.normal(size=(y_pred.size, n_clusters))
    logits[np.arange(y_pred.size), y_pred] += rng.uniform(0, sharpness, y_pred.size)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def brute_force_acc(y_true, y_pred):
    """Best accuracy over every one-to-one map between clusters and classes."""
    classes, clusters = int(y_true.max()) + 1, int(y_pred.max()) + 1
    best = 0
    if clusters <= classes:
        for target in itertools.permutations(range(classes), clusters):
            best = max(best, int(np.sum(np.array(target)[y_pred] == y_true)))
    else:
        for chosen in itertools.permutations(range(clusters), classes):
            # cluster chosen[c] is mapped to class c; the other clusters to nothing.
            cls_of = np.full(clusters, -1)
            cls_of[list(chosen)] = np.arange(classes)
            best = max(best, int(np.sum(cls_of[y_pred] == y_true)))
    return best / y_true.size


# ---------------------------------------------------------------- ACC and matching


@pytest.mark.parametrize(
    ("n_classes", "n_clusters"), [(3, 3), (4, 4), (5, 5), (6, 6), (4, 6), (6, 4), (5, 2)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_acc_matches_brute_force_permutation_search(n_classes, n_clusters, seed):
    rng = np.random.default_rng(seed)
    y, y_pred = noisy_clustering(rng, 200, n_classes, n_clusters)
    y[:n_classes] = np.arange(n_classes)  # every id occurs, so brute force sees all of them
    y_pred[:n_clusters] = np.arange(n_clusters)
    assert abs(m.cluster_acc(y, y_pred) - brute_force_acc(y, y_pred)) < TOL
    mapping = m.hungarian_match(y, y_pred)
    assert mapping.shape == (n_clusters,)
    assert abs(np.mean(mapping[y_pred] == y) - brute_force_acc(y, y_pred)) < TOL


def test_hungarian_match_recovers_a_relabelling():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, 300)
    perm = rng.permutation(7)  # class c is called cluster perm[c]
    mapping = m.hungarian_match(y, perm[y])
    np.testing.assert_array_equal(mapping[perm], np.arange(7))
    assert m.cluster_acc(y, perm[y]) == 1.0


def test_more_clusters_than_classes_leaves_clusters_unmatched():
    # cluster 2 holds both samples of class 1; clusters 0 and 1 split class 0.
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 2, 2])
    mapping = m.hungarian_match(y_true, y_pred)
    assert mapping[2] == 1
    assert sorted(mapping[:2].tolist()) == [-1, 0]
    assert m.cluster_acc(y_true, y_pred) == 0.75  # 3 of 4: one half of class 0 is lost


def test_fewer_clusters_than_classes_and_num_classes_padding():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([1, 1, 0, 0, 0, 0])
    mapping = m.hungarian_match(y_true, y_pred, num_classes=5)
    assert mapping[1] == 0 and mapping[0] in (1, 2)
    assert abs(m.cluster_acc(y_true, y_pred) - 4 / 6) < TOL


def test_single_predicted_cluster():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    y_pred = np.zeros(10, dtype=int)
    assert m.cluster_acc(y_true, y_pred) == 0.5  # the largest class, 5 of 10
    assert m.hungarian_match(y_true, y_pred).tolist() == [2]
    assert m.nmi(y_true, y_pred) == 0.0 == normalized_mutual_info_score(y_true, y_pred)
    assert m.ari(y_true, y_pred) == 0.0 == adjusted_rand_score(y_true, y_pred)


# ---------------------------------------------------------------- NMI / ARI


@pytest.mark.parametrize(("n_classes", "n_clusters"), [(10, 10), (5, 8), (8, 3), (2, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_ari_match_sklearn(n_classes, n_clusters, seed):
    rng = np.random.default_rng(seed)
    y, y_pred = noisy_clustering(rng, 1000, n_classes, n_clusters, p_right=0.5)
    assert abs(m.nmi(y, y_pred) - normalized_mutual_info_score(y, y_pred)) < TOL
    assert abs(m.ari(y, y_pred) - adjusted_rand_score(y, y_pred)) < TOL


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [
        ([0, 0, 0], [3, 3, 3]),  # both a single group: perfect, 1.0
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # both all singletons: perfect
        ([0, 1, 2, 3], [0, 0, 0, 0]),  # single cluster against singletons
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent: ARI negative
        ([4], [0]),  # one sample
        ([0, 0, 5, 5], [2, 2, 0, 0]),  # unused ids in between
    ],
)
def test_nmi_ari_edge_cases_match_sklearn(y_true, y_pred):
    assert abs(m.nmi(y_true, y_pred) - normalized_mutual_info_score(y_true, y_pred)) < TOL
    assert abs(m.ari(y_true, y_pred) - adjusted_rand_score(y_true, y_pred)) < TOL


def test_evaluate_labels_returns_plain_floats():
    out = m.evaluate_labels([0, 0, 1, 1, 2], [1, 1, 0, 0, 0])
    assert set(out) == {"acc", "nmi", "ari"}
    assert all(type(v) is float for v in out.values())
    assert out["acc"] == 0.8


# ---------------------------------------------------------------- matched probabilities, ECE


def test_match_probs_undoes_a_column_permutation():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 6, 400)
    p = random_probs(rng, y, 6, sharpness=6.0)
    perm = rng.permutation(6)
    shuffled = np.empty_like(p)
    shuffled[:, perm] = p  # class c now lives in column perm[c]
    np.testing.assert_allclose(m.match_probs(y, shuffled), p)


def test_match_probs_with_more_and_fewer_clusters():
    rng = np.random.default_rng(5)
    y, y_pred = noisy_clustering(rng, 300, 4, 6)
    p = random_probs(rng, y_pred, 6)
    mp = m.match_probs(y, p)
    assert mp.shape == (300, 6)
    np.testing.assert_allclose(mp.sum(axis=1), 1.0)
    mapping = m.hungarian_match(y, p.argmax(axis=1), num_clusters=6)
    matched = np.flatnonzero(mapping >= 0)
    np.testing.assert_array_equal(mp[:, mapping[matched]], p[:, matched])
    # unmatched clusters follow the classes, in increasing cluster order
    np.testing.assert_array_equal(mp[:, 4:], p[:, np.flatnonzero(mapping < 0)])

    y3, y_pred3 = noisy_clustering(rng, 300, 5, 3)
    mp3 = m.match_probs(y3, random_probs(rng, y_pred3, 3))
    assert mp3.shape == (300, 5)
    assert int(np.sum(mp3.sum(axis=0) == 0)) == 2  # two classes no cluster was matched to


def torchmetrics_ece(y, matched, n_bins=15):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.classification")
    value = tm.multiclass_calibration_error(
        torch.tensor(matched),
        torch.tensor(y),
        num_classes=matched.shape[1],
        n_bins=n_bins,
        norm="l1",
    )
    return float(value)


@pytest.mark.parametrize(("n_classes", "n_clusters"), [(10, 10), (4, 7), (6, 3)])
@pytest.mark.parametrize("n_bins", [15, 7])
def test_ece_matches_torchmetrics_on_matched_probs(n_classes, n_clusters, n_bins):
    rng = np.random.default_rng(n_classes * 100 + n_clusters + n_bins)
    y, y_pred = noisy_clustering(rng, 2000, n_classes, n_clusters)
    p = random_probs(rng, y_pred, n_clusters, sharpness=8.0)
    p[:50] = np.eye(n_clusters)[y_pred[:50]]  # confidences of exactly 1.0 (own bin)
    expected = torchmetrics_ece(y, m.match_probs(y, p), n_bins)
    # torchmetrics works in float32, hence a tolerance of 1e-6, not 1e-12
    assert abs(m.expected_calibration_error(y, p, n_bins=n_bins) - expected) < TOL
    assert m.ece is m.expected_calibration_error


def hand_case():
    # n_bins = 5: bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1)
    # sample  conf  correct  bin
    #   0     0.90  yes      4
    #   1     0.65  yes      3
    #   2     0.70  yes      3
    #   3     0.80  no       4   (class 1 predicted as cluster 0)
    # bin 3: mean conf 0.675, acc 1.0 -> |gap| 0.325, weight 2/4
    # bin 4: mean conf 0.85,  acc 0.5 -> |gap| 0.35,  weight 2/4
    # ECE = (0.325 + 0.35) / 2 = 0.3375
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.8, 0.2]])
    return y, probs


def test_ece_hand_computed_with_empty_bins():
    y, probs = hand_case()
    assert abs(m.expected_calibration_error(y, probs, n_bins=5) - 0.3375) < 1e-12
    table = m.reliability_table(y, probs, n_bins=5)
    assert [r["count"] for r in table] == [0, 0, 0, 2, 2]
    for r in table[:3]:
        assert r["confidence"] is None and r["accuracy"] is None and r["gap"] is None
    assert abs(table[3]["confidence"] - 0.675) < 1e-12 and table[3]["accuracy"] == 1.0
    assert abs(table[4]["confidence"] - 0.85) < 1e-12 and table[4]["accuracy"] == 0.5
    assert abs(table[4]["gap"] - 0.35) < 1e-12
    assert [(r["lo"], r["hi"]) for r in table][3] == pytest.approx((0.6, 0.8))


def test_reliability_table_adds_a_row_for_confidence_one_and_sums_to_ece():
    rng = np.random.default_rng(6)
    y, y_pred = noisy_clustering(rng, 500, 5, 5)
    p = random_probs(rng, y_pred, 5)
    plain = m.reliability_table(y, p)
    assert len(plain) == 15
    p[:20] = np.eye(5)[y_pred[:20]]
    table = m.reliability_table(y, p)
    assert len(table) == 16
    assert table[-1]["lo"] == table[-1]["hi"] == 1.0 and table[-1]["count"] == 20
    assert sum(r["count"] for r in table) == 500
    from_table = sum(r["count"] * abs(r["gap"]) for r in table if r["count"]) / 500
    assert abs(from_table - m.expected_calibration_error(y, p)) < 1e-12


def test_perfectly_calibrated_one_hot_predictions_have_zero_ece():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[1, 2, 0, 0]]  # a relabelling, all correct after matching, confidence 1
    assert m.expected_calibration_error(y, p) == 0.0


# ---------------------------------------------------------------- failure rejection


def test_failure_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(7)
    correct = rng.random(500) < 0.7
    conf = np.round(np.clip(0.5 + 0.2 * correct + rng.normal(0, 0.2, 500), 0, 1), 1)  # many ties
    assert abs(m.failure_auroc(correct, conf) - roc_auc_score(correct, conf)) < TOL


def test_aurc_hand_computed():
    # confidence order is the input order; errors at ranks 2 and 5:
    # risks at k = 1..5: 0/1, 1/2, 1/3, 1/4, 2/5 -> mean = (0 + 1/2 + 1/3 + 1/4 + 2/5) / 5 = 89/300
    correct = [1, 0, 1, 1, 0]
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert abs(m.aurc(correct, conf) - 89 / 300) < 1e-12
    # same data in another input order: same value
    assert abs(m.aurc(correct[::-1], conf[::-1]) - 89 / 300) < 1e-12


def test_aurc_ties_are_averaged_over_orders():
    # one tie group of two, one of them wrong: orders give (0 + 1/2)/2 and (1 + 1/2)/2 -> 0.5
    assert abs(m.aurc([True, False], [0.5, 0.5]) - 0.5) < 1e-12
    # brute force: mean AURC over every ordering compatible with the confidences
    rng = np.random.default_rng(8)
    correct = rng.random(7) < 0.5
    correct[:2] = [True, False]
    conf = np.array([0.9, 0.9, 0.9, 0.4, 0.4, 0.7, 0.2])
    values = []
    for order in itertools.permutations(range(7)):
        order = np.array(order)
        if np.all(np.diff(conf[order]) <= 0):
            err = ~correct[order]
            values.append(np.mean(np.cumsum(err) / np.arange(1, 8)))
    assert abs(m.aurc(correct, conf) - np.mean(values)) < 1e-12


def test_fpr95_hand_computed():
    # 20 correct with confidences 0.80 .. 0.99; TPR >= 95 % needs 19 of them, so the
    # threshold is the 19th highest, 0.81. Wrong confidences >= 0.81: 0.95, 0.85, 0.81 -> 3/5.
    pos = np.arange(80, 100) / 100
    neg = np.array([95, 85, 81, 80, 50]) / 100
    correct = np.r_[np.ones(20, bool), np.zeros(5, bool)]
    assert m.fpr_at_95_tpr(correct, np.r_[pos, neg]) == 0.6
    # 10 correct: ceil(9.5) = 10, the threshold is the lowest correct confidence (0.80)
    correct10 = np.r_[np.ones(10, bool), np.zeros(5, bool)]
    assert m.fpr_at_95_tpr(correct10, np.r_[pos[:10], neg]) == 0.8


def sklearn_fpr95(y, score):
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


@pytest.mark.parametrize("n", [37, 200, 1001])
def test_fpr95_matches_roc_curve(n):
    rng = np.random.default_rng(n)
    correct = rng.random(n) < 0.6
    conf = np.round(rng.random(n) * 0.6 + 0.4 * correct, 2)
    assert abs(m.fpr_at_95_tpr(correct, conf) - sklearn_fpr95(correct, conf)) < TOL


def test_all_correct_and_all_wrong_are_defined():
    conf = [0.9, 0.8, 0.7]
    assert math.isnan(m.failure_auroc([1, 1, 1], conf))
    assert math.isnan(m.fpr_at_95_tpr([1, 1, 1], conf))
    assert m.aurc([1, 1, 1], conf) == 0.0
    assert math.isnan(m.failure_auroc([0, 0, 0], conf))
    assert math.isnan(m.fpr_at_95_tpr([0, 0, 0], conf))
    assert m.aurc([0, 0, 0], conf) == 1.0

    y = np.array([0, 1, 2, 0])
    out = m.evaluate_probs(y, np.eye(3)[y] * 0.7 + 0.1)  # rows (0.8, 0.1, 0.1), all correct
    assert out["acc"] == 1.0 and out["aurc"] == 0.0
    assert math.isnan(out["auroc"]) and math.isnan(out["fpr95"])
    assert abs(out["ece"] - 0.2) < 1e-12  # one bin: confidence 0.8, accuracy 1.0


# ---------------------------------------------------------------- OOD


def test_ood_metrics_match_sklearn():
    rng = np.random.default_rng(9)
    s_in = np.round(rng.normal(1.0, 1.0, 300), 1)
    s_out = np.round(rng.normal(0.0, 1.0, 200), 1)
    y = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[s_in, s_out]
    assert abs(m.ood_auroc(s_in, s_out) - roc_auc_score(y, scores)) < TOL
    assert abs(m.ood_fpr95(s_in, s_out) - sklearn_fpr95(y, scores)) < TOL


def test_ood_hand_computed():
    s_in = np.arange(1, 21)  # 19th highest of 20 is 2: scores >= 2 keep 95 %
    s_out = np.array([0, 1, 2, 3, 25])
    assert m.ood_fpr95(s_in, s_out) == 0.6
    # AUROC = P(in > out) + P(in == out) / 2 over the 20 x 5 pairs:
    # out 0: 20 wins; out 1: 19 + 1/2; out 2: 18 + 1/2; out 3: 17 + 1/2; out 25: 0 -> 75.5 / 100
    assert abs(m.ood_auroc(s_in, s_out) - 0.755) < 1e-12
    assert m.ood_auroc([5, 6], [1, 2]) == 1.0 and m.ood_fpr95([5, 6], [1, 2]) == 0.0
    assert m.ood_auroc([1, 2], [5, 6]) == 0.0 and m.ood_fpr95([1, 2], [5, 6]) == 1.0


# ---------------------------------------------------------------- evaluate_probs


def test_evaluate_probs_is_consistent_with_the_single_metrics():
    rng = np.random.default_rng(10)
    y, y_pred = noisy_clustering(rng, 800, 6, 6)
    p = random_probs(rng, y_pred, 6, sharpness=5.0)
    out = m.evaluate_probs(y, p)
    assert list(out) == ["acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95"]
    assert all(type(v) is float for v in out.values())
    assert all(0.0 <= v <= 1.0 for v in out.values())
    conf, correct = m.confidence_and_correct(y, p)
    assert out["acc"] == m.cluster_acc(y, p.argmax(axis=1)) == correct.mean()
    assert out["ece"] == m.ece(y, p)
    assert out["auroc"] == m.failure_auroc(correct, conf)
    assert out["aurc"] == m.aurc(correct, conf)
    assert out["fpr95"] == m.fpr_at_95_tpr(correct, conf)


# ---------------------------------------------------------------- validation


GOOD = np.array([[0.7, 0.3], [0.2, 0.8]])


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (np.array([[np.nan, 1.0], [0.2, 0.8]]), "NaN"),
        (np.array([[np.inf, 0.0], [0.2, 0.8]]), "NaN or infinite"),
        (np.array([[1.2, -0.2], [0.2, 0.8]]), "negative"),
        (np.array([[0.7, 0.2], [0.2, 0.8]]), "sum to 1"),
        (np.array([[3.0, -1.0], [0.2, 0.8]]), "negative"),
        (np.array([0.5, 0.5]), "2-D"),
        (np.zeros((0, 2)), "empty"),
        (np.array([[0.5, 0.5]]), "different numbers of samples"),
    ],
)
def test_bad_probabilities_raise_cdcerror(probs, message):
    with pytest.raises(CDCError, match=message):
        m.expected_calibration_error([0, 1], probs)
    with pytest.raises(CDCError, match=message):
        m.evaluate_probs([0, 1], probs)


def test_row_sum_tolerance_is_1e_3():
    m.evaluate_probs([0, 1], GOOD + np.array([[0.0009, 0.0], [0.0, 0.0]]))
    with pytest.raises(CDCError, match="sum to 1"):
        m.evaluate_probs([0, 1], GOOD + np.array([[0.0011, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 1, 2], [0, 1], "different numbers of samples"),
        ([], [], "empty"),
        ([0, -1], [0, 1], "non-negative"),
        ([0, 1.5], [0, 1], "integer"),
        ([[0, 1]], [[0, 1]], "1-D"),
        (["a", "b"], [0, 1], "integer"),
    ],
)
def test_bad_labels_raise_cdcerror(y_true, y_pred, message):
    with pytest.raises(CDCError, match=message):
        m.cluster_acc(y_true, y_pred)


def test_float_labels_with_integer_values_are_accepted():
    assert m.cluster_acc(np.array([0.0, 1.0]), np.array([1, 0])) == 1.0


def test_bad_rejection_and_ood_inputs_raise_cdcerror():
    with pytest.raises(CDCError, match="0/1"):
        m.aurc([0, 2], [0.1, 0.2])
    with pytest.raises(CDCError, match="NaN"):
        m.failure_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(CDCError, match="different numbers"):
        m.fpr_at_95_tpr([0, 1, 1], [0.1, 0.2])
    with pytest.raises(CDCError, match="score_out is empty"):
        m.ood_auroc([0.1], [])
    with pytest.raises(CDCError, match="n_bins"):
        m.reliability_table([0, 1], GOOD, n_bins=0)


# --------------------------------------------------------------------------- metrics.json


def test_metrics_json_has_one_shape_and_no_nan(tmp_path):
    import json

    from cdc_serve.metrics_json import HEAD_KEYS, metrics_document, write_metrics

    cal = {k: 0.5 for k in HEAD_KEYS} | {"auroc": float("nan")}
    doc = metrics_document("digits", "test", 7, {"cal": cal})
    assert sorted(doc) == ["dataset", "heads", "n", "split"]  # no "ood" without OOD scores
    assert (doc["dataset"], doc["split"], doc["n"]) == ("digits", "test", 7)
    assert list(doc["heads"]["cal"]) == list(HEAD_KEYS) and math.isnan(doc["heads"]["cal"]["auroc"])
    scores = {"msp": {"auroc": 0.9, "fpr95": 0.2}}
    with_ood = metrics_document("digits", "test", 7, {"cal": cal}, scores, "fashion-mnist")
    assert with_ood["ood"] == {"dataset": "fashion-mnist", "scores": scores}
    path = write_metrics(tmp_path, with_ood)  # a folder: metrics.json inside it
    assert path == tmp_path / "metrics.json"
    text = path.read_text()
    assert text.endswith("}\n") and "NaN" not in text
    assert json.loads(text)["heads"]["cal"]["auroc"] is None


def test_label_free_summary_by_hand():
    from cdc_serve.metrics_json import label_free_summary

    probs = np.array([[0.9, 0.1, 0.0], [0.7, 0.2, 0.1], [0.2, 0.8, 0.0], [0.4, 0.5, 0.1]])
    free = label_free_summary(probs, threshold=0.8)
    assert free["n"] == 4 and free["cluster_sizes"] == [2, 2, 0] and free["empty_clusters"] == 1
    assert free["estimated_accuracy"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.5) / 4)
    assert free["confident_share"] == pytest.approx(0.5) and free["confident_threshold"] == 0.8
    with pytest.raises(CDCError, match="N x C"):
        label_free_summary(np.zeros(3))
