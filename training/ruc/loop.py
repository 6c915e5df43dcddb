"""RUC's training loop (paper Algorithm 1): two networks in turn, co-refurbishing every epoch.

Read top-down:

1. :func:`train_ruc`, the run: the clean set (Sec. 3.1, ``clean_set.py``), the two
   networks f_theta(1) and f_theta(2) (copies of the pretrained backbone with fresh MLP
   heads, App. A.2), resume, then per epoch :func:`_train_epoch` and a checkpoint;
2. :func:`_train_epoch`: Algorithm 1's "for k in {1, 2}", each network for one pass over
   the clean set with the other as its counter network (:func:`_train_network`), then
   co-refurbishing (Eq. 18-19, :func:`_refurbish`);
3. :func:`_train_step`: one batch of Algorithm 1, its steps numbered as in the paper;
4. resume with the project's one scheme (``checkpoint.fingerprint``/``save_stage``/
   ``load_stage``): :func:`ruc_fingerprint`, :func:`_save_state`, :func:`_restore`.

The maths are the pure functions of ``losses.py``. Random numbers come from two
generators seeded by ``seed``: ``gen`` (CPU: batches, MixMatch, the refurbishing subset)
and ``aug_gen`` (on the device: augmentation); both are checkpointed, so a resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdc_serve import CDCError
from cdc_serve_training.checkpoint import fingerprint, load_stage, save_stage
from cdc_serve_training.config import RUCConfig
from cdc_serve_training.ruc.clean_set import quality_or_size, select_clean, selection_masks
from cdc_serve_training.ruc.losses import (
    co_refine,
    co_refurbish,
    cosine_lr,
    guess_unclean,
    label_smoothing,
    mixmatch,
    soft_cross_entropy,
    tau2_at,
    unlabelled_loss,
    unsup_ramp,
)

_LOSSES = ("loss", "loss_strong", "loss_x", "loss_u")  # what _train_step returns, in order


class _Net(nn.Module):
    """One of the two RUC networks f_theta(k): a backbone and an MLP head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@dataclass
class _Run:
    """What every RUC step needs besides the two networks (one training run)."""

    images: Tensor  # uint8 N x C x H x W, CPU
    augmenter: Any  # val / weak / strong
    cfg: RUCConfig
    num_classes: int
    device: torch.device
    gen: torch.Generator  # CPU: batches, MixMatch, the refurbishing subset
    aug_gen: torch.Generator  # on the device: augmentation parameters
    eval_batch_size: int  # batches of the co-refurbishing predictions


def ruc_fingerprint(
    cfg: RUCConfig, *, labels_from: str | None, num_classes: int, hidden: int, seed: int,
    n_images: int,
) -> dict:  # fmt: skip
    """What an RUC checkpoint must agree with to be resumed (``epochs`` may grow).

    The RUC settings, where the pseudo-labels came from, the number of classes, the
    head width, the seed and the number of images.
    """
    settings = {**cfg.to_dict(), "labels_from": labels_from, "num_classes": num_classes,
                "hidden": hidden}  # fmt: skip
    return fingerprint("ruc", settings, seed=seed, n_images=n_images)


def train_ruc(
    backbone: nn.Module,
    data,
    pseudo_labels: Tensor,
    confidences: Tensor | None,
    embeddings: Tensor | None,
    augmenter,
    cfg: RUCConfig,
    device: torch.device | str = "cpu",
    *,
    num_classes: int,
    hidden: int,
    seed: int = 0,
    eval_batch_size: int = 1024,
    labels_from: str | None = None,
    checkpoint_path: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
    clean_masks: dict[str, Tensor] | None = None,
):
    """Refine ``pseudo_labels`` of ``data`` with RUC (Algorithm 1); returns (model, report).

    * ``backbone``: the pretrained encoder (``out_dim`` attribute); each network gets a
      deep copy plus a fresh randomly initialised MLP head of width ``hidden`` (App. A.2).
    * ``data``: an ``ImageData`` (uint8 images; ``labels`` used only for reporting).
    * ``confidences`` (N) for the confidence/hybrid strategies, ``embeddings`` (N x D) for
      the metric/hybrid ones (``clean_set.select_clean``).
    * ``augmenter``: provides ``val``, ``weak`` and ``strong`` (``augment.Augmenter``).
    * ``eval_batch_size``: batches of the co-refurbishing predictions.
    * ``labels_from``: where the pseudo-labels came from (``run_ruc_stage`` passes
      ``--labels-from``); only recorded in the checkpoint's fingerprint.

    The two networks are trained in turn each epoch (network 1 with network 2 as the
    counter network, then the reverse); then co-refurbishing (``losses.co_refurbish``)
    with tau_2 = ``losses.tau2_at``. With ``checkpoint_path`` the state is saved after
    every epoch and ``resume=True`` continues from it; a checkpoint of other settings
    (:func:`ruc_fingerprint`) is refused with the one error naming them. ``epochs`` may
    grow on resume; tau_2 and the cosine learning rate depend on ``cfg.epochs``, so a
    resumed run with more epochs follows the new schedule from the resumed epoch on.
    ``clean_masks`` (from ``clean_set.selection_masks``) skips recomputing the selections
    when one caller trains several strategies.

    Returns a ``heads.ClusteringModel`` whose backbone and ``cal_head`` are network 2's
    (its softmax is the confidence; ``clu_head`` is a copy of the same head) in eval
    mode on the CPU, and a JSON-able report: the clean-set quality of every strategy
    (precision/recall/F1 against ``data.labels`` when known, else sizes), the clean set
    after refurbishing, and a per-epoch history.
    """
    cfg = RUCConfig.from_dict(cfg).validate()
    device = torch.device(device)
    n = data.images.shape[0]
    # a copy: refurbishing changes it in place, the caller's labels stay the input clustering
    labels = torch.as_tensor(pseudo_labels).long().cpu().clone()
    if labels.shape != (n,):
        raise CDCError(f"{labels.shape[0]} pseudo-labels for {n} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CDCError(f"pseudo-labels must lie in 0..{num_classes - 1}")
    if hidden < 1:
        raise CDCError(f"the RUC head width must be positive, got {hidden}")
    true_labels = getattr(data, "labels", None)

    # Sec. 3.1: X, U = S(D), and how every strategy would have chosen X
    strategy, masks = _clean_sets(cfg, labels, confidences, embeddings, clean_masks)
    mask = masks[strategy].clone()
    report: dict[str, Any] = {
        "strategy": strategy,
        "config": cfg.to_dict(),
        "selection": {s: quality_or_size(m, labels, true_labels) for s, m in masks.items()},
        "history": [],
    }

    nets, optimizers = _two_networks(backbone, hidden, num_classes, cfg, seed, device)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    run = _Run(data.images, augmenter, cfg, num_classes, device, gen, aug_gen, eval_batch_size)
    stage = ruc_fingerprint(cfg, labels_from=labels_from, num_classes=num_classes,
                            hidden=hidden, seed=seed, n_images=n)  # fmt: skip
    start_epoch = 0
    state = load_stage(checkpoint_path, stage) if resume and checkpoint_path else None
    if state is not None:
        start_epoch, mask, labels = _restore(state, run, nets, optimizers, report)

    epochs = _epoch_bar(start_epoch, cfg, progress)
    for epoch in epochs:
        row = _train_epoch(run, nets, optimizers, mask, labels, epoch)
        row["clean_set"] = quality_or_size(mask, labels, true_labels)
        report["history"].append(row)
        if progress:
            epochs.set_postfix(
                loss=f"{row['net2']['loss']:.3f}", clean=row["clean_set"]["size"], tau2=row["tau2"]
            )
        if checkpoint_path:
            _save_state(Path(checkpoint_path), stage, epoch + 1, run, nets, optimizers, mask,
                        labels, report["history"])  # fmt: skip

    report["final_clean_set"] = quality_or_size(mask, labels, true_labels)
    return _final_model(nets[1], hidden, num_classes), report


def _train_epoch(
    run: _Run, nets: list[_Net], optimizers: list, mask: Tensor, labels: Tensor, epoch: int
) -> dict[str, Any]:
    """One epoch of Algorithm 1; ``mask`` and ``labels`` grow in place by refurbishing.

    1. for k in {1, 2}: network k for one pass over the (growing) clean set, or at most
       ``cfg.steps_per_epoch`` batches, with the other network as its counter network;
    2. co-refurbishing at the end of the epoch (Eq. 18-19) with tau_2 of this epoch.

    Returns the epoch's history row: each network's mean losses, tau_2 and how many
    samples refurbishing moved.
    """
    cfg = run.cfg
    unclean_idx = (~mask).nonzero().flatten()
    row: dict[str, Any] = {"epoch": epoch + 1}
    steps = math.ceil(int(mask.sum()) / cfg.batch_size)
    steps = min(steps, cfg.steps_per_epoch or steps)

    # 1. "for k in {1, 2}": train f_theta(k) with the counter network f_theta(c)
    for k in range(2):
        row[f"net{k + 1}"] = _train_network(
            run, nets[k], nets[1 - k], optimizers[k], mask, labels, epoch, steps
        )

    # 2. co-refurbishing (Eq. 18-19)
    tau2 = tau2_at(epoch, cfg)
    moved = _refurbish(run, nets, mask, labels, unclean_idx, tau2)
    row.update(tau2=tau2, refurbished=int(moved.numel()))
    return row


def _train_network(
    run: _Run, net: _Net, counter: _Net, optimizer, mask: Tensor, labels: Tensor, epoch: int,
    steps: int,
) -> dict[str, float]:  # fmt: skip
    """``steps`` batches of B clean plus B unclean samples for ``net``; its mean losses.

    The clean batches are consecutive slices of fresh permutations of the clean set, the
    unclean ones drawn with replacement; the learning rate follows the cosine schedule.
    """
    cfg, gen = run.cfg, run.gen
    clean_idx = mask.nonzero().flatten()
    unclean_idx = (~mask).nonzero().flatten()
    bx = min(cfg.batch_size, clean_idx.numel())
    bu = min(cfg.batch_size, unclean_idx.numel())
    rounds = math.ceil(steps * bx / clean_idx.numel())
    order = torch.cat(
        [clean_idx[torch.randperm(clean_idx.numel(), generator=gen)] for _ in range(rounds)]
    )
    net.train()
    counter.eval()
    sums = dict.fromkeys(_LOSSES, 0.0)
    for step in range(steps):
        progress = epoch + step / steps
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg, progress)
        xi = order[step * bx : (step + 1) * bx]
        ui = unclean_idx[torch.randint(0, max(1, unclean_idx.numel()), (bu,), generator=gen)]
        losses = _train_step(run, net, counter, optimizer, xi, ui, labels, progress)
        for key, value in zip(sums, losses, strict=True):
            sums[key] += float(value.detach())
    return {key: value / steps for key, value in sums.items()}


def _train_step(
    run: _Run, net: _Net, counter: _Net, optimizer, xi: Tensor, ui: Tensor, labels: Tensor,
    progress: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One batch of Algorithm 1 for ``net`` (f_theta(k)) with counter network ``counter``.

    ``xi`` indexes B clean samples x (pseudo-label y), ``ui`` B unclean samples u;
    ``progress`` is the epoch count so far (fractional). Returns the losses
    ``(L_t, L_X^s, L_X^, L_U^)`` of Eq. 10.
    """
    cfg, aug, ag, dev = run.cfg, run.augmenter, run.aug_gen, run.device
    xb, ub = run.images[xi].to(dev), run.images[ui].to(dev)
    y = F.one_hot(labels[xi], run.num_classes).float().to(dev)
    has_u = ui.numel() > 0

    # 1. label smoothing: y~ = (1 - eps) y + eps / (C - 1) (1 - y) (Eq. 8)
    y_tilde = label_smoothing(y, cfg.epsilon)
    with torch.no_grad():
        # 2. M weak augmentations phi_a of x and u
        x_views = [aug.weak(xb, generator=ag) for _ in range(cfg.num_views)]
        u_views = [aug.weak(ub, generator=ag) for _ in range(cfg.num_views)] if has_u else []
        # 3. refine the labels with the counter network, then sharpen (Eq. 11-12)
        counter_p = torch.stack([F.softmax(counter(v), 1) for v in x_views]).mean(0)
        y_bar = co_refine(y, counter_p, cfg.temperature)
        # 4. guess the unclean labels from both networks, then sharpen (Eq. 13-14)
        guesses = [F.softmax(m(v), 1) for v in u_views for m in (net, counter)]
        q_bar = guess_unclean(guesses, cfg.temperature) if has_u else y_bar[:0]

    # 5. X^s: strongly augmented clean samples with the smoothed labels (Eq. 9)
    loss_strong = soft_cross_entropy(net(aug.strong(xb, generator=ag)), y_tilde)

    # 6. MixMatch over the co-refined X_bar and U_bar (Eq. 1-5), scored by Eq. 6 and 7
    inputs = torch.cat(x_views + u_views)
    targets = torch.cat([y_bar] * cfg.num_views + [q_bar] * len(u_views))
    mixed_x, mixed_t, _, _ = mixmatch(inputs, targets, run.gen, cfg.alpha)
    logits = net(mixed_x)
    n_x = xi.numel() * cfg.num_views
    loss_x = soft_cross_entropy(logits[:n_x], mixed_t[:n_x])
    loss_u = unlabelled_loss(logits[n_x:], mixed_t[n_x:]) if has_u else 0 * loss_x

    # 7. the total loss L_t (Eq. 10) and one SGD step of theta(k)
    loss = loss_strong + loss_x + cfg.lambda_u * unsup_ramp(progress, cfg) * loss_u
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, loss_strong, loss_x, loss_u


def _refurbish(
    run: _Run, nets: list[_Net], mask: Tensor, labels: Tensor, unclean_idx: Tensor, tau2: float
) -> Tensor:
    """Co-refurbishing (Eq. 18-19) of ``unclean_idx``, on un-augmented images, in place.

    With ``cfg.refurbish_max`` set, a random subset of that many unclean samples is
    scored (CPU budget). Returns the indices (into the subset) of the moved samples.
    """
    cfg = run.cfg
    if cfg.refurbish_max is not None and unclean_idx.numel() > cfg.refurbish_max:
        pick = torch.randperm(unclean_idx.numel(), generator=run.gen)[: cfg.refurbish_max]
        unclean_idx = unclean_idx[pick.sort().values]
    if not unclean_idx.numel():
        return torch.empty(0, dtype=torch.long)
    sub = run.images[unclean_idx]
    probs = [_predict(net, sub, run.augmenter, run.device, run.eval_batch_size) for net in nets]
    sub_mask, sub_labels, moved = co_refurbish(probs, mask[unclean_idx], labels[unclean_idx], tau2)
    mask[unclean_idx] = sub_mask
    labels[unclean_idx] = sub_labels
    return moved


# ----------------------------------------------------------------------------------------------
# The pieces: clean sets, networks, predictions, resume
# ----------------------------------------------------------------------------------------------


def _clean_sets(
    cfg: RUCConfig, labels: Tensor, confidences, embeddings, clean_masks
) -> tuple[str, dict[str, Tensor]]:
    """(the strategy used, every available strategy's clean-set mask), checked."""
    strategy = cfg.strategy
    if strategy == "hybrid" and confidences is None:
        strategy = "metric"  # a labels file has no confidences: hybrid = what is available
    masks = clean_masks if clean_masks is not None else selection_masks(
        labels, confidences, embeddings, cfg
    )  # fmt: skip
    if strategy not in masks:  # raises the clear error about the missing input
        select_clean(strategy, labels, confidences, embeddings, tau1=cfg.tau1, k=cfg.k)
    kept = int(masks[strategy].sum())
    if kept < 2:
        raise CDCError(
            f"the {strategy!r} clean-set strategy kept {kept} of {labels.shape[0]} samples; "
            "RUC needs at least 2 (lower tau1, set clean_fraction, or use another strategy)"
        )
    return strategy, masks


def _two_networks(
    backbone: nn.Module, hidden: int, num_classes: int, cfg: RUCConfig, seed: int, device
) -> tuple[list[_Net], list[torch.optim.Optimizer]]:
    """f_theta(1), f_theta(2): copies of the pretrained backbone + fresh heads (App. A.2).

    The heads are drawn from ``seed`` without touching the global random stream; each
    network has its own SGD optimiser.
    """
    from cdc_serve_training.heads import MLPHead

    dim = getattr(backbone, "out_dim", None)
    if dim is None:
        raise CDCError("the RUC backbone must have an attribute out_dim (its feature size)")
    with torch.random.fork_rng(devices=[]):  # seeded heads, global RNG left untouched
        torch.manual_seed(seed)
        heads = [MLPHead(int(dim), hidden, num_classes) for _ in range(2)]
    nets = [_Net(copy.deepcopy(backbone), head).to(device) for head in heads]
    optimizers = [
        torch.optim.SGD(
            net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for net in nets
    ]
    return nets, optimizers


@torch.no_grad()
def _predict(net: nn.Module, images: Tensor, augmenter, device, batch_size: int) -> Tensor:
    """Softmax of ``net`` over un-augmented ``images`` (uint8, CPU), in eval mode."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = augmenter.val(images[start : start + batch_size].to(device))
        out.append(F.softmax(net(x).float(), dim=1).cpu())
    net.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def _epoch_bar(start_epoch: int, cfg: RUCConfig, progress: bool):
    """The epochs still to train, as a tqdm bar when ``progress``."""
    epochs = range(start_epoch, cfg.epochs)
    if not progress:
        return epochs
    from tqdm import tqdm

    return tqdm(epochs, desc="RUC", initial=start_epoch, total=cfg.epochs, disable=None)


def _final_model(final: _Net, hidden: int, num_classes: int):
    """Network 2 as a ``ClusteringModel`` (both heads its head), eval mode, on the CPU."""
    from cdc_serve_training.heads import ClusteringModel

    final = final.cpu().eval()
    model = ClusteringModel(final.backbone, hidden, num_classes)
    model.cal_head.load_state_dict(final.head.state_dict())
    model.clu_head.load_state_dict(final.head.state_dict())
    model.eval()
    return model


def _save_state(
    path: Path, stage: dict, epochs_done: int, run: _Run, nets, optimizers, mask, labels, history
) -> None:
    """Checkpoint after ``epochs_done`` epochs: what resuming needs (``checkpoint.save_stage``)."""
    save_stage(
        path,
        stage,
        epochs_done,
        nets=[net.state_dict() for net in nets],
        optimizers=[opt.state_dict() for opt in optimizers],
        mask=mask,
        labels=labels,
        gen=run.gen.get_state(),
        aug_gen=run.aug_gen.get_state().cpu(),
        history=history,
    )


def _restore(state: dict, run: _Run, nets, optimizers, report: dict) -> tuple[int, Tensor, Tensor]:
    """Load a checkpoint of :func:`_save_state` into the run; (epochs done, mask, labels)."""
    for i in range(2):
        nets[i].load_state_dict(state["nets"][i])
        optimizers[i].load_state_dict(state["optimizers"][i])
    run.gen.set_state(state["gen"])
    run.aug_gen.set_state(state["aug_gen"].to(run.aug_gen.get_state().device))
    report["history"] = state["history"]
    return int(state["epoch"]), state["mask"], state["labels"]
