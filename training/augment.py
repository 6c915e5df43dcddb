"""Batched image augmentation on tensors, with per-sample random parameters, on any device.

The CDC reference code augments every image on its own with PIL on the CPU. Here a whole
uint8 batch ``N x C x H x W`` (on the CPU or a GPU) is augmented at once:

- geometry (random resized crop, horizontal flip, rotation, shear, translation) is one
  3x3 affine matrix per sample, composed and applied by a single
  ``affine_grid`` / ``grid_sample`` call for the whole batch (bilinear, black fill);
- colour operations are element-wise blends whose per-sample parameter is the identity
  for samples that did not draw the operation, so no sample-dependent control flow or
  indexing is needed (and nothing waits for the GPU).

Views (as the CDC reference, paper App. B.1 and Van Gansbeke et al. 2020):

- ``val``: no augmentation, just ``(x / 255 - mean) / std``.
- ``weak``: RandomResizedCrop + horizontal flip.
- ``strong``: flip + RandomResizedCrop + 4 random RandAugment-style operations per sample
  (with random magnitudes) + Cutout of one square hole (16 px for 32-px images; scaled
  with the image size), filled with 0 after normalisation (the mean), as SCAN does.
- ``moco``: the MoCo-v2 view: RandomResizedCrop, flip, ColorJitter (p = 0.8; brightness and
  contrast for 1-channel images, plus saturation and hue for RGB), RandomGrayscale
  (p = 0.2, RGB only), GaussianBlur (p = 0.5, only for images larger than 32 px).

Geometric RandAugment operations are folded into the affine matrix and applied before the
colour operations; colour operations are point-wise so this only changes the colour of
the black fill, never the geometry. Hue is rotated in the YIQ colour space (a linear
approximation of torchvision's HSV hue shift).

Random numbers come from ``generator`` when given (on its own device, then moved: a CPU
generator gives the same augmentation on any device up to float rounding), so a seeded
generator reproduces a batch exactly.

The per-image torchvision + PIL + DataLoader pipeline of the reference implementation,
which the training benchmark compares against, is ``benchmarks/pil_pipeline.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cdc_serve import CDCError

# RandAugment-style operations of the strong view (Van Gansbeke et al. 2020 list).
STRONG_OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
OP = {name: i for i, name in enumerate(STRONG_OPS)}
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# ITU-R 601 luma weights (as PIL's "L" conversion) and the RGB <-> YIQ matrices for hue.
_LUMA = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class _Random:
    """Uniform / integer draws from an optional generator, returned on ``device``."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self.source = generator.device if generator is not None else device

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0, *shape: int) -> torch.Tensor:
        u = torch.rand((n, *shape), generator=self.generator, device=self.source)
        return (low + (high - low) * u).to(self.device, non_blocking=True)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return (self.uniform(n) < p).float()

    def integers(self, n: int, high: int, *shape: int) -> torch.Tensor:
        x = torch.randint(high, (n, *shape), generator=self.generator, device=self.source)
        return x.to(self.device, non_blocking=True)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ----------------------------------------------------------------------------------------------
# Geometry: per-sample affine matrices (output coords -> input coords, normalised to [-1, 1])
# ----------------------------------------------------------------------------------------------


def random_resized_crop_matrices(
    rnd: _Random,
    n: int,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """``n x 3 x 3`` matrices of torchvision's RandomResizedCrop, drawn per sample.

    As torchvision: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to
    ``tries`` draws, the first that fits wins; if none fits the whole image is used.
    """
    h, w = size
    area = rnd.uniform(n, scale[0], scale[1], tries)
    log_r = rnd.uniform(n, math.log(ratio[0]), math.log(ratio[1]), tries)
    aspect = torch.exp(log_r)
    w_frac = torch.sqrt(area * aspect * h / w)
    h_frac = torch.sqrt(area / aspect * w / h)
    fits = (w_frac <= 1) & (h_frac <= 1)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first fitting try (0 if none)
    any_fit = fits.any(dim=1)
    w_frac = torch.where(
        any_fit, w_frac.gather(1, first).squeeze(1), torch.ones_like(any_fit, dtype=torch.float)
    )
    h_frac = torch.where(
        any_fit, h_frac.gather(1, first).squeeze(1), torch.ones_like(any_fit, dtype=torch.float)
    )
    # Centre of the crop, uniform over the positions where the crop stays inside the image.
    cx = (1 - w_frac) * rnd.uniform(n, -1.0, 1.0)
    cy = (1 - h_frac) * rnd.uniform(n, -1.0, 1.0)
    m = torch.zeros(n, 3, 3, device=rnd.device)
    m[:, 0, 0], m[:, 0, 2] = w_frac, cx
    m[:, 1, 1], m[:, 1, 2] = h_frac, cy
    m[:, 2, 2] = 1
    return m


def flip_matrices(rnd: _Random, n: int, p: float = 0.5) -> torch.Tensor:
    """``n x 3 x 3`` matrices mirroring x for a random share ``p`` of the samples."""
    sign = 1 - 2 * rnd.bernoulli(n, p)
    m = torch.eye(3, device=rnd.device).repeat(n, 1, 1)
    m[:, 0, 0] = sign
    return m


def warp(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample float images ``x`` (N x C x H x W) through per-sample affine ``matrices``."""
    grid = F.affine_grid(matrices[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Colour operations on float images in [0, 1]; per-sample parameters of shape N x 1 x 1 x 1
# ----------------------------------------------------------------------------------------------


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (N x 1 x H x W); 1-channel images are returned as they are."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``b + factor * (a - b)`` clamped to [0, 1]: PIL's ImageEnhance with ``a`` the image."""
    return (b + _col(factor) * (a - b)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _col(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by ``shift`` turns (in [-0.5, 0.5]); RGB only."""
    if x.shape[1] != 3:
        return x
    rgb2yiq = torch.tensor(_RGB2YIQ, device=x.device, dtype=x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", rgb2yiq, x)
    angle = 2 * math.pi * shift.to(x.dtype)
    cos, sin = _col(torch.cos(angle)), _col(torch.sin(angle))
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(rgb2yiq), yiq).clamp_(0, 1)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5) used by ImageEnhance.Sharpness; borders kept."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / k.sum()).expand(c, 1, 3, 3)
    inner = F.conv2d(x, k, groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full [0, 1] range."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp_(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel (256 levels), via scatter_add and gather."""
    n, c, h, w = x.shape
    levels = (x * 255).round_().long().clamp_(0, 255).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=x.dtype)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=x.dtype))
    cdf = hist.cumsum(dim=1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(
        dim=1, keepdim=True
    )
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp_(0, 1)
    return lut.gather(1, levels).reshape(n, c, h, w)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (a threshold above 1 leaves the image as it is)."""
    return torch.where(x >= _col(threshold), 1 - x, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep ``bits`` (1..8) bits of each 8-bit value; 8 bits leaves the image as it is."""
    step = _col(2.0 ** (8 - bits.to(x.dtype)))
    out = torch.floor((x * 255).round_() / step) * step / 255
    return torch.where(_col(bits) >= 8, x, out)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (sigma <= 0 leaves an image as it is)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype).expand_as(k))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C) x K
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# The augmenter
# ----------------------------------------------------------------------------------------------


class Augmenter:
    """Batched views of uint8 ``N x C x H x W`` images -> normalised float32, on the images' device.

    Args:
        size: image size (H, W); outputs have this size.
        mean, std: per-channel normalisation in [0, 1] units.
        crop_scale: area range of the RandomResizedCrop of the strong and MoCo views.
        weak_crop_scale: area range of the weak view's crop (milder: its predictions pick
            the pseudo-labels).
        cutout: side of the strong view's Cutout hole in pixels (default: half the image
            side, i.e. 16 px for 32-px images as the reference; 0 disables it).
        strong_ops: RandAugment-style operations per sample in the strong view.
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue) of the MoCo view.
        blur: GaussianBlur in the MoCo view; default: only for images larger than 32 px.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        weak_crop_scale: tuple[float, float] = (0.5, 1.0),
        cutout: int | None = None,
        strong_ops: int = 4,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur: bool | None = None,
    ) -> None:
        self.size = _as_size(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise CDCError("mean and std need one value per channel")
        self.crop_scale = crop_scale
        self.weak_crop_scale = weak_crop_scale
        self.cutout = round(min(self.size) / 2) if cutout is None else int(cutout)
        self.strong_ops = strong_ops
        self.jitter = jitter
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p
        self.blur = max(self.size) > 32 if blur is None else blur
        self.blur_kernel = 2 * max(1, round(0.05 * min(self.size))) + 1  # ~10 % of the side
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- helpers --------------------------------------------------------------------------------

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise CDCError(f"expected N x {len(self.mean)} x H x W images, got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            return x.float().div_(255)
        return x.float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel for float images in [0, 1]."""
        if x.device not in self._stats:
            c = len(self.mean)
            self._stats[x.device] = (
                torch.tensor(self.mean, device=x.device).view(1, c, 1, 1),
                torch.tensor(self.std, device=x.device).view(1, c, 1, 1),
            )
        mean, std = self._stats[x.device]
        return (x - mean) / std

    def _resize_if_needed(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return x

    # -- views ----------------------------------------------------------------------------------

    def val(self, x: torch.Tensor) -> torch.Tensor:
        """No augmentation: uint8 images -> normalised float32."""
        return self.normalize(self._resize_if_needed(self._to_float(x)))

    def weak(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """RandomResizedCrop (``weak_crop_scale``) + horizontal flip."""
        x = self._to_float(x)
        rnd = _Random(generator, x.device)
        n = x.shape[0]
        m = random_resized_crop_matrices(rnd, n, self.size, self.weak_crop_scale)
        m = m @ flip_matrices(rnd, n)
        return self.normalize(warp(self._out_canvas(x), m))

    def moco(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """MoCo-v2 view: crop, flip, colour jitter (p=0.8), grayscale (p=0.2, RGB), blur (> 32 px)."""
        x = self._to_float(x)
        rnd = _Random(generator, x.device)
        n = x.shape[0]
        m = random_resized_crop_matrices(rnd, n, self.size, self.crop_scale)
        x = warp(self._out_canvas(x), m @ flip_matrices(rnd, n))
        b, c, s, h = self.jitter
        apply = rnd.bernoulli(n, self.jitter_p)
        # Samples that skip the jitter get identity factors (1, 1, 1, 0).
        x = adjust_brightness(x, 1 + apply * rnd.uniform(n, -b, b))
        x = adjust_contrast(x, 1 + apply * rnd.uniform(n, -c, c))
        if x.shape[1] == 3:
            x = adjust_saturation(x, 1 + apply * rnd.uniform(n, -s, s))
            x = adjust_hue(x, apply * rnd.uniform(n, -h, h))
            gray = rnd.bernoulli(n, self.grayscale_p)
            x = blend(grayscale(x).expand_as(x), x, gray)
        if self.blur:
            # MoCo-v2 draws sigma in [0.1, 2.0] px for 224-px images; scaled to this size.
            sigma = rnd.bernoulli(n, 0.5) * rnd.uniform(n, 0.1, 2.0) * (min(self.size) / 224)
            x = gaussian_blur(x, sigma, self.blur_kernel)
        return self.normalize(x)

    def strong(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flip + RandomResizedCrop + ``strong_ops`` random RandAugment ops per sample + Cutout."""
        x = self._to_float(x)
        rnd = _Random(generator, x.device)
        n = x.shape[0]
        ops = rnd.integers(n, len(STRONG_OPS), self.strong_ops)  # N x slots
        mags = rnd.uniform(n, 0.0, 1.0, self.strong_ops)  # magnitude in [0, 1] per slot
        signs = 1 - 2 * rnd.bernoulli(n * self.strong_ops, 0.5).view(n, self.strong_ops)

        # Geometry: crop, flip, then the geometric ops of every slot, as one matrix each.
        m = random_resized_crop_matrices(rnd, n, self.size, self.crop_scale)
        m = m @ flip_matrices(rnd, n)
        for slot in range(self.strong_ops):
            m = m @ self._geometric_matrix(ops[:, slot], mags[:, slot] * signs[:, slot])
        x = warp(self._out_canvas(x), m)

        # Colour: each slot blends every colour op with identity parameters where not drawn.
        for slot in range(self.strong_ops):
            x = self._colour_slot(x, ops[:, slot], mags[:, slot])

        x = self.normalize(x)
        if self.cutout > 0:
            x = x * self._cutout_mask(rnd, n, x.device, x.dtype)
        return x

    # -- pieces of the strong view --------------------------------------------------------------

    def _out_canvas(self, x: torch.Tensor) -> torch.Tensor:
        # grid_sample resamples to the grid's size; inputs of another size are resized first
        # only when needed so the crop maths (fractions of the image) stay the same.
        return self._resize_if_needed(x)

    @staticmethod
    def _geometric_matrix(op: torch.Tensor, signed_mag: torch.Tensor) -> torch.Tensor:
        """Per-sample matrix of the slot's geometric op (identity for non-geometric ops)."""
        n = op.shape[0]
        m = torch.eye(3, device=op.device).repeat(n, 1, 1)
        angle = torch.deg2rad(30.0 * signed_mag) * (op == OP["rotate"])
        m[:, 0, 0], m[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        m[:, 1, 0], m[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        m[:, 0, 1] += 0.3 * signed_mag * (op == OP["shear_x"])
        m[:, 1, 0] += 0.3 * signed_mag * (op == OP["shear_y"])
        # Translation by up to 30 % of the side (2 units = the whole side in grid coordinates).
        m[:, 0, 2] = 0.6 * signed_mag * (op == OP["translate_x"])
        m[:, 1, 2] = 0.6 * signed_mag * (op == OP["translate_y"])
        return m

    @staticmethod
    def _colour_slot(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        """Apply the slot's colour op of every sample, each op to the samples that drew it.

        Each op runs once, vectorised over its group of samples, so the work is one op per
        sample and slot (not every op on every sample).
        """
        # Enhance factors in [0.1, 1.9] (1 = identity) for color/contrast/brightness/sharpness.
        ops = {
            "brightness": lambda v, m: adjust_brightness(v, 0.1 + 1.8 * m),
            "contrast": lambda v, m: adjust_contrast(v, 0.1 + 1.8 * m),
            "color": lambda v, m: adjust_saturation(v, 0.1 + 1.8 * m),
            "sharpness": lambda v, m: blend(v, smooth(v), 0.1 + 1.8 * m),
            "autocontrast": lambda v, m: autocontrast(v),
            "equalize": lambda v, m: equalize(v),
            "solarize": lambda v, m: solarize(v, m),
            "posterize": lambda v, m: posterize(v, 4 + torch.floor(m * 4.999)),
        }
        out = x.clone()
        for name, fn in ops.items():
            index = (op == OP[name]).nonzero().flatten()
            if index.numel():
                out[index] = fn(x[index], mag[index])
        return out

    def _cutout_mask(
        self, rnd: _Random, n: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """N x 1 x H x W mask, 0 inside one square hole per sample (centre anywhere, clipped)."""
        h, w = self.size
        cy = rnd.uniform(n, 0, h).view(n, 1, 1, 1)
        cx = rnd.uniform(n, 0, w).view(n, 1, 1, 1)
        ys = torch.arange(h, device=device, dtype=dtype).view(1, 1, h, 1) + 0.5
        xs = torch.arange(w, device=device, dtype=dtype).view(1, 1, 1, w) + 0.5
        half = self.cutout / 2
        inside = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)
        return (~inside).to(dtype)


# ----------------------------------------------------------------------------------------------
# The reference-style pipeline (per image, PIL, DataLoader) for the benchmark
# ----------------------------------------------------------------------------------------------
