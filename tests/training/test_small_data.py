"""presets.adapt_to_data: the small-data rule, computed by hand (no images decoded)."""

from __future__ import annotations

import pytest

from cdc_serve_training.presets import adapt_to_data, folder_epoch_scale, make_config


@pytest.mark.parametrize(
    ("n", "scales"),
    [(200, (5, 2)), (10_000, (5, 2)), (12_500, (4, 2)), (20_000, (2, 1)), (49_999, (1, 1)),
     (60_000, (1, 1))],
)  # fmt: skip
def test_folder_epoch_scale_by_hand(n, scales):
    assert folder_epoch_scale(n) == scales  # MoCo min(5, 50,000 // n) >= 1, CDC half of it


def _folder(tmp_path, preset="quick", **kwargs):
    return make_config(preset=preset, dataset=f"imagefolder:{tmp_path}", out=str(tmp_path),
                       num_clusters=10, **kwargs)  # fmt: skip


def test_a_small_folder_trains_longer_and_says_so(tmp_path):
    config = _folder(tmp_path)
    moco, cdc = config.moco.epochs, config.cdc.epochs
    lines = adapt_to_data(config, 10_000)
    assert (config.moco.epochs, config.cdc.epochs) == (5 * moco, 2 * cdc)
    assert lines == [
        f"10000 images: MoCo-v2 {5 * moco} epochs (5x), CDC {2 * cdc} epochs (2x) the "
        "preset's, for a folder under 50,000 images (set them with --pretrain-epochs, --epochs)"
    ]


def test_epochs_given_on_the_command_line_stay(tmp_path):
    config = _folder(tmp_path, pretrain_epochs=3)
    cdc = config.cdc.epochs
    adapt_to_data(config, 10_000)
    assert (config.moco.epochs, config.cdc.epochs) == (3, 2 * cdc)
    both = _folder(tmp_path, pretrain_epochs=3, epochs=2)
    assert adapt_to_data(both, 10_000) == []
    assert (both.moco.epochs, both.cdc.epochs) == (3, 2)


def test_built_in_data_sets_and_large_folders_keep_the_preset(tmp_path):
    subset = make_config(preset="quick", dataset="fashion-mnist", out=str(tmp_path), limit=10_000)
    epochs = (subset.moco.epochs, subset.cdc.epochs)
    adapt_to_data(subset, 10_000)
    assert (subset.moco.epochs, subset.cdc.epochs) == epochs
    large = _folder(tmp_path)
    assert adapt_to_data(large, 60_000) == []
    assert (large.moco.epochs, large.cdc.epochs) == epochs


def test_the_paper_preset_keeps_its_long_schedule(tmp_path):
    config = _folder(tmp_path, preset="paper")
    epochs = (config.moco.epochs, config.cdc.epochs)
    adapt_to_data(config, 10_000)
    assert (config.moco.epochs, config.cdc.epochs) == epochs
