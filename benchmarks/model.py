"""The model and batch sizes the benchmarks use: the ``quick`` preset's SmallCNN on 1x28x28.

Sizes come from ``cdc_serve_training.config`` (the ``quick`` preset) when it can be built,
otherwise from the fallbacks below; :func:`quick_preset` says which.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

CHANNELS, SIZE, NUM_CLASSES = 1, 28, 10  # Fashion-MNIST


@dataclass
class PresetSizes:
    """The sizes of the ``quick`` preset that matter for a benchmark."""

    backbone: str = "smallcnn"
    hidden_dim: int = 256
    batch_size: int = 256  # B of Algorithm 1
    sub_batch_size: int = 128  # B_s
    mini_clusters: int = 64  # K
    kmeans_iters: int = 10
    source: str = "fallback sizes in benchmarks/model.py"


def quick_preset() -> PresetSizes:
    """The ``quick`` preset of ``make_config`` (fallbacks if the config module is not there)."""
    sizes = PresetSizes()
    try:
        from cdc_serve_training.presets import make_config

        with tempfile.TemporaryDirectory() as tmp:
            cfg = make_config(preset="quick", dataset="fashion-mnist", out=tmp)
    except Exception as exc:  # the config module may be missing or fail on this machine
        sizes.source += f" (quick preset unavailable: {type(exc).__name__}: {exc})"
        return sizes
    cdc = cfg.cdc
    sizes.backbone = str(cfg.model.backbone)
    sizes.hidden_dim = int(cfg.model.hidden)
    sizes.batch_size = int(_first(cdc, ("batch_size",), sizes.batch_size))
    sizes.sub_batch_size = int(_first(cdc, ("sub_batch_size",), sizes.sub_batch_size))
    sizes.mini_clusters = int(_first(cdc, ("mini_clusters",), sizes.mini_clusters))
    sizes.kmeans_iters = int(_first(cdc, ("kmeans_iters",), sizes.kmeans_iters))
    sizes.source = "cdc_serve_training.presets.make_config(preset='quick')"
    return sizes


def _first(obj, names: tuple[str, ...], default):
    """The first of ``obj``'s attributes ``names`` that is a plain str/int, else ``default``."""
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return default


def build_model(sizes: PresetSizes, seed: int = 0):
    """A randomly initialised ``ClusteringModel`` (SmallCNN + two MLP heads) on 1x28x28."""
    import torch

    from cdc_serve_training.backbones import build_backbone
    from cdc_serve_training.heads import ClusteringModel

    torch.manual_seed(seed)
    backbone = build_backbone(sizes.backbone, CHANNELS, SIZE)
    return ClusteringModel(backbone, sizes.hidden_dim, NUM_CLASSES)


def count_flops(module, example) -> int:
    """Multiply-adds x 2 of the Conv2d and Linear layers for one forward pass of ``example``.

    Counted with forward hooks; BatchNorm, ReLU, pooling and softmax are left out (they
    are a small fraction, and BatchNorm folds into the convolution in the exported graph).
    """
    import torch
    from torch import nn

    total = 0

    def conv_hook(mod: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = mod.kernel_size
        total += 2 * output.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inputs, output):
        nonlocal total
        total += 2 * output.numel() * mod.in_features

    handles = []
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total
