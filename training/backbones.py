"""Feature extractors: torchvision ResNet-18/34 with a small-image stem, and a small CNN.

``build_backbone(name, in_channels, input_size)`` returns an ``nn.Module`` with an
``out_dim`` attribute whose ``forward(x)`` maps ``N x C x H x W`` float images to
``N x out_dim`` features (the "embedding" of the exported model).

- ``resnet18`` / ``resnet34``: torchvision's networks, ``fc`` replaced by ``Identity``
  (512-d features). For inputs up to 64 px the stem is a 3x3 stride-1 convolution
  without max-pool (as the CDC reference does for 32-px images); larger inputs keep the
  7x7 stride-2 stem. Any number of input channels.
- ``smallcnn``: four 3x3 conv-BN-ReLU stages and global average pooling; fast enough to
  train on a 2-core CPU at thousands of 28x28 images per second.
"""

from __future__ import annotations

import torch
from torch import nn

from cdc_serve import CDCError

BACKBONES = ("smallcnn", "resnet18", "resnet34")

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


def _resnet(name: str, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if max(input_size) <= SMALL_STEM_MAX_SIZE:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_backbone(name: str, in_channels: int, input_size: tuple[int, int] | int) -> nn.Module:
    """Build the named backbone (one of ``BACKBONES``) for images of this channel count and size."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 8:
        raise CDCError(f"input size must be (H, W) of at least 8 px, got {input_size}")
    if in_channels < 1:
        raise CDCError(f"in_channels must be >= 1, got {in_channels}")
    if name == "smallcnn":
        return SmallCNN(in_channels, size)
    if name in ("resnet18", "resnet34"):
        return _resnet(name, in_channels, size)
    raise CDCError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
