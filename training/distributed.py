"""Training in several processes: ``torchrun --nproc-per-node N --no-python cdc-serve train ...``.

torchrun starts ``N`` copies of ``cdc-serve train`` (per node) and tells each its place in
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
Without those variables (a plain run), or with ``WORLD_SIZE=1``, no process group is made
and every helper below is the identity: the run is the one-process run, bit for bit.

The scheme, in the order a run meets it (``W`` processes; "rank 0" is the main process):

1. :func:`session` joins the process group around ``pipeline.train``: NCCL with one GPU per
   process (``torch.cuda.set_device(LOCAL_RANK)``) on CUDA, gloo on the CPU. At the end
   every process waits for the others (:func:`barrier`), then the group is destroyed.
2. A preset's batch sizes are **global**: MoCo-v2's batch and CDC's ``B`` and ``B_s`` are
   split over the processes, each runs ``1 / W`` of them (:func:`check_divides` refuses
   sizes that do not split). Steps per epoch and the learning-rate schedule are those of
   one process.
3. Every epoch's order is rank 0's seeded permutation, broadcast (:func:`broadcast`): the
   same on every rank. A step's global batch is the next ``B`` entries of it and each
   process takes ``B / W`` of them (:func:`shard`; for CDC ``B_s / W`` of every
   sub-batch, so that a global sub-batch holds the rows it holds in one process):
   disjoint shards, the last partial batch dropped as in one process, no duplicates. Augmentations come from each
   process's own random stream (:func:`rank_seed`; rank 0's is the one-process stream).
4. Gradients: the training forward runs under DistributedDataParallel (:func:`wrap`),
   which averages the processes' gradients; the losses are written so that this average
   is the gradient of the global batch's loss (:func:`batch_mean` for a mean over the
   batch inside a loss).
5. BatchNorm: on CUDA, SyncBatchNorm while a stage trains (:func:`synced_batchnorm`), so
   batch statistics are those of the global batch. On the CPU, where SyncBatchNorm does
   not run, plain BatchNorm over each process's rows. After every epoch the running
   statistics of every BatchNorm that normalised per process (the CPU's; MoCo's key
   encoder, shuffle BN, everywhere) are averaged over the processes
   (:func:`average_batchnorm_stats`), so that every process holds the same model.
6. Tensors without gradients cross processes with :func:`all_gather` (it is not
   differentiable: MoCo's keys, CDC's selection inputs, random states for a checkpoint,
   :func:`per_rank`) and :func:`broadcast` (:func:`broadcast_module` for a whole model).
7. Files: rank 0 writes every file; the other processes only read (``--resume``, which
   needs every process to see the same ``--out``: one node, or a shared folder).
   :func:`main_first` runs a block on rank 0 before the others (an image folder's cache).
   :func:`digests` gathers a sha256 of each process's weights for ``train_log.json``.
   A CDCError is printed by rank 0 alone (:func:`one_voice`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from cdc_serve import CDCError

# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------

# How long a process waits in a collective: the others wait while rank 0 alone computes the
# features, the K-means row and the head initialisation, and evaluates (NCCL's default is
# 10 minutes, gloo's 30).
TIMEOUT = datetime.timedelta(hours=1)


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group is up (this process trains with others)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes of this run (1 without torchrun)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's place among them (0 without torchrun; torchrun's ``RANK`` before
    the process group is up and after it is gone)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files, logs and evaluates."""
    return rank() == 0


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """The process group of a torchrun run around the block; yields this process's device.

    A plain run yields ``device`` and does nothing else (so does a group made by the
    caller). Under torchrun: ``cuda`` becomes ``cuda:LOCAL_RANK`` with NCCL, the CPU uses
    gloo. After the block every process waits for the others and the group is destroyed;
    after an error it is left to the process's exit (torchrun stops the other processes).
    """
    if not launched() or active():
        yield device
        return
    device = _process_device(device)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    yield device
    barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def one_voice() -> Iterator[None]:
    """A CDCError in the block is reported by rank 0; the other processes exit with status 2.

    Every process meets the same checks (settings, checkpoints, data), so the others
    would print the same line again.
    """
    try:
        yield
    except CDCError:
        if is_main():
            raise
        raise SystemExit(2) from None


def _process_device(device: torch.device) -> torch.device:
    """CUDA: the GPU of this process's ``LOCAL_RANK`` (made the current device)."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.index is not None and device.index != local:
        raise CDCError(
            f"under torchrun every process trains on the GPU of its LOCAL_RANK: use --device "
            f"auto or cuda instead of {device}"
        )
    count = torch.cuda.device_count()
    if local >= count:
        raise CDCError(
            f"process {local} of this node has no GPU (the node has {count}): use "
            f"--nproc-per-node {count} at most, or --device cpu"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def barrier() -> None:
    """Wait until every process gets here (one process: return)."""
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (which may read what it wrote)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ----------------------------------------------------------------------------------------------
# The global batch: sizes, shards, random streams
# ----------------------------------------------------------------------------------------------


def check_divides(size: int, what: str, option: str | None = None) -> None:
    """CDCError unless the processes split the global ``size`` into equal parts of 2 or more.

    Two rows per process at least: BatchNorm needs them. ``option`` names the setting
    the user can change instead of the number of processes.
    """
    W = world_size()
    if W == 1 or (size % W == 0 and size // W >= 2):
        return
    instead = f", or set {option} to a multiple of {W}" if option else ""
    raise CDCError(
        f"{what} of {size} images does not split over {W} processes (each takes an equal "
        f"share of at least 2): use a --nproc-per-node that divides it{instead}"
    )


def shard(rows: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """This process's share of a global batch's ``rows``: its ``1 / W`` of every part.

    The batch is ``parts`` consecutive blocks (CDC's sub-batches; 1: the whole batch) and
    process ``r`` takes the ``r``-th of ``W`` equal slices of each, in order, so that
    the processes' ``s``-th slices together are the batch's ``s``-th block. One process:
    ``rows`` itself. :func:`all_gather` with the same ``parts`` puts the rows back.
    """
    W = world_size()
    if W == 1:
        return rows
    check_divides(len(rows) // parts, "a batch")
    blocks = rows.reshape(parts, W, len(rows) // (parts * W), *rows.shape[1:])
    return blocks[:, rank()].reshape(-1, *rows.shape[1:])


def rank_seed(seed: int) -> int:
    """The seed of this process's random stream: ``seed`` on rank 0, a distinct one elsewhere."""
    r = rank()
    return seed if r == 0 else (seed + r * 0x9E3779B97F4A7C15) % 2**63


def per_rank(state: torch.Tensor) -> torch.Tensor:
    """Every process's ``state`` (e.g. a random generator's), stacked in rank order.

    For a checkpoint that rank 0 writes; :func:`own` picks a process's row back out. One
    process: ``state`` itself (the one-process checkpoint).
    """
    return state if world_size() == 1 else all_gather(state[None])


def own(states: torch.Tensor) -> torch.Tensor:
    """This process's row of :func:`per_rank`'s result (a copy: ``Generator.set_state`` of a
    view that does not start its storage crashes torch 2.14)."""
    return states if world_size() == 1 else states[rank()].clone()


# ----------------------------------------------------------------------------------------------
# Tensors across processes (no gradients)
# ----------------------------------------------------------------------------------------------


def _for_backend(x: torch.Tensor) -> torch.Tensor:
    """``x`` where the backend reads it: a GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return x.to(torch.device("cuda", torch.cuda.current_device()))
    return x.cpu()


def all_gather(x: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """Every process's ``x`` (same shape) along dim 0: the global batch that :func:`shard`
    with the same ``parts`` split (``parts=1``: the processes' rows in rank order).

    Not differentiable: for keys, predictions and states. One process: ``x`` itself.
    """
    W = world_size()
    if W == 1:
        return x
    local = _for_backend(x.detach().contiguous())
    pieces = [torch.empty_like(local) for _ in range(W)]
    dist.all_gather(pieces, local)
    rows = torch.stack(pieces).reshape(W, parts, len(x) // parts, *x.shape[1:])
    return rows.transpose(0, 1).reshape(W * len(x), *x.shape[1:]).to(x.device)


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every process (same shape and dtype everywhere); one process: ``x``."""
    if world_size() == 1:
        return x
    buffer = _for_backend(x.detach().clone())
    dist.broadcast(buffer, 0)
    return buffer.to(x.device)


def _sum(x: torch.Tensor) -> torch.Tensor:
    total = _for_backend(x.detach().clone())
    dist.all_reduce(total)
    return total.to(x.device)


def average(values: dict[str, float]) -> dict[str, float]:
    """The mean over the processes of each figure (one process: ``values`` itself)."""
    if world_size() == 1:
        return values
    total = _sum(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, (total / world_size()).tolist(), strict=True))


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers copied into every process's ``module``."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.copy_(broadcast(tensor))


def same_everywhere(text: str) -> bool:
    """Whether every process passes the same ``text`` (compared by sha256)."""
    if world_size() == 1:
        return True
    mine = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)
    return bool((all_gather(mine[None]) == mine).all())


def digests(module: nn.Module) -> list[str]:
    """The sha256 of every process's ``module.state_dict()`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return [bytes(row.tolist()).hex() for row in all_gather(mine[None])]


# ----------------------------------------------------------------------------------------------
# Training: DDP, the global batch mean, BatchNorm
# ----------------------------------------------------------------------------------------------


def wrap(module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
    """``module`` under DistributedDataParallel; one process: ``module`` itself.

    DDP copies rank 0's parameters and buffers to every process when it wraps, and
    averages the gradients of each backward over the processes. Buffers are not
    broadcast at every forward (``broadcast_buffers=False``): BatchNorm's running
    statistics are averaged after each epoch instead (:func:`average_batchnorm_stats`).
    ``find_unused_parameters``: for a forward that may leave parts of the model out (the
    same parts on every process).
    """
    if world_size() == 1:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    options = {"find_unused_parameters": find_unused_parameters}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        options["forward_sync_buffers"] = False  # torch 2.14's name; it still syncs at init
    else:  # torch 2.11
        options["broadcast_buffers"] = False
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **options)


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the global batch's rows (dim 0) of ``x``, this process's rows being ``x``.

    One process: ``x.mean(dim=0)``. Several: the value is the mean over every process's
    rows (an all_reduce of the row sums); the gradient reaches this process's rows scaled
    by ``W``, so that DDP's average of the processes' gradients is the gradient of the
    global mean (for a loss that is not a mean over rows, such as Eq. 2's entropy of the
    batch-mean prediction).
    """
    W = world_size()
    if W == 1:
        return x.mean(dim=0)
    local = x.sum(dim=0)
    return (_sum(local) + W * (local - local.detach())) / (x.shape[0] * W)


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Every BatchNorm's running mean and variance averaged over the processes (one call).

    A per-process BatchNorm's statistics come from its own rows; their mean is what one
    process would estimate from all of them (exactly for the mean, the variance up to the
    spread between the processes' means). Synchronised ones are equal already.
    """
    if world_size() == 1:
        return
    stats = [t for bn in _batchnorms(module) if bn.track_running_stats
             for t in (bn.running_mean, bn.running_var)]  # fmt: skip
    if not stats:
        return
    mean = _sum(torch.cat([t.flatten() for t in stats])) / world_size()
    for tensor, part in zip(stats, mean.split([t.numel() for t in stats]), strict=True):
        tensor.copy_(part.view_as(tensor))


@contextlib.contextmanager
def synced_batchnorm(*modules: nn.Module, device: torch.device) -> Iterator[None]:
    """On CUDA under torchrun, every BatchNorm of ``modules`` is a SyncBatchNorm in the block.

    In place and with the same parameter and buffer tensors (an optimiser built before
    keeps working); plain BatchNorm again afterwards, so that the modules handed on are
    those of a one-process run. Elsewhere (one process, the CPU) nothing changes.
    """
    if world_size() == 1 or device.type != "cuda":
        yield
        return
    for module in modules:
        _replace_batchnorm(module, _to_sync)
    try:
        yield
    finally:
        for module in modules:
            _replace_batchnorm(module, _to_plain)


def _replace_batchnorm(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, make(child))
        else:
            _replace_batchnorm(child, make)


def _to_sync(bn: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    sync.plain_type = type(bn)
    return sync


def _to_plain(sync: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    cls = getattr(sync, "plain_type", None)
    if cls is None:  # a SyncBatchNorm of the caller's own
        return sync
    plain = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
    for name, tensor in [*sync.named_parameters(recurse=False), *sync.named_buffers(recurse=False)]:
        setattr(plain, name, tensor)
    return plain.train(sync.training)
