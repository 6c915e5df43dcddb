"""Feature extractors: torchvision ResNet-18/34/50 with a small-image stem, and a small CNN.

``build_backbone(name, in_channels, input_size)`` returns an ``nn.Module`` with an
``out_dim`` attribute whose ``forward(x)`` maps ``N x C x H x W`` float images to
``N x out_dim`` features (the "embedding" of the exported model).

- ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's networks, ``fc`` replaced by
  ``Identity`` (512-d features; 2048-d for ResNet-50). For inputs up to 64 px the stem
  is a 3x3 stride-1 convolution without max-pool (as the CDC reference does for 32-px
  images); larger inputs keep the 7x7 stride-2 stem, and so does ``stem="imagenet"``
  (what pretrained torchvision weights expect). Any number of input channels.

:func:`load_weights` fills a backbone from a file: a torchvision state dict (the keys of
``torchvision.models.resnetXX().state_dict()``, ``fc.*`` ignored) or a ``backbone.pt``
written by ``cdc-serve train``; read with ``weights_only=True``.
- ``smallcnn``: four 3x3 conv-BN-ReLU stages and global average pooling; fast enough to
  train on a 2-core CPU at thousands of 28x28 images per second.
"""

from __future__ import annotations

import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training.input_norm import attach as attach_input_norm

BACKBONES = ("smallcnn", "resnet18", "resnet34", "resnet50")
STEMS = ("auto", "small", "imagenet")

# Inputs up to this size get the small-image ResNet stem (3x3 stride-1 conv, no max-pool).
SMALL_STEM_MAX_SIZE = 64


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Stride-2 Conv(3x3)-BN-ReLU stages, then global average pooling.

    Every stage halves the resolution: with the default widths (32, 64, 128) a 28x28 input
    goes 14 -> 7 -> 4 and the feature is 128-d. Larger inputs get more stride-2 stages
    (width kept) until the map is at most 4 px, so the cost per image stays small. The
    stride-2 stem matters on a CPU: a full-resolution first stage costs several times more
    than the rest of the network together (measured: ~2,000 vs ~200 img/s fwd+bwd).
    """

    def __init__(
        self,
        in_channels: int = 1,
        input_size: tuple[int, int] = (28, 28),
        widths: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        stages, c_in, side = [], in_channels, max(input_size)
        for width in widths:
            stages.append(_conv_bn_relu(c_in, width, stride=2))
            c_in, side = width, (side + 1) // 2
        while side > 4:
            stages.append(_conv_bn_relu(c_in, c_in, stride=2))
            side = (side + 1) // 2
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _resnet(name: str, in_channels: int, input_size: tuple[int, int], stem: str) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    small = max(input_size) <= SMALL_STEM_MAX_SIZE if stem == "auto" else stem == "small"
    if small:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_backbone(
    name: str,
    in_channels: int,
    input_size: tuple[int, int] | int,
    stem: str = "auto",
    input_norm: str = "dataset",
) -> nn.Module:
    """Build the named backbone (one of ``BACKBONES``) for images of this channel count and
    size; ``stem`` (ResNets): ``auto`` (small for inputs up to 64 px), ``small`` or
    ``imagenet``; ``input_norm``: the per-image normalisation before the first layer
    (``dataset``: none; see :mod:`cdc_serve_training.input_norm`)."""
    if stem not in STEMS:
        raise CDCError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 8:
        raise CDCError(f"input size must be (H, W) of at least 8 px, got {input_size}")
    if in_channels < 1:
        raise CDCError(f"in_channels must be >= 1, got {in_channels}")
    if name == "smallcnn":
        net = SmallCNN(in_channels, size)
    elif name in ("resnet18", "resnet34", "resnet50"):
        net = _resnet(name, in_channels, size, stem)
    else:
        raise CDCError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    net.stem = stem  # what model.pth's arch records (checkpoint.arch_of)
    return attach_input_norm(net, input_norm, size)


# ----------------------------------------------------------------------------------------------
# Pretrained weights from a file
# ----------------------------------------------------------------------------------------------


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """``(state dict without fc.*, backbone name, input normalisation)`` of a weights file.

    A ``backbone.pt`` of ``cdc-serve train`` names its backbone and the per-image
    normalisation it was pretrained behind (``--input-norm``); a torchvision state dict
    names neither (``None``, ``None``). ``module.`` prefixes (DataParallel/DDP saves) are
    removed.
    """
    from cdc_serve_training.checkpoint import safe_load

    state = safe_load(path)
    name = norm = None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        name, norm, state = state.get("backbone"), state.get("input_norm"), state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise CDCError(
            f"{path} is not a state dict of tensors: save one with "
            "torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)"
        )
    weights = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in weights.items() if not k.startswith("fc.")}, name, norm


def weights_stem(weights: dict[str, torch.Tensor]) -> str:
    """The stem a state dict was trained with: ``imagenet`` for a 7x7 first convolution."""
    conv1 = weights.get("conv1.weight")
    return "imagenet" if conv1 is not None and conv1.shape[-1] == 7 else "small"


def load_weights(backbone: nn.Module, weights: dict[str, torch.Tensor], path: str) -> None:
    """Copy ``weights`` into ``backbone``; one clear error naming missing/unexpected keys.

    3-channel weights of the first convolution go into a 1-channel backbone summed over
    their input channels (a grayscale image as three equal channels)."""
    own = backbone.state_dict()
    conv1 = weights.get("conv1.weight")
    gray = "conv1.weight" in own and own["conv1.weight"].shape[1] == 1
    if gray and conv1 is not None and conv1.shape[1] == 3:
        weights = {**weights, "conv1.weight": conv1.sum(dim=1, keepdim=True)}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("of another shape", wrong)) if keys
        ]  # fmt: skip
        raise CDCError(
            f"{path} does not fit this backbone: keys " + "; ".join(parts) + " (pass the weights "
            "of the --backbone you train, e.g. resnet18 weights with --backbone resnet18)"
        )
    backbone.load_state_dict(weights)
