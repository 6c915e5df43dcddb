"""``train(config)``: the whole training run behind ``cdc-serve train``, as a list of stages.

Each stage is a function of the run's state (:class:`Run`), timed and measured by one
helper (``recorder.StageRecorder``), and leaves its result in ``config.out`` so that
``resume=True`` skips what is done and continues an interrupted stage from its last
epoch. Every checkpoint carries the fingerprint of the settings it was made with
(``checkpoint.fingerprint``): resuming with other settings, another seed or another
number of images is refused with one error naming what changed.

1. data         ``load_dataset`` + checks that need the data (before any training)
2. pretrain     MoCo-v2 on the backbone (:func:`pretrained_backbone`)  -> ``backbone.pt``
                (epoch checkpoints in ``pretrain.ckpt``)
3. kmeans       backbone features of every image; K-means on them (the "MoCo-v2 +
                K-means" row of metrics.json)
4. init         initialisation of both heads (``init.py``)  -> ``init.pt``         [CDC]
5. cdc | ruc    CDC (``cdc.train_cdc``, checkpoints in ``cdc.ckpt``) or RUC
                (``ruc.run_ruc_stage``, checkpoints in ``ruc.ckpt``)
6. evaluate     both heads over the data (``evaluation.py``), OOD thresholds
                (``cdc_serve.ood.fit_ood``)
7. save         ``model.pth`` (``checkpoint.save_model``), ``metrics.json`` and
                ``train_log.json`` (per stage: seconds, peak RSS and, on CUDA, peak GPU
                memory; per-epoch history; metrics right after init; device name)
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve.metrics import METRICS_FILE, write_metrics
from cdc_serve_training.checkpoint import (
    arch_of,
    fingerprint,
    load_stage,
    save_model,
    save_stage,
)
from cdc_serve_training.config import TrainConfig, validate_against_data
from cdc_serve_training.evaluation import (
    backbone_features,
    head_metrics,
    infer,
    kmeans_baseline,
    metrics_json,
)
from cdc_serve_training.heads import ClusteringModel
from cdc_serve_training.recorder import StageRecorder, print_summary


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CDCError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def make_augmenter(config: TrainConfig, data):
    """The views of ``config.augment`` for ``data``'s size and normalisation."""
    from cdc_serve_training.augment import Augmenter

    return Augmenter(data.size, data.mean, data.std, **config.augment.options())


# ----------------------------------------------------------------------------------------------
# The pretrained backbone: one public function for training, ablations and RUC alike
# ----------------------------------------------------------------------------------------------


def backbone_fingerprint(config: TrainConfig, n_images: int) -> dict:
    """What ``backbone.pt`` must agree with to be reused (MoCo's epochs may grow)."""
    settings = {
        "backbone": config.model.backbone,
        "moco": asdict(config.moco),
        "augment": asdict(config.augment),
        "pretrain_limit": config.pretrain_limit,
    }
    return fingerprint("backbone", settings, seed=config.seed, n_images=n_images)


def pretrained_backbone(
    config: TrainConfig, data, device: torch.device, *, resume: bool, augmenter=None
) -> torch.nn.Module:
    """MoCo-v2 pretraining of ``config.model.backbone`` on ``data`` (``config.moco``).

    Writes ``backbone.pt`` into ``config.out``; with ``resume=True`` an existing one made
    with the same settings is reused (with more MoCo epochs, pretraining continues from
    ``pretrain.ckpt``). ``config.moco.epochs == 0`` keeps the random initialisation.
    Returns the backbone on ``device`` in eval mode.
    """
    from cdc_serve_training.backbones import build_backbone
    from cdc_serve_training.moco import pretrain_moco

    out = Path(config.out)
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.model.backbone, data.channels, data.size)
    done, stage = out / "backbone.pt", backbone_fingerprint(config, len(data))
    state = load_stage(done, stage) if resume else None
    if state is not None and state["epoch"] == config.moco.epochs:
        backbone.load_state_dict(state["state_dict"])
        _log(f"pretrain: reusing {done}", config.progress)
        return backbone.to(device).eval()
    if config.moco.epochs > 0:
        pretrain_data = data
        if config.pretrain_limit is not None and config.pretrain_limit < len(data):
            generator = torch.Generator().manual_seed(config.seed)
            pick = torch.randperm(len(data), generator=generator)[: config.pretrain_limit]
            pretrain_data = data.subset(pick.sort().values)
        backbone = pretrain_moco(
            backbone,
            pretrain_data,
            augmenter or make_augmenter(config, data),
            config.moco,
            device,
            seed=config.seed,
            checkpoint_path=out / "pretrain.ckpt",
            resume=resume,
            progress=config.progress,
            amp=config.amp and device.type == "cuda",
        )
    save_stage(
        done,
        stage,
        config.moco.epochs,
        backbone=config.model.backbone,
        state_dict=backbone.state_dict(),
    )
    return backbone.to(device).eval()


# ----------------------------------------------------------------------------------------------
# The run and its stages
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The state one stage hands to the next."""

    config: TrainConfig
    resume: bool
    device: torch.device
    recorder: StageRecorder
    data: Any = None
    augmenter: Any = None
    backbone: torch.nn.Module | None = None
    features: torch.Tensor | None = None
    kmeans_row: dict | None = None
    model: ClusteringModel | None = None
    result: dict | None = None
    metrics: dict | None = None
    ood: dict | None = None
    log: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def stage_data(run: Run) -> None:
    """1. The images, checked against the configuration."""
    from cdc_serve_training.data import load_dataset

    config, d = run.config, run.config.data
    run.data = load_dataset(d.name, d.root, d.split, d.download, d.limit, config.seed)
    validate_against_data(config, len(run.data), run.data.num_classes)
    _log(
        f"{run.data.name}: {len(run.data)} images, {run.data.num_classes} classes, "
        f"device {run.device}",
        config.progress,
    )
    run.augmenter = make_augmenter(config, run.data)


def stage_pretrain(run: Run) -> None:
    """2. MoCo-v2 pretraining, or ``backbone.pt`` from an earlier run when resuming."""
    run.backbone = pretrained_backbone(
        run.config, run.data, run.device, resume=run.resume, augmenter=run.augmenter
    )


def stage_kmeans(run: Run) -> None:
    """3. Backbone features of every image, and the K-means baseline when labels exist."""
    config, data = run.config, run.data
    run.features = backbone_features(run.backbone, data, run.device, config.eval_batch_size)
    if data.labels is not None:
        run.kmeans_row = kmeans_baseline(
            run.features, data.labels, data.num_classes, seed=config.seed
        )
        _log(f"K-means on the backbone features: acc {run.kmeans_row['acc']:.4f}", config.progress)


def init_fingerprint(config: TrainConfig, n_images: int) -> dict:
    """What ``init.pt`` must agree with to be reused."""
    settings = {"init": asdict(config.init), "model": asdict(config.model)}
    return fingerprint("init", settings, seed=config.seed, n_images=n_images)


def stage_init(run: Run) -> None:
    """4. Both heads initialised (prototypes or random), or ``init.pt`` when resuming."""
    from cdc_serve_training.init import init_heads

    config, data, features = run.config, run.data, run.features
    model = ClusteringModel(run.backbone, config.model.hidden, data.num_classes)
    model = model.to(features.device)
    done, stage = run.out / "init.pt", init_fingerprint(config, len(data))
    state = load_stage(done, stage, features.device) if run.resume else None
    if state is not None:
        model.load_state_dict(state["state_dict"])
    else:
        init_heads(
            model,
            features,
            method=config.init.head_init,
            hidden=config.model.hidden,
            ortho_steps=config.init.ortho_steps,
            ortho_lr=config.init.ortho_lr,
            kmeans_iters=config.init.kmeans_iters,
            max_samples=config.init.max_samples,
            kmeans_restarts=config.init.kmeans_restarts,
            seed=config.seed,
        )
        save_stage(done, stage, 0, state_dict=model.state_dict())
    run.model = model
    run.log["init_metrics"] = _init_metrics(model, features, data.labels)


def _init_metrics(model: ClusteringModel, features: torch.Tensor, labels) -> dict | None:
    """Metrics of the clustering head right after initialisation (Table 2-I rows)."""
    if labels is None:
        return None
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model.clu_head(features).float(), dim=1)
    return head_metrics(labels, probs)


def stage_cdc(run: Run) -> None:
    """5. CDC training (Algorithm 1), checkpoints in ``cdc.ckpt``."""
    from cdc_serve_training.cdc import train_cdc

    config = run.config
    run.log["history"] = train_cdc(
        run.model,
        run.data,
        run.augmenter,
        config.cdc,
        run.device,
        seed=config.seed,
        checkpoint_path=run.out / "cdc.ckpt",
        resume=run.resume,
        progress=config.progress,
        amp=config.amp and run.device.type == "cuda",
    )


def stage_ruc(run: Run) -> None:
    """5. RUC on the chosen pseudo-labels, checkpoints in ``ruc.ckpt``."""
    from cdc_serve_training.ruc import run_ruc_stage

    run.model, run.log["ruc_report"] = run_ruc_stage(
        run.config, run.data, run.backbone, run.features, run.device, run.out, run.resume,
        run.augmenter,
    )  # fmt: skip


def stage_evaluate(run: Run) -> None:
    """6. Both heads over the data: metrics (with labels) and the OOD thresholds."""
    from cdc_serve.ood import fit_ood

    config, data = run.config, run.data
    run.result = infer(run.model, data, run.device, config.eval_batch_size)
    if data.labels is not None:
        run.metrics = metrics_json(
            data.name,
            config.data.split,
            len(data),
            run.kmeans_row,
            head_metrics(data.labels, run.result["clu_probs"]),
            head_metrics(data.labels, run.result["cal_probs"]),
        )
    else:
        run.metrics = {
            "dataset": data.name,
            "split": config.data.split,
            "n": len(data),
            "heads": {},
        }
    run.ood = fit_ood(run.result["features"], run.result["cal_probs"])


def stage_save(run: Run) -> None:
    """7. ``model.pth`` and ``metrics.json``."""
    config, data = run.config, run.data
    save_model(
        run.out / "model.pth",
        run.model.cpu(),
        method=config.method,
        arch=arch_of(run.model, config.model.backbone, data.channels, data.size),
        preprocess=data.preprocess(),
        config=config.to_dict(),
        dataset=data.name,
        metrics=run.metrics,
        ood=run.ood,
    )
    write_metrics(run.out / METRICS_FILE, run.metrics)


STAGES = {
    "cdc": (stage_data, stage_pretrain, stage_kmeans, stage_init, stage_cdc, stage_evaluate,
            stage_save),
    "ruc": (stage_data, stage_pretrain, stage_kmeans, stage_ruc, stage_evaluate, stage_save),
}  # fmt: skip


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run every stage; returns the path of ``model.pth`` (``metrics.json`` lies beside it)."""
    config = config.validate()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    run = Run(config=config, resume=resume, device=device, recorder=StageRecorder(device))
    run.log["config"] = config.to_dict()
    for stage in STAGES[config.method]:
        with run.recorder.stage(stage.__name__.removeprefix("stage_")):
            stage(run)
    run.log.update(run.recorder.log())
    (run.out / "train_log.json").write_text(json.dumps(run.log, indent=2, default=str) + "\n")
    print_summary(run.metrics, run.recorder)
    return run.out / "model.pth"
