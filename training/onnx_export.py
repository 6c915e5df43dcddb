"""The torch side of ``cdc-serve export``: trace the served graph to ONNX and check it.

The served graph is ``CalibratedInference``: ``input -> backbone -> calibration head ->
softmax`` with outputs ``probs`` and ``embedding``, the tensor names of
:mod:`cdc_serve.contract`. ``verify_onnx`` runs onnxruntime and PyTorch on the same real
batch and refuses a graph whose ``probs`` differ by more than the tolerance.
``cdc_serve.export`` orchestrates the rest (metadata, Triton repository) without
importing torch itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdc_serve import CDCError
from cdc_serve.contract import EMBEDDING, INPUT_NAME, OUTPUT_NAMES, PROBS
from cdc_serve.preprocess import normalise_with
from cdc_serve_training.heads import CalibratedInference

OPSET = 17


def inference_module(model):
    """The exported graph: backbone -> calibration head -> softmax, plus the embedding."""
    inference = CalibratedInference(model).eval()
    inference.embedding_dim = model.backbone.out_dim
    return inference


def verification_batch(info: dict, data_root, n: int) -> tuple[np.ndarray, str]:
    """A real, normalised batch from the model's own data set (random data if it is absent)."""
    pre = info["preprocess"]
    channels, (h, w) = int(pre["channels"]), pre["input_size"]
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
    return normalise_with(images, pre["mean"], pre["std"]), source


def export_onnx(inference, batch: np.ndarray, path: Path) -> Path:
    """Trace ``inference`` to ONNX with a dynamic batch axis and run the ONNX checker."""
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


def verify_onnx(inference, batch: np.ndarray, path: Path, tolerance: float = 1e-5) -> float:
    """Max abs difference of ``probs`` between onnxruntime and PyTorch; raise above ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_probs, ort_embedding = session.run([PROBS, EMBEDDING], {INPUT_NAME: batch})
    with torch.no_grad():
        torch_probs, torch_embedding = inference(torch.from_numpy(batch))
    diff = float(np.max(np.abs(ort_probs - torch_probs.numpy())))
    if not diff <= tolerance:
        raise CDCError(
            f"the exported graph disagrees with PyTorch: max |probs difference| = {diff:.3e} "
            f"> {tolerance:.0e}; nothing was written"
        )
    if ort_embedding.shape != tuple(torch_embedding.shape):
        raise CDCError("the exported embedding has the wrong shape; nothing was written")
    return diff
