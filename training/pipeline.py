"""``train(config)``: the whole training run behind ``cdc-serve train``.

Stages, each leaving its result in ``config.out`` so that ``resume=True`` skips what is
done and continues an interrupted stage from its last epoch:

1. data         ``load_dataset`` + checks that need the data (before any training)
2. pretrain     MoCo-v2 on the backbone (``moco.pretrain_moco``)  -> ``backbone.pt``
                (epoch checkpoints in ``pretrain.ckpt``)
3. baseline     backbone features of every image; K-means on them (the "MoCo-v2 +
                K-means" row of metrics.json)
4. init         prototype initialisation of both heads (``init.py``)  -> ``init.pt``
5. train        CDC (``cdc.train_cdc``, checkpoints in ``cdc.ckpt``) or RUC
                (``ruc.train_ruc``, checkpoints in ``ruc.ckpt``)
6. evaluate     both heads over the data (``evaluation.py``), OOD thresholds
                (``cdc_serve.ood.fit_ood``)
7. save         ``model.pth`` (``checkpoint.save_model``), ``metrics.json`` and
                ``train_log.json`` (timings, per-epoch history with each epoch's seconds,
                metrics right after init, device name, peak RSS and, on CUDA, peak GPU
                memory per stage)
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve_training.checkpoint import arch_of, atomic_save, safe_load, save_model
from cdc_serve_training.config import TrainConfig, validate, validate_against_data
from cdc_serve_training.evaluation import (
    backbone_features,
    head_metrics,
    infer,
    kmeans_baseline,
    metrics_json,
)
from cdc_serve_training.heads import ClusteringModel


def _augment_options(options: dict) -> dict:
    """Augmenter keyword arguments from the config (JSON turns tuples into lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


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


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def load_data(config: TrainConfig):
    """Stage 1: the images, checked against the configuration."""
    from cdc_serve_training.data import load_dataset

    d = config.data
    data = load_dataset(d.name, d.root, d.split, d.download, d.limit, config.seed)
    validate_against_data(config, len(data), data.num_classes)
    return data


def pretrained_backbone(
    config: TrainConfig, data, augmenter, device: torch.device, resume: bool
) -> torch.nn.Module:
    """Stage 2: MoCo-v2 pretraining, or ``backbone.pt`` from an earlier run when resuming."""
    from cdc_serve_training.backbones import build_backbone
    from cdc_serve_training.moco import pretrain_moco

    out = Path(config.out)
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, data.channels, data.size)
    done = out / "backbone.pt"
    if resume and done.exists():
        state = safe_load(done)
        if state.get("backbone") != config.backbone:
            raise CDCError(
                f"{done} holds a {state.get('backbone')} backbone, not {config.backbone}"
            )
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
            augmenter,
            config.moco,
            device,
            seed=config.seed,
            checkpoint_path=out / "pretrain.ckpt",
            resume=resume,
            progress=config.progress,
            amp=config.amp and device.type == "cuda",
        )
    atomic_save(
        {
            "backbone": config.backbone,
            "epochs": config.moco.epochs,
            "state_dict": backbone.state_dict(),
        },
        done,
    )
    return backbone.to(device).eval()


def initialised_model(
    config: TrainConfig,
    backbone: torch.nn.Module,
    features: torch.Tensor,
    num_classes: int,
    resume: bool,
) -> ClusteringModel:
    """Stage 4: both heads initialised (prototypes or random), or ``init.pt`` when resuming."""
    from cdc_serve_training.init import init_heads

    out = Path(config.out)
    model = ClusteringModel(backbone, config.init.hidden, num_classes).to(features.device)
    done = out / "init.pt"
    if resume and done.exists():
        model.load_state_dict(safe_load(done, map_location=features.device)["state_dict"])
        return model
    init_heads(
        model,
        features,
        method=config.cdc.init,
        hidden=config.init.hidden,
        ortho_steps=config.init.ortho_steps,
        ortho_lr=config.init.ortho_lr,
        kmeans_iters=config.init.kmeans_iters,
        max_samples=config.init.max_samples,
        kmeans_restarts=config.init.kmeans_restarts,
        seed=config.seed,
    )
    atomic_save({"epoch": 0, "state_dict": model.state_dict()}, done)
    return model


def _init_metrics(model: ClusteringModel, features: torch.Tensor, labels) -> dict | None:
    """Metrics of the clustering head right after initialisation (Table 2-I rows)."""
    if labels is None:
        return None
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model.clu_head(features).float(), dim=1)
    return head_metrics(labels, probs)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run every stage; returns the path of ``model.pth`` (``metrics.json`` lies beside it)."""
    from cdc_serve_training.augment import Augmenter

    config = validate(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    amp = config.amp and device.type == "cuda"
    seed_everything(config.seed)
    timings: dict[str, float] = {}
    # on CUDA, per stage: peak memory of tensors (allocated) and held by torch's caching
    # allocator (reserved; nvidia-smi adds the CUDA context to it)
    peak_gpu_mib: dict[str, dict[str, int]] = {}
    clock = time.perf_counter()

    cpu_clock = time.process_time()

    def lap(stage: str) -> None:
        nonlocal clock
        if device.type == "cuda":  # charge queued kernels to their stage, then its peak memory
            torch.cuda.synchronize(device)
            peak_gpu_mib[stage] = {
                "allocated": round(torch.cuda.max_memory_allocated(device) / 2**20),
                "reserved": round(torch.cuda.max_memory_reserved(device) / 2**20),
            }
            torch.cuda.reset_peak_memory_stats(device)
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    data = load_data(config)
    lap("data")
    _log(
        f"{data.name}: {len(data)} images, {data.num_classes} classes, device {device}",
        config.progress,
    )
    augmenter = Augmenter(data.size, data.mean, data.std, **_augment_options(config.augment))

    backbone = pretrained_backbone(config, data, augmenter, device, resume)
    lap("pretrain")
    features = backbone_features(backbone, data, device, config.eval_batch_size)
    kmeans_row = (
        kmeans_baseline(features, data.labels, data.num_classes, seed=config.seed)
        if data.labels is not None
        else None
    )
    lap("kmeans")
    if kmeans_row:
        _log(f"K-means on the backbone features: acc {kmeans_row['acc']:.4f}", config.progress)

    log: dict = {
        "config": config.to_dict(),
        "device": str(device),
        "device_name": _device_name(device),
    }
    if config.method == "cdc":
        from cdc_serve_training.cdc import train_cdc

        model = initialised_model(config, backbone, features, data.num_classes, resume)
        log["init_metrics"] = _init_metrics(model, features, data.labels)
        lap("init")
        log["history"] = train_cdc(
            model,
            data,
            augmenter,
            config.cdc,
            device,
            seed=config.seed,
            checkpoint_path=out / "cdc.ckpt",
            resume=resume,
            progress=config.progress,
            amp=amp,
        )
        lap("cdc")
    else:
        from cdc_serve_training.ruc import run_ruc_stage

        lap("init")
        model, log["ruc_report"] = run_ruc_stage(
            config, data, backbone, features, device, out, resume, augmenter
        )
        lap("ruc")

    result = infer(model, data, device, config.eval_batch_size)
    if data.labels is not None:
        metrics = metrics_json(
            data.name,
            config.data.split,
            len(data),
            kmeans_row,
            head_metrics(data.labels, result["clu_probs"]),
            head_metrics(data.labels, result["cal_probs"]),
        )
    else:
        metrics = {"dataset": data.name, "split": config.data.split, "n": len(data), "heads": {}}
    from cdc_serve.ood import fit_ood

    ood = fit_ood(result["features"], result["cal_probs"])
    lap("evaluate")

    model_path = save_model(
        out / "model.pth",
        model.cpu(),
        method=config.method,
        arch=arch_of(model, config.backbone, data.channels, data.size),
        preprocess=data.preprocess(),
        config=config.to_dict(),
        dataset=data.name,
        metrics=metrics,
        ood=ood,
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lap("save")
    log["timings_s"] = timings
    log["total_s"] = round(sum(timings.values()), 2)
    log["cpu_s"] = round(time.process_time() - cpu_clock, 2)  # all threads: busy-machine check
    log["peak_rss_mib"] = _peak_rss_mib()
    if peak_gpu_mib:
        log["peak_gpu_memory_mib"] = peak_gpu_mib
    (out / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    print_summary(metrics, timings, peak_gpu_mib, log["device_name"])
    return model_path


def _device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (Linux) or platform's processor."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _peak_rss_mib() -> int | None:
    """This process's peak resident memory so far (MiB), where the OS reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024) if sys.platform != "darwin" else round(kib / 2**20)


def print_summary(
    metrics: dict,
    timings: dict[str, float],
    peak_gpu_mib: dict[str, dict[str, int]] | None = None,
    device_name: str = "",
) -> None:
    """The heads' metrics (percent), the time per stage and, on a GPU, its peak memory."""
    from rich.console import Console
    from rich.table import Table

    keys = ("acc", "nmi", "ari", "ece", "auroc", "aurc", "fpr95")
    table = Table(title=f"{metrics['dataset']} ({metrics['split']}, n={metrics['n']}), percent")
    table.add_column("head")
    for key in keys:
        table.add_column(key, justify="right")
    for head, values in metrics.get("heads", {}).items():
        table.add_row(head, *(f"{100 * values[k]:.2f}" if k in values else "-" for k in keys))
    console = Console(stderr=True)
    console.print(table)
    console.print(
        "time: "
        + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings.items())
        + f" (total {sum(timings.values()):.0f}s)"
    )
    if peak_gpu_mib:
        console.print(
            f"peak GPU memory, allocated/reserved ({device_name}): "
            + ", ".join(
                f"{stage} {mib['allocated']:,}/{mib['reserved']:,} MiB"
                for stage, mib in peak_gpu_mib.items()
            )
        )
