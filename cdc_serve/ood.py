"""Out-of-distribution (OOD) scores from a model's ``probs`` and ``embedding`` outputs.

Convention (``docs/ARCHITECTURE.md``): an ``ood_score`` is higher when an image is
more likely out of distribution; an image is flagged ``ood`` when its score is above
the score's threshold, fitted as the ``keep`` quantile (95 %) of the scores of
in-distribution (training) data, so that 95 % of in-distribution data is kept.

Scores (all numpy; fitted parameters are small and JSON-able):

- ``msp``: ``1 - max_c p_c``, the maximum softmax probability baseline used by the
  CDC paper (App. C.5, after Hendrycks & Gimpel).
- ``prototype``: ``1 - max_j cos(z, m_j)`` with ``z`` the L2-normalised embedding and
  ``m_j`` prototypes of the training embeddings: for each predicted cluster, the
  centres of a small k-means on the normalised embeddings of the samples assigned to
  it (``prototypes_per_cluster`` of them).
- ``mahalanobis``: ``min_c (z - mu_c)^T S^-1 (z - mu_c)`` with ``z`` the L2-normalised
  embedding, ``mu_c`` the mean of cluster ``c`` (by predicted cluster) and ``S`` one
  shared, Ledoit-Wolf-shrunk covariance (Lee et al. 2018; SSD, Sehwag et al. 2021).
- ``knn``: ``1 - cos`` to the ``k``-th nearest of a random subsample of training
  embeddings (Sun et al. 2022), thresholded on training samples outside that bank.

The default score is :data:`DEFAULT_SCORE` (change it there, or per model with
``fit_ood(..., default=...)``). It was chosen by measurement on real data before a CDC
model existed: in-distribution Fashion-MNIST classes 0-7, OOD = held-out classes 8-9
and scikit-learn digits resized to 28x28, OOD AUROC (higher is better):

==========================================  ============  ============  ============
features (probs from)                       msp           mahalanobis   knn
==========================================  ============  ============  ============
small CNN, 84.6 % acc. (its softmax)        0.72 / 0.65   0.85 / 0.98   0.74 / 0.98
small CNN, 75 % acc. (its softmax)          0.71 / 0.82   0.85 / 0.97   0.72 / 0.95
PCA-64 of pixels (k-means soft assignment)  0.60 / 0.71   0.79 / 0.95   0.79 / 0.97
==========================================  ============  ============  ============

(held-out classes / digits). Mahalanobis is best or close to best everywhere and
beats msp on both OOD sets; the CDC model's own figures are in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from cdc_serve import CDCError
from cdc_serve.choices import OodScore, values

SCORES = values(OodScore)
DEFAULT_SCORE = "mahalanobis"
PARAMS_VERSION = 1
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


# -- compact JSON encoding of float32 arrays ------------------------------------------


def encode_array(array: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    """A float array as a JSON-able dict (base64 of the little-endian float32/float16 bytes)."""
    if dtype not in _DTYPES:
        raise CDCError(f"encode_array: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    array = np.ascontiguousarray(array, dtype=_DTYPES[dtype])
    return {
        "dtype": dtype,
        "shape": list(array.shape),
        "base64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def decode_array(data: dict[str, Any] | list) -> np.ndarray:
    """Inverse of :func:`encode_array` (plain nested lists are accepted too); float32 out."""
    if isinstance(data, list):
        return np.asarray(data, dtype=np.float32)
    try:
        raw = base64.b64decode(data["base64"])
        dtype = _DTYPES[data.get("dtype", "float32")]
        return np.frombuffer(raw, dtype=dtype).reshape(data["shape"]).astype(np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise CDCError(f"OOD parameters: corrupt array ({exc})") from None


# -- the scores as pure functions ------------------------------------------------------


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def msp_score(probs: np.ndarray) -> np.ndarray:
    """``1 - max softmax probability`` (CDC paper App. C.5)."""
    return 1.0 - np.asarray(probs, dtype=np.float32).max(axis=1)


def prototype_score(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """``1 - max cosine similarity`` to the (unit-norm) prototypes."""
    return 1.0 - (_l2_normalise(embedding) @ prototypes.T).max(axis=1)


def symmetric_precision(precision: np.ndarray) -> np.ndarray:
    """The stored (float32) precision matrix made exactly symmetric, in float64."""
    p = np.asarray(precision, dtype=np.float64)
    return (p + p.T) / 2


def mahalanobis_factor(precision: np.ndarray) -> np.ndarray:
    """``L`` with ``L @ L.T`` = the symmetric precision (float64; negative rounding noise in
    its eigenvalues clipped to 0): ``d(z, mu)^2 = |(z - mu) @ L|^2``, the form the served
    graph computes (:mod:`cdc_serve.served_graph`)."""
    values, vectors = np.linalg.eigh(symmetric_precision(precision))
    return vectors * np.sqrt(np.clip(values, 0.0, None))[None, :]


def mahalanobis_score(
    embedding: np.ndarray, means: np.ndarray, precision: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """Smallest squared Mahalanobis distance of the normalised embedding to a cluster mean.

    Computed in float64 (the distances are large differences of large terms) and
    returned as float32; the served graph computes the same in float64 too.
    """
    e = np.asarray(embedding, dtype=np.float64)
    z = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    p, mu = symmetric_precision(precision), np.asarray(means, dtype=np.float64)
    # d(z, mu)^2 = z'Pz - 2 z'P mu + mu'P mu, computed for all clusters at once.
    pm = mu @ p  # (C, D)
    mpm = np.einsum("cd,cd->c", pm, mu)
    out = np.empty(len(z), dtype=np.float32)
    for i in range(0, len(z), chunk):
        zc = z[i : i + chunk]
        zpz = np.einsum("nd,nd->n", zc @ p, zc)
        out[i : i + chunk] = (zpz[:, None] - 2 * zc @ pm.T + mpm[None, :]).min(axis=1)
    return out


def knn_score(embedding: np.ndarray, bank: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """``1 - cos`` to the k-th nearest (unit-norm) bank embedding."""
    z = _l2_normalise(embedding)
    k = min(k, len(bank))
    out = np.empty(len(z), dtype=np.float32)
    for i in range(0, len(z), chunk):
        sims = z[i : i + chunk] @ bank.T
        out[i : i + chunk] = 1.0 - np.partition(sims, -k, axis=1)[:, -k]
    return out


# -- fitting ---------------------------------------------------------------------------


def _fit_prototypes(z: np.ndarray, labels: np.ndarray, per_cluster: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    protos = []
    for c in np.unique(labels):
        zc = z[labels == c]
        k = min(per_cluster, len(zc))
        if k <= 1:
            protos.append(zc.mean(axis=0, keepdims=True))
        else:
            km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(zc)
            protos.append(km.cluster_centers_)
    return _l2_normalise(np.concatenate(protos))


def _fit_mahalanobis(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    centred = z - means[np.searchsorted(classes, labels)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return means.astype(np.float32), lw.precision_.astype(np.float32)


def fit_ood(
    embedding: np.ndarray,
    probs: np.ndarray,
    keep: float = 0.95,
    seed: int = 0,
    default: str | None = None,
    scores: Iterable[str] = SCORES,
    prototypes_per_cluster: int = 4,
    knn_bank: int = 1000,
    knn_k: int = 5,
    max_fit: int = 20000,
) -> dict[str, Any]:
    """Fit every OOD score on in-distribution data and its threshold.

    Args:
        embedding: ``N x D`` backbone features of in-distribution (training) images.
        probs: ``N x C`` calibration-head probabilities of the same images.
        keep: share of in-distribution data to keep; threshold = ``keep`` quantile.
        seed: random seed for subsampling and k-means.
        default: name of the default score (``DEFAULT_SCORE`` when None).
        max_fit: at most this many samples are used (random subsample) to fit.

    Returns a JSON-able dict ``{"version", "keep", "default", "scores": {name: {...,
    "threshold": float}}}`` (a few MB at most: arrays are base64 float32).
    """
    embedding = np.asarray(embedding, dtype=np.float32)
    probs = np.asarray(probs, dtype=np.float32)
    if embedding.ndim != 2 or probs.ndim != 2 or len(embedding) != len(probs):
        raise CDCError(
            f"fit_ood: need embedding N x D and probs N x C, got {embedding.shape} and {probs.shape}"
        )
    if len(embedding) < 10:
        raise CDCError(f"fit_ood: need at least 10 in-distribution samples, got {len(embedding)}")
    if not (0.0 < keep < 1.0):
        raise CDCError(f"fit_ood: keep must be in (0, 1), got {keep}")
    if not (np.isfinite(embedding).all() and np.isfinite(probs).all()):
        raise CDCError("fit_ood: embedding or probs contain NaN or inf")
    scores = list(scores)
    unknown = set(scores) - set(SCORES)
    if unknown:
        raise CDCError(f"fit_ood: unknown score(s) {sorted(unknown)}; known: {SCORES}")
    default = default or (DEFAULT_SCORE if DEFAULT_SCORE in scores else scores[0])
    if default not in scores:
        raise CDCError(f"fit_ood: default score {default!r} is not among {scores}")

    rng = np.random.default_rng(seed)
    if len(embedding) > max_fit:
        pick = rng.choice(len(embedding), max_fit, replace=False)
        embedding, probs = embedding[pick], probs[pick]
    z = _l2_normalise(embedding)
    labels = probs.argmax(axis=1)

    def threshold(values: np.ndarray) -> float:
        return float(np.quantile(values, keep))

    fitted: dict[str, dict[str, Any]] = {}
    if "msp" in scores:
        fitted["msp"] = {"threshold": threshold(msp_score(probs))}
    if "prototype" in scores:
        # Stored as float16: threshold with the rounded values the scorer will use.
        protos = _fit_prototypes(z, labels, prototypes_per_cluster, seed)
        protos = protos.astype(np.float16).astype(np.float32)
        fitted["prototype"] = {
            "prototypes": encode_array(protos, "float16"),
            "threshold": threshold(prototype_score(z, protos)),
        }
    if "mahalanobis" in scores:
        means, precision = _fit_mahalanobis(z, labels)
        fitted["mahalanobis"] = {
            "means": encode_array(means),
            "precision": encode_array(precision),
            "threshold": threshold(mahalanobis_score(z, means, precision)),
        }
    if "knn" in scores:
        # Bank from one part, threshold from the rest: a bank member is at distance 0
        # from itself and would bias the threshold down.
        n_bank = min(knn_bank, len(z) // 2)
        order = rng.permutation(len(z))
        bank, rest = z[order[:n_bank]], z[order[n_bank:]]
        bank = bank.astype(np.float16).astype(np.float32)  # stored as float16
        k = min(knn_k, n_bank)
        fitted["knn"] = {
            "bank": encode_array(bank, "float16"),
            "k": int(k),
            "threshold": threshold(knn_score(rest, bank, k)),
        }
    return {"version": PARAMS_VERSION, "keep": float(keep), "default": default, "scores": fitted}


# -- applying --------------------------------------------------------------------------


def _scorers(params: dict[str, Any]) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Decode fitted parameters once into ``name -> f(embedding, probs)``."""
    fitted = params.get("scores", {}) if params else {}
    out: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "msp": lambda e, p: msp_score(p)
    }
    if "prototype" in fitted:
        protos = decode_array(fitted["prototype"]["prototypes"])
        out["prototype"] = lambda e, p: prototype_score(e, protos)
    if "mahalanobis" in fitted:
        means = decode_array(fitted["mahalanobis"]["means"])
        precision = decode_array(fitted["mahalanobis"]["precision"])
        out["mahalanobis"] = lambda e, p: mahalanobis_score(e, means, precision)
    if "knn" in fitted:
        bank = decode_array(fitted["knn"]["bank"])
        k = int(fitted["knn"]["k"])
        out["knn"] = lambda e, p: knn_score(e, bank, k)
    return out


class OODScorer:
    """Fitted OOD parameters decoded once, for scoring many batches."""

    def __init__(self, params: dict[str, Any] | None, score: str | None = None) -> None:
        params = params or {}
        self.params = params
        try:  # the parameters come from a file (cdc_meta.json): any shape of JSON
            self._scorers = _scorers(params)
            fitted = params.get("scores", {})
            self.name = score or params.get("default") or "msp"
            known = self.name in self._scorers
            # Without a fitted threshold nothing is flagged (threshold = +inf).
            self.threshold = (
                float(fitted.get(self.name, {}).get("threshold", np.inf)) if known else np.inf
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CDCError(
                f"OOD parameters: malformed ({type(exc).__name__}: {exc}); export the model again"
            ) from None
        if not known:
            raise CDCError(
                f"OOD score {self.name!r} is not available for this model "
                f"(available: {', '.join(sorted(self._scorers))})"
            )

    @property
    def available(self) -> list[str]:
        return sorted(self._scorers)

    def score(self, embedding: np.ndarray, probs: np.ndarray) -> np.ndarray:
        try:
            return self._scorers[self.name](embedding, probs).astype(np.float32)
        except ValueError as exc:  # fitted arrays of another width than the model's outputs
            raise CDCError(
                f"OOD score {self.name!r}: the fitted parameters do not fit the model's outputs "
                f"({exc}); export the model again"
            ) from None

    def flags(self, embedding: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ood flags, scores)`` for a batch."""
        s = self.score(embedding, probs)
        return s > self.threshold, s


def ood_scores(
    embedding: np.ndarray, probs: np.ndarray, params: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """Every available score (``msp`` always, the others when fitted) for a batch."""
    return {
        name: f(embedding, probs).astype(np.float32) for name, f in _scorers(params or {}).items()
    }


def ood_flags(
    embedding: np.ndarray,
    probs: np.ndarray,
    params: dict[str, Any] | None,
    score: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(flags, scores)`` of one score (``params["default"]`` when None)."""
    return OODScorer(params, score).flags(embedding, probs)
