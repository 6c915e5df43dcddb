"""RUC: robust-learning refinement of any clustering's pseudo-labels.

Park et al., "Improving Unsupervised Image Clustering With Robust Learning" (CVPR 2021),
``../shared/papers/ruc-robust-unsupervised-clustering.txt``; equation numbers are the
paper's. RUC is an add-on: it takes the pseudo-labels of an existing clustering
(K-means on a pretrained backbone's features, a CDC model's clustering head, or any
labels file), splits the samples into a *clean* set X (labelled data) and an *unclean*
set U (unlabelled data), and retrains two networks with MixMatch, label smoothing,
co-refinement and co-refurbishing. The final network's softmax is its confidence.

Modules, read top-down (the settings are ``config.RUCConfig``, ``config.QUICK_RUC`` and
``config.RUCStrategy``):

1. ``clean_set``: the clean-set selection (Sec. 3.1): :func:`select_clean` with the
   confidence, metric (:func:`knn_vote`) and hybrid strategies, :func:`selection_masks`,
   :func:`clean_set_quality` (the paper's Table 3);
2. ``losses``: the pure maths of the retraining (Sec. 3.2): :func:`sharpen`,
   :func:`label_smoothing`, :func:`soft_cross_entropy`, :func:`mixmatch`,
   :func:`co_refine`, :func:`guess_unclean`, :func:`co_refurbish`, :func:`tau2_at`,
   :func:`unsup_ramp`;
3. ``loop``: the training loop :func:`train_ruc` (Algorithm 1) and its resumable
   checkpoints (:func:`ruc_fingerprint`);
4. ``labels``: where the pseudo-labels come from: :func:`pseudo_labels_from`;
5. ``stage``: the pipeline stage :func:`run_ruc_stage`;
6. ``strategies``: the strategy comparison :func:`compare_strategies`,
   :func:`run_strategy_comparison` (docs/ABLATIONS.md).

Choices where the paper leaves room (each is also stated at its function):

* The two networks are deep copies of the pretrained backbone with *fresh, randomly
  initialised* MLP heads: App. A.2 re-initialises the last layer on purpose, "to avoid
  the model falling into the same local optimum as the original model".
* tau_2 follows the paper's schedule (0.9, +0.02 every 40 of 200 epochs), expressed as a
  fraction of training so that short CPU runs see the whole schedule; the reference
  code's fixed 0.99 is ``tau2_start=0.99, tau2_step=0``.
* K-means' soft assignment is no classifier confidence (its maximum stays far below
  tau_1 = 0.99), so for K-means pseudo-labels the confidence strategy keeps the most
  confident half of every cluster (``clean_fraction``, :data:`KMEANS_CLEAN_FRACTION`).
* Co-refurbishing runs at the end of every epoch (Sec. 3.2 "at the end of every epoch"),
  on un-augmented images.
* The returned model is network 2, the one trained last.
"""

from __future__ import annotations

from cdc_serve_training.config import RUCConfig, RUCStrategy
from cdc_serve_training.presets import QUICK_RUC
from cdc_serve_training.ruc.clean_set import (
    KMEANS_CLEAN_FRACTION,
    STRATEGIES,
    clean_set_quality,
    knn_vote,
    most_confident_per_class,
    select_clean,
    selection_masks,
)
from cdc_serve_training.ruc.labels import pseudo_labels_from
from cdc_serve_training.ruc.loop import ruc_fingerprint, train_ruc
from cdc_serve_training.ruc.losses import (
    co_refine,
    co_refurbish,
    guess_unclean,
    label_smoothing,
    mixmatch,
    sharpen,
    soft_cross_entropy,
    tau2_at,
    unlabelled_loss,
    unsup_ramp,
)
from cdc_serve_training.ruc.stage import run_ruc_stage
from cdc_serve_training.ruc.strategies import (
    compare_strategies,
    run_strategy_comparison,
    strategies_markdown,
)

__all__ = [
    "KMEANS_CLEAN_FRACTION",
    "QUICK_RUC",
    "STRATEGIES",
    "RUCConfig",
    "RUCStrategy",
    "clean_set_quality",
    "co_refine",
    "co_refurbish",
    "compare_strategies",
    "guess_unclean",
    "knn_vote",
    "label_smoothing",
    "mixmatch",
    "most_confident_per_class",
    "pseudo_labels_from",
    "ruc_fingerprint",
    "run_ruc_stage",
    "run_strategy_comparison",
    "select_clean",
    "selection_masks",
    "sharpen",
    "soft_cross_entropy",
    "strategies_markdown",
    "tau2_at",
    "train_ruc",
    "unlabelled_loss",
    "unsup_ramp",
]
