"""Benchmark 3: CDC training throughput (images/s of Algorithm 1 steps), two data pipelines.

Both contenders run the *same* training step, ``cdc_serve_training.cdc._train_batch``
(Algorithm 1: no-grad val/weak passes, Eq. 4 selection, per-batch mini-cluster K-means,
per sub-batch clustering + calibration losses, Adam steps), on the same model (one
initial state, copied), with the ``quick`` preset's ``B``, ``B_s``, ``K``; only the
source of the three views differs:

- project: uint8 batches on the device and the batched tensor
  :class:`cdc_serve_training.augment.Augmenter` (per-sample random parameters; strong
  views only for the selected samples, as ``_train_batch`` asks for them);
- reference-like: :class:`benchmarks.pil_pipeline.PILReferencePipeline`, a
  ``DataLoader`` whose workers build the val, weak and strong views of every image one
  at a time with PIL and ``torchvision.transforms`` (as the authors' code does, with the
  same crop scales, RandAugment op count and Cutout size as the Augmenter), handed to
  the same step through :class:`PrecomputedViews`.

Images: Fashion-MNIST's training images when they are installed, random ones otherwise.
A round is a fixed number of steps (a fresh DataLoader iterator per round, so worker
start-up counts as it does per epoch in the reference); rounds alternate between the
contenders after one warm-up step each.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys

import torch

from benchmarks.common import (
    BenchSettings,
    Measurement,
    Section,
    cpu_cores,
    fmt_profile,
    fmt_rate,
    fmt_ratio,
    interleaved,
    md_table,
    met,
    profile_top_ops,
)
from benchmarks.model import CHANNELS, NUM_CLASSES, SIZE, build_model, quick_preset

GOAL_CPU = 1.5  # project pipeline >= 1.5x the PIL pipeline on the (2-core) CPU
GOAL_GPU = 3.0  # ... >= 3x on the same GPU


def load_images(n: int):
    """(an ``ImageData`` of n uint8 1 x 28 x 28 images, where they came from)."""
    from cdc_serve_training.data import ImageData, load_dataset

    try:
        data = load_dataset("fashion-mnist", split="train", limit=n)
        return data.subset(slice(0, n)), "Fashion-MNIST training images"
    except Exception as exc:  # not installed here: random images of the same shape
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, CHANNELS, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        data = ImageData(images, None, NUM_CLASSES, "random", (0.5,), (0.25,))
        return data, f"random images ({type(exc).__name__}: {exc})"


class PrecomputedViews:
    """Hands views built elsewhere to code that calls ``augmenter.val/weak/strong(x)``.

    The training step is driven with ``x = torch.arange(B)`` (indices into the batch), so
    ``strong(x[chosen])`` returns the chosen rows of the precomputed strong views.
    """

    def __init__(self, val: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor) -> None:
        self._val, self._weak, self._strong = val, weak, strong

    def val(self, idx: torch.Tensor) -> torch.Tensor:
        return self._val[idx]

    def weak(self, idx: torch.Tensor, generator=None) -> torch.Tensor:
        return self._weak[idx]

    def strong(self, idx: torch.Tensor, generator=None) -> torch.Tensor:
        return self._strong[idx]


def cdc_config(sizes, quick: bool):
    """The quick preset's CDCConfig (smaller batches with --quick)."""
    from cdc_serve_training.config import CDCConfig
    from cdc_serve_training.presets import make_config

    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cfg = copy.deepcopy(make_config(preset="quick", dataset="fashion-mnist", out=tmp).cdc)
    except Exception:
        cfg = CDCConfig(
            batch_size=sizes.batch_size,
            sub_batch_size=sizes.sub_batch_size,
            mini_clusters=sizes.mini_clusters,
            kmeans_iters=sizes.kmeans_iters,
        )
    if quick:
        cfg.batch_size, cfg.sub_batch_size, cfg.mini_clusters = 200, 100, 20
    return cfg


class Trainer:
    """One model + optimizer trained by ``_train_batch`` from one view source."""

    def __init__(self, model, cfg, device, amp: bool):
        from cdc_serve_training import cdc

        self.cdc = cdc
        self.model = cdc._to_device(model, device).train()
        self.cfg, self.device = cfg, device
        self.optimizer = cdc._optimizer(self.model, cfg)
        self.select_head, self.cal_head = cdc._heads(self.model, cfg)
        self.autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"
        )
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.selected: list[float] = []
        self.peak_memory = 0

    def step(self, x: torch.Tensor, augmenter) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats = self.cdc._train_batch(
            self.model,
            x,
            augmenter,
            self.cfg,
            NUM_CLASSES,
            self.select_head,
            self.cal_head,
            self.optimizer,
            self.generator,
            self.autocast,
        )
        self.selected.append(stats["selected"])
        if self.device.type == "cuda":
            self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated())


def project_work(trainer: Trainer, images: torch.Tensor, augmenter):
    """Steps with uint8 batches already on the device and the batched tensor Augmenter."""
    B = trainer.cfg.batch_size
    gen = torch.Generator(device=images.device).manual_seed(1)

    def work(n: int) -> int:
        order = torch.randperm(len(images), generator=gen, device=images.device)
        for s in range(n):
            trainer.step(images[order[s * B : (s + 1) * B]], augmenter)
        return n * B

    return work


def pil_work(trainer: Trainer, data, augmenter, workers: int):
    """Steps fed by a fresh reference-like DataLoader (PIL, one image at a time) per round."""
    from benchmarks.pil_pipeline import PILReferencePipeline

    B = trainer.cfg.batch_size
    gen = torch.Generator().manual_seed(2)
    rounds = 0

    def work(n: int) -> int:
        nonlocal rounds
        rounds += 1
        subset = data.subset(torch.randperm(len(data), generator=gen)[: n * B])
        pipeline = PILReferencePipeline(subset, ("val", "weak", "strong"), aug=augmenter)
        loader = pipeline.loader(B, num_workers=workers, seed=rounds)
        index = torch.arange(B, device=trainer.device)
        steps = 0
        for views, _ in loader:
            views = [v.to(trainer.device, non_blocking=True) for v in views]
            trainer.step(index, PrecomputedViews(*views))
            steps += 1
        del loader  # shuts its (persistent) workers down before the next contender runs
        return steps * B

    return work


def run(settings: BenchSettings) -> Section:
    from cdc_serve_training.augment import Augmenter

    cores = cpu_cores()
    torch.set_num_threads(cores)
    sizes = quick_preset()
    cfg = cdc_config(sizes, settings.quick)
    B = cfg.batch_size
    steps = 1 if settings.quick else 2
    data_all, source = load_images(max(4 * B, steps * B))
    devices = ["cpu"] + (["cuda"] if settings.device == "cuda" else [])
    base = build_model(sizes)
    worker_options = (cores,) if settings.quick else (0, cores)
    # a PIL round lasts seconds: three alternating rounds are enough and keep `make bench` short
    timing = dataclasses.replace(settings, rounds=min(settings.rounds, 3))

    tables, goals, data = [], [], {"config": vars(cfg), "images": source, "steps_per_round": steps}
    for dev_name in devices:
        device = torch.device(dev_name)
        amp = dev_name == "cuda"
        dev_images = data_all.images.to(device)
        augmenter = Augmenter((SIZE, SIZE), data_all.mean, data_all.std)
        trainers = {"project": Trainer(copy.deepcopy(base), cfg, device, amp)}
        contenders = {"project": project_work(trainers["project"], dev_images, augmenter)}
        for w in worker_options:
            name = f"pil_w{w}"
            trainers[name] = Trainer(copy.deepcopy(base), cfg, device, amp)
            contenders[name] = pil_work(trainers[name], data_all, augmenter, w)
        print(f"[bench]   training on {dev_name}: warm-up", file=sys.stderr, flush=True)
        for work in contenders.values():
            work(1)
        sync = torch.cuda.synchronize if dev_name == "cuda" else None
        print(f"[bench]   training on {dev_name}: timing", file=sys.stderr, flush=True)
        m = interleaved(contenders, timing, units=dict.fromkeys(contenders, steps), sync=sync)
        table, goal, figures = _results(dev_name, m, trainers, worker_options)
        if dev_name == "cpu":
            figures["profile_project"] = profile_top_ops(
                functools.partial(contenders["project"], 1), runs=1
            )
            table += (
                "\nWhere one project step spends its time on the CPU (torch.profiler, self CPU "
                "time): " + fmt_profile(figures["profile_project"]) + ".\n"
            )
        tables.append(table)
        goals.append(goal)
        data[dev_name] = figures

    lines = [
        "## 3. CDC training throughput (Algorithm 1 steps)",
        "",
        f"Measured {'with --quick ' if settings.quick else ''}on {', '.join(devices)}: "
        f"the `quick` preset's model ({sizes.backbone}, hidden {sizes.hidden_dim}) and CDC "
        f"settings B = {cfg.batch_size}, B_s = {cfg.sub_batch_size}, K = {cfg.mini_clusters}, "
        f"{cfg.kmeans_iters} K-means iterations; {source}. Each contender runs "
        "`cdc_serve_training.cdc._train_batch` (the whole Algorithm 1 step: two no-grad "
        "passes, Eq. 4 selection, mini-cluster K-means, sub-batch losses and Adam steps); "
        "only the source of the views differs. "
        f"{timing.rounds} alternating rounds of {steps} step(s) of {B} images each after one "
        "warm-up step; median round reported. The PIL pipeline starts a fresh DataLoader "
        "per round (worker start-up included, as once per epoch in the reference).",
        "",
        *tables,
        "",
        md_table(["goal", "measured", "met?"], [[g, v, met(ok)] for g, v, ok in goals]),
    ]
    missed = [f"{g} (measured {v})" for g, v, ok in goals if ok is False]
    if missed:
        lines += ["", "**Missed:** " + "; ".join(missed) + "."]
    return Section("training", "\n".join(lines), goals, data)


def _results(dev_name: str, m: dict[str, Measurement], trainers, worker_options):
    project = m["project"]
    pil = {w: m[f"pil_w{w}"] for w in worker_options}
    best_w = max(pil, key=lambda w: pil[w].throughput)
    rows = []
    figures = {}
    for name, meas in m.items():
        trainer = trainers[name]
        share = sum(trainer.selected) / max(len(trainer.selected), 1)
        label = (
            "project: batched tensor Augmenter, uint8 batches on the device"
            if name == "project"
            else f"reference-like: PIL + torchvision.transforms, DataLoader, "
            f"{name.removeprefix('pil_w')} workers"
        )
        row = [
            label,
            fmt_rate(meas.throughput),
            f"{meas.seconds:.2f} s",
            f"{100 * share:.0f} %",
            fmt_ratio(meas.throughput / pil[best_w].throughput),
        ]
        if dev_name == "cuda":
            row.append(f"{trainer.peak_memory / 2**20:.0f} MiB")
        rows.append(row)
        figures[name] = {
            "images_per_s": meas.throughput,
            "seconds_per_round": meas.seconds,
            "selected_share": share,
            "spread": meas.spread,
            "peak_memory_bytes": trainer.peak_memory,
        }
    headers = ["pipeline", "images/s", "time per round", "selected (Eq. 4)", "vs fastest PIL"]
    if dev_name == "cuda":
        headers.append("peak GPU memory")
    ratio = project.throughput / pil[best_w].throughput
    goal_value = GOAL_GPU if dev_name == "cuda" else GOAL_CPU
    goal = (
        f"training step throughput >= {goal_value:g}x the PIL + DataLoader pipeline "
        f"({dev_name}, against its faster worker setting)",
        fmt_ratio(ratio),
        ratio >= goal_value,
    )
    figures["ratio"] = ratio
    return f"**{dev_name}**\n\n" + md_table(headers, rows) + "\n", goal, figures
