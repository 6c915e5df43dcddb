"""Test helper: tiny exported models (ONNX without torch + a real ModelMeta with fitted OOD).

Used by test_client.py, test_predict.py, test_client_triton.py and conftest's
``make_tiny_repository``. The core graph is conftest.make_tiny_onnx's (Flatten -> MatMul
-> Add = embedding -> MatMul -> Add -> Softmax = probs); :func:`reference_outputs`
recomputes it in numpy from the weights. Two export formats:

- the current one (``format_version`` 2, the default): the core wrapped by
  :func:`cdc_serve.served_graph.serving_graph`, as ``cdc-serve export`` does (uint8
  images in; cluster_id, confidence, ood_score, ood, probs, embedding out);
- the previous one (``format_version=1``): the core graph itself with a version-1
  ``cdc_meta.json``, as exports made before the in-graph scores were written. Clients
  must keep serving those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import make_tiny_onnx, tiny_core_model

from cdc_serve.modelmeta import FORMAT_VERSION, META_FILE, ModelMeta
from cdc_serve.ood import fit_ood
from cdc_serve.preprocess import normalise

NUM_CLASSES = 5
EMBEDDING_DIM = 6
PREVIOUS_FORMAT = 1


def tiny_modelmeta(
    channels: int = 1,
    size: tuple[int, int] = (8, 8),
    ood: dict | None = None,
    format_version: int = FORMAT_VERSION,
) -> ModelMeta:
    return ModelMeta(
        name="tiny",
        num_classes=NUM_CLASSES,
        channels=channels,
        input_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        embedding_dim=EMBEDDING_DIM,
        ood=ood or {},
        dataset="synthetic",
        format_version=format_version,
    )


def reference_outputs(onnx_path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiny core graph (a path or an ``onnx.ModelProto``) computed in numpy (float64)
    from its initialisers, on normalised float input."""
    import onnx
    from onnx import numpy_helper

    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(onnx_path))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    emb = x.reshape(len(x), -1).astype(np.float64) @ weights["w_embed"] + weights["b_embed"]
    logits = emb @ weights["w_cls"] + weights["b_cls"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), emb


def fitted_ood(onnx_path: Path, meta: ModelMeta, seed: int = 0) -> dict:
    """OOD parameters fitted on random in-distribution images (uniform noise)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (400, meta.channels, *meta.input_size)).astype(np.uint8)
    probs, emb = reference_outputs(onnx_path, normalise(images, meta))
    return fit_ood(emb, probs, knn_bank=100)


def write_tiny_graph(
    path: Path,
    channels: int = 1,
    size: tuple[int, int] = (8, 8),
    seed: int = 0,
    format_version: int = FORMAT_VERSION,
) -> tuple[Path, ModelMeta]:
    """Write the tiny model's ONNX file in either format; returns it and its metadata
    (OOD parameters fitted on noise, default score Mahalanobis)."""
    import onnx

    from cdc_serve.served_graph import serving_graph

    core = tiny_core_model(NUM_CLASSES, (channels, *size), EMBEDDING_DIM, seed)
    meta = tiny_modelmeta(channels, size, format_version=format_version)
    meta.ood = fitted_ood(core, meta, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(serving_graph(core, meta) if meta.scores_in_graph else core, str(path))
    return path, meta


def make_exported_model(
    root: Path,
    channels: int = 1,
    size: tuple[int, int] = (8, 8),
    seed: int = 0,
    version: int = 1,
    format_version: int = FORMAT_VERSION,
) -> Path:
    """Write ``root/tiny/<version>/{model.onnx, cdc_meta.json}``; returns ``root/tiny``."""
    version_dir = Path(root) / "tiny" / str(version)
    _, meta = write_tiny_graph(
        version_dir / "model.onnx", channels, size, seed, format_version=format_version
    )
    meta.version = version
    meta.write(version_dir / META_FILE)
    return version_dir.parent


RENAMED = {"input": "pixels", "probs": "p", "embedding": "z"}


def make_renamed_export(root: Path, names: dict[str, str] = RENAMED, seed: int = 0) -> Path:
    """A python-backend Triton model (previous format) whose tensors are not called input /
    probs / embedding.

    Writes ``root/renamed/config.pbtxt`` (its ``input``/``output`` entries renamed) and
    ``root/renamed/1/{model.onnx, cdc_meta.json, model.py}`` with the metadata naming the
    same tensors (``input_name``, ``outputs``); returns ``root/renamed``. Clients and the
    served ``model.py`` must follow those names, not the defaults.
    """
    import dataclasses
    import shutil

    import onnx
    from google.protobuf import text_format

    from cdc_serve.contract import CONFIG_FILE, ONNX_FILE, PYTHON_MODEL_FILE
    from cdc_serve.triton import PYTHON_MODEL_SOURCE, config_pbtxt, meta_parameters, parse_config

    model_dir = Path(root) / "renamed"
    version_dir = model_dir / "1"
    source = make_tiny_onnx(Path(root).parent / f".renamed-src-{seed}" / "tiny.onnx",
                            num_classes=NUM_CLASSES, embedding_dim=EMBEDDING_DIM, seed=seed)  # fmt: skip
    graph = onnx.load(str(source))
    for node in graph.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in (*graph.graph.input, *graph.graph.output):
        value.name = names.get(value.name, value.name)
    onnx.checker.check_model(graph)
    version_dir.mkdir(parents=True)
    onnx.save(graph, str(version_dir / ONNX_FILE))
    shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / PYTHON_MODEL_FILE)

    meta = dataclasses.replace(
        tiny_modelmeta(format_version=PREVIOUS_FORMAT),
        input_name=names["input"],
        outputs=(names["probs"], names["embedding"]),
    )
    meta.ood = fitted_ood(source, meta, seed)
    meta.version = 1
    meta.write(version_dir / META_FILE)

    text = config_pbtxt("renamed", "python", NUM_CLASSES, (1, 8, 8), EMBEDDING_DIM, max_batch=16,
                        instance_kind="KIND_CPU", parameters=meta_parameters(meta.to_dict()),
                        format_version=PREVIOUS_FORMAT)  # fmt: skip
    config = parse_config(text)
    config.input[0].name = names["input"]
    config.output[0].name, config.output[1].name = names["probs"], names["embedding"]
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config), encoding="utf-8")
    return model_dir
