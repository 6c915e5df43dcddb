"""The torch side of ``cdc-serve export``: trace the network to ONNX and check the result.

The traced *core* graph is ``CalibratedInference``: normalised ``input -> backbone ->
calibration head -> softmax`` with outputs ``probs`` and ``embedding``, the tensor names
of :mod:`cdc_serve.contract`; :func:`cdc_serve.served_graph.serving_graph` wraps it into
the served graph (uint8 images in, the whole answer out). ``verify_onnx`` runs
onnxruntime on the served graph and PyTorch on the same real images and refuses an
export whose outputs differ (PyTorch for ``probs``, ``embedding``, ``confidence`` and
``cluster_id``; the numpy OOD code of :mod:`cdc_serve.ood` for ``ood_score`` and
``ood``). ``cdc_serve.export`` orchestrates the rest (metadata, Triton repository)
without importing torch itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve.contract import (
    CLUSTER_ID,
    CONFIDENCE,
    EMBEDDING,
    INPUT_NAME,
    OUTPUT_NAMES,
    PROBS,
    SERVED_OUTPUTS,
)
from cdc_serve.datasets import parse_class_filter
from cdc_serve.preprocess import normalise_with
from cdc_serve.served_graph import check_scores
from cdc_serve_training.heads import CalibratedInference

OPSET = 17


def inference_module(model):
    """The exported graph: backbone -> calibration head -> softmax, plus the embedding."""
    inference = CalibratedInference(model).eval()
    inference.embedding_dim = model.backbone.out_dim
    return inference


def _folder_batch(folder: str, channels: int, size: tuple[int, int], n: int) -> np.ndarray:
    """The first ``n`` readable images of an image folder, decoded as ``predict`` does."""
    from cdc_serve.image_folder import list_images
    from cdc_serve.preprocess import load_image

    images = []
    for path in list_images(Path(folder))[0]:
        try:
            images.append(load_image(path, channels, size))
        except CDCError:
            continue
        if len(images) == n:
            break
    if not images:
        raise CDCError(f"{folder}: no readable image")
    return np.stack(images)


def verification_batch(info: dict, data_root, n: int) -> tuple[np.ndarray, str]:
    """Real uint8 images from the model's own data set (random images if it is absent)."""
    pre = info["preprocess"]
    channels, (h, w) = int(pre["channels"]), pre["input_size"]
    dataset = parse_class_filter(str(info.get("dataset", "")))[0]
    if dataset.startswith("imagefolder:"):  # the user's folder, where it still is
        try:
            images = _folder_batch(dataset.removeprefix("imagefolder:"), channels, (h, w), n)
            return images, f"the first {len(images)} images of {dataset}"
        except CDCError:
            pass  # moved or gone: random images below
    try:
        from cdc_serve_training.data import load_dataset

        data = load_dataset(
            info.get("dataset", ""),
            root=str(data_root) if data_root else None,
            split="test",
            limit=n,
        )
        images = data.images[:n].numpy()
        if images.shape[1:] != (channels, h, w):
            raise CDCError("shape mismatch")
        source = f"{info.get('dataset')} test split"
    except CDCError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(n, channels, h, w)).astype(np.uint8)
        source = "random images (the training data set was not found)"
    return np.ascontiguousarray(images, dtype=np.uint8), source


def export_onnx(inference, batch: np.ndarray, path: Path) -> Path:
    """Trace ``inference`` (the core graph) to ONNX with a dynamic batch axis and run the
    ONNX checker; ``batch`` is a normalised float32 example."""
    import onnx

    example = torch.from_numpy(batch[:2])
    names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    try:  # the TorchScript exporter: fast and exact for these convolutional graphs
        torch.onnx.export(
            inference,
            (example,),
            str(path),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            **names,
        )
    except (TypeError, RuntimeError):  # torch versions without it: the dynamo exporter
        batch_dim = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.onnx.export(
            inference,
            (example,),
            str(path),
            dynamic_shapes=({0: batch_dim},),
            dynamo=True,
            opset_version=18,
            **names,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def verify_onnx(
    inference, images: np.ndarray, path: Path, meta, tolerance: float = 1e-5
) -> dict[str, float]:
    """Check every output of the served graph at ``path`` on the uint8 ``images``
    (``meta``: the export's :class:`cdc_serve.modelmeta.ModelMeta`).

    onnxruntime against PyTorch (on the normalised images) for ``probs``, ``embedding``
    (relative to its largest value when that exceeds 1), ``confidence`` and
    ``cluster_id``; against :func:`cdc_serve.served_graph.check_scores` (the numpy OOD
    code on the graph's own outputs) for ``ood_score`` and ``ood``. Returns the largest
    difference per float output; raises CDCError ("nothing was written") on any
    disagreement.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = session.run(list(SERVED_OUTPUTS), {INPUT_NAME: images})
    got = dict(zip(SERVED_OUTPUTS, arrays, strict=True))
    x = normalise_with(images, meta.mean, meta.std)
    with torch.no_grad():
        torch_probs, torch_embedding = (t.numpy() for t in inference(torch.from_numpy(x)))
    scale = max(1.0, float(np.abs(torch_embedding).max(initial=0.0)))
    diffs = {
        PROBS: _max_abs(got[PROBS], torch_probs),
        EMBEDDING: _max_abs(got[EMBEDDING], torch_embedding) / scale,
        CONFIDENCE: _max_abs(got[CONFIDENCE], torch_probs.max(axis=1)),
    }
    top2 = np.sort(torch_probs, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > tolerance
    if (got[CLUSTER_ID] != torch_probs.argmax(axis=1))[decided].any():
        diffs[CLUSTER_ID] = float("inf")
    try:
        bad = [f"{k} differs by {v:.3e}" for k, v in diffs.items() if not v <= tolerance]
        if bad:
            raise CDCError(f"{', '.join(bad)} (tolerance {tolerance:.0e})")
        diffs["ood_score"] = check_scores(got, meta, tolerance)
    except CDCError as exc:
        raise CDCError(
            f"the exported graph disagrees with PyTorch and the numpy OOD code: {exc}; "
            "nothing was written"
        ) from None
    return diffs


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))
