"""``cdc-serve evaluate``: run a model over a labelled data set and report every metric.

Works on a trained ``model.pth`` (both heads are evaluated) or on an exported model
(the calibration head, through onnxruntime). Writes ``metrics.json`` (the schema of
training's metrics.json, plus an ``ood`` section; :func:`cdc_serve.metrics_json.write_metrics`),
a reliability diagram and a confidence histogram per head, and returns a :class:`Report`
whose ``format()`` is the printed table.

An exported model needs no torch: its data sets are read with :mod:`cdc_serve.datasets`
and brought to the model's channels and size as the client does it
(:func:`cdc_serve.preprocess.to_model_images`). A ``model.pth`` is run in PyTorch, so it
needs the ``train`` extra; its data sets are read and resized by the training package
(``cdc_serve_training.data``), as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdc_serve import CDCError, metrics, metrics_json, ood, plots
from cdc_serve.contract import EMBEDDING, PROBS

METRIC_KEYS = metrics_json.HEAD_KEYS


@dataclass
class Report:
    """Metrics per head, OOD results per score, and the files written."""

    dataset: str
    split: str
    n: int
    heads: dict[str, dict[str, float]]
    ood: dict[str, dict[str, float]] = field(default_factory=dict)
    ood_dataset: str | None = None
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return metrics_json.metrics_document(
            self.dataset, self.split, self.n, self.heads, self.ood, self.ood_dataset
        )

    def format(self) -> str:
        keys = [k for k in METRIC_KEYS if any(k in h for h in self.heads.values())]
        lines = [
            f"{self.dataset} ({self.split}, n={self.n})",
            "head    " + "".join(f"{k:>8}" for k in keys),
        ]
        for head, values in self.heads.items():
            cells = "".join(f"{100 * values[k]:8.2f}" if k in values else f"{'-':>8}" for k in keys)
            lines.append(f"{head:<8}{cells}")
        if self.ood:
            lines.append(
                f"OOD vs {self.ood_dataset}: "
                + ", ".join(
                    f"{name} AUROC {100 * v['auroc']:.2f} FPR95 {100 * v['fpr95']:.2f}"
                    for name, v in self.ood.items()
                )
            )
        lines.append("(percent)")
        lines += [f"wrote {p}" for p in self.files]
        return "\n".join(lines)


def evaluate(
    model: Path | str,
    *,
    dataset: str = "fashion-mnist",
    split: str = "test",
    ood_dataset: str | None = None,
    out: Path | str = "runs/eval",
    data_root: Path | str | None = None,
    batch_size: int = 512,
) -> Report:
    """Evaluate ``model`` on ``dataset`` (and OOD data) and write metrics.json + PNGs to ``out``."""
    model = Path(model)
    if not model.exists():
        raise CDCError(f"no model at {model}")
    runner = _TorchRunner(model) if model.suffix == ".pth" else _OnnxRunner(model)
    images, labels = runner.load(dataset, split, data_root)
    if labels is None:
        raise CDCError(f"data set {dataset!r} has no labels: evaluation needs them")
    outputs = runner.run(images, batch_size)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heads: dict[str, dict[str, float]] = {}
    files: list[Path] = []
    for head in ("clu", "cal"):
        if head in outputs:
            heads[head] = metrics.evaluate_probs(labels, outputs[head])
            files.append(
                plots.reliability_diagram(
                    labels, outputs[head], out / f"reliability_{head}.png", title=f"{head} head"
                )
            )
            files.append(
                plots.confidence_histogram(
                    labels, outputs[head], out / f"confidence_{head}.png", title=f"{head} head"
                )
            )

    report = Report(dataset=dataset, split=split, n=len(labels), heads=heads, files=files)
    if ood_dataset:
        ood_images, _ = runner.load(
            ood_dataset, "all", None if ood_dataset != dataset else data_root
        )
        ood_outputs = runner.run(ood_images, batch_size)
        params = runner.ood_params
        if not params:
            raise CDCError("this model carries no OOD statistics (retrain or re-export it)")
        s_in = ood.ood_scores(outputs["embedding"], outputs["cal"], params)
        s_out = ood.ood_scores(ood_outputs["embedding"], ood_outputs["cal"], params)
        report.ood_dataset = ood_dataset
        report.ood = {
            name: {
                # metrics.ood_* take "higher = in distribution": negate the OOD score.
                "auroc": metrics.ood_auroc(-s_in[name], -s_out[name]),
                "fpr95": metrics.ood_fpr95(-s_in[name], -s_out[name]),
            }
            for name in s_in
        }
    path = metrics_json.write_metrics(out / metrics_json.METRICS_FILE, report.to_json())
    report.files.insert(0, path)
    return report


def _data_root(data_root) -> str | None:
    return str(data_root) if data_root else None


def _load_numpy(name: str, split: str, data_root, channels: int, size: tuple[int, int]):
    """uint8 N x C x H x W images (at the model's size and channels) and labels, no torch."""
    from cdc_serve.datasets import read_dataset
    from cdc_serve.preprocess import to_model_images

    data = read_dataset(name, _data_root(data_root), split)
    return to_model_images(data.images, channels, size), data.labels


def _load_torch(name: str, split: str, data_root, channels: int, size: tuple[int, int]):
    """The same through the training package's loader and resize (what training sees)."""
    from cdc_serve_training.data import load_dataset, resize_images

    data = load_dataset(name, root=_data_root(data_root), split=split)
    images = data.images
    if images.shape[1] != channels:  # grayscale <-> RGB
        if channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(images.dtype)
        else:
            images = images.expand(-1, channels, -1, -1)
    if tuple(images.shape[-2:]) != tuple(size):
        images = resize_images(images, tuple(size))
    labels = data.labels.numpy() if data.labels is not None else None
    return images.to("cpu").numpy().astype(np.uint8), labels


class _TorchRunner:
    """Both heads of a trained model.pth, in PyTorch (through the training package)."""

    def __init__(self, path: Path):
        from cdc_serve_training.checkpoint import load_model

        self.model, self.info = load_model(path)
        pre = self.info["preprocess"]
        self.channels, self.input_size = int(pre["channels"]), tuple(pre["input_size"])
        self.ood_params = self.info.get("ood") or {}

    def load(self, name: str, split: str, data_root) -> tuple[np.ndarray, np.ndarray | None]:
        return _load_torch(name, split, data_root, self.channels, self.input_size)

    def run(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        from cdc_serve_training.evaluation import infer_images

        out = infer_images(self.model, images, self.info["preprocess"], batch_size)
        return {"clu": out["clu_probs"], "cal": out["cal_probs"], "embedding": out["features"]}


class _OnnxRunner:
    """The exported calibration head, through onnxruntime (no torch)."""

    def __init__(self, path: Path):
        from cdc_serve.client import Client

        self.client = Client(model=path)
        meta = self.client.meta
        self.channels, self.input_size = meta.channels, tuple(meta.input_size)
        self.ood_params = meta.ood

    def load(self, name: str, split: str, data_root) -> tuple[np.ndarray, np.ndarray | None]:
        return _load_numpy(name, split, data_root, self.channels, self.input_size)

    def run(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        probs, embedding = [], []
        for start in range(0, len(images), batch_size):
            result = self.client.predict_arrays(
                self.client.model_input(images[start : start + batch_size]), (PROBS, EMBEDDING)
            )
            probs.append(result[PROBS])
            embedding.append(result[EMBEDDING])
        return {"cal": np.concatenate(probs), "embedding": np.concatenate(embedding)}
