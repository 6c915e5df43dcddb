"""Every fixed set of choices of the command line, as ``str`` Enums, in one place.

The CLI's options take these types, so ``--help`` lists the values and a wrong one is
refused before any work starts. The library validates the same values from here
(``values(ExportFormat)`` and so on), and the training configuration
(``cdc_serve_training.config``) imports its CLI-facing choices from here too, so that
the CLI never has to import the training package (nor torch) to build its options.
"""

from __future__ import annotations

import enum


def values(choices: type[enum.Enum]) -> tuple[str, ...]:
    """The plain string values of an Enum of choices, in order."""
    return tuple(c.value for c in choices)


# -- training (cdc_serve_training.config) -----------------------------------------------------


class Preset(str, enum.Enum):
    quick = "quick"
    standard = "standard"
    paper = "paper"


class Method(str, enum.Enum):
    cdc = "cdc"
    ruc = "ruc"


class Backbone(str, enum.Enum):
    smallcnn = "smallcnn"
    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"


class InputNorm(str, enum.Enum):
    """What the backbone does with each image's colours (``cdc_serve_training.input_norm``)."""

    auto = "auto"  # object for image folders, dataset for the built-in data sets
    dataset = "dataset"
    image = "image"
    object = "object"


class HeadInit(str, enum.Enum):
    """Where CDC's two heads start (``cdc_serve_training.init``)."""

    prototype = "prototype"  # the paper's Sec. 3.3: K-means prototypes of the backbone features
    random = "random"  # PyTorch's default init (Table 2-I "w/o Init.")


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Ablation(str, enum.Enum):
    """The paper's Table 2 variants (their settings: ``cdc_serve_training.presets.ABLATIONS``)."""

    random_init = "random-init"
    fixed_099 = "fixed-0.99"
    fixed_095 = "fixed-0.95"
    fixed_09 = "fixed-0.9"
    fixed_08 = "fixed-0.8"
    single_head_clu = "single-head-clu"
    single_head_clu_cal = "single-head-clu+cal"
    no_stop_gradient = "no-stop-gradient"


class Study(str, enum.Enum):
    """What ``cdc-serve ablations`` reproduces."""

    table2 = "table2"  # the CDC paper's Table 2
    ruc_strategies = "ruc-strategies"  # RUC's clean-set strategies (its Tables 1 and 3)


# -- data (cdc_serve.datasets) ----------------------------------------------------------------


class Split(str, enum.Enum):
    train = "train"
    test = "test"
    all = "all"  # train + test, as the CDC paper clusters both


# -- export and serving ------------------------------------------------------------------------


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"


class TritonBackend(str, enum.Enum):
    """Which Triton backend an ONNX export is configured for."""

    onnxruntime = "onnxruntime"  # NVIDIA's Triton containers
    python = "python"  # the pip-installed tritonserver (nvidia-pytriton)


class InstanceKind(str, enum.Enum):
    """Where Triton runs a model's instances (``config.pbtxt`` ``instance_group { kind }``)."""

    auto = "auto"  # KIND_AUTO: the serving machine's GPU when it has one, else its CPU
    cpu = "KIND_CPU"
    gpu = "KIND_GPU"


class Protocol(str, enum.Enum):
    """How a client reaches the model: in process, or a Triton server."""

    local = "local"
    http = "http"
    grpc = "grpc"


class TritonProtocol(str, enum.Enum):
    """How a client talks to a Triton server (``predict --url``)."""

    http = "http"
    grpc = "grpc"


class SharedMemory(str, enum.Enum):
    """How a client hands images to a Triton server on its own machine."""

    auto = "auto"  # system shared memory when the server is on loopback
    system = "system"  # always (an error if the server cannot open it)
    none = "none"  # inside the requests


class Engine(str, enum.Enum):
    """Where ``cdc-serve predict`` runs the scoring."""

    local = "local"  # this process (decoding in worker processes), the default
    ray = "ray"  # Ray Data actors, on a local Ray or a cluster (the ``ray`` extra)


class OodScore(str, enum.Enum):
    """OOD scores (``cdc_serve.ood``); higher means more likely out of distribution."""

    msp = "msp"
    prototype = "prototype"
    mahalanobis = "mahalanobis"
    knn = "knn"
