"""OOD scores: definitions, fitted thresholds, JSON-ability, separation on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cdc_serve import CDCError
from cdc_serve.ood import (
    SCORES,
    OODScorer,
    decode_array,
    encode_array,
    fit_ood,
    knn_score,
    mahalanobis_score,
    msp_score,
    ood_flags,
    ood_scores,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(n: int, centres: np.ndarray, seed: int, spread: float = 0.3):
    """Embeddings around ``centres`` (in-distribution clusters) and their softmax probs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    emb = centres[labels] + spread * rng.normal(size=(n, centres.shape[1]))
    probs = _softmax(emb @ centres.T / np.linalg.norm(centres, axis=1))
    return emb.astype(np.float32), probs.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 2
    train = synthetic(3000, centres, seed=1)
    test_in = synthetic(2000, centres, seed=2)
    # OOD: clusters the model never saw.
    test_out = synthetic(1000, rng.normal(size=(3, 16)) * 2, seed=3)
    return train, test_in, test_out


@pytest.fixture(scope="module")
def params(data):
    (e, p), _, _ = data
    return fit_ood(e, p, keep=0.95, seed=0, knn_bank=500)


def test_params_are_json_and_small(params):
    text = json.dumps(params)
    assert len(text) < 3_000_000
    back = json.loads(text)
    assert back["default"] in SCORES and set(back["scores"]) == set(SCORES)
    assert all(np.isfinite(back["scores"][s]["threshold"]) for s in SCORES)


def test_thresholds_keep_95_percent_of_in_distribution(data, params):
    _, (e, p), _ = data
    for name, scores in ood_scores(e, p, params).items():
        kept = np.mean(scores <= params["scores"][name]["threshold"])
        assert 0.90 <= kept <= 0.99, (name, kept)


def test_embedding_scores_separate_unseen_clusters(data, params):
    _, (e_in, p_in), (e_out, p_out) = data
    s_in, s_out = ood_scores(e_in, p_in, params), ood_scores(e_out, p_out, params)
    y = np.r_[np.zeros(len(e_in)), np.ones(len(e_out))]
    for name in ("prototype", "mahalanobis", "knn"):
        auc = roc_auc_score(y, np.r_[s_in[name], s_out[name]])
        assert auc > 0.95, (name, auc)


def test_msp_definition():
    probs = np.array([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33]], dtype=np.float32)
    np.testing.assert_allclose(msp_score(probs), [0.3, 0.66], atol=1e-6)


def test_mahalanobis_matches_direct_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3)).astype(np.float32)
    means = rng.normal(size=(2, 3)).astype(np.float32)
    a = rng.normal(size=(3, 3))
    precision = (a @ a.T + np.eye(3)).astype(np.float32)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    direct = np.array(
        [min((x - m) @ precision @ (x - m) for m in means) for x in zn], dtype=np.float32
    )
    np.testing.assert_allclose(
        mahalanobis_score(z, means, precision, chunk=3), direct, rtol=1e-4, atol=1e-5
    )


def test_knn_is_kth_nearest_cosine():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(20, 4))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    z = rng.normal(size=(5, 4)) * 3
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    want = np.array([1 - np.sort(bank @ x)[-3] for x in zn])
    np.testing.assert_allclose(knn_score(z, bank.astype(np.float32), k=3, chunk=2), want, atol=1e-5)


def test_flags_use_default_and_threshold(data, params):
    _, (e, p), _ = data
    flags, scores = ood_flags(e, p, params)
    default = params["default"]
    np.testing.assert_array_equal(flags, scores > params["scores"][default]["threshold"])
    flags_msp, scores_msp = ood_flags(e, p, params, score="msp")
    np.testing.assert_allclose(scores_msp, msp_score(p))
    assert flags_msp.dtype == bool


def test_default_can_be_chosen(data):
    (e, p), _, _ = data
    params = fit_ood(e, p, default="msp", scores=("msp", "prototype"))
    assert params["default"] == "msp" and set(params["scores"]) == {"msp", "prototype"}
    assert OODScorer(params).name == "msp"


def test_without_params_only_msp_and_nothing_flagged():
    probs = _softmax(np.random.default_rng(0).normal(size=(10, 3)))
    scorer = OODScorer({})
    assert scorer.name == "msp" and scorer.available == ["msp"]
    flags, _ = scorer.flags(np.zeros((10, 4)), probs)
    assert not flags.any()
    with pytest.raises(CDCError, match="not available"):
        OODScorer({}, "knn")


def test_array_encoding_round_trip():
    a = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(encode_array(a)))), a)
    np.testing.assert_array_equal(decode_array(a.tolist()), a)
    with pytest.raises(CDCError, match="corrupt"):
        decode_array({"shape": [2, 2], "base64": "AAAA"})


@pytest.mark.parametrize(
    "emb, probs, kwargs, message",
    [
        (np.zeros((20, 3)), np.zeros((19, 2)), {}, "need embedding"),
        (np.zeros((5, 3)), np.full((5, 2), 0.5), {}, "at least 10"),
        (np.zeros((20, 3)), np.full((20, 2), 0.5), {"keep": 1.5}, "keep"),
        (np.full((20, 3), np.nan), np.full((20, 2), 0.5), {}, "NaN"),
        (np.zeros((20, 3)), np.full((20, 2), 0.5), {"scores": ("energy",)}, "unknown score"),
        (
            np.zeros((20, 3)),
            np.full((20, 2), 0.5),
            {"default": "knn", "scores": ("msp",)},
            "default",
        ),
    ],
)
def test_fit_rejects_bad_input(emb, probs, kwargs, message):
    with pytest.raises(CDCError, match=message):
        fit_ood(emb, probs, **kwargs)
