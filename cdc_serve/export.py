"""Export a trained ``model.pth`` to ONNX (or TensorRT) inside a Triton model repository.

The network ``backbone -> calibration head -> softmax`` (``probs``, the calibrated
probabilities, CDC paper Sec. 3.4 "Final Prediction", and ``embedding``, the backbone
feature) is traced to ONNX and wrapped by :mod:`cdc_serve.served_graph` into the served
graph: uint8 images in, normalised inside, and per image ``cluster_id``,
``confidence``, ``ood_score`` (the model's default OOD score), ``ood``, ``probs`` and
``embedding`` out (metadata ``format_version`` 2). The clustering head is not exported.

Nothing is written before every output is verified on a real batch of the training
data set: onnxruntime against PyTorch for ``probs``, ``embedding``, ``confidence`` and
``cluster_id``, against the numpy OOD code for ``ood_score`` and ``ood`` (floats within
1e-5, ids and flags equal).

The torch side (tracing, comparing with PyTorch) lives in
``cdc_serve_training.onnx_export``, imported only when an export runs: ``cdc_serve``
itself never imports torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cdc_serve import CDCError, __version__
from cdc_serve.choices import ExportFormat, TritonBackend, values
from cdc_serve.contract import DEFAULT_REJECT_BELOW, INPUT_NAME, ONNX_FILE, PLAN_FILE

PROBS_TOLERANCE = 1e-5
FORMATS = values(ExportFormat)
BACKENDS = values(TritonBackend)


@dataclass
class ExportResult:
    """What an export wrote and how well the exported graph matched PyTorch."""

    version_dir: Path
    model_file: Path
    backend: str
    fmt: str
    diffs: dict[str, float]  # output -> max difference found by the verification
    verify_batch: int
    verify_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """The largest ``probs`` difference between onnxruntime and PyTorch."""
        return self.diffs["probs"]

    def summary(self) -> str:
        checked = ", ".join(f"{k} {v:.1e}" for k, v in self.diffs.items())
        lines = [
            f"exported {self.fmt} ({self.backend} backend) -> {self.version_dir}",
            f"  model file: {self.model_file} ({self.model_file.stat().st_size / 1e6:.2f} MB)",
            f"  verified on {self.verify_batch} images ({self.verify_source}): "
            f"max |probs_onnxruntime - probs_torch| = {self.max_abs_diff:.2e} "
            f"(tolerance {PROBS_TOLERANCE:.0e})",
            f"  every output checked (max difference; cluster_id and ood equal): {checked}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_model(
    model_path: Path | str,
    *,
    out: Path | str = "model_repository",
    name: str = "cdc",
    fmt: str = "onnx",
    backend: str = "onnxruntime",
    max_batch: int = 256,
    fp16: bool = False,
    trt_accelerator: bool = False,
    data_root: Path | str | None = None,
    verify_batch: int = 64,
    reject_below: float = DEFAULT_REJECT_BELOW,
    instance_kind: str = "auto",
) -> ExportResult:
    """Export ``model_path`` into the Triton repository ``out`` as a new version of ``name``.

    ``reject_below`` is the model's default reject threshold (in ``cdc_meta.json`` and the
    config parameters; clients may pick another). ``instance_kind`` is ``auto`` (Triton's
    ``KIND_AUTO``: the serving machine decides), ``KIND_CPU`` or ``KIND_GPU``.
    """
    model_path = Path(model_path)
    if fmt not in FORMATS:
        raise CDCError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise CDCError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if fmt == "tensorrt" and backend == "python":
        raise CDCError("--format tensorrt needs Triton's tensorrt backend, not --backend python")
    if max_batch < 1:
        raise CDCError(f"--max-batch must be at least 1, got {max_batch}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise CDCError(f"model name {name!r} must be letters, digits, '-' or '_'")
    if not model_path.is_file():
        raise CDCError(f"no model file at {model_path}")
    if fmt == "tensorrt":
        _require_tensorrt()

    if not 0.0 <= reject_below <= 1.0:
        raise CDCError(f"--reject-below must lie in [0, 1], got {reject_below}")
    from cdc_serve.triton import resolve_instance_kind

    resolve_instance_kind(instance_kind, "tensorrt" if fmt == "tensorrt" else backend)

    from cdc_serve_training.checkpoint import load_model
    from cdc_serve_training.onnx_export import inference_module, verification_batch

    model, info = load_model(model_path)
    inference = inference_module(model)
    images, source = verification_batch(info, data_root, verify_batch)
    meta = build_meta(info, name=name, embedding_dim=int(inference.embedding_dim))
    meta.reject_below = float(reject_below)

    with tempfile.TemporaryDirectory(prefix="cdc-export-") as tmp:
        onnx_path = Path(tmp) / ONNX_FILE
        diffs = _served_onnx(inference, images, meta, onnx_path)
        model_file = onnx_path
        if fmt == "tensorrt":
            model_file = build_tensorrt_plan(
                onnx_path, Path(tmp) / PLAN_FILE, info=info, max_batch=max_batch, fp16=fp16
            )
        from cdc_serve.triton import add_model_version

        backend_kind = "tensorrt" if fmt == "tensorrt" else backend
        version_dir = add_model_version(
            Path(out),
            name,
            model_file,
            meta.to_dict(),
            backend=backend_kind,
            max_batch=max_batch,
            trt_accelerator=trt_accelerator,
            fp16=fp16,
            instance_kind=instance_kind,
        )
    notes: list[str] = []
    if backend == "onnxruntime" and fmt == "onnx":
        notes.append(
            "configured for Triton's onnxruntime backend (NVIDIA's containers); `cdc-serve "
            "serve` runs it on the pip-installed tritonserver through the Python backend"
        )
    return ExportResult(
        version_dir=version_dir,
        model_file=version_dir / (PLAN_FILE if fmt == "tensorrt" else ONNX_FILE),
        backend=backend_kind,
        fmt=fmt,
        diffs=diffs,
        verify_batch=int(images.shape[0]),
        verify_source=source,
        notes=notes,
    )


def _served_onnx(inference, images, meta, path: Path) -> dict[str, float]:
    """Trace the core graph, wrap it into the served graph at ``path``, verify every output."""
    import onnx

    from cdc_serve.preprocess import normalise
    from cdc_serve.served_graph import serving_graph
    from cdc_serve_training.onnx_export import export_onnx, verify_onnx

    core = path.with_name("core.onnx")
    export_onnx(inference, normalise(images, meta), core)
    onnx.save(serving_graph(onnx.load(str(core)), meta), str(path))
    return verify_onnx(inference, images, path, meta, tolerance=PROBS_TOLERANCE)


def build_meta(info: dict, *, name: str, embedding_dim: int):
    """The metadata that travels with the model (``cdc_meta.json`` and config parameters),
    a :class:`cdc_serve.modelmeta.ModelMeta` of the current format."""
    from cdc_serve.modelmeta import ModelMeta

    pre, arch = info["preprocess"], info["arch"]
    meta = ModelMeta(
        name=name,
        version=0,  # set by the repository writer
        method=info.get("method", "cdc"),
        num_classes=int(arch["num_classes"]),
        channels=int(pre["channels"]),
        input_size=tuple(int(s) for s in pre["input_size"]),
        mean=[float(m) for m in pre["mean"]],
        std=[float(s) for s in pre["std"]],
        embedding_dim=embedding_dim,
        ood=info.get("ood") or {},
        metrics=info.get("metrics") or {},
        dataset=str(info.get("dataset", "")),
        project_version=__version__,
    )
    return meta


def _require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise CDCError(
            "--format tensorrt needs NVIDIA's `tensorrt` Python package and a GPU, which are not "
            "installed here; export --format onnx and let Triton's onnxruntime backend use its "
            "TensorRT execution accelerator (--trt-accelerator), or run the export inside "
            "NVIDIA's container (docs/DEPLOY.md)"
        ) from None


def build_tensorrt_plan(
    onnx_path: Path, plan_path: Path, *, info: dict, max_batch: int, fp16: bool
) -> Path:
    """Build a serialized TensorRT engine with one optimisation profile for batches 1..max_batch.

    Not exercised by the test suite (no TensorRT on the CI machine).
    """
    import tensorrt as trt

    pre = info["preprocess"]
    chw = (int(pre["channels"]), *(int(s) for s in pre["input_size"]))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CDCError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *chw), (max(1, max_batch // 2), *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CDCError("TensorRT failed to build an engine (see its log above)")
    plan_path.write_bytes(bytes(engine))
    return plan_path
