"""Training configuration: dataclasses, the ``quick`` and ``paper`` presets, and the ablations.

``make_config(...)`` is what ``cdc-serve train`` calls. It starts from a preset, applies
the command-line overrides and one of the paper's Table 2 ablations, and validates
everything it can before any data is read (``B % B_s == 0``, ``K <= B``, known names),
raising :class:`cdc_serve.CDCError` with a message naming the problem.

Presets
- ``quick``: the small CNN on a 2-core CPU. The whole pipeline (MoCo-v2 pretraining,
  K-means baseline, prototype init, CDC, evaluation) on all 70,000 Fashion-MNIST images
  runs in well under 10 minutes; the settings were tuned on that data (docs/BENCHMARKS.md).
- ``paper``: ResNet-34 and the reference settings (App. B.1 and reference-facts.md):
  MoCo-v2 1000 epochs, CDC 100 epochs, ``B = 1000``, ``B_s = 500``, ``K = 500``, Adam
  1e-4 (heads) / 5e-5 (encoder). Meant for a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cdc_serve import CDCError
from cdc_serve_training.moco import QUICK_MOCO, MocoConfig

PRESETS = ("quick", "paper")
METHODS = ("cdc", "ruc")
SPLITS = ("train", "test", "all")
BACKBONE_NAMES = ("smallcnn", "resnet18", "resnet34")


@dataclass
class DataConfig:
    """Which images to train on."""

    name: str = "fashion-mnist"
    root: str | None = None
    split: str = "all"
    limit: int | None = None
    download: bool = False


@dataclass
class InitConfig:
    """Prototype initialisation of the heads (paper Sec. 3.3; init.py)."""

    hidden: int = 512  # H, the heads' hidden size
    ortho_steps: int = 2000  # "orthogonalisation" refinement steps per weight matrix
    ortho_lr: float = 0.1
    kmeans_iters: int = 100
    max_samples: int | None = None  # K-means of the init on a random subset (CPU shortcut)
    kmeans_restarts: int = 1  # K-means runs per prototype set; the lowest inertia is kept


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
    # ablations (paper Table 2)
    init: str = "prototype"  # "prototype" | "random"
    selection: str = "dynamic"  # "dynamic" (Eq. 4) | "fixed"
    fixed_threshold: float = 0.99
    heads: str = "dual"  # "dual" | "clu" | "clu+cal"
    stop_gradient: bool = True


@dataclass
class TrainConfig:
    """Everything ``pipeline.train`` needs; ``to_dict()`` is stored in model.pth."""

    data: DataConfig
    backbone: str
    moco: MocoConfig
    init: InitConfig
    cdc: CDCConfig
    out: str
    preset: str = "quick"
    method: str = "cdc"
    ruc: Any = None  # ruc.RUCConfig when method == "ruc"
    init_from: str | None = None  # RUC: "kmeans", a CDC model.pth or a labels .npy/.csv
    ablation: str | None = None
    device: str = "auto"
    seed: int = 0
    amp: bool = True  # bf16 autocast, on CUDA only
    eval_batch_size: int = 1024
    progress: bool = True
    augment: dict = field(default_factory=dict)  # keyword arguments of augment.Augmenter
    pretrain_limit: int | None = None  # MoCo on a seeded random subset of this many images

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Ablations (paper Table 2): name -> changes to CDCConfig
# ----------------------------------------------------------------------------------------------

ABLATIONS: dict[str, dict[str, Any]] = {
    "random-init": {"init": "random"},  # Table 2-I "w/o Init. + CDC"
    "fixed-0.99": {"selection": "fixed", "fixed_threshold": 0.99},  # Table 2-II
    "fixed-0.95": {"selection": "fixed", "fixed_threshold": 0.95},
    "fixed-0.9": {"selection": "fixed", "fixed_threshold": 0.90},
    "fixed-0.8": {"selection": "fixed", "fixed_threshold": 0.80},
    "single-head-clu": {"heads": "clu"},  # Table 2-III
    "single-head-clu+cal": {"heads": "clu+cal"},  # Table 2-IV
    "no-stop-gradient": {"stop_gradient": False},  # Table 2-V
}


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _quick_preset() -> dict[str, Any]:
    """Small CNN, few epochs: the whole pipeline on 70,000 28x28 images in < 10 min on 2 cores.

    Tuned on Fashion-MNIST (all 70,000 images; 320 s on an idle 2-core machine); every
    knob trades accuracy for CPU time:

    - MoCo-v2 for 8 epochs with a small projector and queue (``moco.QUICK_MOCO``);
    - CDC for 4 epochs with larger learning rates than the paper's 100-epoch schedule
      (Adam 1e-3 heads / 3e-4 encoder; 5e-4 / 1e-4 gained less in the same time);
    - a milder strong view (2 RandAugment ops, 8-px Cutout, 40-100 % crops): with the
      paper's 4 ops, half-side Cutout and 20-100 % crops the few CDC steps fitted the
      pseudo-labels poorly on 28-px images;
    - coarse mini-clusters, ``K = 10`` per ``B = 1,000`` images (about 100 images each),
      and ``w_en = 4``: the calibration target of Eq. 1 averages the clustering head over a
      larger neighbourhood, which is what brings the calibration head's confidence down to
      its accuracy after so short a schedule (K = 20: ECE 8.8-11 %); against ``w_en = 2``
      the stronger entropy term lowered ECE in 6 of 9 paired runs (by 0.6 points on
      average, 1 point on the default command) at the same ACC, and raised it by 1-1.5
      points in the other 3;
    - ``label_by="column"`` (see :func:`cdc.select_pseudo_labels`): with coarse
      mini-clusters the calibration head is less confident and, labelled by argmax, a
      cluster could lose every pseudo-label and die (ACC then fell below K-means);
    - no orthogonalisation step (it cost ~2 points of ACC right after the init here);
      the init's K-means on a 20,000-image subset.

    Measured (seed 0, docs/BENCHMARKS.md): CDC-Cal ACC 64.3 % vs 51.7 % for K-means on
    the same backbone, ECE 3.0 % vs 19.3 % for the clustering head. The seed decides
    the accuracy: of nine runs (three seeds, with and without restarts of the init's
    K-means, and before and after the channels-last step), five stop at ACC 55-56 % (two
    look-alike clusters merged early do not split again in 4 epochs), with ECE 2.8-5.9 %
    over all nine.
    """
    moco = dataclasses.replace(QUICK_MOCO)  # a copy: configs are mutable
    init = InitConfig(hidden=128, ortho_steps=0, ortho_lr=0.1, kmeans_iters=50, max_samples=20000)
    cdc = CDCConfig(
        epochs=4,
        batch_size=1000,
        sub_batch_size=500,
        mini_clusters=10,
        lr_heads=1e-3,
        lr_encoder=3e-4,
        w_en=4.0,
        kmeans_iters=10,
        label_by="column",
    )
    augment = {"strong_ops": 2, "cutout": 8, "crop_scale": (0.4, 1.0)}
    return {"backbone": "smallcnn", "moco": moco, "init": init, "cdc": cdc,
            "augment": augment, "pretrain_limit": None}  # fmt: skip


def _paper_preset() -> dict[str, Any]:
    """The paper's settings (App. B.1, reference-facts.md) with ResNet-34."""
    return {"backbone": "resnet34", "moco": MocoConfig(), "init": InitConfig(), "cdc": CDCConfig()}


_PRESETS = {"quick": _quick_preset, "paper": _paper_preset}


def _known_dataset(name: str) -> bool:
    from cdc_serve_training.data import DATASETS, parse_class_filter

    name = parse_class_filter(name)[0]  # "fashion-mnist[0-7]" is fashion-mnist, 8 classes
    return name in DATASETS or (name.startswith("imagefolder:") and len(name) > len("imagefolder:"))


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
    """Check the settings that do not need the data; CDCError naming the problem otherwise."""
    c = config.cdc
    if c.epochs < 0 or config.moco.epochs < 0:
        raise CDCError("epochs must be >= 0")
    if c.batch_size < 1 or c.sub_batch_size < 1:
        raise CDCError(f"batch sizes must be positive (B={c.batch_size}, B_s={c.sub_batch_size})")
    if c.batch_size % c.sub_batch_size != 0:
        raise CDCError(
            f"the batch size B={c.batch_size} is not divisible by the sub-batch size "
            f"B_s={c.sub_batch_size}"
        )
    if not 1 <= c.mini_clusters <= c.batch_size:
        raise CDCError(
            f"the number of mini-clusters K={c.mini_clusters} must be between 1 and the "
            f"batch size B={c.batch_size}"
        )
    if c.init not in ("prototype", "random"):
        raise CDCError(f"unknown head initialisation {c.init!r}; use prototype or random")
    if c.selection not in ("dynamic", "fixed"):
        raise CDCError(f"unknown selection {c.selection!r}; use dynamic or fixed")
    if not 0.0 < c.fixed_threshold <= 1.0:
        raise CDCError(f"the fixed threshold must be in (0, 1], got {c.fixed_threshold}")
    if c.label_by not in ("argmax", "column"):
        raise CDCError(f"unknown pseudo-label rule {c.label_by!r}; use argmax or column")
    if c.heads not in ("dual", "clu", "clu+cal"):
        raise CDCError(f"unknown head setting {c.heads!r}; use dual, clu or clu+cal")
    if c.lr_heads <= 0 or c.lr_encoder < 0:
        raise CDCError("learning rates must be positive")
    if config.init.hidden < 1:
        raise CDCError(f"the hidden size must be positive, got {config.init.hidden}")
    if config.backbone not in BACKBONE_NAMES:
        raise CDCError(
            f"unknown backbone {config.backbone!r}; use one of {', '.join(BACKBONE_NAMES)}"
        )
    if config.method not in METHODS:
        raise CDCError(f"unknown method {config.method!r}; use cdc or ruc")
    if config.data.split not in SPLITS:
        raise CDCError(f"unknown split {config.data.split!r}; use train, test or all")
    if config.data.limit is not None and config.data.limit < 1:
        raise CDCError(f"--limit must be a positive number of images, got {config.data.limit}")
    if not _known_dataset(config.data.name):
        from cdc_serve_training.data import dataset_names

        raise CDCError(f"unknown dataset {config.data.name!r}; known: {', '.join(dataset_names())}")
    _check_device(config.device)
    return config


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
    if config.init.hidden < num_classes and config.cdc.init == "prototype":
        raise CDCError(
            f"the hidden size {config.init.hidden} is smaller than the {num_classes} classes"
        )


def _scale_for_limit(cdc: CDCConfig, limit: int) -> None:
    """Small --limit runs: shrink B (and B_s, K with it) so that a few batches fit."""
    while cdc.batch_size > limit // 2 and cdc.batch_size % 2 == 0 and cdc.sub_batch_size % 2 == 0:
        cdc.batch_size //= 2
        cdc.sub_batch_size //= 2
        cdc.mini_clusters = max(1, cdc.mini_clusters // 2)


def make_config(
    *,
    preset: str,
    dataset: str,
    out: str,
    method: str = "cdc",
    init_from: str | None = None,
    data_root: str | None = None,
    split: str = "all",
    backbone: str | None = None,
    epochs: int | None = None,
    pretrain_epochs: int | None = None,
    ablation: str | None = None,
    device: str = "auto",
    seed: int = 0,
    limit: int | None = None,
    download: bool = False,
) -> TrainConfig:
    """The configuration of one training run (what ``cdc-serve train`` builds); validated."""
    if preset not in _PRESETS:
        raise CDCError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    settings = _PRESETS[preset]()
    moco, init, cdc = settings["moco"], settings["init"], settings["cdc"]
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise CDCError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
        cdc = dataclasses.replace(cdc, **ABLATIONS[ablation])
    if limit is not None and limit >= 1:
        _scale_for_limit(cdc, limit)
    if pretrain_epochs is not None:
        moco.epochs = pretrain_epochs

    ruc = None
    if method == "ruc":
        from cdc_serve_training.ruc import QUICK_RUC, RUCConfig

        ruc = dataclasses.replace(QUICK_RUC) if preset == "quick" else RUCConfig()
        if epochs is not None:
            ruc.epochs = epochs
    elif epochs is not None:
        cdc.epochs = epochs
    if init_from is not None and method != "ruc":
        raise CDCError("--init-from is for --method ruc only")

    config = TrainConfig(
        data=DataConfig(name=dataset, root=data_root, split=split, limit=limit, download=download),
        backbone=backbone or settings["backbone"],
        moco=moco,
        init=init,
        cdc=cdc,
        out=str(out),
        preset=preset,
        method=method,
        ruc=ruc,
        init_from=init_from,
        ablation=ablation,
        device=device,
        seed=seed,
        augment=dict(settings.get("augment", {})),
        pretrain_limit=settings.get("pretrain_limit"),
    )
    return validate(config)


__all__ = [
    "ABLATIONS",
    "PRESETS",
    "CDCConfig",
    "DataConfig",
    "InitConfig",
    "TrainConfig",
    "make_config",
    "validate",
    "validate_against_data",
]
