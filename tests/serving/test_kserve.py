"""docs/kserve-inferenceservice.yaml: a KServe InferenceService for an exported repository.

No cluster here: the manifest is parsed and checked against what Triton needs (protocol
v2, readiness on /v2/health/ready, resources, a larger /dev/shm) and against the layout
``cdc-serve export`` writes (its storageUri names the repository root)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_tiny_repository

from cdc_serve.contract import CONFIG_FILE, META_FILE, ONNX_FILE
from cdc_serve.view import inspect_repository

yaml = pytest.importorskip("yaml")

DOCS = Path(__file__).resolve().parents[2] / "docs"
MANIFEST = DOCS / "kserve-inferenceservice.yaml"
NVIDIA_CONTAINER = {"onnxruntime", "python", "tensorrt"}  # the backends it ships


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def test_it_is_a_triton_inference_service_on_protocol_v2(service):
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    assert "--strict-readiness=true" in model["args"]
    assert not any(
        a.startswith("--model-repository") for a in model["args"]
    )  # KServe's /mnt/models


def test_resources_and_readiness_are_what_triton_needs(service):
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(model["resources"][part])
    ready = model["readinessProbe"]["httpGet"]
    assert ready == {"path": "/v2/health/ready", "port": 8080}
    assert model["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (mount,) = [m for m in model["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in predictor["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_storage_uri_names_the_repository_root_the_export_writes(service, tmp_path):
    uri = service["spec"]["predictor"]["model"]["storageUri"]
    scheme, path = uri.split("://", 1)
    assert scheme in ("pvc", "gs", "s3")
    folder = path.split("/", 1)[1]  # after the claim (pvc) or bucket (gs, s3) name
    # what KServe copies to /mnt/models: the folder `cdc-serve export --out` writes
    repo = tmp_path / folder
    version = make_tiny_repository(repo, "fmnist", backend="onnxruntime")
    assert (repo / "fmnist" / CONFIG_FILE).is_file()
    assert {p.name for p in version.iterdir()} == {ONNX_FILE, META_FILE}
    (model,) = inspect_repository(repo, NVIDIA_CONTAINER)
    assert model.name == "fmnist" and not model.shadow  # served as exported, no shadow
    # and docs/DEPLOY.md copies that same folder to that same place
    deploy = (DOCS / "DEPLOY.md").read_text(encoding="utf-8")
    assert MANIFEST.name in deploy and folder in deploy
