"""`cdc-serve train --dataset imagefolder:DIR`: a user's own unlabelled folder, end to end.

200 coloured digits of random sizes (PNG and JPEG) plus three broken files: the run
adapts its batch sizes to the data, skips and lists the broken files, writes one
assignment per image and the label-free figures, and reuses its decoded cache.
"""

from __future__ import annotations

import csv
import json

import pytest
from folders import digit_folder
from typer.testing import CliRunner

from cdc_serve.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--preset", "quick", "--pretrain-epochs", "1", "--epochs", "1", "--device", "cpu"]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train(folder, out, *extra):
    args = ["train", "--dataset", f"imagefolder:{folder}", "--out", str(out), *QUICK, *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return digit_folder(tmp_path_factory.mktemp("own") / "photos", n=200)


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    folder, _ = photos
    out = tmp_path_factory.mktemp("run")
    result = _train(folder, out, "--num-clusters", "10")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_200_unlabelled_images_train_with_adapted_batches(trained):
    out, output = trained
    assert (
        "200 images: CDC batch B=100, sub-batch B_s=50, mini-clusters K=2, MoCo batch 64" in output
    )
    rows = _csv(out / "assignments.csv")
    assert len(rows) == 200 and list(rows[0]) == ["source", "cluster_id", "confidence"]
    assert rows[0]["source"].endswith("photos/00000.png")
    assert all(0 <= int(r["cluster_id"]) < 10 and 0 < float(r["confidence"]) <= 1 for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads"] == {} and metrics["n"] == 200
    free = metrics["label_free"]
    assert free["n"] == 200 and sum(free["cluster_sizes"]) == 200
    assert len(free["cluster_sizes"]) == 10 and free["empty_clusters"] == free[
        "cluster_sizes"
    ].count(0)
    assert 0 < free["estimated_accuracy"] <= 1 and free["confident_threshold"] == 0.8


def test_bad_files_are_skipped_with_one_line_each_and_listed(trained):
    out, output = trained
    skipped = _csv(out / "skipped.csv")
    assert [r["file"] for r in skipped] == ["zz-empty.png", "zz-text.png", "zz-truncated.jpg"]
    assert output.count("warning: skipped ") == 3 and "3 unreadable file(s) skipped" in output


def test_a_second_run_reuses_the_decoded_images(photos, trained):
    folder, _ = photos
    out, _ = trained
    (cache,) = out.glob("images-*.npy")
    stamp = cache.stat().st_mtime_ns
    again = _train(folder, out, "--num-clusters", "10", "--resume")
    assert again.exit_code == 0, again.output
    assert cache.stat().st_mtime_ns == stamp and len(list(out.glob("images-*.npy"))) == 1


def test_sub_folders_give_labels_for_evaluation(tmp_path):
    folder, labels = digit_folder(tmp_path / "classes", n=200, classes=True, broken=False)
    result = _train(folder, tmp_path / "run")  # 10 sub-folders: 10 clusters
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"kmeans", "clu", "cal"} and "label_free" in metrics
    rows = _csv(tmp_path / "run" / "assignments.csv")
    assert [int(r["label"]) for r in rows] == labels.tolist()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no class sub-folders: say how many clusters to find with --num-clusters K"),
        (["--num-clusters", "10", "--batch-size", "100", "--sub-batch-size", "30"],
         "B=100 is not divisible by the sub-batch size B_s=30"),
        (["--num-clusters", "10", "--batch-size", "500"], "B=500 is larger than the data"),
        (["--num-clusters", "10", "--input-size", "big"], "--input-size 'big': use N or HxW"),
        (["--num-clusters", "10", "--channels", "2"], "--channels must be 1 or 3"),
        (["--num-clusters", "10", "--strict"], "zz-empty.png: empty file"),
    ],
)  # fmt: skip
def test_bad_settings_fail_with_one_line_before_decoding(photos, tmp_path, extra, message):
    folder, _ = photos
    result = _train(folder, tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if "--strict" not in extra:  # refused before any image was decoded
        assert not list((tmp_path / "run").glob("images-*.npy"))


def test_torchvision_resnet18_weights_load_and_a_wrong_file_is_one_clear_error(photos, tmp_path):
    """--backbone-weights: a torchvision state dict goes into model.pth unchanged
    (--pretrain-epochs 0 --epochs 0), and ResNet-34 weights for a ResNet-18 are refused."""
    import torch
    import torchvision

    from cdc_serve_training.checkpoint import load_model

    folder, _ = photos
    torch.manual_seed(1)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    args = ["--num-clusters", "10", "--backbone", "resnet18", "--backbone-weights",
            str(tmp_path / "r18.pth"), "--pretrain-epochs", "0", "--epochs", "0"]  # fmt: skip
    result = _train(folder, tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    model, info = load_model(tmp_path / "run" / "model.pth")
    assert info["arch"]["stem"] == "imagenet"
    trained = model.backbone.state_dict()
    for key, value in weights.items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(trained[key], value), key
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    args[5] = str(tmp_path / "r34.pth")
    wrong = _train(folder, tmp_path / "run34", *args)
    assert wrong.exit_code == 2 and "does not fit this backbone: keys unexpected" in wrong.output
    assert "layer1.2" in wrong.output and "Traceback" not in wrong.output


def test_a_backbone_of_an_earlier_run_brings_its_input_norm(photos, trained, tmp_path):
    """--backbone-weights backbone.pt: the file's --input-norm is the run's (its features are
    those of such inputs) unless --input-norm asks for another: then one clear error."""
    import torch

    from cdc_serve_training.checkpoint import load_model, safe_load

    folder, _ = photos
    out, _ = trained
    state = safe_load(out / "backbone.pt")
    assert state["input_norm"] == "object"
    torch.save({**state, "input_norm": "image"}, tmp_path / "image.pt")  # as an `image` run's
    args = ["--num-clusters", "10", "--backbone-weights", str(tmp_path / "image.pt"),
            "--pretrain-epochs", "0", "--epochs", "0"]  # fmt: skip
    result = _train(folder, tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    assert "image.pt: --input-norm image, as it was pretrained" in result.output
    assert load_model(tmp_path / "run" / "model.pth")[0].backbone.input_norm_mode == "image"
    wrong = _train(folder, tmp_path / "wrong", *args, "--input-norm", "object")
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    assert "was pretrained with --input-norm image; train it with --input-norm image" in (
        wrong.output
    )


def test_a_labels_csv_gives_the_labelled_metrics(photos, tmp_path):
    """--labels FILE (`file,label`, outside the folder): ACC/NMI/ARI/ECE, training unchanged."""
    folder, labels = photos
    good = sorted(p.name for p in folder.iterdir() if not p.name.startswith("zz"))
    rows = [f"{name},{label}" for name, label in zip(good, labels.tolist(), strict=True)]
    rows += ["zz-empty.png,0", "zz-text.png,1", "zz-truncated.jpg,2"]  # the skipped ones too
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    result = _train(folder, tmp_path / "run", "--num-clusters", "10", "--labels",
                    str(tmp_path / "labels.csv"))  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"kmeans", "clu", "cal"}
    assert 0 <= metrics["heads"]["cal"]["ece"] <= 1
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\n00000.png,x\n")
    result = _train(folder, tmp_path / "run2", "--num-clusters", "10", "--labels", str(bad))
    assert result.exit_code == 2 and "is not an integer" in result.output


def test_export_of_a_folder_model_verifies_on_the_folders_images(photos, trained, tmp_path):
    folder, _ = photos
    out, _ = trained
    args = ["export", str(out / "model.pth"), "--out", str(tmp_path / "repo"), "--name", "own"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"the first 64 images of imagefolder:{folder}" in result.output, result.output


def test_a_folder_model_normalises_each_image_unless_told_otherwise(photos, trained, tmp_path):
    """--input-norm auto is object for a folder (model.pth and train_log.json say so);
    --input-norm dataset turns it off; an unknown value is refused before any work."""
    from cdc_serve_training.checkpoint import load_model

    folder, _ = photos
    out, _ = trained
    assert load_model(out / "model.pth")[0].backbone.input_norm_mode == "object"
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["model"]["input_norm"] == "object"
    plain = tmp_path / "plain"
    result = _train(folder, plain, "--num-clusters", "10", "--input-norm", "dataset")
    assert result.exit_code == 0, result.output
    assert load_model(plain / "model.pth")[0].backbone.input_norm_mode == "dataset"
    result = _train(folder, tmp_path / "bad", "--num-clusters", "10", "--input-norm", "colour")
    assert result.exit_code == 2 and "colour" in result.output
