"""``train(config)``: the whole training run behind ``cdc-serve train``, as a list of stages.

Each stage is a function of the run's state (:class:`Run`), timed and measured by one
helper (``recorder.StageRecorder``), and leaves its result in ``config.out`` so that
``resume=True`` skips what is done and continues an interrupted stage from its last
epoch. Every checkpoint carries the fingerprint of the settings it was made with
(``checkpoint.fingerprint``): resuming with other settings, another seed or another
number of images is refused with one error naming what changed.

1. data         ``load_dataset`` + checks that need the data (before any training)
2. pretrain     MoCo-v2 on the backbone (:func:`pretrained_backbone`)  -> ``backbone.pt``
                (epoch checkpoints in ``pretrain.ckpt``); RUC on a model's clustering
                (``--init-from model.pth``) starts from that model's backbone instead
3. kmeans       backbone features of every image; K-means on them (the "MoCo-v2 +
                K-means" row of metrics.json)
4. init         initialisation of both heads (``init.py``)  -> ``init.pt``         [CDC]
5. cdc | ruc    CDC (``cdc.train_cdc``, checkpoints in ``cdc.ckpt``) or RUC
                (``ruc.run_ruc_stage``, checkpoints in ``ruc.ckpt``)
4.-5. restarts  ``--restarts N``: init + CDC N times on the one backbone, the candidate
                whose calibration head expects the highest accuracy kept (``restarts.py``)
6. evaluate     both heads over the data (``evaluation.py``), OOD thresholds
                (``cdc_serve.ood.fit_ood``)
7. save         ``model.pth`` (``checkpoint.save_model``), ``metrics.json`` and
                ``train_log.json`` (per stage: seconds, peak RSS and, on CUDA, peak GPU
                memory; per-epoch history; metrics right after init; device name; the
                number of processes and a sha256 of each process's final weights)

Under torchrun (``distributed.py``) every process runs ``train``: all of them load the
data (rank 0 first: it may write an image folder's cache), pretrain and train CDC
together (the batches are global, split over the processes); rank 0 alone computes the
features, the K-means row and the head initialisation (broadcast to the others), and
alone evaluates and writes files. RUC trains in one process only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve.metrics_json import (
    METRICS_FILE,
    label_free_summary,
    metrics_document,
    write_metrics,
)
from cdc_serve_training import distributed
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


def _initial_backbone(config: TrainConfig, data) -> torch.nn.Module:
    """The backbone before MoCo-v2: random, or the ``--backbone-weights`` file's weights.

    The weights' first convolution decides the ResNet stem (7x7: torchvision's ImageNet
    stem, kept whatever the input size; ``backbone.stem`` records it for ``model.pth``).
    ``config.model.input_norm`` is the per-image normalisation in front of it; a
    ``backbone.pt`` of an earlier run brings its own (in place, unless ``--input-norm``
    asked for another: then one clear error, its features being those of other inputs).
    """
    from cdc_serve_training.backbones import build_backbone, load_weights, read_weights
    from cdc_serve_training.backbones import weights_stem as stem_of

    name, path, norm = config.model.backbone, config.model.weights, config.model.input_norm
    if path is None:
        return build_backbone(name, data.channels, data.size, input_norm=norm)
    weights, saved_name, saved_norm = read_weights(path)
    if saved_name is not None and saved_name != name:
        raise CDCError(
            f"{path} holds a {saved_name} backbone; train it with --backbone {saved_name}"
        )
    if saved_norm is not None and saved_norm != norm:
        if "input_norm" in config.set_by_user:
            raise CDCError(
                f"{path} was pretrained with --input-norm {saved_norm}; train it with "
                f"--input-norm {saved_norm} (or leave --input-norm out)"
            )
        _log(f"{path}: --input-norm {saved_norm}, as it was pretrained", config.progress)
        config.model.input_norm = norm = saved_norm
    stem = "auto" if name == "smallcnn" else stem_of(weights)
    backbone = build_backbone(name, data.channels, data.size, stem, input_norm=norm)
    load_weights(backbone, weights, path)
    return backbone


def backbone_fingerprint(config: TrainConfig, n_images: int) -> dict:
    """What ``backbone.pt`` must agree with to be reused (MoCo's epochs may grow; the
    preset may not: ``quick`` resumed in a ``standard`` run's folder is refused)."""
    settings = {
        "preset": config.preset,
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "moco": asdict(config.moco),
        "augment": asdict(config.augment),
        "pretrain_limit": config.pretrain_limit,
        **({"input_norm": config.model.input_norm} if config.model.input_norm != "dataset" else {}),
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
    from cdc_serve_training.moco import pretrain_moco

    out = Path(config.out)
    torch.manual_seed(config.seed)
    backbone = _initial_backbone(config, data)
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
        input_norm=config.model.input_norm,
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
    """1. The images, checked against the configuration (an image folder: before decoding).

    Small data sets get smaller batches (``presets.adapt_to_data``, printed). An image
    folder is read by the streaming reader into ``out/images-<key>.npy`` (memory-mapped,
    reused by the next run on the same files); its unreadable files are skipped, one
    warning line each, and listed in ``skipped.csv``.
    """
    from cdc_serve_training.data import FolderOptions, load_dataset
    from cdc_serve_training.presets import adapt_to_data

    config, d = run.config, run.config.data
    folder = None
    if d.is_folder:
        folder = FolderOptions(
            size=tuple(d.input_size), channels=d.channels, num_clusters=d.num_clusters,
            cache_dir=str(run.out), strict=d.strict, progress=config.progress, labels=d.labels,
        )  # fmt: skip
        _check_folder(config, folder)
    with distributed.main_first():  # rank 0 may write an image folder's cache: it goes first
        run.data = load_dataset(d.name, d.root, d.split, d.download, d.limit, config.seed,
                                folder=folder)  # fmt: skip
    for line in adapt_to_data(config, len(run.data), distributed.world_size()):
        _log(line, config.progress)
    validate_against_data(config, len(run.data), run.data.num_classes)
    _check_processes(config)
    if distributed.is_main():
        _write_skipped(run)
    _log(
        f"{run.data.name}: {len(run.data)} images, {run.data.num_classes} clusters, "
        f"{run.data.channels}x{run.data.size[0]}x{run.data.size[1]}, device {run.device}",
        config.progress,
    )
    run.augmenter = make_augmenter(config, run.data)


def _check_folder(config: TrainConfig, folder) -> None:
    """An image folder's count, cluster count and batch sizes, checked before any decoding."""
    from cdc_serve.image_folder import list_images
    from cdc_serve_training.presets import adapt_to_data

    files, _, classes = list_images(Path(config.data.name.split(":", 1)[1]).expanduser())
    num_clusters = folder.num_clusters or len(classes or [])
    if num_clusters < 1:
        raise CDCError(
            f"{config.data.name} has no class sub-folders: say how many clusters to find "
            "with --num-clusters K"
        )
    n = min(len(files), config.data.limit or len(files))
    trial = dataclasses.replace(config, cdc=dataclasses.replace(config.cdc),
                                moco=dataclasses.replace(config.moco))  # fmt: skip
    adapt_to_data(trial, n, distributed.world_size())
    validate_against_data(trial, n, num_clusters)
    _check_processes(trial)


def _check_processes(config: TrainConfig) -> None:
    """Under torchrun: CDC only, and global batches that split over the processes."""
    if distributed.world_size() == 1:
        return
    if config.method != "cdc":
        raise CDCError(
            f"--method {config.method} trains in one process: run it without torchrun "
            "(or with --nproc-per-node 1)"
        )
    if config.moco.epochs > 0:
        distributed.check_divides(config.moco.batch_size, "the MoCo-v2 batch")
    distributed.check_divides(config.cdc.sub_batch_size, "the CDC sub-batch B_s",
                              "--sub-batch-size (and --batch-size)")  # fmt: skip


def _write_skipped(run: Run) -> None:
    """One warning line per skipped file, and ``skipped.csv`` (file, reason) in the run folder."""
    skipped = run.data.skipped or []
    path = run.out / "skipped.csv"
    if not skipped:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    for file, reason in skipped:
        print(f"warning: skipped {file}: {reason}", file=sys.stderr)
    print(f"warning: {len(skipped)} unreadable file(s) skipped, listed in {path}", file=sys.stderr)


def stage_pretrain(run: Run) -> None:
    """2. MoCo-v2 pretraining, or ``backbone.pt`` from an earlier run when resuming.

    RUC on a cdc-serve model's clustering (``--init-from model.pth``) starts from that
    model's backbone instead: it has learnt the clusters RUC refines, and pretraining
    again would throw that away.
    """
    from cdc_serve_training.ruc.labels import is_model_file, source_model

    config = run.config
    if config.method == "ruc" and is_model_file(config.labels_from):
        model, _ = source_model(config.labels_from, run.data, run.data.num_classes,
                                config.model.backbone)  # fmt: skip
        _log(f"pretrain: starting from the backbone of {config.labels_from}", config.progress)
        run.backbone = model.backbone.to(run.device).eval()
        return
    run.backbone = pretrained_backbone(
        config, run.data, run.device, resume=run.resume, augmenter=run.augmenter
    )


def stage_kmeans(run: Run) -> None:
    """3. Backbone features of every image, and the K-means baseline when labels exist.

    Rank 0 only: the other processes need neither (the init is rank 0's, broadcast).
    """
    if not distributed.is_main():
        return
    config, data = run.config, run.data
    run.features = backbone_features(run.backbone, data, run.device, config.eval_batch_size)
    if data.labels is not None:
        run.kmeans_row = kmeans_baseline(
            run.features, data.labels, data.num_classes, seed=config.seed
        )
        _log(f"K-means on the backbone features: acc {run.kmeans_row['acc']:.4f}", config.progress)


def init_fingerprint(config: TrainConfig, n_images: int, seed: int) -> dict:
    """What a saved initialisation (``init.pt``) must agree with to be reused."""
    settings = {"init": asdict(config.init), "model": asdict(config.model)}
    return fingerprint("init", settings, seed=seed, n_images=n_images)


def stage_init(run: Run) -> None:
    """4. Both heads initialised (prototypes or random), or ``init.pt`` when resuming.

    Computed (or read) once, by rank 0, and broadcast to the other processes.
    """
    run.model = initialised_model(run, run.backbone, run.config.seed, run.out / "init.pt")


def initialised_model(run: Run, backbone, seed: int, path: Path) -> ClusteringModel:
    """Both heads on ``backbone`` initialised from ``run.features`` with ``seed`` (``path``:
    the saved initialisation, reused when resuming); rank 0's, broadcast."""
    config, data = run.config, run.data
    model = ClusteringModel(backbone, config.model.hidden, data.num_classes)
    model = model.to(run.device)
    if distributed.is_main():
        _init_on_main(run, model, seed, path)
    distributed.broadcast_module(model)
    return model


def _init_on_main(run: Run, model: ClusteringModel, seed: int, done: Path) -> None:
    """The head initialisation from the features (or ``done``), and its metrics."""
    from cdc_serve_training.init import init_heads

    config, data, features = run.config, run.data, run.features
    stage = init_fingerprint(config, len(data), seed)
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
            seed=seed,
        )
        save_stage(done, stage, 0, state_dict=model.state_dict())
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
    run.log["history"] = train_cdc_stage(run, run.model, run.config.seed, run.out / "cdc.ckpt")


def train_cdc_stage(run: Run, model: ClusteringModel, seed: int, checkpoint: Path) -> dict:
    """CDC (``cdc.train_cdc``) on ``model`` in place with ``seed``; the per-epoch history."""
    from cdc_serve_training.cdc import train_cdc

    config = run.config
    return train_cdc(
        model,
        run.data,
        run.augmenter,
        config.cdc,
        run.device,
        seed=seed,
        checkpoint_path=checkpoint,
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
    """6. Both heads over the data: metrics (with labels) and the OOD thresholds (rank 0)."""
    from cdc_serve.ood import fit_ood

    config, data = run.config, run.data
    if run.result is None:  # --restarts has predicted the chosen model's already
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
    else:  # no labels: what the model says about itself (label_free, below) is all there is
        run.metrics = metrics_document(data.name, config.data.split, len(data), heads={})
    run.metrics["label_free"] = label_free_summary(run.result["cal_probs"])
    run.ood = fit_ood(run.result["features"], run.result["cal_probs"])


def stage_save(run: Run) -> None:
    """7. ``model.pth`` and ``metrics.json`` (rank 0)."""
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
    _write_assignments(run)


def _write_assignments(run: Run) -> None:
    """``assignments.csv``: per training image, in the data set's order, its cluster and
    calibrated confidence (and its true label when known)."""
    data, probs = run.data, np.asarray(run.result["cal_probs"])
    sources = data.sources or [f"{data.name}[{i}]" for i in range(len(data))]
    labels = None if data.labels is None else data.labels.tolist()
    with open(run.out / "assignments.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "cluster_id", "confidence"] + (["label"] if labels else []))
        for i, (cluster, confidence) in enumerate(zip(probs.argmax(1), probs.max(1), strict=True)):
            row = [sources[i], int(cluster), f"{float(confidence):.6f}"]
            writer.writerow(row + ([labels[i]] if labels else []))


MAIN_ONLY = (stage_evaluate, stage_save)  # what rank 0 alone runs under torchrun


def stages(config: TrainConfig) -> tuple:
    """The stages of a run: CDC (4. init, 5. cdc; or 4.-5. ``--restarts N``) or RUC."""
    if config.method == "ruc":
        return (stage_data, stage_pretrain, stage_kmeans, stage_ruc, stage_evaluate, stage_save)
    if config.restarts > 1:
        from cdc_serve_training.restarts import stage_restarts

        middle = (stage_restarts,)
    else:
        middle = (stage_init, stage_cdc)
    return (stage_data, stage_pretrain, stage_kmeans, *middle, stage_evaluate, stage_save)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run every stage; returns the path of ``model.pth`` (``metrics.json`` lies beside it).

    Under torchrun every process calls it (``distributed.session``): rank 0 logs and
    writes, the others train with it and wait for it at the end.
    """
    config = config.validate()
    with distributed.session(resolve_device(config.device)) as device, distributed.one_voice():
        if not distributed.is_main():  # one process prints: the others keep quiet
            config = dataclasses.replace(config, progress=False)
        if distributed.is_main():
            Path(config.out).mkdir(parents=True, exist_ok=True)
        if resume:
            _check_same_checkpoints(Path(config.out))
        seed_everything(config.seed)
        run = Run(config=config, resume=resume, device=device, recorder=StageRecorder(device))
        run.log["config"] = config.to_dict()
        run.log["world_size"] = distributed.world_size()
        for stage in stages(config):
            if distributed.is_main() or stage not in MAIN_ONLY:
                with run.recorder.stage(stage.__name__.removeprefix("stage_")):
                    stage(run)
        run.log["rank_weight_digests"] = distributed.digests(run.model)
        if distributed.is_main():
            run.log.update(run.recorder.log())
            log = json.dumps(run.log, indent=2, default=str) + "\n"
            (run.out / "train_log.json").write_text(log)
            print_summary(run.metrics, run.recorder)
    return run.out / "model.pth"


def _check_same_checkpoints(out: Path) -> None:
    """Under torchrun, ``--resume`` needs every process to see the same checkpoints."""
    patterns = ("pretrain.ckpt", "backbone.pt", "init*.pt", "cdc*.ckpt", "ruc.ckpt")
    files = sorted(path for pattern in patterns for path in out.glob(pattern) if path.is_file())
    seen = [f"{path.name} {path.stat().st_size}" for path in files]
    if not distributed.same_everywhere("\n".join(seen)):
        raise CDCError(
            f"--resume: the processes do not see the same checkpoints in {out}; with several "
            "nodes, --out must be a folder that every node shares"
        )
