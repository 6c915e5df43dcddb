"""RUC's clean-set selection (paper Sec. 3.1): split the data into clean X and unclean U.

Read top-down:

- :func:`select_clean`: one strategy's mask, the paper's three strategies
  (confidence-based, metric-based, hybrid);
- :func:`knn_vote`: the kNN classifier y' = kNN(h(x)) of the metric-based strategy;
- :func:`most_confident_per_class`: the rank form of the confidence strategy, for
  confidences that only rank samples (K-means', :data:`KMEANS_CLEAN_FRACTION`);
- :func:`selection_masks`: every strategy's mask at once, sharing the kNN vote;
- :func:`clean_set_quality`: precision, recall and F1 of a clean set (Tables 3 and 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cdc_serve import CDCError
from cdc_serve_training.config import RUCConfig, RUCStrategy

STRATEGIES = tuple(s.value for s in RUCStrategy)

#: Share of every K-means cluster the confidence strategy keeps (rank form of tau_1):
#: K-means' Student-t soft assignment ranks samples but is no classifier confidence,
#: its maximum stays far below tau_1 = 0.99. Half of each cluster, fixed a priori.
KMEANS_CLEAN_FRACTION = 0.5


def select_clean(
    strategy: str,
    pseudo_labels: Tensor,
    confidences: Tensor | None,
    embeddings: Tensor | None,
    *,
    tau1: float = 0.99,
    k: int = 100,
    clean_fraction: float | None = None,
) -> Tensor:
    """Split the data into the clean set X (True) and the unclean set U (Sec. 3.1).

    * ``"confidence"``: max(y) >= tau_1, the clustering's own confidence (the paper
      writes ">"; with float confidences the two differ only on exact ties). With
      ``clean_fraction`` set, the most confident ``clean_fraction`` of every pseudo-label
      class instead (:func:`most_confident_per_class`);
    * ``"metric"``: argmax(kNN(h(x))) = argmax(y), the pseudo-label agrees with the vote
      of its ``k`` nearest neighbours on the L2-normalised embedding (:func:`knn_vote`);
    * ``"hybrid"``: both.

    Returns a bool mask of length N.
    """
    if strategy not in STRATEGIES:
        raise CDCError(f"unknown clean-set strategy {strategy!r}; choose one of {STRATEGIES}")
    labels = torch.as_tensor(pseudo_labels).long().cpu()
    n = labels.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    if strategy in ("confidence", "hybrid"):
        if confidences is None:
            raise CDCError(
                f"the {strategy!r} clean-set strategy needs confidences, and these "
                "pseudo-labels have none (a labels file gives labels only); use 'metric'"
            )
        conf = torch.as_tensor(confidences).float().cpu()
        if conf.shape != (n,):
            raise CDCError(f"confidences have shape {tuple(conf.shape)}, expected ({n},)")
        if clean_fraction is None:
            mask &= conf >= tau1
        else:
            mask &= most_confident_per_class(labels, conf, clean_fraction)
    if strategy in ("metric", "hybrid"):
        if embeddings is None:
            raise CDCError(f"the {strategy!r} strategy needs embeddings for the kNN vote")
        emb = torch.as_tensor(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise CDCError(f"embeddings have shape {tuple(emb.shape)}, expected ({n}, D)")
        mask &= knn_vote(emb, labels, k).cpu() == labels
    return mask


def knn_vote(
    embeddings: Tensor,
    labels: Tensor,
    k: int,
    *,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """kNN classifier y' = kNN(h(x)) of the metric-based strategy (Sec. 3.1).

    Each sample's ``k`` nearest neighbours by cosine similarity (dot product of the
    L2-normalised ``embeddings``), *excluding the sample itself*, vote with their
    ``labels``; the most frequent label wins (ties go to the lowest label). Rows are
    processed in chunks so that N = 70,000 fits in a few hundred MB on a CPU.

    Returns the voted label per sample (int64, N).
    """
    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise CDCError(f"kNN needs 1 <= k < number of samples; got k={k} for {n} samples")
    z = F.normalize(embeddings.float(), dim=1)
    labels = labels.to(z.device).long()
    c = int(num_classes or int(labels.max()) + 1)
    if chunk_size is None:  # about 32 M similarities (128 MB) per chunk
        chunk_size = max(1, (1 << 25) // n)
    votes = torch.empty(n, dtype=torch.long, device=z.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = z[start:stop] @ z.T
        rows = torch.arange(stop - start, device=z.device)
        sims[rows, rows + start] = -math.inf  # a sample does not vote for itself
        neighbours = sims.topk(k, dim=1).indices
        counts = F.one_hot(labels[neighbours], c).sum(dim=1)
        votes[start:stop] = counts.argmax(dim=1)
    return votes


def most_confident_per_class(labels: Tensor, confidences: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``ceil(fraction * n_c)`` most confident samples of every class c.

    The confidence strategy's rank form (:func:`select_clean` with ``clean_fraction``):
    for confidences that only *rank* samples, such as K-means' Student-t soft
    assignment, whose maximum rarely exceeds 0.3 so that tau_1 = 0.99 would keep nothing.
    Per class, so that no cluster drops out of the clean set. Ties keep the lower index.
    """
    if not 0.0 < fraction <= 1.0:
        raise CDCError(f"clean_fraction must lie in (0, 1], got {fraction}")
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        order = torch.sort(confidences[members], descending=True, stable=True).indices
        mask[members[order[: math.ceil(fraction * members.numel())]]] = True
    return mask


def selection_masks(
    labels: Tensor, confidences: Tensor | None, embeddings: Tensor | None, cfg: RUCConfig
) -> dict[str, Tensor]:
    """The clean-set mask of every strategy the inputs allow (:func:`select_clean`).

    ``confidence`` needs confidences, ``metric`` embeddings, ``hybrid`` both; the kNN
    vote is computed once and shared by ``metric`` and ``hybrid``.
    """
    options = {"tau1": cfg.tau1, "k": cfg.k, "clean_fraction": cfg.clean_fraction}
    masks: dict[str, Tensor] = {}
    if confidences is not None:
        masks["confidence"] = select_clean("confidence", labels, confidences, None, **options)
    if embeddings is not None:
        masks["metric"] = select_clean("metric", labels, None, embeddings, **options)
    if "confidence" in masks and "metric" in masks:
        masks["hybrid"] = masks["confidence"] & masks["metric"]
    return masks


def clean_set_quality(mask: Tensor, pseudo_labels: Tensor, true_labels: Tensor) -> dict:
    """Precision, recall and F1 of a clean set, as in the paper's Tables 3 and 5.

    The paper reports them without formulas; its Fig. 4 (precision falls while recall
    rises as co-refurbishing grows the clean set) fixes the reading used here. A
    sample's pseudo-label is *correct* when it equals the true class after the Hungarian
    matching of pseudo-labels to classes over all N samples; the clean set is the
    positive prediction of "correct":

    * precision = |clean and correct| / |clean|  (how pure the clean set is),
    * recall    = |clean and correct| / |correct| (how many correct labels it keeps),
    * F1 = 2 P R / (P + R).

    Returns ``dict(precision, recall, f1, size)`` as fractions and the clean-set size.
    """
    from cdc_serve.metrics import hungarian_match

    mask_np = torch.as_tensor(mask).bool().cpu().numpy()
    pred = torch.as_tensor(pseudo_labels).long().cpu().numpy()
    true = torch.as_tensor(true_labels).long().cpu().numpy()
    if not mask_np.shape == pred.shape == true.shape:
        raise CDCError("mask, pseudo-labels and true labels must have the same length")
    correct = hungarian_match(true, pred)[pred] == true
    hits = int((mask_np & correct).sum())
    size = int(mask_np.sum())
    precision = hits / size if size else 0.0
    recall = hits / int(correct.sum()) if correct.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "size": size}


def quality_or_size(mask: Tensor, labels: Tensor, true_labels: Tensor | None) -> dict:
    """:func:`clean_set_quality` where the true labels are known, else the size alone."""
    if true_labels is None:
        return {"size": int(mask.sum())}
    return clean_set_quality(mask, labels, true_labels)
