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
  ``resume=True`` continue exactly as an uninterrupted run; it is the project's one
  resume scheme (``checkpoint.save_stage`` / ``load_stage``: the settings' fingerprint
  must match, only ``epochs`` may grow). It holds only tensors and plain Python values
  and is read with ``torch.load(weights_only=True)``.
- Channels-last tensors (faster on GPUs, and ~20 % on this CPU for the small CNN); on
  CUDA with ``amp``, bf16 autocast. Images move to the device once; augmentation and all
  random draws of the loop happen there (``Augmenter``, a generator on the device).
- Several processes (torchrun, ``distributed.py``): ``batch_size`` is the global batch,
  each process runs its ``1 / W`` share of every step (the epoch's order is rank 0's,
  broadcast) with its own augmentation stream. The query encoder runs under DDP
  (``MoCo.forward``), which averages the gradients; the key encoder stays per process,
  each running its share in ``shuffle_bn_splits / W`` chunks (at least 1), so that a
  chunk still holds ``batch_size / shuffle_bn_splits`` keys. The keys of all processes
  are gathered before they are enqueued: every process holds the same queue. On CUDA
  the query encoder's BatchNorm is synchronised (SyncBatchNorm); on the CPU it
  normalises each process's rows. Per-process running statistics (the CPU's, the key
  encoder's) are averaged after every epoch. A checkpoint keeps every process's random
  state.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdc_serve_training import distributed
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.checkpoint import fingerprint, load_stage, save_stage
from cdc_serve_training.config import MocoConfig
from cdc_serve_training.data import ImageData


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

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The queries of one view or two (what DDP runs: gradients reach the query encoder)."""
        return self.query(x1), None if x2 is None else self.query(x2)

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
# Training
# ----------------------------------------------------------------------------------------------


def moco_fingerprint(cfg: MocoConfig, *, seed: int, n_images: int) -> dict:
    """What a MoCo checkpoint must agree with to be resumed (``epochs`` may grow)."""
    return fingerprint("moco", asdict(cfg), seed=seed, n_images=n_images)


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
    one is continued (same settings, seed and data size required, ``epochs`` may grow) and
    gives the same weights as an uninterrupted run. The per-epoch mean loss is stored in
    the checkpoint (``history``) and on the returned module as ``moco_history``.
    """
    device = torch.device(device)
    cfg.validate(len(data))
    distributed.check_divides(cfg.batch_size, "the MoCo-v2 batch")
    progress = progress and distributed.is_main()
    if cfg.crop_scale is not None:
        augmenter = copy.copy(augmenter)
        augmenter.crop_scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
    # The queue's random start comes from a CPU generator; every draw of the training loop
    # (batch order, augmentation, key shuffles) from one generator on the training device,
    # so nothing is copied between host and device for randomness.
    model = MoCo(backbone, cfg, torch.Generator().manual_seed(seed)).to(device)
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))
    # Channels-last convolutions are faster on GPUs and on this CPU too (measured ~20 %).
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.query_parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    run = _Run(model, optimizer, generator, augmenter, cfg, device, amp)
    stage = moco_fingerprint(cfg, seed=seed, n_images=len(data))
    start_epoch, history = 0, []
    state = load_stage(checkpoint_path, stage) if resume and checkpoint_path else None
    if state is not None:
        start_epoch, history = run.restore(state)
        if progress:
            print(f"MoCo: resuming from {checkpoint_path} after epoch {start_epoch}/{cfg.epochs}",
                  file=sys.stderr)  # fmt: skip

    images = data.images.to(device)  # uint8, moved once
    steps = len(data) // cfg.batch_size  # the last partial batch is dropped
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
    with distributed.synced_batchnorm(model.backbone, model.projector, device=device):
        run.queries = distributed.wrap(model, device)  # the query encoder under DDP
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            mean_loss = run.epoch(images, epoch, steps, bar)
            distributed.average_batchnorm_stats(model)
            seconds = time.perf_counter() - started
            history.append({"epoch": epoch + 1, "loss": mean_loss, "seconds": seconds})
            if bar is not None:  # one line per epoch, above the bar; all a log or a pipe gets
                bar.write(
                    f"MoCo epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f} ({seconds:.0f} s)",
                    file=sys.stderr,
                )
            if checkpoint_path is not None:
                save_stage(checkpoint_path, stage, epoch + 1, **run.state(), history=history)
    if bar is not None:
        bar.close()

    backbone = model.backbone.to(memory_format=torch.contiguous_format).eval()
    backbone.moco_history = history
    return backbone


class _Run:
    """The mutable state of one pretraining run: model, optimiser, random stream."""

    def __init__(self, model: MoCo, optimizer, generator, augmenter, cfg, device, amp) -> None:
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.queries = model  # the model itself, or under DDP (pretrain_moco sets it)
        self.augmenter, self.cfg, self.device = augmenter, cfg, device
        self.cuda = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and amp)

    def state(self) -> dict:
        """What a checkpoint holds besides the fingerprint, the epoch and the history.

        The random states are every process's (``distributed.per_rank``; one process: its own).
        """
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.cuda else None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": distributed.per_rank(self.generator.get_state()),
            "torch_rng": distributed.per_rank(torch.get_rng_state()),
            "cuda_rng": None if cuda_rng is None else distributed.per_rank(cuda_rng),
        }

    def restore(self, state: dict) -> tuple[int, list]:
        """Load a checkpoint's state; returns (epochs done, history)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(distributed.own(state["generator"]))
        torch.set_rng_state(distributed.own(state["torch_rng"]))
        if self.cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(distributed.own(state["cuda_rng"]), self.device)
        return int(state["epoch"]), list(state["history"])

    def epoch(self, images: torch.Tensor, epoch: int, steps: int, bar) -> float:
        """One epoch of InfoNCE steps over a random order of ``images``; its mean loss.

        The order is rank 0's (the same on every process); each process trains on its
        share of every step's global batch (``distributed.shard``).
        """
        cfg, generator = self.cfg, self.generator
        order = torch.randperm(len(images), generator=generator, device=self.device)
        order = distributed.broadcast(order)
        total_loss = torch.zeros((), device=self.device)
        for step in range(steps):
            lr = learning_rate(cfg, epoch * steps + step, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss = self.step(images[distributed.shard(batch)])
            total_loss += loss.detach()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        return distributed.average({"loss": float(total_loss) / max(1, steps)})["loss"]

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """One MoCo-v2 step: two views, momentum update, InfoNCE, SGD, enqueue the keys.

        ``batch`` is this process's share of the step's images (all of them in one process).
        """
        cfg, model, generator = self.cfg, self.model, self.generator
        x1 = self.augmenter.moco(batch, generator).contiguous(memory_format=torch.channels_last)
        x2 = self.augmenter.moco(batch, generator).contiguous(memory_format=torch.channels_last)
        shuffle = torch.randperm(len(batch), generator=generator, device=self.device)
        splits = max(1, cfg.shuffle_bn_splits // distributed.world_size())
        with self.autocast:
            model.momentum_update(cfg.key_momentum)
            q1, q2 = self.queries(x1, x2 if cfg.symmetric else None)
            k2 = model.keys(x2, shuffle, splits)
            loss = info_nce(q1, k2, model.queue, cfg.temperature)
            keys = k2
            if cfg.symmetric:
                k1 = model.keys(x1, shuffle, splits)
                loss = 0.5 * (loss + info_nce(q2, k1, model.queue, cfg.temperature))
                keys = torch.cat([k2, k1])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.enqueue(distributed.all_gather(keys))  # every process's keys: one queue
        return loss


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
