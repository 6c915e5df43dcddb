"""The served graph: images in, the whole answer out (metadata ``format_version`` 2).

``cdc-serve export`` traces the network to an ONNX *core* graph (float32 normalised
``input`` -> ``probs``, ``embedding``; :mod:`cdc_serve_training.onnx_export`), and
:func:`serving_graph` wraps it, without torch, into what Triton serves::

    input (uint8 N x C x H x W)
      -> Cast, / 255, - mean[c], / std[c]          (the numpy normalisation, op for op)
      -> the core graph                              -> probs, embedding
      -> TopK(probs, 1)                              -> confidence, cluster_id
      -> the model's default OOD score               -> ood_score
      -> ood_score > threshold                       -> ood

so any Triton client (``curl`` included) gets ``cluster_id``, ``confidence``,
``ood_score`` and ``ood`` without knowing the project's OOD maths. The OOD score is
the one ``cdc_meta.json`` names as default (:mod:`cdc_serve.ood`):

- ``mahalanobis``: ``min_c |(z - mu_c) L|^2`` with ``z`` the L2-normalised embedding and
  ``L`` a factor of the shrunk precision matrix (:func:`cdc_serve.ood.mahalanobis_factor`),
  in float64 like :func:`cdc_serve.ood.mahalanobis_score`, so the two agree to float32
  rounding;
- ``prototype``, ``knn``: a matrix product against the stored prototypes / bank, then
  the max / the k-th largest cosine; ``msp``: ``1 - confidence``.

The reject threshold is not in the graph: ``rejected = confidence < t`` is the caller's
choice (the model's default ``t`` is ``reject_below`` in the metadata).
:func:`check_scores` is the numpy side of export verification: the graph's answer
against :mod:`cdc_serve.ood` on the graph's own ``probs`` and ``embedding``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cdc_serve import CDCError
from cdc_serve.contract import (
    CLUSTER_ID,
    CONFIDENCE,
    EMBEDDING,
    FLOAT_INPUT_FORMAT_VERSION,
    INPUT_NAME,
    META_FORMAT_VERSION,
    OOD,
    OOD_SCORE,
    PROBS,
    SCORE_OUTPUTS,
    SERVED_OUTPUTS,
    TENSOR_TYPES,
)
from cdc_serve.ood import OODScorer, decode_array, mahalanobis_factor

MIN_OPSET = 13  # Squeeze / Unsqueeze / ReduceSum take their axes as inputs from here on
_P = "cdc_"  # prefix of every tensor this module adds to a graph


def served_score(ood: dict[str, Any] | None) -> tuple[str, float]:
    """``(name, threshold)`` of the OOD score the graph computes: the metadata's default
    (``msp`` with an infinite threshold, i.e. nothing flagged, when nothing was fitted)."""
    scorer = OODScorer(ood or {})
    return scorer.name, scorer.threshold


# -- building blocks -------------------------------------------------------------------------


class _Builder:
    """Nodes and constants appended to a graph, every name prefixed with ``cdc_``."""

    def __init__(self, taken: set[str]) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.taken = taken
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        name = f"{_P}{hint}_{self.count}"
        if name in self.taken:
            raise CDCError(f"the core graph already has a tensor named {name!r}")
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, n_out: int = 1, **attrs) -> Any:
        from onnx import helper

        outputs = [self.name(f"{hint}{i}" if n_out > 1 else hint) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs if n_out > 1 else outputs[0]

    def axes(self, *axes: int) -> str:
        return self.const("axes", np.asarray(axes, dtype=np.int64))

    def top1(self, x: str, largest: bool) -> tuple[str, str]:
        """Values and indices of the largest (smallest) entry of each row, shape ``[N]``.
        TopK keeps the first of equal entries, as numpy's argmax does."""
        k = self.const("k", np.asarray([1], dtype=np.int64))
        values, indices = self.op("TopK", [x, k], "top", n_out=2, axis=1, largest=int(largest))
        squeeze = self.axes(1)
        return self.op("Squeeze", [values, squeeze], "topv"), self.op(
            "Squeeze", [indices, squeeze], "topi"
        )

    def unit_rows(self, x: str, eps: float, dtype) -> str:
        """Rows of ``x`` divided by their L2 norm (at least ``eps``), as ``cdc_serve.ood`` does."""
        squares = self.op("Mul", [x, x], "sq")
        norm = self.op(
            "Sqrt", [self.op("ReduceSum", [squares, self.axes(1)], "ss", keepdims=1)], "norm"
        )
        floor = self.op("Max", [norm, self.const("eps", np.asarray(eps, dtype=dtype))], "normf")
        return self.op("Div", [x, floor], "unit")


# -- the OOD scores ---------------------------------------------------------------------------


def _mahalanobis(b: _Builder, embedding: str, fitted: dict[str, Any]) -> str:
    from onnx import TensorProto

    means = decode_array(fitted["means"]).astype(np.float64)
    factor = mahalanobis_factor(decode_array(fitted["precision"]))
    e64 = b.op("Cast", [embedding], "e64", to=TensorProto.DOUBLE)
    y = b.op("MatMul", [b.unit_rows(e64, 1e-12, np.float64), b.const("L", factor)], "zl")
    diff = b.op(
        "Sub", [b.op("Unsqueeze", [y, b.axes(1)], "zl3"), b.const("muL", means @ factor)], "diff"
    )
    dist = b.op("ReduceSum", [b.op("Mul", [diff, diff], "d2"), b.axes(2)], "dist", keepdims=0)
    nearest, _ = b.top1(dist, largest=False)
    return b.op("Cast", [nearest], "maha", to=TensorProto.FLOAT)


def _one_minus(b: _Builder, x: str) -> str:
    return b.op("Sub", [b.const("one", np.asarray(1.0, np.float32)), x], "oneminus")


def _cosines(b: _Builder, embedding: str, rows: np.ndarray) -> str:
    unit = b.unit_rows(embedding, 1e-12, np.float32)
    return b.op("MatMul", [unit, b.const("bankT", rows.T.astype(np.float32))], "cos")


def _ood_score(b: _Builder, name: str, fitted: dict, embedding: str, confidence: str) -> str:
    if name == "msp":
        return _one_minus(b, confidence)
    if name == "mahalanobis":
        return _mahalanobis(b, embedding, fitted)
    if name == "prototype":
        best, _ = b.top1(_cosines(b, embedding, decode_array(fitted["prototypes"])), largest=True)
        return _one_minus(b, best)
    if name == "knn":
        bank = decode_array(fitted["bank"])
        k = min(int(fitted["k"]), len(bank))
        kk = b.const("k", np.asarray([k], dtype=np.int64))
        values, _ = b.op("TopK", [_cosines(b, embedding, bank), kk], "knn", n_out=2, axis=1)
        kth = b.op("Gather", [values, b.const("kth", np.asarray(k - 1, np.int64))], "kth", axis=1)
        return _one_minus(b, kth)
    raise CDCError(f"the served graph cannot compute the OOD score {name!r}")


# -- the graph ----------------------------------------------------------------------------------


def _opset(core) -> int:
    version = next((o.version for o in core.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise CDCError(
            f"the core graph uses opset {version}; the served graph needs >= {MIN_OPSET}"
        )
    return version


def serving_graph(core, meta) -> Any:
    """The format-2 served graph (an ``onnx.ModelProto``) around the ``core`` graph.

    ``core`` takes ``meta.input_name`` (float32 normalised ``N x C x H x W``) and gives
    ``meta.outputs`` (``probs``, ``embedding``); ``meta`` is a
    :class:`cdc_serve.modelmeta.ModelMeta` (mean, std, OOD parameters). The result takes
    uint8 images under the same input name and gives :data:`cdc_serve.contract.SERVED_OUTPUTS`
    (``probs`` and ``embedding`` under the names ``meta.outputs`` gives them).
    """
    import onnx
    from onnx import TensorProto, helper

    _opset(core)
    model = onnx.ModelProto()
    model.CopyFrom(core)
    graph = model.graph
    probs_name, embedding_name = meta.outputs
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if meta.input_name not in inputs or {probs_name, embedding_name} - outputs.keys():
        raise CDCError(
            f"the core graph must take {meta.input_name!r} and give {list(meta.outputs)}; it has "
            f"inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    batch = inputs[meta.input_name].type.tensor_type.shape.dim[0]
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in (*graph.initializer, *graph.input, *graph.output)}
    b = _Builder(taken)

    # images -> the core graph's normalised input, with numpy's operations in numpy's order
    shape_c = (1, meta.channels, 1, 1)
    pixels = b.op("Cast", [meta.input_name], "pixels", to=TensorProto.FLOAT)
    unit = b.op("Div", [pixels, b.const("255", np.asarray(255.0, np.float32))], "unit01")
    centred = b.op("Sub", [unit, b.const("mean", np.reshape(meta.mean, shape_c).astype(np.float32))], "centred")  # fmt: skip
    normalised = b.op("Div", [centred, b.const("std", np.reshape(meta.std, shape_c).astype(np.float32))], "normalised")  # fmt: skip
    pre = list(b.nodes)
    b.nodes.clear()
    for node in graph.node:
        node.input[:] = [normalised if n == meta.input_name else n for n in node.input]

    # probs, embedding -> the answer
    confidence, cluster_id = b.top1(probs_name, largest=True)
    name, threshold = served_score(meta.ood)
    fitted = (meta.ood or {}).get("scores", {}).get(name, {})
    score = _ood_score(b, name, fitted, embedding_name, confidence)
    flag = b.op("Greater", [score, b.const("threshold", np.asarray(threshold, np.float32))], "ood")
    renames = {confidence: CONFIDENCE, cluster_id: CLUSTER_ID, score: OOD_SCORE, flag: OOD}
    for node in b.nodes:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]

    core_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*pre, *core_nodes, *b.nodes])
    graph.initializer.extend(b.initializers)
    del graph.input[:]
    image = helper.make_tensor_value_info(meta.input_name, TensorProto.UINT8, [None, *_chw(meta)])
    image.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.input.append(image)
    per_image = {CLUSTER_ID: TensorProto.INT64, CONFIDENCE: TensorProto.FLOAT,
                 OOD_SCORE: TensorProto.FLOAT, OOD: TensorProto.BOOL}  # fmt: skip
    new_outputs = []
    for out in SCORE_OUTPUTS:
        info = helper.make_tensor_value_info(out, per_image[out], [None])
        info.type.tensor_type.shape.dim[0].CopyFrom(batch)
        new_outputs.append(info)
    kept = [outputs[probs_name], outputs[embedding_name]]
    del graph.output[:]
    graph.output.extend([*new_outputs, *kept])
    onnx.checker.check_model(model, full_check=True)
    return model


def _chw(meta) -> list[int]:
    return [int(meta.channels), *(int(s) for s in meta.input_size)]


# -- verification (the numpy side) -----------------------------------------------------------


def check_scores(outputs: dict[str, np.ndarray], meta, tolerance: float = 1e-5) -> float:
    """Check the graph's answer against numpy on the graph's own ``probs`` and ``embedding``.

    ``confidence`` and ``ood_score`` must lie within ``tolerance`` of what
    :mod:`cdc_serve.ood` computes; ``cluster_id`` and ``ood`` must be equal, except where
    the numpy value itself is undecided within ``tolerance`` (two top probabilities, or a
    score and its threshold, closer than that). Returns the largest float difference;
    raises CDCError naming the output that disagrees.
    """
    missing = [n for n in SERVED_OUTPUTS if n not in outputs]
    if missing:
        raise CDCError(f"the served graph lacks the outputs {missing}")
    probs, embedding = outputs[PROBS], outputs[EMBEDDING]
    name, threshold = served_score(meta.ood)
    expected_score = OODScorer(meta.ood, name).score(embedding, probs)
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.zeros((len(probs), 2))
    tied = (top2[:, 1] - top2[:, 0]) <= tolerance
    near = np.abs(expected_score.astype(np.float64) - np.float32(threshold)) <= tolerance
    diffs = {
        CONFIDENCE: _max_diff(outputs[CONFIDENCE], probs.max(axis=1)),
        OOD_SCORE: _max_diff(outputs[OOD_SCORE], expected_score),
    }
    for out, diff in diffs.items():
        if not diff <= tolerance:
            raise CDCError(f"served {out!r} differs from numpy by {diff:.3e} > {tolerance:.0e}")
    wrong_id = (outputs[CLUSTER_ID] != probs.argmax(axis=1)) & ~tied
    wrong_ood = (outputs[OOD] != (expected_score > threshold)) & ~near
    for out, wrong in ((CLUSTER_ID, wrong_id), (OOD, wrong_ood)):
        if wrong.any():
            raise CDCError(f"served {out!r} differs from numpy for {int(wrong.sum())} image(s)")
    return max(diffs.values())


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if np.shape(a) != np.shape(b):
        return float("inf")
    if len(a) == 0:
        return 0.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- reading a graph's layout ----------------------------------------------------------------


def onnx_shapes(model_file) -> dict[str, Any]:
    """``input_chw``, ``num_classes``, ``embedding_dim`` and ``format_version`` of an ONNX file.

    Checks the contract (:mod:`cdc_serve.contract`): an input ``input`` of rank 4 and
    outputs ``probs`` and ``embedding`` of rank 2, every axis but the batch axis fixed;
    a uint8 input with every per-image output of rank 1 is format 2, a float32 input
    format 1.
    """
    import onnx

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... on a bad file
        raise CDCError(f"{model_file} is not a readable ONNX model: {exc}") from None

    def dims(value_info) -> tuple[str, list[int | None]]:
        tensor = value_info.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return elem, shape

    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    in_type = inputs.get(INPUT_NAME, ("", []))[0]
    served = in_type == "UINT8"
    wanted = SERVED_OUTPUTS if served else (PROBS, EMBEDDING)
    problems = [] if INPUT_NAME in inputs else [f"no input named {INPUT_NAME!r} (inputs: {sorted(inputs)})"]  # fmt: skip
    problems += [f"no output named {o!r} (outputs: {sorted(outputs)})" for o in wanted if o not in outputs]  # fmt: skip
    if problems:
        raise CDCError(f"{model_file} does not follow the model contract: " + "; ".join(problems))
    element = {n: _ONNX_TYPES[t] for n, t in TENSOR_TYPES.items()}
    if not served:
        element[INPUT_NAME] = "FLOAT"
    expect = {INPUT_NAME: (inputs[INPUT_NAME], 4)}
    expect.update({o: (outputs[o], 2 if o in (PROBS, EMBEDDING) else 1) for o in wanted})
    for tensor_name, ((elem, shape), rank) in expect.items():
        if elem != element[tensor_name] or len(shape) != rank or any(d is None or d < 1 for d in shape[1:]):  # fmt: skip
            raise CDCError(
                f"{model_file}: {tensor_name!r} must be {element[tensor_name]} of rank {rank} "
                f"with fixed non-batch axes, found {elem} {shape}"
            )
    return {
        "num_classes": outputs[PROBS][1][1],
        "input_chw": tuple(inputs[INPUT_NAME][1][1:]),
        "embedding_dim": outputs[EMBEDDING][1][1],
        "format_version": META_FORMAT_VERSION if served else FLOAT_INPUT_FORMAT_VERSION,
    }


_ONNX_TYPES = {"UINT8": "UINT8", "INT64": "INT64", "FP32": "FLOAT", "BOOL": "BOOL"}
