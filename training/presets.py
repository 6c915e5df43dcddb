"""The presets of ``cdc-serve train``, the paper's Table 2 ablations, and ``make_config``.

``make_config(...)`` is what ``cdc-serve train`` calls: it starts from a preset, applies
the command-line overrides and one of the ablations, and validates everything it can
before any data is read (``TrainConfig.validate``). The settings' types and their checks
are in ``config.py``.

Presets
- ``quick``: the small CNN on a 2-core CPU. The whole pipeline (MoCo-v2 pretraining,
  K-means baseline, prototype init, CDC, evaluation) on all 70,000 Fashion-MNIST images
  runs in well under 10 minutes; the settings were tuned on that data (docs/BENCHMARKS.md).
- ``standard``: the quick preset's network and schedule, with the best of three
  initialisations kept without labels (``--restarts 3``): about 12 minutes for 70,000
  images on 2 cores; on none of the five seeds measured did it keep a bad-group run.
- ``paper``: ResNet-34 and the reference settings (App. B.1 and reference-facts.md):
  MoCo-v2 1000 epochs, CDC 100 epochs, ``B = 1000``, ``B_s = 500``, ``K = 500``, Adam
  1e-4 (heads) / 5e-5 (encoder). Meant for a GPU.

``--epochs`` is the method's own stage: CDC epochs with ``--method cdc``, RUC epochs with
``--method ruc``; ``--pretrain-epochs`` sets MoCo-v2's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cdc_serve import CDCError
from cdc_serve_training.config import (
    AugmentConfig,
    CDCConfig,
    DataConfig,
    InitConfig,
    Method,
    MocoConfig,
    ModelConfig,
    Preset,
    RUCConfig,
    TrainConfig,
    check_choice,
)

# The paper's settings (ResNet-34, GPU).
PAPER_MOCO = MocoConfig()

# The quick preset's pretraining: small CNN on a 2-core CPU, all 70,000 Fashion-MNIST
# images in about 2.5-3 minutes on a quiet machine (8 epochs of ~20 s each). A short run
# wants a high learning rate, a small queue and a small projector. 4 epochs took half the
# time but gave a backbone on which CDC's clusters were less stable (ACC below K-means
# with the quick preset's CDC settings).
QUICK_MOCO = MocoConfig(
    epochs=8,
    batch_size=256,
    lr=0.5,
    momentum=0.9,
    weight_decay=1e-4,
    temperature=0.2,
    queue_size=8192,
    key_momentum=0.99,
    proj_hidden=512,
    proj_dim=128,
    warmup_epochs=0.1,
)

#: CPU preset: RUC on the pseudo-labels of all 70,000 Fashion-MNIST images with the
#: quick small CNN in about 2 minutes on 2 cores: 20 epochs of 30 steps per network with
#: batches of 64 clean + 64 unclean images, one weak view (M = 1) for the guesses, and
#: co-refurbishing scored on at most 8,192 unclean samples per epoch. Everything else
#: (lr, lambda_U, eps, T, alpha, tau_1, k, tau_2 schedule) as in the paper. The heads'
#: width is the quick preset's model.hidden (128). 20 epochs, not 3: on the quick CDC
#: model of seed 0 (its clustering head 68.7 %) RUC ended at 65.6 % after 3 epochs,
#: 68.2 % after 10 and 68.7 % after 20; with 20, RUC on the CDC and the K-means labels of
#: seeds 0 and 1 ends at least as accurate as its input and with a lower ECE
#: (docs/BENCHMARKS.md "RUC, longer").
QUICK_RUC = RUCConfig(
    epochs=20,
    batch_size=64,
    steps_per_epoch=30,
    num_views=1,
    rampup_epochs=1.0,
    refurbish_max=8192,
)


# ----------------------------------------------------------------------------------------------
# Ablations (paper Table 2): name -> changes to one section
# ----------------------------------------------------------------------------------------------

ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "random-init": {"init": {"head_init": "random"}},  # Table 2-I "w/o Init. + CDC"
    "fixed-0.99": {"cdc": {"selection": "fixed", "fixed_threshold": 0.99}},  # Table 2-II
    "fixed-0.95": {"cdc": {"selection": "fixed", "fixed_threshold": 0.95}},
    "fixed-0.9": {"cdc": {"selection": "fixed", "fixed_threshold": 0.90}},
    "fixed-0.8": {"cdc": {"selection": "fixed", "fixed_threshold": 0.80}},
    "single-head-clu": {"cdc": {"heads": "clu"}},  # Table 2-III
    "single-head-clu+cal": {"cdc": {"heads": "clu+cal"}},  # Table 2-IV
    "no-stop-gradient": {"cdc": {"stop_gradient": False}},  # Table 2-V
}


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _quick_preset() -> dict[str, Any]:
    """Small CNN, few epochs: the whole pipeline on 70,000 28x28 images in < 10 min on 2 cores.

    Tuned on Fashion-MNIST (all 70,000 images; 431 s on an idle 2-core machine); every
    knob trades accuracy for CPU time:

    - MoCo-v2 for 8 epochs with a small projector and queue (``moco.QUICK_MOCO``);
    - CDC for 4 epochs with larger learning rates than the paper's 100-epoch schedule
      (Adam 1e-3 heads / 3e-4 encoder; 5e-4 / 1e-4 gained less in the same time);
    - a milder strong view (2 RandAugment ops, 8-px Cutout, 40-100 % crops): with the
      paper's 4 ops, half-side Cutout and 20-100 % crops the few CDC steps fitted the
      pseudo-labels poorly on 28-px images;
    - ``K = 20`` mini-clusters per ``B = 1,000`` images (about 50 images each) with a
      strong entropy weight ``w_en = 12``. Eq. 1's target is the mean clustering-head
      prediction of a sample's mini-cluster, so ``K`` sets how finely the calibration
      head can tell easy images from hard ones: with ``K = 10`` (about one mini-cluster
      per class) the target is a class average, and the images the head was surest of
      were 99 % correct at a confidence of 0.93. Finer mini-clusters alone make the head
      over-confident (``K = 20`` with ``w_en = 1``: ECE 8.8-11 %, with 8: 6.0 %); the
      entropy term brings its confidence back down. Against ``K = 10``, ``w_en = 4`` on
      the same backbones and initialisations (seeds 0-3, docs/BENCHMARKS.md "Finer
      mini-clusters"): ACC +2.3 to +4.6 points, two to three times as many images at or
      above 0.8, their estimate 0.8-5.7 points from their accuracy (was 4.3-6.7), ECE
      3.4-6.3 % (was 3.0-7.2 %);
    - ``label_by="column"`` (see :func:`cdc.select_pseudo_labels`): with coarse
      targets the calibration head is less confident and, labelled by argmax, a
      cluster could lose every pseudo-label and die (ACC then fell below K-means);
    - the paper's prototype init (Sec. 3.3), its K-means on a 20,000-image subset, no
      orthogonalisation step (it cost ~2 points of ACC right after the init here), and
      each of its two K-means the lowest-inertia of 10 k-means++ draws
      (``kmeans_restarts``, about 12 s more). With one draw, the partition depends on
      the draw: on two backbones it gave 48.7-51.5 % ACC and, in 4 of 6 draws, only
      three clusters for Sandal, Sneaker, Ankle boot and Bag; CDC then ended in the
      bad group below on 3 of 6. With 10 draws every seed gave the same kind of
      partition (53.5-55.2 %, four such clusters, 10 of 10), and CDC 67.4-70.8 % in all
      14 runs measured: six inits on those two backbones, seeds 0-4 from scratch, seeds
      0-2 under torchrun (docs/BENCHMARKS.md "One K-means draw"). A
      random head (``--head-init random``) was measured against it twice, three
      initialisations on each of several backbones (docs/BENCHMARKS.md "Random head
      initialisation"): ahead on one machine (seeds 0-4 at 67.4-70.9 % against
      56.8-67.9 %), behind on another (seeds 0-2: 62.7-66.6 % against 66.3-67.8 %),
      and landing in the bad group below about as often. So the presets keep the
      paper's init.

    Measured (seeds 0-4 from scratch, 2-core Intel Xeon, docs/BENCHMARKS.md): CDC-Cal
    ACC 67.4-70.8 %, 10-20 points above K-means on the same backbone, ECE 3.0-5.9 %
    (seed 0: 69.3 % at 3.9 %), 5-6 minutes a run. With one K-means draw the seed decided
    the accuracy: an initialisation either reached 63-71 % or stopped at 51-59 %, where
    two unlike classes share a cluster (Ankle boot with Bag, Sneaker with Sandal;
    docs/BENCHMARKS.md) and the tops are spread over one cluster more (merged at the
    init, they do not split again in 4 epochs). The 10 draws above remove that split
    on the backbones measured. ``--restarts 3`` (``restarts.py``) still trains three
    initialisations and keeps the one that expects the most; with 10 draws its
    candidates differ by less than a point. That takes about 2 minutes more per
    candidate on 2 cores, so quick keeps one.
    """
    init = InitConfig(
        ortho_steps=0, ortho_lr=0.1, kmeans_iters=50, max_samples=20000, kmeans_restarts=10
    )
    cdc = CDCConfig(
        epochs=4,
        batch_size=1000,
        sub_batch_size=500,
        mini_clusters=20,
        lr_heads=1e-3,
        lr_encoder=3e-4,
        w_en=12.0,
        kmeans_iters=10,
        label_by="column",
    )
    return {
        "model": ModelConfig(backbone="smallcnn", hidden=128),
        "moco": dataclasses.replace(QUICK_MOCO),  # a copy: configs are mutable
        "init": init,
        "cdc": cdc,
        "ruc": lambda: dataclasses.replace(QUICK_RUC),
        "augment": AugmentConfig(strong_ops=2, cutout=8, crop_scale=(0.4, 1.0)),
        "restarts": 1,
    }


def _standard_preset() -> dict[str, Any]:
    """The quick preset's settings, and the best of three initialisations (``--restarts 3``).

    What the measurements on all 70,000 Fashion-MNIST images point to (2-core CPU,
    docs/BENCHMARKS.md "The standard preset"): 2 of the 15 initialisations measured ended
    in the bad group (56.8 % where the others reach 63-70 %); three candidates
    on the one backbone, judged by their calibration heads' own estimate, kept a model
    of 67.7-68.4 % on each of seeds 0-4, in 11-12 minutes a run. Longer schedules did
    not buy accuracy: 50 MoCo-v2 epochs instead of 8 raised K-means on the features by
    3 points and CDC by none, and a small CNN twice as wide (the same +3 for K-means)
    gave 64.2 % on seed 0 at 2.4 times the cost. So ``standard`` spends its time on
    candidates, not on longer training. Those figures are of the init with one K-means
    draw; since the quick preset takes the best of 10 draws, the three candidates start
    from nearly the same partition and end within a point of each other (67.5-68.5 % on
    two backbones, 2026-12-03), so ``standard`` buys little over ``quick`` now.
    """
    settings = _quick_preset()
    settings["restarts"] = 3
    return settings


def _paper_preset() -> dict[str, Any]:
    """The paper's settings (App. B.1, reference-facts.md) with ResNet-34."""
    return {
        "model": ModelConfig(backbone="resnet34", hidden=512),
        "moco": MocoConfig(),
        "init": InitConfig(),
        "cdc": CDCConfig(),
        "ruc": lambda: RUCConfig(),
        "augment": AugmentConfig(),
        "restarts": 1,
    }


_PRESETS = {"quick": _quick_preset, "standard": _standard_preset, "paper": _paper_preset}

# The input size of an image folder's images unless --input-size says otherwise: small
# for the CPU preset, the STL-10 size for the paper's ResNet (never the images' own size:
# 12-MP photos would not fit a training batch).
FOLDER_INPUT_SIZE = {"quick": 32, "standard": 32, "paper": 96}


def _scale_for_limit(cdc: CDCConfig, limit: int) -> None:
    """Small --limit runs: shrink B (and B_s, K with it) so that a few batches fit."""
    while cdc.batch_size > limit // 2 and cdc.batch_size % 2 == 0 and cdc.sub_batch_size % 2 == 0:
        cdc.batch_size //= 2
        cdc.sub_batch_size //= 2
        cdc.mini_clusters = max(1, cdc.mini_clusters // 2)


def apply_ablation(config: TrainConfig, ablation: str) -> None:
    """Change ``config`` in place as one of the paper's Table 2 rows does."""
    if ablation not in ABLATIONS:
        raise CDCError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    for section, changes in ABLATIONS[ablation].items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **changes))
    config.ablation = ablation


def make_config(
    *,
    preset: str,
    dataset: str,
    out: str,
    method: str = "cdc",
    labels_from: str | None = None,
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
    num_clusters: int | None = None,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    strict: bool = False,
    batch_size: int | None = None,
    sub_batch_size: int | None = None,
    mini_clusters: int | None = None,
    backbone_weights: str | None = None,
    labels: str | None = None,
    restarts: int | None = None,
    input_norm: str = "auto",
    head_init: str | None = None,
) -> TrainConfig:
    """The configuration of one training run (what ``cdc-serve train`` builds); validated.

    ``epochs`` is the method's own stage: CDC epochs for ``cdc``, RUC epochs for ``ruc``.
    ``input_norm`` ``auto`` is ``object`` for image folders and ``dataset`` otherwise;
    ``restarts`` ``None`` is the preset's for CDC (3 for ``standard``, 1 for the others)
    and 1 for RUC. ``head_init`` ``None`` is the preset's (the paper's ``prototype``
    init in all three); an ablation's own setting wins over it.
    """
    check_choice(preset, Preset, "preset")
    check_choice(method, Method, "method")
    settings = _PRESETS[preset]()
    if restarts is None:  # the preset's; RUC refines one given clustering
        restarts = settings["restarts"] if method == "cdc" else 1
    config = TrainConfig(
        data=DataConfig(
            name=dataset,
            root=data_root,
            split=split,
            limit=limit,
            download=download,
            num_clusters=num_clusters,
            channels=channels,
            strict=strict,
            labels=labels,
            input_size=input_size
            or ((FOLDER_INPUT_SIZE[preset],) * 2 if dataset.startswith("imagefolder:") else None),
        ),  # fmt: skip
        model=settings["model"],
        moco=settings["moco"],
        init=settings["init"],
        cdc=settings["cdc"],
        augment=settings["augment"],
        out=str(out),
        preset=preset,
        method=method,
        ruc=settings["ruc"]() if method == "ruc" else None,
        labels_from=labels_from,
        device=device,
        seed=seed,
        restarts=restarts,
    )
    if backbone is not None:
        config.model.backbone = backbone
    config.model.weights = backbone_weights
    if input_norm == "auto":
        input_norm = "object" if dataset.startswith("imagefolder:") else "dataset"
    else:
        config.set_by_user.append("input_norm")
    config.model.input_norm = input_norm
    if head_init is not None:
        config.init.head_init = head_init
    if ablation is not None:
        apply_ablation(config, ablation)
    if limit is not None and limit >= 1:
        _scale_for_limit(config.cdc, limit)
    if pretrain_epochs is not None:
        config.moco.epochs = pretrain_epochs
        config.set_by_user.append("pretrain_epochs")
    if epochs is not None:
        (config.ruc if method == "ruc" else config.cdc).epochs = epochs
        config.set_by_user.append("epochs")
    given = {"batch_size": batch_size, "sub_batch_size": sub_batch_size,
             "mini_clusters": mini_clusters}  # fmt: skip
    for key, value in given.items():
        if value is not None:
            setattr(config.cdc, key, value)
            config.set_by_user.append(key)
    return config.validate()


# A quick-preset image folder smaller than this trains for more epochs (MoCo-v2 at most
# FOLDER_MAX_EPOCH_SCALE times the preset's, CDC half that factor): about as many MoCo-v2
# steps as this many images give.
FOLDER_REFERENCE_IMAGES = 50_000
FOLDER_MAX_EPOCH_SCALE = 5


def folder_epoch_scale(n_images: int) -> tuple[int, int]:
    """How many times the preset's MoCo-v2 and CDC epochs a folder of ``n_images`` trains."""
    moco = max(1, min(FOLDER_MAX_EPOCH_SCALE, FOLDER_REFERENCE_IMAGES // max(n_images, 1)))
    return moco, max(1, moco // 2)


def _scale_folder_epochs(config: TrainConfig, n_images: int) -> list[str]:
    """A small image folder's MoCo-v2 and CDC epochs with quick or standard, in place (the
    log line, or none).

    The quick preset's 8 MoCo-v2 and 4 CDC epochs are made for 70,000 images. A folder of
    10,000 makes 39 MoCo-v2 steps an epoch against 273: on the coloured Fashion-MNIST
    folder its features then reach 41.7 % ACC, 50.5 % with 5 times the MoCo-v2 epochs
    (``docs/BENCHMARKS.md``). CDC's own epochs matter less, and its calibration was best
    at twice the preset's (ECE 5.6 / 8.2 % on two seeds, measured with the normalisation
    still in float32, against 7.3 / 11.0 % with 4
    epochs and 7.5 / 11.7 % with 20). So a quick (or standard) CDC run on an image folder under
    ``FOLDER_REFERENCE_IMAGES`` images trains ``folder_epoch_scale(n)`` times the
    preset's epochs (10,000 images: MoCo-v2 5 times, CDC 2 times), unless
    ``--pretrain-epochs`` / ``--epochs`` say otherwise. The paper preset's long schedule
    stays as it is.
    """
    moco_scale, cdc_scale = folder_epoch_scale(n_images)
    quick_cdc = config.preset in ("quick", "standard") and config.method == "cdc"
    if not config.data.is_folder or moco_scale == 1 or not quick_cdc:
        return []
    changed = []
    if "pretrain_epochs" not in config.set_by_user and config.moco.epochs > 0:
        config.moco.epochs *= moco_scale
        changed.append(f"MoCo-v2 {config.moco.epochs} epochs ({moco_scale}x)")
    if "epochs" not in config.set_by_user and config.cdc.epochs > 0 and cdc_scale > 1:
        config.cdc.epochs *= cdc_scale
        changed.append(f"CDC {config.cdc.epochs} epochs ({cdc_scale}x)")
    if not changed:
        return []
    return [
        f"{n_images} images: {', '.join(changed)} the preset's, for a folder under "
        f"{FOLDER_REFERENCE_IMAGES:,} images (set them with --pretrain-epochs, --epochs)"
    ]


def adapt_to_data(config: TrainConfig, n_images: int, world_size: int = 1) -> list[str]:
    """Batch sizes and a folder's epochs for small data sets, in place; returns what
    changed, for the log.

    The rule: when the CDC batch ``B`` is larger than half the data, ``B`` becomes half
    the data (two batches an epoch), the sub-batch ``B_s`` keeps its share of ``B`` (half,
    in both presets) and the mini-clusters ``K`` theirs (at least 1); MoCo-v2's batch
    halves while it is larger than half the data (down to 8). Settings given on the
    command line (``--batch-size``, ``--sub-batch-size``, ``--mini-clusters``) are left
    as they are. With the quick preset, 200 images train with ``B = 100``, ``B_s = 50``,
    ``K = 2`` and a MoCo batch of 64. With ``world_size`` processes (torchrun) ``B_s``
    is rounded down to a multiple of it, so that it splits over them. A small image
    folder also trains for more epochs (:func:`_scale_folder_epochs`).
    """
    lines = _scale_folder_epochs(config, n_images)
    cdc, moco = config.cdc, config.moco
    before = (cdc.batch_size, cdc.sub_batch_size, cdc.mini_clusters, moco.batch_size)
    fixed = set(config.set_by_user) & {"batch_size", "sub_batch_size", "mini_clusters"}
    if not fixed and cdc.batch_size > n_images // 2 >= 2:
        share = cdc.batch_size // cdc.sub_batch_size
        unit = share * world_size  # B a multiple of B / B_s, B_s of the processes
        new = max(unit, (n_images // 2) // unit * unit)
        cdc.mini_clusters = max(1, round(cdc.mini_clusters * new / cdc.batch_size))
        cdc.batch_size, cdc.sub_batch_size = new, new // share
    while moco.batch_size > n_images // 2 and moco.batch_size >= 16:
        moco.batch_size //= 2
    if (cdc.batch_size, cdc.sub_batch_size, cdc.mini_clusters, moco.batch_size) == before:
        return lines
    return [
        *lines,
        f"{n_images} images: CDC batch B={cdc.batch_size}, sub-batch B_s={cdc.sub_batch_size}, "
        f"mini-clusters K={cdc.mini_clusters}, MoCo batch {moco.batch_size} (smaller batches "
        "for small data; set them with --batch-size, --sub-batch-size, --mini-clusters)",
    ]
