"""System shared memory for requests to a Triton server on the same machine.

A request normally carries its input tensor inside the message (protobuf for gRPC, the
binary body for HTTP): the client copies the batch into the message and the server copies
it out again. When client and server share a machine, Triton can instead read the tensor
from a POSIX shared-memory region that the client registered once (Triton's *system
shared memory* extension); the request then names the region, and carries no tensor.
On the 2-core benchmark machine this lifts gRPC throughput by 8-13 % on the small
model (docs/BENCHMARKS.md, section 1).

:class:`SharedInput` is one such region, owned by one client thread (one request in
flight at a time). :func:`is_loopback` decides whether ``shared_memory="auto"`` uses it.
Outputs still come back in the response: they are small (the per-image answer and the
probabilities; the embedding only when a client asks for it).
"""

from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np

from cdc_serve import CDCError
from cdc_serve.choices import SharedMemory, values
from cdc_serve.contract import INPUT_NAME

MODES = values(SharedMemory)
DATATYPES = {"uint8": "UINT8", "float32": "FP32"}  # what a client sends, as Triton names it
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}


def shm_free_bytes() -> int | None:
    """Free bytes in the POSIX shared-memory filesystem (None where there is none to ask)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def is_loopback(url: str) -> bool:
    """Whether ``url`` (``HOST:PORT``, with or without scheme) names this machine's loopback."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    if host.startswith("["):  # [::1]:8001
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.lower() in _LOOPBACK or host.startswith("127.")


class SharedMemoryUnavailable(CDCError):
    """This process cannot create the region, or the server cannot open it (another host or
    container). Connection errors are not this: they propagate as they are, to be retried."""


class SharedInput:
    """A shared-memory region registered with a Triton server, holding one input batch.

    ``client`` is a ``tritonclient.http`` or ``tritonclient.grpc`` client and ``module``
    its module (for ``InferInput``). The region is created with ``nbytes`` bytes and
    registered under a name unique to this process; :meth:`close` unregisters and
    removes it. Raises :class:`SharedMemoryUnavailable` when the region cannot be made or
    the server cannot open it (the caller decides whether to fall back to tensors in the
    message); other errors, such as a refused connection, propagate unchanged.
    """

    def __init__(self, client, module, nbytes: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm, self.module, self.nbytes = shm, module, int(nbytes)
        self.name = f"cdc-serve-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.key = "/" + self.name
        free = shm_free_bytes()
        if free is not None and self.nbytes > free // 2:
            # a full tmpfs makes the copy into the mapping crash the process (SIGBUS)
            raise SharedMemoryUnavailable(
                f"{SHM_DIR} has {free / 2**20:.0f} MiB free; a {self.nbytes / 2**20:.0f} MiB "
                "region would leave too little"
            )
        try:
            self.handle = shm.create_shared_memory_region(self.name, self.key, self.nbytes)
        except Exception as exc:  # noqa: BLE001  no /dev/shm, out of space, ...
            raise SharedMemoryUnavailable(f"cannot create {self.key}: {exc}") from exc
        try:
            client.register_system_shared_memory(self.name, self.key, self.nbytes)
        except BaseException as exc:
            shm.destroy_shared_memory_region(self.handle)
            if "unable to open shared memory" in str(exc).lower():
                raise SharedMemoryUnavailable(
                    f"the server cannot open {self.key} (is it on another host or container?)"
                ) from exc
            raise

    def input(self, x: np.ndarray, name: str = INPUT_NAME):
        """Copy the batch ``x`` (uint8 images, or float32 for exports of the previous format)
        into the region; the ``InferInput`` that points at it."""
        if x.nbytes > self.nbytes:
            raise CDCError(f"{x.nbytes} bytes do not fit the {self.nbytes}-byte region {self.key}")
        self._shm.set_shared_memory_region(self.handle, [x])
        datatype = DATATYPES.get(str(x.dtype))
        if datatype is None:
            raise CDCError(f"shared memory carries uint8 or float32 batches, not {x.dtype}")
        inp = self.module.InferInput(name, list(x.shape), datatype)
        inp.set_shared_memory(self.name, x.nbytes)
        return inp

    def close(self, client=None) -> None:
        """Unregister from the server (through ``client``, best effort) and free the region."""
        if client is not None:
            with contextlib.suppress(Exception):  # the server may be gone already
                client.unregister_system_shared_memory(self.name)
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self._shm.destroy_shared_memory_region(self.handle)
            self.handle = None
