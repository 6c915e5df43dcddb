"""Batched augmentation: shapes, ranges, per-sample randomness, seeded determinism, the ops."""

from __future__ import annotations

import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training.augment import (
    Augmenter,
    autocontrast,
    equalize,
    gaussian_blur,
    posterize,
    solarize,
)

VIEWS = ("weak", "strong", "moco")


def images(n: int = 16, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish random images: upsampled noise, so crops and flips change the pixels.
    small = torch.randint(0, 256, (n, c, size // 4, size // 4), generator=g).float()
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    return big.round().clamp(0, 255).to(torch.uint8)


def augmenter(c: int = 1, size: int = 28) -> Augmenter:
    return Augmenter(size, [0.3] * c, [0.35] * c)


@pytest.mark.parametrize(("c", "size"), [(1, 28), (3, 32), (3, 96), (1, 8)])
@pytest.mark.parametrize("view", VIEWS)
def test_shapes_dtype_and_range(c: int, size: int, view: str) -> None:
    aug = augmenter(c, size)
    x = images(6, c, size)
    y = getattr(aug, view)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32
    pixels = y * 0.35 + 0.3  # back to [0, 1] units
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_val_is_plain_normalisation() -> None:
    aug, x = augmenter(), images()
    assert torch.allclose(aug.val(x), (x.float() / 255 - 0.3) / 0.35)


def test_full_image_crop_is_identity_up_to_flip() -> None:
    aug = Augmenter(28, [0.3], [0.35], weak_crop_scale=(1.0, 1.0))
    x = images(32)
    y, ref = aug.weak(x, torch.Generator().manual_seed(0)), aug.val(x)
    same = torch.isclose(y, ref, atol=1e-5).flatten(1).all(1)
    flipped = torch.isclose(y, ref.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0 < int(flipped.sum()) < 32  # some flipped, some not


@pytest.mark.parametrize("view", VIEWS)
def test_each_sample_gets_its_own_parameters(view: str) -> None:
    aug = augmenter()
    x = images(1).repeat(16, 1, 1, 1)  # the same image 16 times
    y = getattr(aug, view)(x, torch.Generator().manual_seed(0)).flatten(1)
    distinct = {tuple(row.tolist()) for row in y}
    assert len(distinct) == 16


@pytest.mark.parametrize("view", VIEWS)
def test_seeded_generator_reproduces_and_seeds_differ(view: str) -> None:
    aug, x = augmenter(3, 32), images(8, 3, 32)
    a = getattr(aug, view)(x, torch.Generator().manual_seed(5))
    b = getattr(aug, view)(x, torch.Generator().manual_seed(5))
    c = getattr(aug, view)(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A generator advances: two calls in a row differ, and the pair repeats from the same seed.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first, second = getattr(aug, view)(x, g1), getattr(aug, view)(x, g1)
    assert not torch.equal(first, second)
    assert torch.equal(first, getattr(aug, view)(x, g2)) and torch.equal(
        second, getattr(aug, view)(x, g2)
    )


def test_global_rng_is_used_without_a_generator() -> None:
    aug, x = augmenter(), images(4)
    torch.manual_seed(0)
    a = aug.strong(x)
    torch.manual_seed(0)
    assert torch.equal(a, aug.strong(x))


def test_strong_has_cutout_holes_at_the_mean() -> None:
    aug = Augmenter(28, [0.3], [0.35], cutout=14)
    x = torch.full((32, 1, 28, 28), 255, dtype=torch.uint8)
    y = aug.strong(x, torch.Generator().manual_seed(0))
    zeros = (y == 0).flatten(1).sum(1)
    assert (zeros > 0).all()  # every sample has a hole (value 0 = the mean after normalising)
    assert (zeros <= 14 * 14).all()
    no_cut = Augmenter(28, [0.3], [0.35], cutout=0).strong(x, torch.Generator().manual_seed(0))
    assert ((no_cut == 0).flatten(1).sum(1) < zeros).any()


def test_colour_ops() -> None:
    x = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    assert torch.allclose(solarize(x, torch.tensor([2.0])), x)
    assert torch.allclose(solarize(x, torch.tensor([0.0])), 1 - x)
    assert torch.allclose(posterize(x, torch.tensor([8.0])), x)
    poster = posterize(x, torch.tensor([2.0]))
    assert len(torch.unique(poster)) == 4
    low = 0.25 + 0.5 * x
    assert torch.allclose(autocontrast(low), x, atol=1e-6)
    eq = equalize(low)
    assert eq.min() == 0 and eq.max() == 1
    assert torch.allclose(gaussian_blur(x, torch.tensor([0.0]), 3), x)
    blurred = gaussian_blur(x, torch.tensor([2.0]), 5)
    assert blurred.std() < x.std() and blurred.shape == x.shape


def test_bad_input_shape() -> None:
    with pytest.raises(CDCError, match="N x 1 x H x W"):
        augmenter().val(images(2, 3, 28))
