"""Every setting of a training run, as typed dataclasses, in one place.

The presets (``quick``, ``paper``), the paper's Table 2 ablations and ``make_config``,
which builds the configuration of ``cdc-serve train`` from them, are in ``presets.py``.
One validation style throughout: every section has a ``validate()`` method that raises
:class:`cdc_serve.CDCError` naming the setting and what to do;
:func:`validate_against_data` adds the checks that need the data's size and class count.

Sections (each stage reads its own):

- :class:`DataConfig`    which images (``data.py``)
- :class:`ModelConfig`   the backbone and the heads' hidden size H, the one place for both
- :class:`AugmentConfig` the views (``augment.Augmenter``'s keyword arguments)
- :class:`MocoConfig`    MoCo-v2 pretraining (``moco.py``)
- :class:`InitConfig`    the heads' initialisation: ``head_init`` prototype | random (``init.py``)
- :class:`CDCConfig`     Algorithm 1 (``cdc.py``)
- :class:`RUCConfig`     RUC (``ruc/``), where the pseudo-labels come from is ``labels_from``
- :class:`TrainConfig`   all of the above, plus seed, device and output folder

The choices (presets, methods, backbones, ...) are ``str`` Enums shared with the CLI, so
``--help`` lists them and a wrong value is refused before any work starts. The dataclass
fields hold the plain string values, so ``to_dict()`` stays JSON- and
``weights_only``-safe.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdc_serve import CDCError
from cdc_serve.choices import Backbone, HeadInit, InputNorm, Method, Preset, Split, values

# ----------------------------------------------------------------------------------------------
# Choices (the CLI-facing ones live in cdc_serve.choices)
# ----------------------------------------------------------------------------------------------


class Selection(str, enum.Enum):
    dynamic = "dynamic"  # Eq. 4
    fixed = "fixed"  # Table 2-II


class LabelBy(str, enum.Enum):
    argmax = "argmax"
    column = "column"


class CalTarget(str, enum.Enum):
    mean = "mean"  # Eq. 1: the mini-cluster's mean clustering-head prediction
    votes = "votes"  # the mini-cluster's share of clustering-head argmaxes (cdc.py)


class Heads(str, enum.Enum):
    dual = "dual"
    clu = "clu"  # Table 2-III
    clu_cal = "clu+cal"  # Table 2-IV


PRESETS = values(Preset)
METHODS = values(Method)
SPLITS = values(Split)
BACKBONE_NAMES = values(Backbone)


def check_choice(value: str, choices: type[enum.Enum], what: str) -> None:
    if value not in values(choices):
        raise CDCError(f"unknown {what} {value!r}; use one of {', '.join(values(choices))}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which images to train on."""

    name: str = "fashion-mnist"
    root: str | None = None
    split: str = "all"
    limit: int | None = None
    download: bool = False
    # image folders (imagefolder:DIR)
    input_size: tuple[int, int] | None = None  # (H, W); None: the preset's folder size
    channels: int | None = None  # 1 or 3; None: 1 when every image is grayscale
    num_clusters: int | None = None  # required without class sub-folders
    strict: bool = False  # an unreadable file is an error instead of skipped
    labels: str | None = None  # `file,label` CSV of an image folder, for evaluation only

    @property
    def is_folder(self) -> bool:
        return self.name.startswith("imagefolder:")

    def validate(self) -> None:
        from cdc_serve_training.data import dataset_names, parse_class_filter

        if self.split not in SPLITS:
            raise CDCError(f"unknown split {self.split!r}; use train, test or all")
        if self.limit is not None and self.limit < 1:
            raise CDCError(f"--limit must be a positive number of images, got {self.limit}")
        base = parse_class_filter(self.name)[0]  # "fashion-mnist[0-7]": fashion-mnist, 8 classes
        folder = base.startswith("imagefolder:") and len(base) > len("imagefolder:")
        if base not in dataset_names() and not folder:
            raise CDCError(f"unknown dataset {self.name!r}; known: {', '.join(dataset_names())}")
        if self.channels not in (None, 1, 3):
            raise CDCError(f"--channels must be 1 or 3, got {self.channels}")
        if self.input_size is not None and min(self.input_size) < 8:
            raise CDCError(f"--input-size must be at least 8 pixels, got {self.input_size}")
        if self.num_clusters is not None and self.num_clusters < 2:
            raise CDCError(f"--num-clusters must be at least 2, got {self.num_clusters}")
        if not self.is_folder and (
            self.num_clusters or self.channels or self.input_size or self.labels
        ):
            raise CDCError(
                "--num-clusters, --channels, --input-size and --labels are for "
                "--dataset imagefolder:DIR"
            )
        if self.labels is not None and not Path(self.labels).is_file():
            raise CDCError(f"--labels {self.labels}: no such file")


@dataclass
class ModelConfig:
    """The network: backbone architecture and the heads' hidden size H (CDC and RUC alike)."""

    backbone: str = "resnet34"
    hidden: int = 512  # H: Linear(D, H) -> BN -> ReLU -> Linear(H, C) in every head
    # a torchvision state dict or a backbone.pt to start from (MoCo-v2 continues from it,
    # or is skipped with --pretrain-epochs 0); its first convolution decides the stem
    weights: str | None = None
    # per-image normalisation before the backbone (input_norm.py): dataset, image or object
    # (make_config resolves the CLI's auto: object for image folders, else dataset)
    input_norm: str = "dataset"

    def validate(self) -> None:
        check_choice(self.backbone, Backbone, "backbone")
        check_choice(self.input_norm, InputNorm, "input normalisation")
        if self.input_norm == InputNorm.auto.value:
            raise CDCError("resolve --input-norm auto before training (presets.make_config does)")
        if self.weights is not None and not Path(self.weights).is_file():
            raise CDCError(f"--backbone-weights {self.weights}: no such file")
        if self.hidden < 1:
            raise CDCError(f"the hidden size must be positive, got {self.hidden}")


@dataclass
class AugmentConfig:
    """The views of ``augment.Augmenter`` (its keyword arguments, with its defaults)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # strong and MoCo views' crop area range
    weak_crop_scale: tuple[float, float] = (0.5, 1.0)
    cutout: int | None = None  # None: half the image side (16 px for 32-px images)
    strong_ops: int = 4  # RandAugment-style operations per strong view
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur: bool | None = None  # None: only for images larger than 32 px

    def validate(self) -> None:
        for name in ("crop_scale", "weak_crop_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise CDCError(f"augment {name} must satisfy 0 < low <= high <= 1")
        if self.strong_ops < 0 or (self.cutout is not None and self.cutout < 0):
            raise CDCError("augment strong_ops and cutout must be >= 0")

    def options(self) -> dict[str, Any]:
        """``Augmenter`` keyword arguments (tuples, also after a JSON round trip)."""
        return {
            k: tuple(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclass
class MocoConfig:
    """MoCo-v2 settings; the defaults are the CDC paper's (App. B.1)."""

    epochs: int = 1000
    batch_size: int = 256
    lr: float = 0.5  # base learning rate, scaled by batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 0.2
    queue_size: int = 32768
    key_momentum: float = 0.99
    proj_hidden: int = 4096
    proj_dim: int = 256
    warmup_epochs: float = 50
    symmetric: bool = False
    shuffle_bn_splits: int = 4
    # Area range of the views' RandomResizedCrop; None keeps the Augmenter's (0.2, 1.0).
    crop_scale: tuple[float, float] | None = None

    def validate(self, n_images: int | None = None) -> None:
        """CDCError for settings that cannot train (on ``n_images`` images, when given)."""
        if self.epochs < 0:
            raise CDCError(f"MoCo epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise CDCError(f"MoCo batch size must be at least 2, got {self.batch_size}")
        if n_images is not None and n_images < self.batch_size:
            raise CDCError(
                f"MoCo batch size {self.batch_size} is larger than the {n_images} images"
            )
        if self.queue_size < 1 or self.temperature <= 0 or self.lr <= 0:
            raise CDCError("MoCo needs queue_size >= 1, temperature > 0 and lr > 0")
        if not 0 <= self.key_momentum <= 1:
            raise CDCError(f"MoCo key momentum must lie in [0, 1], got {self.key_momentum}")
        if self.shuffle_bn_splits < 1 or self.batch_size < self.shuffle_bn_splits:
            raise CDCError("MoCo shuffle_bn_splits must be between 1 and the batch size")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise CDCError(
                f"MoCo crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}"
            )


@dataclass
class InitConfig:
    """Initialisation of the heads (paper Sec. 3.3; init.py)."""

    head_init: str = "prototype"  # "prototype" (Sec. 3.3) | "random" (Table 2-I, --head-init)
    ortho_steps: int = 2000  # "orthogonalisation" refinement steps per weight matrix
    ortho_lr: float = 0.1
    kmeans_iters: int = 100
    max_samples: int | None = None  # K-means of the init on a random subset (CPU shortcut)
    kmeans_restarts: int = 1  # K-means runs per prototype set; the lowest inertia is kept

    def validate(self) -> None:
        check_choice(self.head_init, HeadInit, "head initialisation")
        if self.ortho_steps < 0 or self.kmeans_iters < 1 or self.kmeans_restarts < 1:
            raise CDCError("init needs ortho_steps >= 0, kmeans_iters >= 1, kmeans_restarts >= 1")


@dataclass
class CDCConfig:
    """Joint training of the two heads (paper Sec. 3.1-3.4, Algorithm 1; cdc.py)."""

    epochs: int = 100
    batch_size: int = 1000  # B
    sub_batch_size: int = 500  # B_s
    mini_clusters: int = 500  # K, K-means clusters per batch for the calibration targets
    lr_heads: float = 1e-4
    lr_encoder: float = 5e-5
    weight_decay: float = 0.0
    w_en: float = 1.0  # weight of the negative entropy loss (Eq. 3)
    kmeans_iters: int = 20  # Lloyd iterations of the per-batch K-means
    label_by: str = "argmax"  # Eq. 4 pseudo-label: "argmax" (paper) | "column" (see cdc.py)
    cal_target: str = "mean"  # Eq. 1 target: "mean" (paper) | "votes" (see cdc.py)
    # ablations (paper Table 2)
    selection: str = "dynamic"  # "dynamic" (Eq. 4) | "fixed"
    fixed_threshold: float = 0.99
    heads: str = "dual"  # "dual" | "clu" | "clu+cal"
    stop_gradient: bool = True

    def validate(self) -> None:
        if self.epochs < 0:
            raise CDCError("epochs must be >= 0")
        if self.batch_size < 1 or self.sub_batch_size < 1:
            raise CDCError(
                f"batch sizes must be positive (B={self.batch_size}, B_s={self.sub_batch_size})"
            )
        if self.batch_size % self.sub_batch_size != 0:
            raise CDCError(
                f"the batch size B={self.batch_size} is not divisible by the sub-batch size "
                f"B_s={self.sub_batch_size}"
            )
        if not 1 <= self.mini_clusters <= self.batch_size:
            raise CDCError(
                f"the number of mini-clusters K={self.mini_clusters} must be between 1 and the "
                f"batch size B={self.batch_size}"
            )
        check_choice(self.selection, Selection, "selection")
        if not 0.0 < self.fixed_threshold <= 1.0:
            raise CDCError(f"the fixed threshold must be in (0, 1], got {self.fixed_threshold}")
        check_choice(self.label_by, LabelBy, "pseudo-label rule")
        check_choice(self.cal_target, CalTarget, "calibration target")
        check_choice(self.heads, Heads, "head setting")
        if self.lr_heads <= 0 or self.lr_encoder < 0:
            raise CDCError("learning rates must be positive")


@dataclass
class TrainConfig:
    """Everything ``pipeline.train`` needs; ``to_dict()`` is stored in model.pth."""

    data: DataConfig
    model: ModelConfig
    moco: MocoConfig
    init: InitConfig
    cdc: CDCConfig
    out: str
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preset: str = "quick"
    method: str = "cdc"
    ruc: RUCConfig | None = None  # method == "ruc"
    labels_from: str | None = None  # RUC: "kmeans", a CDC model.pth or a labels .npy/.csv
    ablation: str | None = None
    device: str = "auto"
    seed: int = 0
    restarts: int = 1  # CDC: initialisations trained on the one backbone (restarts.py)
    amp: bool = True  # bf16 autocast, on CUDA only
    eval_batch_size: int = 1024
    progress: bool = True
    pretrain_limit: int | None = None  # MoCo on a seeded random subset of this many images
    # settings given on the command line, which presets.adapt_to_data leaves alone
    set_by_user: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check every section (no data needed); CDCError naming the problem otherwise."""
        for section in (self.data, self.model, self.augment, self.init, self.cdc):
            section.validate()
        self.moco.validate()
        check_choice(self.method, Method, "method")
        if self.restarts < 1:
            raise CDCError(
                f"--restarts {self.restarts}: use 1 (one initialisation) or more; the run "
                "keeps the candidate with the highest estimated accuracy"
            )
        if self.restarts > 1 and self.method != "cdc":
            raise CDCError("--restarts is for --method cdc (RUC refines one given clustering)")
        if self.method == "ruc":
            (self.ruc or RUCConfig()).validate()
        elif self.labels_from is not None:
            raise CDCError("--labels-from is for --method ruc only")
        _check_device(self.device)
        return self


def _check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise CDCError(
                f"device {device!r} requested but no CUDA GPU is available (use auto or cpu)"
            )
        return
    raise CDCError(f"unknown device {device!r}; use auto, cpu or cuda")


def validate(config: TrainConfig) -> TrainConfig:
    """``config.validate()``: every check that does not need the data."""
    return config.validate()


def validate_against_data(config: TrainConfig, n: int, num_classes: int) -> None:
    """Checks that need the data's size and class count (run before any training)."""
    if num_classes < 2:
        raise CDCError(
            f"{config.data.name} has {num_classes} class(es); clustering needs at least 2"
        )
    if num_classes > n:
        raise CDCError(
            f"{num_classes} clusters requested but the data has only {n} images; "
            "use more images (--limit) or fewer classes"
        )
    if config.method == "cdc":
        if config.cdc.batch_size > n:
            raise CDCError(
                f"the CDC batch size B={config.cdc.batch_size} is larger than the data "
                f"({n} images); use more images"
            )
        if num_classes > config.cdc.batch_size:
            raise CDCError(
                f"{num_classes} clusters do not fit in a CDC batch of B={config.cdc.batch_size} "
                "images (Eq. 4 takes floor(B / C) samples per class)"
            )
    if config.model.hidden < num_classes and config.init.head_init == "prototype":
        raise CDCError(
            f"the hidden size {config.model.hidden} is smaller than the {num_classes} classes"
        )


__all__ = [
    "PRESETS",
    "AugmentConfig",
    "CDCConfig",
    "DataConfig",
    "InitConfig",
    "ModelConfig",
    "MocoConfig",
    "TrainConfig",
    "validate",
    "validate_against_data",
]


# ----------------------------------------------------------------------------------------------
# RUC (ruc/)
# ----------------------------------------------------------------------------------------------


class RUCStrategy(str, enum.Enum):
    """How RUC chooses its clean set (paper Sec. 3.1; ``ruc.clean_set.select_clean``)."""

    confidence = "confidence"  # the clustering's confidence max(y) >= tau_1
    metric = "metric"  # the kNN vote on the embedding agrees with the pseudo-label
    hybrid = "hybrid"  # both


@dataclass
class RUCConfig:
    """RUC hyper-parameters; defaults are the paper's (Sec. 4.1, App. A.2) for CIFAR-10.

    ``steps_per_epoch`` None means one pass over the clean set per epoch (batches of
    ``batch_size`` clean plus ``batch_size`` unclean samples); a number caps it (CPU runs).
    The heads' width is the run's one hidden size (``ModelConfig.hidden``) and the
    inference batch the run's ``eval_batch_size``: ``train_ruc`` takes both explicitly.
    """

    epochs: int = 200
    batch_size: int = 200  # 200 for CIFAR-10/20, 100 for STL-10
    steps_per_epoch: int | None = None
    lr: float = 0.01  # SGD, cosine annealing to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_u: float = 25.0  # 25 / 50 / 100 for CIFAR-10 / STL-10 / CIFAR-20
    rampup_epochs: float = 16.0  # linear ramp of lambda_u (MixMatch/DivideMix practice)
    epsilon: float = 0.5  # label smoothing, Eq. 8
    temperature: float = 0.5  # sharpening T
    alpha: float = 4.0  # Beta(alpha, alpha) of MixMatch
    num_views: int = 2  # M weak views for label guessing
    tau1: float = 0.99  # confidence strategy: keep max(y) >= tau1 ...
    clean_fraction: float | None = None  # ... or, if set, the most confident share per class
    k: int = 100  # metric strategy
    strategy: str = "hybrid"  # an RUCStrategy value
    tau2_start: float = 0.9  # refurbishing threshold schedule: start ...
    tau2_step: float = 0.02  # ... + step ...
    tau2_every: float = 0.2  # ... every this fraction of training (40 of 200 epochs)
    refurbish_max: int | None = None  # score at most this many unclean samples per epoch

    def validate(self) -> RUCConfig:
        """Raise CDCError on impossible values; returns self."""
        check_choice(self.strategy, RUCStrategy, "RUC strategy")
        if self.epochs < 1 or self.batch_size < 2:
            raise CDCError("RUC needs epochs >= 1 and batch_size >= 2")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise CDCError("RUC steps_per_epoch must be >= 1 (or None for a full pass)")
        if not 0.0 <= self.epsilon < 1.0 or self.temperature <= 0 or self.alpha <= 0:
            raise CDCError("RUC needs 0 <= epsilon < 1, temperature > 0 and alpha > 0")
        if self.k < 1 or self.num_views < 1:
            raise CDCError("RUC needs k >= 1 and num_views >= 1")
        return self

    @classmethod
    def from_dict(cls, values: dict | RUCConfig | None) -> RUCConfig:
        """Build from a plain dict (a TrainConfig's ``ruc`` field); unknown keys -> CDCError."""
        if values is None:
            return cls()
        if isinstance(values, RUCConfig):
            return values
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            moved = unknown & {"hidden_dim", "eval_batch_size"}
            hint = (
                f"; {' and '.join(sorted(moved))} are no RUC settings any more: the run's "
                "model.hidden and eval_batch_size apply to RUC too"
                if moved
                else ""
            )
            raise CDCError(f"unknown RUC settings: {sorted(unknown)}{hint}")
        return cls(**values).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ += ["RUCConfig", "RUCStrategy"]
