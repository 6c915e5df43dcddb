"""Per-image input normalisation (``--input-norm``): hand-computed values, the invariances
it promises, weights that keep their names, and its record in model.pth."""

from __future__ import annotations

import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training.backbones import build_backbone
from cdc_serve_training.checkpoint import arch_of, build_model
from cdc_serve_training.heads import ClusteringModel
from cdc_serve_training.input_norm import border_mean, border_width, object_polarity, standardise

pytestmark = pytest.mark.usefixtures("one_thread")


def _object_image() -> torch.Tensor:
    """1 x 2 x 8 x 8: a 4x4 square of 3 on a background of 1 (channel 0), its inverse
    (channel 1)."""
    x = torch.ones(1, 2, 8, 8)
    x[:, 0, 2:6, 2:6] = 3.0
    x[:, 1] = 4.0 - x[:, 0]
    return x


def test_standardise_by_hand():
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    # mean 3, deviations -3 -1 1 3, population std sqrt(5)
    expected = torch.tensor([[[[-3.0, -1.0], [1.0, 3.0]]]]) / (5**0.5 + 0.1)
    torch.testing.assert_close(standardise(x, eps=0.1), expected)


def test_border_mean_by_hand():
    x = _object_image()
    assert border_width((8, 8)) == (1, 1) and border_width((32, 17)) == (4, 2)
    assert border_mean(x, (1, 1)).tolist() == [[1.0, 3.0]]  # all background
    x[0, 0, 0, 0] = 29.0  # one of the 28 border pixels: mean 1 + 28/28
    assert border_mean(x, (1, 1))[0, 0].item() == pytest.approx(2.0)
    # a 2-row, 1-column border: 8 * 8 - 4 * 6 = 40 pixels, the square's 4 x 4 inside
    assert border_mean(_object_image(), (2, 1))[0, 0].item() == pytest.approx(1.0)


def test_object_polarity_makes_light_on_dark_and_dark_on_light_alike():
    x = _object_image()
    z = object_polarity(x, (1, 1))
    torch.testing.assert_close(z[:, 0], z[:, 1])
    assert z[0, 0, 4, 4] > 0 > z[0, 0, 0, 0]  # the object above the mean, the border below
    shifted = object_polarity(5.0 - 2.0 * x, (1, 1), eps=0.0)  # exposure, contrast, polarity
    torch.testing.assert_close(shifted, object_polarity(x, (1, 1), eps=0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_backbone_keeps_its_weight_names_and_ignores_exposure(name):
    torch.manual_seed(0)
    plain = build_backbone(name, 3, 32)
    net = build_backbone(name, 3, 32, input_norm="object").eval()
    assert list(net.state_dict()) == list(plain.state_dict())
    net.load_state_dict(plain.state_dict())  # a torchvision-style state dict still loads
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(1.5 - 3.0 * x), net(3.0 * x), atol=1e-5, rtol=0)
        assert not torch.allclose(plain.eval()(1.5 - 3.0 * x), plain(3.0 * x), atol=1e-3)


def test_model_pth_records_the_normalisation():
    backbone = build_backbone("smallcnn", 1, 28, input_norm="image")
    model = ClusteringModel(backbone, hidden_dim=8, num_classes=3)
    arch = arch_of(model, "smallcnn", 1, (28, 28))
    assert arch["input_norm"] == "image"
    assert build_model(arch).backbone.input_norm_mode == "image"
    plain = arch_of(
        ClusteringModel(build_backbone("smallcnn", 1, 28), 8, 3), "smallcnn", 1, (28, 28)
    )
    assert "input_norm" not in plain  # older model.pth files read as before
    assert build_model(plain).backbone.input_norm_mode == "dataset"


def test_unknown_mode_is_one_clear_error():
    with pytest.raises(CDCError, match="dataset, image, object"):
        build_backbone("smallcnn", 1, 28, input_norm="per-pixel")


def test_auto_means_object_for_folders_and_dataset_otherwise(tmp_path):
    from cdc_serve_training.presets import make_config

    folder = make_config(preset="quick", dataset=f"imagefolder:{tmp_path}", out=str(tmp_path),
                         num_clusters=3)  # fmt: skip
    assert folder.model.input_norm == "object"
    builtin = make_config(preset="quick", dataset="digits", out=str(tmp_path))
    assert builtin.model.input_norm == "dataset"
    chosen = make_config(preset="quick", dataset="digits", out=str(tmp_path), input_norm="image")
    assert chosen.model.input_norm == "image"
