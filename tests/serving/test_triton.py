"""Repository layout and config.pbtxt generation (cdc_serve/triton.py); no server needed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import make_tiny_onnx, make_tiny_repository, tiny_meta

from cdc_serve import CDCError
from cdc_serve.triton import (
    META_FILE,
    PYTHON_MODEL_SOURCE,
    add_model_version,
    config_pbtxt,
    latest_version_dir,
    list_models,
    next_version,
    onnx_shapes,
    parse_config,
    read_config,
    read_meta,
    resolve_instance_kind,
)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- versions


def test_next_version_counts_numeric_folders_only(tmp_path):
    assert next_version(tmp_path / "missing") == 1
    assert next_version(tmp_path) == 1
    for name in ("1", "3", "latest", ".incoming-x", "10a"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version folder")
    assert next_version(tmp_path) == 4
    assert latest_version_dir(tmp_path) == tmp_path / "3"


def test_latest_version_dir_without_versions(tmp_path):
    with pytest.raises(CDCError, match="no numbered version"):
        latest_version_dir(tmp_path)


# ----------------------------------------------------------------------------- config.pbtxt


@pytest.mark.parametrize(
    "backend, kwargs, platform, backend_field",
    [
        ("onnxruntime", {"instance_kind": "KIND_CPU"}, "onnxruntime_onnx", ""),
        ("python", {"instance_kind": "KIND_CPU"}, "", "python"),
        ("tensorrt", {"instance_kind": "auto"}, "tensorrt_plan", ""),
    ],
)
def test_config_parses_as_model_config(backend, kwargs, platform, backend_field):
    text = config_pbtxt(
        "cdc",
        backend,
        num_classes=10,
        input_chw=(3, 32, 32),
        embedding_dim=512,
        max_batch=64,
        instance_count=2,
        preferred_batch_sizes=[16, 8],
        max_queue_delay_us=250,
        parameters={"num_classes": "10", "ood_threshold": "0.125"},
        **kwargs,
    )
    config = parse_config(text)
    assert config.name == "cdc"
    assert config.platform == platform
    assert config.backend == backend_field
    assert config.max_batch_size == 64
    from tritonclient.grpc import model_config_pb2 as pb

    def described(tensors):
        return [(t.name, pb.DataType.Name(t.data_type), list(t.dims), t.HasField("reshape"),
                 list(t.reshape.shape)) for t in tensors]  # fmt: skip

    assert described(config.input) == [("input", "TYPE_UINT8", [3, 32, 32], False, [])]
    assert described(config.output) == [  # one value per image: dims [1] reshaped to [N]
        ("cluster_id", "TYPE_INT64", [1], True, []),
        ("confidence", "TYPE_FP32", [1], True, []),
        ("ood_score", "TYPE_FP32", [1], True, []),
        ("ood", "TYPE_BOOL", [1], True, []),
        ("probs", "TYPE_FP32", [10], False, []),
        ("embedding", "TYPE_FP32", [512], False, []),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    kind = pb.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
    assert kind == ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
    assert config.instance_group[0].count == 2
    assert config.parameters["ood_threshold"].string_value == "0.125"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_previous_format_config_lists_float_input_and_two_outputs():
    text = config_pbtxt("cdc", "python", 10, (1, 28, 28), 128, 64, format_version=1)
    config = parse_config(text)
    from tritonclient.grpc import model_config_pb2 as pb

    assert [(t.name, pb.DataType.Name(t.data_type)) for t in (*config.input, *config.output)] == [
        ("input", "TYPE_FP32"),
        ("probs", "TYPE_FP32"),
        ("embedding", "TYPE_FP32"),
    ]


@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_accelerator_block(fp16):
    text = config_pbtxt(
        "cdc", "onnxruntime", 4, (1, 28, 28), 64, 32, "KIND_GPU", trt_accelerator=True, fp16=fp16
    )
    accelerators = parse_config(text).optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == ("FP16" if fp16 else "FP32")


def test_parameter_strings_survive_escaping():
    tricky = 'quote " backslash \\ newline \n tab \t bell \x07 unicode é 漢'
    text = config_pbtxt("cdc", "python", 3, (1, 4, 4), 2, 8, "KIND_CPU", parameters={"k": tricky})
    assert parse_config(text).parameters["k"].string_value == tricky


def test_instance_kind_auto_is_left_to_the_serving_machine(monkeypatch, tmp_path):
    """``auto`` is Triton's KIND_AUTO whatever the exporting machine has (here a stand-in
    nvidia-smi that lists a GPU, then none), so an export serves the same anywhere."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Test GPU (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_instance_kind("auto", "python") == "KIND_AUTO"
    assert resolve_instance_kind("auto", "onnxruntime") == "KIND_AUTO"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_instance_kind("auto", "onnxruntime") == "KIND_AUTO"
    assert resolve_instance_kind("KIND_CPU", "python") == "KIND_CPU"
    assert resolve_instance_kind("auto", "tensorrt") == "KIND_GPU"  # a plan needs a GPU
    text = config_pbtxt("cdc", "onnxruntime", 4, (1, 8, 8), 6, 8, trt_accelerator=True)
    assert "kind: KIND_AUTO" in text and "gpu_execution_accelerator" in text
    with pytest.raises(CDCError, match="GPU instances"):
        config_pbtxt("cdc", "onnxruntime", 4, (1, 8, 8), 6, 8, "KIND_CPU", trt_accelerator=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "tensorflow"}, "backend must be one of"),
        ({"name": "../evil"}, "not a valid folder name"),
        ({"name": ""}, "not a valid folder name"),
        ({"max_batch": 0}, "max_batch must be a positive integer"),
        ({"num_classes": 2.5}, "num_classes must be a positive integer"),
        ({"input_chw": (1, 28)}, "input_chw must be three"),
        ({"instance_kind": "GPU"}, "instance kind must be one of"),
        ({"backend": "tensorrt", "instance_kind": "KIND_CPU"}, "GPU only"),
        ({"backend": "python", "trt_accelerator": True}, "onnxruntime backend only"),
        ({"fp16": True}, "needs the TensorRT accelerator"),
        ({"preferred_batch_sizes": [4, 64]}, "preferred batch sizes"),
    ],
)
def test_config_rejects_bad_arguments(kwargs, message):
    args = {
        "name": "cdc",
        "backend": "onnxruntime",
        "num_classes": 4,
        "input_chw": (1, 28, 28),
        "embedding_dim": 8,
        "max_batch": 32,
        "instance_kind": "KIND_CPU",
        **kwargs,
    }
    with pytest.raises(CDCError, match=message):
        config_pbtxt(**args)


def test_parse_config_reports_syntax_errors():
    with pytest.raises(CDCError, match="invalid config.pbtxt"):
        parse_config('name: "x"\nmax_batch_size: [ 1 ')


# ----------------------------------------------------------------------------- repository


def test_onnx_shapes_read_from_graph(tmp_path):
    from tiny_export import write_tiny_graph

    path = make_tiny_onnx(tmp_path / "m.onnx", num_classes=7, input_chw=(3, 5, 4), embedding_dim=9)
    assert onnx_shapes(path) == {
        "num_classes": 7, "input_chw": (3, 5, 4), "embedding_dim": 9, "format_version": 1,
    }  # fmt: skip
    served, _ = write_tiny_graph(tmp_path / "served.onnx", channels=3, size=(5, 4))
    assert onnx_shapes(served) == {
        "num_classes": 5, "input_chw": (3, 5, 4), "embedding_dim": 6, "format_version": 2,
    }  # fmt: skip


def test_python_variant_layout_and_versions(tmp_path):
    repo = tmp_path / "repo"
    v1 = make_tiny_repository(repo, name="cdc", max_batch=8, seed=0, instance_kind="KIND_CPU",
                              format_version=1, meta=tiny_meta())  # fmt: skip
    assert v1 == repo / "cdc" / "1"
    assert sorted(p.name for p in v1.iterdir()) == ["cdc_meta.json", "model.onnx", "model.py"]
    assert (v1 / "model.py").read_bytes() == PYTHON_MODEL_SOURCE.read_bytes()
    assert read_meta(v1) == {**tiny_meta(), "version": 1}
    config = read_config(repo / "cdc")
    assert config.backend == "python" and config.max_batch_size == 8
    assert config.parameters["num_classes"].string_value == "5"
    assert json.loads(config.parameters["preprocess"].string_value) == tiny_meta()["preprocess"]
    before = tree_digest(v1)

    v2 = make_tiny_repository(repo, name="cdc", max_batch=8, seed=1, instance_kind="KIND_CPU",
                              format_version=1, meta=tiny_meta())  # fmt: skip
    assert v2 == repo / "cdc" / "2"
    assert tree_digest(v1) == before, "adding version 2 changed version 1"
    assert (v2 / "model.onnx").read_bytes() != (v1 / "model.onnx").read_bytes()
    assert latest_version_dir(repo / "cdc") == v2
    assert read_meta(repo / "cdc")["version"] == 2  # a model folder reads its latest version
    assert read_config(repo / "cdc").parameters["version"].string_value == "2"
    # No staging folders or temporary files are left behind.
    assert sorted(p.name for p in (repo / "cdc").iterdir()) == ["1", "2", "config.pbtxt"]
    assert list_models(repo) == ["cdc"]


def test_onnxruntime_and_tensorrt_layouts(tmp_path):
    repo = tmp_path / "repo"
    onnx_path = make_tiny_onnx(tmp_path / "m.onnx")
    v = add_model_version(
        repo,
        "ort",
        onnx_path,
        {"a": 1},
        "onnxruntime",
        32,
        trt_accelerator=True,
        instance_kind="KIND_GPU",
    )
    assert sorted(p.name for p in v.iterdir()) == ["cdc_meta.json", "model.onnx"]
    config = read_config(repo / "ort")
    assert config.platform == "onnxruntime_onnx"
    assert (
        config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    )

    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not checked here: a TensorRT engine is opaque without tensorrt")
    with pytest.raises(CDCError, match="needs num_classes, input_chw, embedding_dim"):
        add_model_version(repo, "trt", plan, {}, "tensorrt", 32)
    v = add_model_version(
        repo, "trt", plan, {}, "tensorrt", 32, num_classes=5, input_chw=(1, 8, 8), embedding_dim=6
    )
    assert sorted(p.name for p in v.iterdir()) == ["cdc_meta.json", "model.plan"]
    assert read_config(repo / "trt").platform == "tensorrt_plan"
    # The shapes may come from the metadata instead (ModelMeta field names).
    meta = {"num_classes": 3, "embedding_dim": 4, "channels": 3, "input_size": [32, 32]}
    add_model_version(repo, "trt", plan, meta, "tensorrt", 32, fp16=True)
    config = read_config(repo / "trt")
    assert [list(o.dims) for o in config.output] == [[1], [1], [1], [1], [3], [4]]
    assert list(config.input[0].dims) == [3, 32, 32]


def test_real_model_meta_round_trip(tmp_path):
    """The exporter passes ModelMeta.to_dict() with version 0; the written file is valid."""
    from cdc_serve.modelmeta import ModelMeta

    meta = ModelMeta(
        name="cdc", version=1, num_classes=5, channels=1, input_size=(8, 8),
        mean=[0.5], std=[0.25], embedding_dim=6, ood={"threshold": 0.3},
    ).to_dict()  # fmt: skip
    meta["version"] = 0
    repo = tmp_path / "repo"
    v1 = make_tiny_repository(repo, "cdc", meta=meta, instance_kind="KIND_CPU")
    v2 = make_tiny_repository(repo, "cdc", meta=meta, instance_kind="KIND_CPU")
    assert ModelMeta.read(v1 / META_FILE).version == 1
    assert ModelMeta.read(v2 / META_FILE).version == 2
    params = read_config(repo / "cdc").parameters
    assert params["num_classes"].string_value == "5"
    assert json.loads(params["ood"].string_value) == {"threshold": 0.3}
    with pytest.raises(CDCError, match="num_classes=7 in the metadata disagrees"):
        make_tiny_repository(repo, "cdc", meta={**meta, "num_classes": 7})


def test_add_model_version_rejects_bad_input(tmp_path):
    repo = tmp_path / "repo"
    onnx_path = make_tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(CDCError, match="does not exist"):
        add_model_version(repo, "cdc", tmp_path / "nope.onnx", {}, "python", 8)
    with pytest.raises(CDCError, match="not plain JSON"):
        add_model_version(repo, "cdc", onnx_path, {"x": object()}, "python", 8)
    with pytest.raises(CDCError, match="not plain JSON"):
        add_model_version(repo, "cdc", onnx_path, {"x": float("nan")}, "python", 8)
    with pytest.raises(CDCError, match="num_classes=3 in the arguments disagrees"):
        add_model_version(repo, "cdc", onnx_path, {}, "python", 8, num_classes=3)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(CDCError, match="not a readable ONNX model|model contract"):
        add_model_version(repo, "cdc", garbage, {}, "python", 8)
    assert not repo.exists() or not any((repo / "cdc").glob("*")), "a failed add left files"

    add_model_version(repo, "cdc", onnx_path, {}, "python", 8, instance_kind="KIND_CPU")
    with pytest.raises(CDCError, match="served by the python backend"):
        add_model_version(repo, "cdc", onnx_path, {}, "onnxruntime", 8)
    assert next_version(repo / "cdc") == 2


def test_contract_violations_in_onnx_are_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["probs"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CDCError, match="no input named 'input'.*no output named 'embedding'"):
        onnx_shapes(path)


def test_read_meta_errors(tmp_path):
    with pytest.raises(CDCError, match="does not exist"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text("[1, 2]")
    with pytest.raises(CDCError, match="not a JSON object"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text("{broken")
    with pytest.raises(CDCError, match="cannot read model metadata"):
        read_meta(tmp_path)


TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "templates"
TEMPLATE_COMMON = {
    "num_classes": 10,
    "input_chw": (1, 28, 28),
    "embedding_dim": 128,
    "max_batch": 256,
    "preferred_batch_sizes": [64, 256],
    "parameters": {
        "cdc_meta_file": "cdc_meta.json",
        "num_classes": "10",
        "channels": "1",
        "input_size": "[28,28]",
    },
}
TEMPLATES = {
    "onnxruntime": {"instance_kind": "auto", "trt_accelerator": True, "fp16": True},
    "python": {"instance_kind": "auto"},
    "tensorrt": {"instance_kind": "auto"},
}


@pytest.mark.parametrize("backend", sorted(TEMPLATES))
def test_templates_parse_and_match_the_generator(backend):
    """model_repository/templates/*/config.pbtxt are valid and what config_pbtxt writes."""
    text = (TEMPLATE_DIR / backend / "config.pbtxt").read_text()
    parse_config(text)
    assert text == config_pbtxt("cdc", backend, **TEMPLATES[backend], **TEMPLATE_COMMON)


# ----------------------------------------------------------------------------- model.py


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


def _python_model(monkeypatch):
    """Load the python backend's model.py as Triton's stub would, with a stand-in pb_utils."""
    import importlib.util
    import sys
    import types

    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _FakeTensor
    fake.get_input_tensor_by_name = lambda request, name: (
        _FakeTensor(name, request[name]) if name in request else None
    )
    fake.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        tensors={t.name: t.array for t in output_tensors or []}, error=error
    )
    fake.TritonError = str
    fake.TritonModelException = type("TritonModelException", (Exception,), {})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("served_model_py", PYTHON_MODEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _initialised(module, model_dir: Path, version: str = "1"):
    """A TritonPythonModel initialised with the model's config.pbtxt, as Triton passes it."""
    from google.protobuf import json_format

    config = json_format.MessageToJson(read_config(model_dir), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": config, "model_repository": str(model_dir), "model_version": version}
    )
    return model


def test_python_model_follows_the_contract_names_in_the_config(tmp_path, monkeypatch):
    import numpy as np
    import onnxruntime as ort

    from cdc_serve.contract import (
        INPUT_NAME,
        ONNX_FILE,
        ORT_SPINNING_PARAMETER,
        ORT_THREADS_PARAMETER,
        OUTPUT_NAMES,
        SERVED_OUTPUTS,
    )

    module = _python_model(monkeypatch)
    # the names model.py cannot import from cdc_serve.contract
    assert module.MODEL_FILE == ONNX_FILE and module.THREADS_PARAMETER == ORT_THREADS_PARAMETER
    assert module.SPINNING_PARAMETER == ORT_SPINNING_PARAMETER

    rng = np.random.default_rng(0)
    for fmt, names, dtype in ((2, SERVED_OUTPUTS, np.uint8), (1, OUTPUT_NAMES, np.float32)):
        v1 = make_tiny_repository(tmp_path / f"repo{fmt}", name="cdc", instance_kind="KIND_CPU",
                                  format_version=fmt)  # fmt: skip
        model = _initialised(module, v1.parent)
        assert (model.input_name, tuple(model.output_names)) == (INPUT_NAME, names)
        a, b = (rng.integers(0, 256, size=(n, 1, 8, 8)).astype(dtype) for n in (3, 2))
        bad = {INPUT_NAME: np.zeros((2, 8, 8), dtype)}
        good_a, wrong, good_b = model.execute([{INPUT_NAME: a}, bad, {INPUT_NAME: b}])
        session = ort.InferenceSession(str(v1 / "model.onnx"), providers=["CPUExecutionProvider"])
        for response, x in ((good_a, a), (good_b, b)):  # batched together, split back
            assert response.error is None and set(response.tensors) == set(names)
            expected = session.run(list(names), {"input": x})
            for name, want in zip(names, expected, strict=True):
                assert response.tensors[name].dtype == want.dtype
                np.testing.assert_allclose(response.tensors[name], want, atol=1e-6)
        assert f"{np.dtype(dtype)} [N, C, H, W]" in wrong.error and INPUT_NAME in wrong.error
        (wrong_type,) = model.execute([{INPUT_NAME: a.astype(np.float64)}])
        assert "float64" in wrong_type.error
    (missing,) = model.execute([{"something": a}])
    assert f"no tensor named {INPUT_NAME!r}" in missing.error


class _Request(dict):
    """A request that names the outputs it wants, as Triton's InferenceRequest does."""

    def __init__(self, tensors, wanted):
        super().__init__(tensors)
        self.wanted = wanted

    def requested_output_names(self):
        return self.wanted


def test_python_model_sends_only_the_outputs_asked_for(tmp_path, monkeypatch):
    import numpy as np

    module = _python_model(monkeypatch)
    model = _initialised(module, make_tiny_repository(tmp_path / "repo", name="cdc").parent)
    x = np.zeros((2, 1, 8, 8), np.uint8)
    few, every = model.execute([_Request({"input": x}, ["ood", "cluster_id"]), _Request({"input": x}, [])])  # fmt: skip
    assert set(few.tensors) == {"cluster_id", "ood"} and few.tensors["ood"].dtype == np.bool_
    assert set(every.tensors) == set(model.output_names)  # none named: every output


def test_python_model_reads_renamed_tensors_from_the_config(tmp_path, monkeypatch):
    """Nothing in model.py hard-codes a tensor name: a renamed config and graph still serve."""
    import numpy as np
    from tiny_export import RENAMED, make_renamed_export

    module = _python_model(monkeypatch)
    model_dir = make_renamed_export(tmp_path)
    model = _initialised(module, model_dir)
    x = np.random.default_rng(1).normal(size=(4, 1, 8, 8)).astype(np.float32)
    (response,) = model.execute([{RENAMED["input"]: x}])
    assert response.error is None
    assert set(response.tensors) == {RENAMED["probs"], RENAMED["embedding"]}
    assert response.tensors[RENAMED["probs"]].shape == (4, 5)
    # a config naming outputs the graph lacks is refused when the model loads
    text = (model_dir / "config.pbtxt").read_text().replace('"z"', '"zz"')
    (model_dir / "config.pbtxt").write_text(text)
    with pytest.raises(module.pb_utils.TritonModelException, match=r"lacks the outputs \['zz'\]"):
        _initialised(module, model_dir)


def test_the_contract_names_reach_config_and_metadata(tmp_path):
    from cdc_serve.contract import EMBEDDING, INPUT_NAME, PROBS, SERVED_OUTPUTS
    from cdc_serve.modelmeta import ModelMeta

    v1 = make_tiny_repository(tmp_path / "repo", name="cdc", instance_kind="KIND_CPU")
    config = read_config(v1.parent)
    assert [t.name for t in config.input] == [INPUT_NAME]
    assert [t.name for t in config.output] == list(SERVED_OUTPUTS)
    meta = ModelMeta(name="m", num_classes=2, channels=1, input_size=(4, 4), mean=[0.5],
                     std=[0.5], embedding_dim=3)  # fmt: skip
    assert (meta.input_name, meta.outputs) == (INPUT_NAME, (PROBS, EMBEDDING))
