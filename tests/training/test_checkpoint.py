"""model.pth: round trip and a clear CDCError for every kind of bad file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from cdc_serve import CDCError
from cdc_serve_training.checkpoint import arch_of, build_model, load_model, save_model

ARCH = {
    "backbone": "smallcnn",
    "in_channels": 1,
    "input_size": [28, 28],
    "feature_dim": 128,
    "hidden_dim": 16,
    "num_classes": 4,
}
PREPROCESS = {"input_size": [28, 28], "channels": 1, "mean": [0.3], "std": [0.35]}


def _save(path, model=None, **overrides):
    model = model or build_model(ARCH)
    kwargs = dict(
        method="cdc", arch=ARCH, preprocess=PREPROCESS, config={"preset": "quick"},
        dataset="fashion-mnist", metrics={"n": 1}, ood={"scores": {}},
    )  # fmt: skip
    kwargs.update(overrides)
    return save_model(path, model, **kwargs)


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH)
    assert build_model(arch_of(model, "smallcnn", 1, (28, 28))).num_classes == 4
    path = _save(tmp_path / "model.pth", model)
    loaded, info = load_model(path)
    assert not loaded.training
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert info["arch"] == ARCH and info["preprocess"] == PREPROCESS
    assert info["format"] == "cdc-serve/model" and info["format_version"] == 1
    assert "state_dict" not in info
    # plain containers only: readable with weights_only=True
    raw = torch.load(path, weights_only=True)
    assert raw["method"] == "cdc"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_missing_file(tmp_path):
    with pytest.raises(CDCError, match="no such file"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = _save(tmp_path / "model.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CDCError, match="truncated|corrupt|not a"):
        load_model(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(CDCError):
        load_model(path)


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "model.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CDCError, match="not a cdc-serve model"):
        load_model(path)


class _Payload:
    """Unpickling this would call a function: weights_only must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_crafted_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"format": "cdc-serve/model", "evil": _Payload()}, path)
    with pytest.raises(CDCError, match="refusing to unpickle"):
        load_model(path)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CDCError):
        load_model(plain)


def _rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_other_format_version(tmp_path):
    path = _save(tmp_path / "model.pth")
    _rewrite(path, format_version=99)
    with pytest.raises(CDCError, match="format version"):
        load_model(path)
    _rewrite(path, format_version=1, project_version="7.0.0")
    with pytest.raises(CDCError, match="incompatible"):
        load_model(path)
    _rewrite(path, format="something-else")
    with pytest.raises(CDCError, match="not a cdc-serve model"):
        load_model(path)


def test_class_count_disagreeing_with_weights(tmp_path):
    path = _save(tmp_path / "model.pth")
    _rewrite(path, arch={**ARCH, "num_classes": 7})
    with pytest.raises(CDCError, match="7 classes"):
        load_model(path)


def test_missing_and_unexpected_keys(tmp_path):
    path = _save(tmp_path / "model.pth")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("cal_head.fc1.weight")
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, path)
    with pytest.raises(CDCError, match="missing weights.*unexpected weights"):
        load_model(path)


def test_wrong_shapes(tmp_path):
    path = _save(tmp_path / "model.pth")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["clu_head.fc1.weight"] = torch.zeros(3, 3)
    torch.save(payload, path)
    with pytest.raises(CDCError, match="do not fit"):
        load_model(path)
