"""The ``cdc-serve`` command line: thin Typer commands over the library modules.

Every command turns a :class:`cdc_serve.CDCError` into one line on stderr and exit
status 2, so bad input never shows a traceback. Commands that need torch
(``train``, ``ablations``, ``export``, ``evaluate`` of a ``.pth``) import it only when
they run, ``train`` and ``ablations`` through :func:`_training`. Choices are the Enums
of ``cdc_serve.choices``: ``--help`` lists them and a wrong value is refused before any
work starts.
"""

from __future__ import annotations

import enum
import functools
import sys
from pathlib import Path

import typer

from cdc_serve import CDCError, __version__
from cdc_serve.choices import (
    Ablation,
    Backbone,
    Device,
    Engine,
    ExportFormat,
    HeadInit,
    InputNorm,
    InstanceKind,
    Method,
    OodScore,
    Preset,
    SharedMemory,
    Split,
    Study,
    TritonBackend,
    TritonProtocol,
)

app = typer.Typer(
    help="Train calibrated deep clustering models, export them to ONNX/Triton, serve and score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _user_errors(func):
    """Print a CDCError (or a missing optional dependency) as one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CDCError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:
            if exc.name in {"torch", "torchvision", "cdc_serve_training"}:
                typer.secho(
                    f"error: this command needs the training extra ({exc.name} is missing): "
                    "pip install 'cdc-serve[train]'",
                    fg=typer.colors.RED,
                    err=True,
                )
                raise typer.Exit(2) from None
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cdc-serve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """cdc-serve: cluster IDs with a confidence you can trust."""


def _training(module: str):
    """A module of the training package: the CLI's one way into it (and so into torch),
    taken only by the commands that train."""
    import importlib

    return importlib.import_module(f"cdc_serve_training.{module}")


def _value(choice):
    return None if choice is None else choice.value


def _plain(value):
    """A command-line value as the training settings hold it: Enum -> its value, Path -> str."""
    if isinstance(value, enum.Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def _size(text: str | None) -> tuple[int, int] | None:
    """``"64"`` -> (64, 64), ``"48x64"`` -> (48, 64) (height x width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise CDCError(f"--input-size {text!r}: use N or HxW, e.g. 64 or 48x64") from None
    return height, width


@app.command()
@_user_errors
def train(
    dataset: str = typer.Option(
        "fashion-mnist", help="fashion-mnist, digits, cifar10, cifar20, stl10 or imagefolder:PATH."
    ),
    preset: Preset = typer.Option(
        Preset.quick,
        help="quick (small CNN, 2-core CPU, < 10 min for 70,000 images), standard (quick's "
        "settings, the best of 3 initialisations kept, ~12 min) or paper (ResNet, GPU).",
    ),
    out: Path = typer.Option(
        Path("runs/fmnist"), help="Output folder for model.pth, metrics.json and checkpoints."
    ),
    method: Method = typer.Option(Method.cdc, help="CDC, or RUC on existing pseudo-labels."),
    labels_from: str | None = typer.Option(
        None,
        "--labels-from",
        "--init-from",
        help="RUC only: where its pseudo-labels come from: kmeans (default), a CDC "
        "model.pth, or a labels .npy/.csv.",
    ),
    data_root: Path | None = typer.Option(
        None, help="Folder holding the dataset files (default: the usual place per dataset)."
    ),
    split: Split = typer.Option(
        Split.all, help="Which part of the dataset (the paper merges train and test)."
    ),
    backbone: Backbone | None = typer.Option(None, help="Override the preset's backbone."),
    epochs: int | None = typer.Option(
        None, help="Epochs of the method's own stage: CDC epochs, or RUC epochs with --method ruc."
    ),
    pretrain_epochs: int | None = typer.Option(None, help="Override the number of MoCo-v2 epochs."),
    ablation: Ablation | None = typer.Option(
        None, help="One of the paper's Table 2 variants (see docs/ABLATIONS.md)."
    ),
    head_init: HeadInit | None = typer.Option(
        None,
        help="Where CDC's heads start: prototype (the default: the paper's Sec. 3.3, K-means "
        "prototypes of the pretrained features) or random (PyTorch's init; measured against "
        "it in docs/BENCHMARKS.md).",
    ),
    device: Device = typer.Option(Device.auto, help="auto: CUDA if present, else CPU."),
    seed: int = typer.Option(0, help="Random seed."),
    restarts: int | None = typer.Option(
        None,
        help="CDC: train N initialisations on the one pretrained backbone and keep the one "
        "whose calibration head expects the highest accuracy (no labels needed; every "
        "candidate is in train_log.json). Default: the preset's (3 with standard, else 1).",
    ),
    limit: int | None = typer.Option(None, help="Use a seeded subset of N images."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoints in --out."),
    download: bool = typer.Option(False, "--download", help="Allow downloading a missing dataset."),
    num_clusters: int | None = typer.Option(
        None,
        help="imagefolder: how many clusters to find (required without class sub-folders; "
        "default: one per sub-folder, whose names are then labels for evaluation only).",
    ),
    input_size: str | None = typer.Option(
        None,
        help="imagefolder: N or HxW, the size images are resized to (default: 32 with the "
        "quick and standard presets, 96 with paper; never the images' own size).",
    ),
    channels: int | None = typer.Option(
        None, help="imagefolder: 1 or 3 (default: 1 when every image is grayscale, else 3)."
    ),
    input_norm: InputNorm = typer.Option(
        InputNorm.auto,
        help="What the backbone does with each image's colours: dataset (one normalisation "
        "for all), image (each image to zero mean, unit deviation: exposure and tint no "
        "longer count), object (image, and a dark object on light looks like a light one "
        "on dark); auto: object for imagefolder, dataset for the built-in data sets.",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="imagefolder: stop at the first unreadable file (default: skip)."
    ),
    labels: Path | None = typer.Option(
        None,
        help="imagefolder: a `file,label` CSV of true labels, for evaluation only (ACC, NMI, "
        "ARI, ECE in metrics.json); training never sees them.",
    ),
    batch_size: int | None = typer.Option(
        None, help="CDC batch B (default: the preset's, halved for small data; printed)."
    ),
    sub_batch_size: int | None = typer.Option(None, help="CDC sub-batch B_s (divides B)."),
    mini_clusters: int | None = typer.Option(None, help="CDC mini-clusters K per batch."),
    backbone_weights: Path | None = typer.Option(
        None,
        help="Start from these weights: a torchvision state dict of --backbone (e.g. "
        "torch.save(torchvision.models.resnet18(weights='DEFAULT').state_dict(), 'r18.pth')) "
        "or a backbone.pt of an earlier run; with --pretrain-epochs 0 MoCo-v2 is skipped.",
    ),
) -> None:
    """Pretrain (MoCo-v2), initialise the heads from prototypes and train CDC or RUC."""
    # every option but --resume is a make_config setting of the same name, as a plain value
    settings = {name: _plain(value) for name, value in locals().items() if name != "resume"}
    config = _training("presets").make_config(**{**settings, "input_size": _size(input_size)})
    model_path = _training("pipeline").train(config, resume=resume)
    if _training("distributed").is_main():  # under torchrun, rank 0 wrote the files
        typer.echo(f"model: {model_path}")
        typer.echo(f"metrics: {model_path.parent / 'metrics.json'}")


@app.command()
@_user_errors
def ablations(
    study: Study = typer.Option(
        Study.table2,
        help="table2: the CDC paper's Table 2 (-> --out); ruc-strategies: RUC's clean-set "
        "strategies on K-means pseudo-labels (-> --runs/strategies.md).",
    ),
    dataset: str = typer.Option("fashion-mnist", help="Dataset to run the study on."),
    preset: Preset = typer.Option(Preset.quick, help="Preset for every row."),
    out: Path = typer.Option(Path("docs/ABLATIONS.md"), help="table2: Markdown report to write."),
    runs: Path = typer.Option(Path("runs/ablations"), help="Folder for the runs."),
    data_root: Path | None = typer.Option(None, help="Folder holding the dataset files."),
    device: Device = typer.Option(Device.auto, help="auto: CUDA if present, else CPU."),
    limit: int | None = typer.Option(None, help="Use a seeded subset of N images for every row."),
    backbone: Path | None = typer.Option(
        None,
        help="ruc-strategies: the backbone.pt of a `cdc-serve train` run (default: pretrain "
        "one into --runs).",
    ),
    epochs: int | None = typer.Option(None, help="ruc-strategies: RUC epochs."),
    seed: int = typer.Option(0, help="ruc-strategies: random seed."),
) -> None:
    """Reproduce the paper's ablations (Table 2) or RUC's strategy comparison, as Markdown."""
    if study is Study.ruc_strategies:
        path = _training("ruc").run_strategy_comparison(
            dataset, data_root, backbone, runs, limit=limit, seed=seed, device=device.value,
            preset=preset.value, epochs=epochs,
        )  # fmt: skip
        typer.echo(path.read_text())
    else:
        path = _training("ablations").run_ablations(
            dataset=dataset, preset=preset.value, out=out, runs=runs, data_root=data_root,
            device=device.value, limit=limit,
        )  # fmt: skip
    typer.echo(f"wrote {path}")


@app.command()
@_user_errors
def export(
    model: Path = typer.Argument(..., help="A model.pth written by `cdc-serve train`."),
    out: Path = typer.Option(
        Path("model_repository"), help="Triton model repository to write into."
    ),
    name: str = typer.Option("cdc", help="Model name inside the repository."),
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="The model file."),
    backend: TritonBackend = typer.Option(
        TritonBackend.onnxruntime,
        help="onnxruntime (NVIDIA's containers; `cdc-serve serve` runs it on the pip-installed "
        "tritonserver too) or python (a model.py that runs model.onnx).",
    ),
    instance_kind: InstanceKind = typer.Option(
        InstanceKind.auto,
        help="Where Triton runs the model: auto (KIND_AUTO: the serving machine's GPU if it "
        "has one, else its CPU), KIND_CPU or KIND_GPU.",
    ),
    reject_below: float = typer.Option(
        0.8, help="The model's default reject threshold (clients may choose another)."
    ),
    max_batch: int = typer.Option(256, help="Largest batch Triton may form."),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT only: build an fp16 engine."),
    trt_accelerator: bool = typer.Option(
        False,
        "--trt-accelerator",
        help="onnxruntime backend: enable the TensorRT execution accelerator in config.pbtxt.",
    ),
    data_root: Path | None = typer.Option(
        None, help="Where the training dataset lives (to verify on a real batch)."
    ),
) -> None:
    """Export backbone + calibration head to ONNX (or TensorRT) inside a Triton model repository."""
    from cdc_serve.export import export_model

    result = export_model(
        model,
        out=out,
        name=name,
        fmt=format.value,
        backend=backend.value,
        max_batch=max_batch,
        fp16=fp16,
        trt_accelerator=trt_accelerator,
        data_root=data_root,
        reject_below=reject_below,
        instance_kind=instance_kind.value,
    )
    typer.echo(result.summary())


@app.command()
@_user_errors
def serve(
    repository: Path = typer.Argument(Path("model_repository"), help="Triton model repository."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (loopback unless you say otherwise)."
    ),
    http_port: int = typer.Option(8000, help="HTTP port."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    poll: bool = typer.Option(
        False,
        "--poll",
        help="Watch the repository and serve each new version exported into it (hot update; "
        "requests in flight during the switch succeed).",
    ),
    poll_interval: float = typer.Option(2.0, help="With --poll: seconds between looks."),
) -> None:
    """Start a Triton Inference Server on the repository and wait (Ctrl-C stops it).

    Serves every export of this project on whichever tritonserver it finds: models
    configured for onnxruntime run through the Python backend on a server without it.
    """
    from cdc_serve.serve_command import serve_forever

    serve_forever(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        poll=poll_interval if poll else None,
    )


@app.command()
@_user_errors
def predict(
    inputs: list[Path] = typer.Argument(
        ..., help="Image files, folders (recursive), .npy arrays or IDX files."
    ),
    model: Path | None = typer.Option(
        None, help="Exported model (repository/<name>, a version folder or model.onnx)."
    ),
    url: str | None = typer.Option(None, help="Triton server HOST:PORT (instead of --model)."),
    protocol: TritonProtocol = typer.Option(TritonProtocol.http, help="With --url."),
    model_name: str = typer.Option("cdc", help="Model name on the Triton server."),
    reject_below: float | None = typer.Option(
        None,
        help="Reject predictions whose calibrated confidence is below this (default: the "
        "model's reject_below, 0.8 unless chosen at export).",
    ),
    batch_size: int = typer.Option(256, help="Images per request."),
    shared_memory: SharedMemory = typer.Option(
        SharedMemory.auto,
        help="With --url: send images through system shared memory (auto: when the server "
        "is on loopback; system: always; none: inside the requests).",
    ),
    output: Path | None = typer.Option(
        None,
        help="preds.csv, preds.jsonl or preds.parquet (default: print the summary only).",
    ),
    ood_score: OodScore | None = typer.Option(
        None, help="OOD score to use (default: the model's best)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run into the same --output."
    ),
    labels: Path | None = typer.Option(
        None, help="Optional IDX/.npy labels to report the true accuracy beside the estimate."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: on a terminal only)."
    ),
    engine: Engine = typer.Option(
        Engine.local,
        help="local: this process; ray: Ray Data actors (a local Ray for the run, or the "
        "cluster at --ray-address; needs the ray extra). Same rows either way.",
    ),
    ray_address: str | None = typer.Option(
        None, help="With --engine ray: the cluster to join (HEAD:6379, or auto on a node of it)."
    ),
    ray_actors: int | None = typer.Option(
        None,
        help="With --engine ray: scoring actors, each with one model copy (default: "
        "one per CPU of the cluster).",
    ),
) -> None:
    """Score images: cluster ID, calibrated confidence, rejection and OOD flags per image."""
    from cdc_serve.predict import predict as run_predict

    summary = run_predict(
        inputs,
        model=model,
        url=url,
        protocol=protocol.value,
        model_name=model_name,
        reject_below=reject_below,
        batch_size=batch_size,
        output=output,
        ood_score=_value(ood_score),
        resume=resume,
        labels=labels,
        progress=sys.stderr.isatty() if progress is None else progress,
        shared_memory=shared_memory.value,
        engine=engine.value,
        ray_address=ray_address,
        ray_actors=ray_actors,
    )
    typer.echo(summary.format())


@app.command()
@_user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A model.pth or an exported model."),
    dataset: str = typer.Option("fashion-mnist", help="Labelled dataset to evaluate on."),
    split: Split = typer.Option(Split.test, help="Which part of the dataset."),
    ood_dataset: str | None = typer.Option(
        None, help="A dataset to use as out-of-distribution data."
    ),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for metrics.json and the PNGs."),
    data_root: Path | None = typer.Option(None, help="Folder holding the dataset files."),
) -> None:
    """Compute ACC, NMI, ARI, ECE, AUROC, AURC, FPR95 (and OOD scores) and draw reliability diagrams."""
    from cdc_serve.evaluate import evaluate as run_evaluate

    report = run_evaluate(
        model,
        dataset=dataset,
        split=split.value,
        ood_dataset=ood_dataset,
        out=out,
        data_root=data_root,
    )
    typer.echo(report.format())


@app.command()
@_user_errors
def report(
    predictions: Path = typer.Argument(
        ..., help="A predict output (.csv/.jsonl) or an assignments.csv of `cdc-serve train`."
    ),
    out: Path | None = typer.Option(
        None, help="Folder for index.html and the PNGs (default: report/ beside PREDICTIONS)."
    ),
    reject_below: float | None = typer.Option(
        None,
        help="Reject confidences below this (default: the file's rejected column, else 0.8).",
    ),
    labels: Path | None = typer.Option(
        None, help="IDX/.npy labels aligned with the rows (else a label column, if any)."
    ),
    root: Path | None = typer.Option(
        None,
        help="Folder that relative sources are relative to (default: the current folder, "
        "then the folder of PREDICTIONS).",
    ),
    num_clusters: int | None = typer.Option(
        None, help="How many clusters the model has (default: the largest cluster_id + 1)."
    ),
) -> None:
    """Write an HTML page with one contact sheet per cluster (and a reliability diagram with labels)."""
    from cdc_serve.report import make_report

    result = make_report(
        predictions,
        out=out if out is not None else Path(predictions).parent / "report",
        reject_below=reject_below,
        labels=labels,
        root=root,
        num_clusters=num_clusters,
    )
    typer.echo(result.format())


if __name__ == "__main__":  # pragma: no cover
    app()
