"""Per-image input normalisation: what the backbone sees of each image's colours.

Every image first gets the data set's normalisation, ``(x / 255 - mean[c]) / std[c]``
(the augmenter in training, the served graph at inference). ``--input-norm`` then says
what the backbone does with it, before its first layer:

- ``dataset``: nothing more. The built-in data sets' default: their images share one
  exposure, contrast and polarity (Fashion-MNIST: a light garment on black).
- ``image``: each image, channel by channel, to zero mean and unit deviation,
  ``(x - mean_hw) / (std_hw + eps)``. Exposure, tint and contrast no longer tell two
  images apart; shapes and textures do.
- ``object``: ``image``, then each channel's sign chosen so that the image's border
  (the outer eighth on every side, where an object-centred photo shows its background)
  lies below the mean. A dark object on a light background and a light one on a dark
  background then look the same. The default for image folders: without it, a folder of
  product shots or scans in many colours clusters by colour (measured on Fashion-MNIST in
  random colours, ``docs/BENCHMARKS.md``).

Where colour or brightness is what tells the groups apart (ripe and unripe fruit, day
and night shots), train with ``--input-norm dataset``; where the background is not at
the border, ``image`` keeps the colours' polarity.

Both are parameter-free and applied by a forward pre-hook on the backbone, so that the
backbone's weights keep their names (a torchvision state dict still loads) and the ONNX
export, which traces the backbone, carries the normalisation into the served graph.
It is computed in float64 (see ``InputNormalisation.forward``).
``model.pth`` records the choice in its ``arch`` (``input_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from cdc_serve import CDCError
from cdc_serve.choices import InputNorm, values

MODES = tuple(m for m in values(InputNorm) if m != InputNorm.auto.value)

# Added to the per-image deviation (in units of the data set's std): keeps a flat channel
# (a uniform image, or a colour channel that object and background share) from being
# blown up to unit deviation of its noise.
EPS = 0.05
# The border that decides an ``object`` image's sign: this fraction of each side.
BORDER = 1 / 8


def standardise(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``N x C x H x W`` -> each image and channel at zero mean, deviation ``std / (std + eps)``."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    centred = x - mean
    std = centred.square().mean(dim=(2, 3), keepdim=True).sqrt()
    return centred / (std + eps)


def border_width(size: tuple[int, int], fraction: float = BORDER) -> tuple[int, int]:
    """The border's rows and columns for images of ``size`` (H, W): at least one of each."""
    return max(1, int(size[0] * fraction)), max(1, int(size[1] * fraction))


def border_mean(x: torch.Tensor, border: tuple[int, int]) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x C``: the mean over the outer ``border`` (rows, columns)."""
    (h, w), (bh, bw) = x.shape[2:], border
    inner = x[:, :, bh : h - bh, bw : w - bw]
    total = x.sum(dim=(2, 3)) - inner.sum(dim=(2, 3))
    return total / (h * w - (h - 2 * bh) * (w - 2 * bw))


def object_polarity(x: torch.Tensor, border: tuple[int, int], eps: float = EPS) -> torch.Tensor:
    """Standardised ``x`` with each channel's sign flipped where its border is above the mean."""
    z = standardise(x, eps)
    sign = torch.where(border_mean(z, border) > 0, -1.0, 1.0).to(z.dtype)
    return z * sign[:, :, None, None]


class InputNormalisation(nn.Module):
    """``image`` or ``object`` normalisation of ``size`` images (no parameters, no buffers)."""

    def __init__(self, mode: str, size: tuple[int, int]) -> None:
        super().__init__()
        if mode not in ("image", "object"):
            raise CDCError(f"no per-image normalisation {mode!r}; use image or object")
        self.mode, self.border = mode, border_width(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float64: the mean subtracted from a nearly flat channel, then the division by
        # its small deviation, would turn float32's different summation orders (PyTorch,
        # onnxruntime) into visible differences of the served graph's outputs
        z = x.double()
        z = object_polarity(z, self.border) if self.mode == "object" else standardise(z)
        return z.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.mode}, border={self.border}"


def _normalise_input(backbone: nn.Module, args: tuple) -> tuple:
    return (backbone.input_norm(args[0]), *args[1:])


def attach(backbone: nn.Module, mode: str, size: tuple[int, int]) -> nn.Module:
    """Give ``backbone`` (for ``size`` images) the ``mode`` normalisation (``dataset``: none);
    records ``backbone.input_norm_mode``."""
    if mode not in MODES:
        raise CDCError(f"unknown input normalisation {mode!r}; use one of {', '.join(MODES)}")
    backbone.input_norm_mode = mode
    if mode != "dataset":
        backbone.input_norm = InputNormalisation(mode, size)
        backbone.register_forward_pre_hook(_normalise_input)
    return backbone
