"""``cdc-serve serve REPO``: every repository this project exports, on whichever Triton is here.

1. find the ``tritonserver`` (:func:`cdc_serve.serve.find_tritonserver`) and the
   backends it has;
2. inspect every model of ``REPO`` and refuse, one line per model, what cannot be served
   (:mod:`cdc_serve.view`);
3. build the view Triton is given: models whose backend the server lacks (onnxruntime on
   the pip-installed server) run through the Python backend from shadow entries that
   link the same ``model.onnx``, with one line saying so;
4. start Triton on loopback, print its URLs, run until Ctrl-C or SIGTERM.

With ``poll`` seconds (``serve --poll``) Triton runs in explicit model-control mode and
the repository is looked at every ``poll`` seconds: a new version exported into it
(complete: its model file and ``cdc_meta.json`` written) is linked into the view and the
model reloaded through Triton's repository API. Triton loads the new version while the
old one serves, then retires the old one when its requests are done, so requests in
flight during the switch succeed.
"""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

from cdc_serve import CDCError
from cdc_serve.serve import TritonServer, check_repository, find_tritonserver
from cdc_serve.view import inspect_repository, server_backends, sync_view


class _Terminate(Exception):
    """Raised in the main thread when SIGTERM arrives."""


def _say(line: str) -> None:
    print(line, flush=True)


def serve_forever(
    repository: Path,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    startup_timeout: float = 300.0,
    poll: float | None = None,
) -> int | None:
    """``cdc-serve serve``: start Triton on a view of ``repository``, run until stopped."""
    if poll is not None and not poll > 0:
        raise CDCError(f"--poll must be a positive number of seconds, got {poll}")
    repository = Path(repository)
    check_repository(repository)  # a missing or empty repository: say so before anything else
    binary = find_tritonserver()
    backends = server_backends(binary.backend_dir)
    models = inspect_repository(repository, backends)
    with tempfile.TemporaryDirectory(prefix="cdc-serve-view-") as view:
        sync_view(models, Path(view))
        for model in models:
            if model.note():
                _say(model.note())
        server = TritonServer(
            Path(view),
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            startup_timeout=startup_timeout,
            binary=binary,
            model_control="explicit" if poll else "none",
        )
        _say(f"starting {binary.path} ({binary.source}) on {repository}")
        return _run(server, repository, backends, poll)


def _run(server: TritonServer, repository: Path, backends, poll: float | None) -> int | None:
    def on_sigterm(signum, frame):
        raise _Terminate()

    # Both handlers are installed explicitly: a shell that starts a job in the background
    # leaves SIGINT ignored, and Python then raises no KeyboardInterrupt on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.start()
        server.wait_ready()
        _say(f"Triton ready in {server.start_seconds:.1f} s")
        _say(f"  HTTP:    http://{server.http_url}")
        _say(f"  gRPC:    {server.grpc_url}")
        _say(f"  metrics: {server.metrics_url}")
        _say(f"  log:     {server.log_path}")
        _say(f"  models:  {', '.join(server.models)}")
        if poll:
            _say(f"watching {repository} every {poll:g} s for new versions")
        _say("Ctrl-C (or SIGTERM) stops the server.")
        _watch(server, repository, backends, poll)
        raise CDCError(
            f"tritonserver stopped by itself (status {server.process.returncode}); "
            f"its log ends with:\n{server.log_tail()}"
        )
    except (KeyboardInterrupt, _Terminate):
        _say("stopping Triton ...")
        code = server.stop()
        _say(f"stopped (status {code})")
        return code
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _watch(server: TritonServer, repository: Path, backends, poll: float | None) -> None:
    """Until the server exits: every ``poll`` s, bring new versions into the view and reload."""
    next_look = time.monotonic() + (poll or 0)
    while server.process.poll() is None:
        time.sleep(0.5 if not poll else min(0.5, poll))
        if not poll or time.monotonic() < next_look:
            continue
        next_look = time.monotonic() + poll
        for line in reload_changed(server, repository, backends):
            _say(line)


def reload_changed(server: TritonServer, repository: Path, backends) -> list[str]:
    """Sync the view with ``repository`` and (re)load every model that changed; one line each."""
    try:
        models = inspect_repository(repository, backends)
    except CDCError as exc:  # an export half-way, or a broken model: keep serving what runs
        return [f"not reloading: {exc}"]
    lines = []
    by_name = {m.name: m for m in models}
    for name in sync_view(models, server.repository):
        if name not in by_name:
            continue  # removed from the repository: Triton keeps serving it until restarted
        try:
            server.load_model(name)
        except CDCError as exc:
            lines.append(f"error: {exc}; the versions served before stay served")
            continue
        lines.append(f"reloaded {name}: serving version {by_name[name].versions[-1]}")
    return lines
