"""Backbones: output shapes for 1 and 3 channels at 28/32/96 px, the stem, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve_training.backbones import BACKBONES, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 96])
def test_output_shape(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, channels, size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, net.out_dim)
    assert torch.isfinite(out).all()
    expected = {"smallcnn": 128, "resnet50": 2048}.get(name, 512)
    assert net.out_dim == expected


def test_resnet_small_stem_only_for_small_images() -> None:
    small = build_backbone("resnet18", 1, (32, 32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    large = build_backbone("resnet18", 3, 96)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert not isinstance(large.maxpool, nn.Identity)
    assert isinstance(large.fc, nn.Identity)


def test_smallcnn_trains() -> None:
    """A few SGD steps on a fixed batch lower a simple regression loss (gradients flow)."""
    torch.manual_seed(0)
    net = build_backbone("smallcnn", 1, 28)
    x, target = torch.randn(32, 1, 28, 28), torch.randn(32, net.out_dim)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (net(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "args",
    [("vgg", 1, 28), ("smallcnn", 0, 28), ("resnet18", 3, 4), ("smallcnn", 1, (28, 28, 3))],
)
def test_bad_arguments(args) -> None:
    with pytest.raises(CDCError):
        build_backbone(*args)


def test_resnet50_and_the_imagenet_stem():
    import torch

    from cdc_serve_training.backbones import build_backbone

    net = build_backbone("resnet50", 3, 32)
    assert net.out_dim == 2048 and net.conv1.kernel_size == (3, 3)
    imagenet = build_backbone("resnet18", 1, 32, stem="imagenet")
    assert imagenet.conv1.kernel_size == (7, 7)
    assert imagenet(torch.zeros(2, 1, 32, 32)).shape == (2, 512)
