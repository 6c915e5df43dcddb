"""MoCo-v2 pretraining of a backbone (He et al. 2020; Chen et al. 2020b; CDC paper App. B.1).

A query encoder (backbone + 2-layer MLP projector) is trained with the InfoNCE loss to
pick, for each image, the key of another augmented view of the same image among a queue
of keys from earlier batches. The key encoder is an exponential moving average of the
query encoder (``key_momentum``). After pretraining only the query backbone is kept: its
features feed K-means, the prototype initialisation and CDC.

Details:

- InfoNCE with temperature ``T``: logits ``[q.k+, q.queue] / T``, the positive at index 0.
  ``symmetric=True`` also uses the second view as the query (twice the signal per step).
- Batch-norm leakage: MoCo's "shuffle BN" runs the key encoder on a shuffled batch split
  over GPUs. On one device the key batch is shuffled and run in ``shuffle_bn_splits``
  chunks, so a key's BN statistics come from a random subset of the batch, as there.
- SGD (momentum, weight decay), learning rate ``lr * batch_size / 256``, linear warm-up
  for ``warmup_epochs`` then cosine decay to 0, set per step.
- A checkpoint after every epoch (weights, optimiser, queue, every random state) makes
  ``resume=True`` continue exactly as an uninterrupted run. It holds only tensors and
  plain Python values and is read with ``torch.load(weights_only=True)``.
- Channels-last tensors (faster on GPUs, and ~20 % on this CPU for the small CNN); on
  CUDA with ``amp``, bf16 autocast. Images move to the device once; augmentation and all
  random draws of the loop happen there (``Augmenter``, a generator on the device).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.data import ImageData

CHECKPOINT_FORMAT = "cdc-serve/moco-checkpoint"
CHECKPOINT_VERSION = 1


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

    def validate(self, n_images: int) -> None:
        """Raise CDCError for settings that cannot train on ``n_images`` images."""
        if self.epochs < 0:
            raise CDCError(f"MoCo epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise CDCError(f"MoCo batch size must be at least 2, got {self.batch_size}")
        if n_images < self.batch_size:
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


# The paper's settings (ResNet-34, GPU).
PAPER_MOCO = MocoConfig()

# The quick preset's pretraining (``config._quick_preset`` uses exactly this): small CNN on
# a 2-core CPU, all 70,000 Fashion-MNIST images in about 2.5-3 minutes on a quiet machine
# (8 epochs of ~20 s each). A short run wants a high learning rate, a small queue and a
# small projector. 4 epochs took half the time but gave a backbone on which CDC's clusters
# were less stable (ACC below K-means with the quick preset's CDC settings).
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


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo-v2's projection head: Linear -> BN -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class MoCo(nn.Module):
    """Query encoder, its momentum (key) copy, and the queue of keys."""

    def __init__(self, backbone: nn.Module, cfg: MocoConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector(backbone.out_dim, cfg.proj_hidden, cfg.proj_dim)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for p in self.key_parameters():
            p.requires_grad_(False)
        queue = torch.randn(cfg.queue_size, cfg.proj_dim, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_backbone.parameters(), *self.key_projector.parameters()]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key <- m * key + (1 - m) * query, for every parameter."""
        keys, queries = self.key_parameters(), self.query_parameters()
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, queries, alpha=1 - m)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, order: torch.Tensor, splits: int) -> torch.Tensor:
        """Key embeddings, the batch shuffled by ``order`` and run in ``splits`` chunks."""
        shuffled = x[order]
        out = torch.cat(
            [self.key_projector(self.key_backbone(chunk)) for chunk in shuffled.chunk(splits)]
        )
        k = torch.empty_like(out)
        k[order] = out
        return F.normalize(k, dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue.shape[0]
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue.shape[0])


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: cross-entropy of picking the positive key ``k`` among ``k`` and the queue."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T.to(q.dtype)
    logits = torch.cat([positive, negative], dim=1).float() / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def learning_rate(cfg: MocoConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to 0 (per step)."""
    base = cfg.lr * cfg.batch_size / 256
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Read a MoCo checkpoint (``weights_only``), with a clear error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not torch, unsafe pickle ...
        raise CDCError(f"{path}: not a readable MoCo checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CDCError(f"{path}: not a MoCo checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise CDCError(f"{path}: MoCo checkpoint version {state.get('format_version')} unsupported")
    return state


# Settings that must match for a resumed run to be the same run.
_RESUME_KEYS = (
    "batch_size", "lr", "momentum", "weight_decay", "temperature", "queue_size",
    "key_momentum", "proj_hidden", "proj_dim", "warmup_epochs", "symmetric", "shuffle_bn_splits",
    "crop_scale",
)  # fmt: skip


def _plain(value):
    """Tuples and lists compare equal (a config may come back from JSON with lists)."""
    return [float(v) for v in value] if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def pretrain_moco(
    backbone: nn.Module,
    data: ImageData,
    augmenter: Augmenter,
    cfg: MocoConfig,
    device: torch.device | str,
    *,
    seed: int = 0,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    amp: bool = False,
) -> nn.Module:
    """Pretrain ``backbone`` with MoCo-v2 on ``data``; returns it trained, in eval mode.

    ``checkpoint_path`` gets a checkpoint after every epoch; with ``resume=True`` an existing
    one is continued (same settings required, ``epochs`` may grow) and gives the same
    weights as an uninterrupted run. The per-epoch mean loss is stored in the checkpoint
    (``history``) and on the returned module as ``moco_history``.
    """
    device = torch.device(device)
    cfg.validate(len(data))
    if cfg.crop_scale is not None:
        augmenter = copy.copy(augmenter)
        augmenter.crop_scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
    # The queue's random start comes from a CPU generator; every draw of the training loop
    # (batch order, augmentation, key shuffles) from one generator on the training device,
    # so nothing is copied between host and device for randomness.
    model = MoCo(backbone, cfg, torch.Generator().manual_seed(seed)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cuda = device.type == "cuda"
    # Channels-last convolutions are faster on GPUs and on this CPU too (measured ~20 %).
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.query_parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    start_epoch, history = 0, []

    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        saved = state["config"]
        changed = [k for k in _RESUME_KEYS if _plain(saved.get(k)) != _plain(getattr(cfg, k))]
        if changed or state["seed"] != seed or state["n_images"] != len(data):
            raise CDCError(
                f"{checkpoint_path}: cannot resume, the run's settings changed "
                f"({', '.join(changed) or 'seed or dataset size'}); use a new output folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch, history = int(state["epoch"]), list(state["history"])

    n = len(data)
    steps = n // cfg.batch_size  # the last partial batch is dropped
    images = data.images.to(device)  # uint8, moved once
    splits = cfg.shuffle_bn_splits
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp)
    bar = None
    if progress and start_epoch < cfg.epochs:
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, nothing in logs and pipes
        bar = tqdm(
            total=(cfg.epochs - start_epoch) * steps,
            desc="moco",
            unit="step",
            leave=False,
            disable=None,
        )

    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(n, generator=generator, device=device)
        total_loss = torch.zeros((), device=device)
        started = time.perf_counter()
        for step in range(steps):
            lr = learning_rate(cfg, epoch * steps + step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = images[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            x1 = augmenter.moco(batch, generator).contiguous(memory_format=torch.channels_last)
            x2 = augmenter.moco(batch, generator).contiguous(memory_format=torch.channels_last)
            shuffle = torch.randperm(len(batch), generator=generator, device=device)
            with autocast:
                model.momentum_update(cfg.key_momentum)
                q1 = model.query(x1)
                k2 = model.keys(x2, shuffle, splits)
                loss = info_nce(q1, k2, model.queue, cfg.temperature)
                keys = k2
                if cfg.symmetric:
                    q2 = model.query(x2)
                    k1 = model.keys(x1, shuffle, splits)
                    loss = 0.5 * (loss + info_nce(q2, k1, model.queue, cfg.temperature))
                    keys = torch.cat([k2, k1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.enqueue(keys)
            total_loss += loss.detach()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        mean_loss = float(total_loss) / max(1, steps)
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": mean_loss, "seconds": seconds})
        if bar is not None:  # one line per epoch, above the bar; all a log or a pipe gets
            bar.write(
                f"MoCo epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f} ({seconds:.0f} s)",
                file=sys.stderr,
            )
        if checkpoint_path is not None:
            _save(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "format_version": CHECKPOINT_VERSION,
                    "epoch": epoch + 1,
                    "config": asdict(cfg),
                    "seed": seed,
                    "n_images": n,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
                    "history": history,
                },
            )
    if bar is not None:
        bar.close()

    backbone = model.backbone.to(memory_format=torch.contiguous_format).eval()
    backbone.moco_history = history
    return backbone


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: ImageData,
    augmenter: Augmenter,
    device: torch.device | str,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Backbone features (N x D, float32, on ``device``) of the un-augmented images."""
    device = torch.device(device)
    backbone.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x = augmenter.val(data.images[start : start + batch_size].to(device))
        out.append(backbone(x).float())
    return torch.cat(out)
