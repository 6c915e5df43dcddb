"""Export a trained ``model.pth`` to ONNX (or TensorRT) inside a Triton model repository.

The inference graph is ``input -> backbone -> calibration head -> softmax`` with two
outputs, ``probs`` (the calibrated probabilities, CDC paper Sec. 3.4 "Final
Prediction") and ``embedding`` (the backbone feature, used by the OOD scores). The
clustering head is not exported.

Nothing is written as done before it is verified: the ONNX checker, then
onnxruntime against PyTorch on a real batch of the training data set (max abs
difference of ``probs`` must be <= 1e-5 in float32).

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
from cdc_serve.contract import INPUT_NAME, ONNX_FILE, PLAN_FILE

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
    max_abs_diff: float
    verify_batch: int
    verify_source: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"exported {self.fmt} ({self.backend} backend) -> {self.version_dir}",
            f"  model file: {self.model_file} ({self.model_file.stat().st_size / 1e6:.2f} MB)",
            f"  verified on {self.verify_batch} images ({self.verify_source}): "
            f"max |probs_onnxruntime - probs_torch| = {self.max_abs_diff:.2e} "
            f"(tolerance {PROBS_TOLERANCE:.0e})",
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
) -> ExportResult:
    """Export ``model_path`` into the Triton repository ``out`` as a new version of ``name``."""
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

    from cdc_serve_training.checkpoint import load_model
    from cdc_serve_training.onnx_export import (
        export_onnx,
        inference_module,
        verification_batch,
        verify_onnx,
    )

    model, info = load_model(model_path)
    inference = inference_module(model)
    batch, source = verification_batch(info, data_root, verify_batch)

    with tempfile.TemporaryDirectory(prefix="cdc-export-") as tmp:
        onnx_path = Path(tmp) / ONNX_FILE
        export_onnx(inference, batch, onnx_path)
        max_diff = verify_onnx(inference, batch, onnx_path, tolerance=PROBS_TOLERANCE)
        model_file = onnx_path
        notes: list[str] = []
        if fmt == "tensorrt":
            model_file = build_tensorrt_plan(
                onnx_path, Path(tmp) / PLAN_FILE, info=info, max_batch=max_batch, fp16=fp16
            )
        meta = build_meta(info, name=name, embedding_dim=int(inference.embedding_dim))
        from cdc_serve.triton import add_model_version

        backend_kind = "tensorrt" if fmt == "tensorrt" else backend
        version_dir = add_model_version(
            Path(out),
            name,
            model_file,
            meta,
            backend=backend_kind,
            max_batch=max_batch,
            trt_accelerator=trt_accelerator,
            fp16=fp16,
        )
    final_file = version_dir / (PLAN_FILE if fmt == "tensorrt" else ONNX_FILE)
    if backend == "onnxruntime" and fmt == "onnx":
        notes.append(
            "onnxruntime_onnx needs NVIDIA's Triton container; for the pip-installed "
            "server export with --backend python (see docs/DEPLOY.md)"
        )
    return ExportResult(
        version_dir=version_dir,
        model_file=final_file,
        backend=backend_kind,
        fmt=fmt,
        max_abs_diff=max_diff,
        verify_batch=int(batch.shape[0]),
        verify_source=source,
        notes=notes,
    )


def build_meta(info: dict, *, name: str, embedding_dim: int) -> dict:
    """The metadata that travels with the model (``cdc_meta.json`` and config parameters)."""
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
    return meta.to_dict()


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
