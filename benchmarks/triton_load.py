"""What the inference benchmark serves and how it loads Triton.

- :func:`served_onnx`: the benchmark model as ``cdc-serve export`` writes it: the traced
  core graph wrapped by :func:`cdc_serve.served_graph.serving_graph` (uint8 images in;
  cluster_id, confidence, Mahalanobis ood_score, ood, probs, embedding out), its OOD
  statistics fitted on the model's own embeddings of random images;
- :func:`build_triton_repo`: a repository with it as a Python-backend model (what the
  pip ``tritonserver`` serves);
- :class:`TritonLoad`: concurrent clients, each keeping one request in flight, asking for
  what :class:`cdc_serve.client.Client` asks for in ``cdc-serve predict``
  (:data:`REQUESTED`: the per-image answer, not ``probs`` nor the embedding).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_cores
from benchmarks.model import CHANNELS, NUM_CLASSES, SIZE
from cdc_serve.contract import INPUT_NAME, ORT_THREADS_PARAMETER, SCORE_OUTPUTS

MODEL_NAME = "bench"
QUEUE_DELAY_US = 100  # the dynamic batcher's wait for more requests (config.pbtxt default)
REQUESTED = list(SCORE_OUTPUTS)  # what the client library asks a current export for
MEAN, STD = [0.5] * CHANNELS, [0.5] * CHANNELS


def served_onnx(inference, path: Path, name: str = MODEL_NAME):
    """Export ``inference`` (a ``CalibratedInference``) as the served graph at ``path``;
    returns its :class:`cdc_serve.modelmeta.ModelMeta`."""
    import onnx
    import torch

    from cdc_serve.modelmeta import ModelMeta
    from cdc_serve.ood import fit_ood
    from cdc_serve.preprocess import normalise_with
    from cdc_serve.served_graph import serving_graph
    from cdc_serve_training.onnx_export import export_onnx

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (512, CHANNELS, SIZE, SIZE)).astype(np.uint8)
    x = normalise_with(images, MEAN, STD)
    with torch.inference_mode():
        probs, embedding = (t.numpy() for t in inference(torch.from_numpy(x)))
    meta = ModelMeta(
        name=name, num_classes=NUM_CLASSES, channels=CHANNELS, input_size=(SIZE, SIZE),
        mean=MEAN, std=STD, embedding_dim=int(embedding.shape[1]), dataset="random",
        ood=fit_ood(embedding, probs, scores=("msp", "mahalanobis")),
    )  # fmt: skip
    core = path.with_name(f"{path.stem}.core.onnx")
    export_onnx(inference, x[:32], core)
    onnx.save(serving_graph(onnx.load(str(core)), meta), str(path))
    return meta


def build_triton_repo(
    repo: Path, onnx_path: Path, meta, queue_delay_us: int = QUEUE_DELAY_US, max_batch: int = 256
) -> Path:
    """A model repository with the Python-backend model (what the pip ``tritonserver`` serves)."""
    from cdc_serve.triton import add_model_version, meta_parameters

    params = {**meta_parameters(meta.to_dict()), ORT_THREADS_PARAMETER: str(cpu_cores())}
    return add_model_version(
        repo,
        meta.name,
        onnx_path,
        meta.to_dict(),
        backend="python",
        max_batch=max_batch,
        instance_kind="KIND_CPU",
        max_queue_delay_us=queue_delay_us,
        parameters=params,
    )


def server_version(http_url: str) -> str:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(http_url)
    try:
        return str(client.get_server_metadata().get("version", "unknown"))
    finally:
        client.close()


class TritonLoad:
    """``concurrency`` threads, each with its own tritonclient, sending the same request.

    ``work(n)`` makes every thread send ``n`` requests of ``batch`` uint8 images (one in
    flight per thread) and returns the images processed. In-message inputs are encoded
    once per thread; with ``shared_memory`` each thread registers one system
    shared-memory region (:class:`cdc_serve.shm.SharedInput`, as the client library does
    on loopback) and copies the batch into it before every request.
    """

    def __init__(
        self,
        protocol: str,
        url: str,
        batch: np.ndarray,
        concurrency: int,
        model_name: str = MODEL_NAME,
        shared_memory: bool = False,
    ):
        self.protocol, self.url, self.batch, self.concurrency = protocol, url, batch, concurrency
        self.model_name, self.shared_memory = model_name, shared_memory
        self.local = threading.local()
        self.regions: list = []
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"bench-{protocol}")

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def _new_client(self):
        tc = self._module()
        if self.protocol == "grpc":
            return tc.InferenceServerClient(self.url)
        return tc.InferenceServerClient(self.url, concurrency=1)

    def _client(self):
        if not hasattr(self.local, "client"):
            tc, client = self._module(), self._new_client()
            inp, region = tc.InferInput(INPUT_NAME, list(self.batch.shape), "UINT8"), None
            if self.shared_memory:
                from cdc_serve.shm import SharedInput

                region = SharedInput(client, tc, self.batch.nbytes)
                self.regions.append(region)
            elif self.protocol == "grpc":
                inp.set_data_from_numpy(self.batch)
            else:
                inp.set_data_from_numpy(self.batch, binary_data=True)
            binary = {} if self.protocol == "grpc" else {"binary_data": True}
            outs = [tc.InferRequestedOutput(n, **binary) for n in REQUESTED]
            self.local.client, self.local.inputs, self.local.outputs = client, [inp], outs
            self.local.region = region
        return self.local

    def infer_once(self):
        c = self._client()
        inputs = [c.region.input(self.batch)] if c.region is not None else c.inputs
        return c.client.infer(self.model_name, inputs, outputs=c.outputs)

    def _loop(self, n: int) -> int:
        for _ in range(n):
            self.infer_once()
        return n * self.batch.shape[0]

    def work(self, n: int) -> int:
        futures = [self.pool.submit(self._loop, n) for _ in range(self.concurrency)]
        return sum(f.result() for f in futures)

    def close(self):
        self.pool.shutdown(wait=True)
        if self.regions:  # unregister through a client of this thread, then free them
            client = self._new_client()
            try:
                for region in self.regions:
                    region.close(client)
            finally:
                client.close()
            self.regions = []
