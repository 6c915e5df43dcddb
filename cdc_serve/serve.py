"""Find and run a real Triton Inference Server on loopback.

:func:`find_tritonserver` prefers a ``tritonserver`` on ``PATH`` (NVIDIA's containers put
one there, with every backend) and falls back to the binary that the ``nvidia-pytriton``
wheel ships (Linux x86-64 only, Python backend only). The wheel's server needs three
things to run a Python-backend model, which :func:`find_tritonserver` arranges:

1. its bundled libraries (``nvidia_pytriton.libs/``) on ``LD_LIBRARY_PATH``;
2. a backend folder ``python/`` holding ``libtriton_python.so``,
   ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for
   *this* Python version (the wheel keeps one per version under
   ``python_backend_stubs/<major.minor>/``); it is assembled once in
   ``~/.cache/cdc-serve/triton-backends/`` (or ``$CDC_SERVE_CACHE``);
3. this interpreter's ``bin/`` first on ``PATH``: the stub embeds Python and finds its
   ``sys.prefix`` (hence numpy and onnxruntime) from the ``python3`` it sees on ``PATH``.

:class:`TritonServer` starts the binary on free (or given) ports bound to 127.0.0.1,
waits for ``/v2/health/ready`` and stops it with SIGTERM (SIGKILL after a grace period,
then it removes the Python backend's ``/dev/shm`` regions that a killed stub leaves).
A model that fails to load is reported as one line per model (Triton's reason), not as
the server's log. With ``model_control="explicit"`` every model is loaded at start and
:meth:`TritonServer.load_model` (re)loads one through the repository API: how
``cdc-serve serve --poll`` picks up new versions (:mod:`cdc_serve.serve_command`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cdc_serve import CDCError
from cdc_serve.contract import CONFIG_FILE
from cdc_serve.triton import gpu_visible, list_models

LOG_TAIL_LINES = 40
MODEL_CONTROL = ("none", "explicit")
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version (\d+): (.*?)(?:\\n|\"?$)", re.M)


# ----------------------------------------------------------------------------- the binary


@dataclass(frozen=True)
class TritonBinary:
    """A runnable ``tritonserver``: the executable, environment additions, backend folder."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)
    backend_dir: Path | None = None  # None: the binary's own default (/opt/tritonserver/backends)
    cache_dir: Path | None = None
    source: str = "PATH"  # "PATH" or "nvidia-pytriton"

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with this binary's additions prepended to path lists."""
        env = dict(os.environ if base is None else base)
        for key, value in self.env.items():
            if key in ("PATH", "LD_LIBRARY_PATH") and env.get(key):
                env[key] = value + os.pathsep + env[key]
            else:
                env[key] = value
        return env


def find_tritonserver() -> TritonBinary:
    """A ``tritonserver`` on ``PATH`` first, else the one in the ``nvidia-pytriton`` package."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(path=Path(on_path))
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") and machine in ("x86_64", "amd64")):
        raise CDCError(
            f"no tritonserver on PATH, and the pip-installable one (nvidia-pytriton) exists only "
            f"for Linux x86-64 (this is {sys.platform} {machine}); run the repository in NVIDIA's "
            "Triton container instead (see docs/DEPLOY.md)"
        )
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise CDCError(
            "no tritonserver on PATH and nvidia-pytriton is not installed: "
            "pip install 'cdc-serve[server]' (or nvidia-pytriton), or use NVIDIA's Triton container"
        )
    package = Path(spec.origin).parent
    dist = package / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.is_file():
        raise CDCError(f"nvidia-pytriton is installed but {binary} is missing (a broken install?)")
    libs = package.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # an editable pytriton keeps them inside the package
        libs = dist / "external_libs"
    lib_path = [str(libs)]
    python_libdir = _python_libdir()
    if python_libdir:
        lib_path.append(python_libdir)
    return TritonBinary(
        path=binary,
        env={
            "LD_LIBRARY_PATH": os.pathsep.join(lib_path),
            "PATH": str(Path(sys.executable).parent),
        },
        backend_dir=_assemble_backend_dir(dist),
        cache_dir=dist / "caches",
        source="nvidia-pytriton",
    )


def _python_libdir() -> str | None:
    """The folder of this interpreter's ``libpython3.X.so`` (so the stub embeds the same build)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlibrary and ldlibrary.endswith(".so") and (Path(libdir) / ldlibrary).exists():
        return libdir
    return None


def _cache_root() -> Path:
    if os.environ.get("CDC_SERVE_CACHE"):
        return Path(os.environ["CDC_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdc-serve"


def _assemble_backend_dir(dist: Path) -> Path:
    """A backend folder whose ``python/`` holds the wheel's Python backend plus this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = dist / "python_backend_stubs"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise CDCError(
            f"nvidia-pytriton has no Python backend stub for Python {version} "
            f"(it has: {', '.join(have) or 'none'}); use one of those Python versions"
        )
    backend_src = dist / "backends" / "python"
    sources = {
        "libtriton_python.so": backend_src / "libtriton_python.so",
        "triton_python_backend_utils.py": backend_src / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for path in sources.values():
        if not path.is_file():
            raise CDCError(f"nvidia-pytriton is incomplete: {path} is missing")
    # One folder per (wheel files, Python version): a new wheel gets a fresh folder.
    key = hashlib.sha256(
        "|".join(
            f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources.values()
        ).encode()
    ).hexdigest()[:12]
    target = _cache_root() / "triton-backends" / f"py{version}-{key}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    except OSError as exc:
        raise CDCError(
            f"cannot write the Triton backend folder under {target.parent} ({exc}); "
            "set CDC_SERVE_CACHE to a writable folder"
        ) from None
    try:
        (staging / "python").mkdir()
        for name, path in sources.items():
            shutil.copy2(path, staging / "python" / name)
        os.chmod(staging / "python" / "triton_python_backend_stub", 0o755)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)
        except OSError:  # another process assembled it first
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- the server


def check_repository(repository: Path) -> list[str]:
    """The model names of a Triton repository; CDCError if it is missing or holds no model."""
    repository = Path(repository)
    if not repository.exists():
        raise CDCError(
            f"model repository {repository} does not exist "
            "(create one with `cdc-serve export model.pth --out ...`)"
        )
    if not repository.is_dir():
        raise CDCError(f"model repository {repository} is not a folder")
    models = list_models(repository)
    if not models:
        raise CDCError(
            f"model repository {repository} holds no model: expected <name>/{CONFIG_FILE} "
            "and <name>/<version>/ inside it (see model_repository/README.md)"
        )
    return models


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    if not host:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return host
    if address.is_unspecified:  # bound to every address: reach it over loopback
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def _url(host: str, port: int) -> str:
    host = _connect_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on ``host`` (loopback by default).

    Port 0 means "pick a free port". Use as a context manager (start, wait until ready,
    stop on exit) or call :meth:`start`, :meth:`wait_ready` and :meth:`stop`.
    """

    def __init__(
        self,
        repository: Path,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
        startup_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        binary: TritonBinary | None = None,
        model_control: str = "none",
    ) -> None:
        if model_control not in MODEL_CONTROL:
            raise CDCError(f"model_control must be one of {MODEL_CONTROL}, not {model_control!r}")
        self.model_control = model_control
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self._requested_ports = {
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
        }
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.binary = binary
        self.models: list[str] = []
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # start() to ready, measured by wait_ready()
        self._log_path = Path(log_path) if log_path else None
        self._own_log_dir: tempfile.TemporaryDirectory | None = None
        self._started_at = 0.0
        self._finalizer: weakref.finalize | None = None

    # -- addresses
    @property
    def http_url(self) -> str:
        """``HOST:PORT`` of the HTTP/REST endpoint (the form ``tritonclient.http`` takes)."""
        return _url(self.host, self.http_port)

    @property
    def grpc_url(self) -> str:
        """``HOST:PORT`` of the gRPC endpoint (the form ``tritonclient.grpc`` takes)."""
        return _url(self.host, self.grpc_port)

    @property
    def metrics_url(self) -> str:
        """``http://HOST:PORT/metrics``: the Prometheus metrics."""
        return f"http://{_url(self.host, self.metrics_port)}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    # -- life cycle
    def command(self) -> list[str]:
        """The ``tritonserver`` command line (ports must be chosen already)."""
        assert self.binary is not None
        args = [
            str(self.binary.path),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            *(["--load-model=*"] if self.model_control == "explicit" else []),
            "--disable-auto-complete-config",  # the config.pbtxt is the whole truth
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--allow-gpu-metrics={'true' if gpu_visible() else 'false'}",
        ]
        if self.binary.backend_dir is not None:
            args.append(f"--backend-directory={self.binary.backend_dir}")
        if self.binary.cache_dir is not None:
            args.append(f"--cache-directory={self.binary.cache_dir}")
        return args + list(self.extra_args)

    def start(self) -> TritonServer:
        """Launch the server (returns at once; :meth:`wait_ready` waits for it)."""
        if self.process is not None and self.process.poll() is None:
            raise CDCError("this TritonServer is already running")
        self.models = check_repository(self.repository)
        if self.binary is None:
            self.binary = find_tritonserver()
        self._choose_ports()
        self._launch()
        return self

    def _launch(self) -> None:
        if self._finalizer is not None:  # a relaunch: the previous attempt has exited
            self._finalizer()
        if self._log_path is None:
            self._own_log_dir = tempfile.TemporaryDirectory(prefix="cdc-serve-triton-")
            self._log_path = Path(self._own_log_dir.name) / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "wb") as log:
            self._started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.binary.environment(),
                start_new_session=True,  # Ctrl-C reaches us; we stop the server ourselves
            )
        # Never leave a server behind, even if the caller forgets stop().
        self._finalizer = weakref.finalize(self, _reap, self.process)

    def _choose_ports(self) -> None:
        ports = {}
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = self._requested_ports[name]
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise CDCError(
                    f"{name.replace('_', ' ')} must be 0 (any free port) .. 65535, not {port!r}"
                )
            if port == 0:
                port = free_port(self.host)
                while port in ports.values():
                    port = free_port(self.host)
            elif not _port_is_free(self.host, port):
                flag = "--" + name.replace("_", "-")
                raise CDCError(
                    f"port {port} on {self.host} is already in use (choose another {flag})"
                )
            if port in ports.values():
                raise CDCError(f"the HTTP, gRPC and metrics ports must differ (got {port} twice)")
            ports[name] = port
        self.http_port, self.grpc_port, self.metrics_port = (
            ports["http_port"], ports["grpc_port"], ports["metrics_port"]
        )  # fmt: skip

    def is_ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> TritonServer:
        """Poll ``/v2/health/ready``; CDCError (with the log tail) if the server dies or is late."""
        if self.process is None:
            raise CDCError("the Triton server was not started")
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        port_retries = 3
        while True:
            code = self.process.poll()
            if code is not None and port_retries and self._lost_port_race():
                # A port picked as free was taken before the server bound it: pick again.
                port_retries -= 1
                self._choose_ports()
                self._launch()
                continue
            if code is not None:
                raise CDCError(
                    f"tritonserver exited with status {code} before it was ready "
                    f"(repository {self.repository}): {self._why()}"
                )
            if self.is_ready():
                self.start_seconds = time.monotonic() - self._started_at
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise CDCError(
                    f"tritonserver was not ready after {self.startup_timeout:.0f} s "
                    f"(repository {self.repository}); its log ends with:\n{tail}"
                )
            time.sleep(0.1)

    def load_failures(self) -> list[str]:
        """One line per model version Triton failed to load, with its reason, from the log."""
        return [
            f"model {name!r} version {version}: {reason.strip()}"
            for name, version, reason in _LOAD_FAILURE.findall(self.log())
        ]

    def _why(self) -> str:
        failures = self.load_failures()
        if failures:
            return f"{'; '.join(failures)} (the whole log: {self.log_path})"
        return f"its log ends with:\n{self.log_tail()}"

    def load_model(self, name: str, timeout: float = 600.0) -> None:
        """(Re)load model ``name`` through the repository API (``model_control="explicit"``).

        Triton loads the new versions while the old ones keep serving, then unloads the old
        ones once their requests are done. CDCError with Triton's reason if it fails (the
        versions loaded before stay served)."""
        url = f"http://{self.http_url}/v2/repository/models/{name}/load"
        request = urllib.request.Request(url, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read().decode("utf-8", "replace")).get("error", "")
            except (ValueError, AttributeError):
                reason = str(exc)
        except (urllib.error.URLError, OSError) as exc:
            reason = str(exc)
        first_line = str(reason).replace("\\n", "\n").split("\n")[0]  # not the traceback
        raise CDCError(f"Triton could not load model {name!r}: {first_line.strip(' ;')[:500]}")

    def _lost_port_race(self) -> bool:
        auto = 0 in self._requested_ports.values()
        return auto and "already in use" in self.log()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        process = self.process
        if process is None:
            return None
        regions = _backend_regions(process.pid)  # while the processes that map them still live
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait(timeout=10)
        # The Python backend's stub processes are children of the server: make sure they go
        # too, with the shared memory they could not free when killed.
        _reap(process, regions)
        if self._finalizer is not None:
            self._finalizer.detach()
        return process.returncode

    def log(self) -> str:
        """The server's log so far (stdout and stderr)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.process is not None and self.process.poll() is None else "stopped"
        return f"TritonServer({str(self.repository)!r}, http={self.http_url}, {state})"


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group the server leads (itself and its stub processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


_BACKEND_REGION_PREFIX = "/dev/shm/triton_python_backend_shm_region_"


def _backend_regions(group: int) -> set[Path]:
    """The Python backend's shared-memory files mapped by processes of this process group.

    Triton's Python backend keeps one ``/dev/shm/triton_python_backend_shm_region_<uuid>``
    per model instance and removes it when the model unloads; a server that is killed, or
    that times out on shutdown, leaves it behind. Read from ``/proc/<pid>/maps`` (Linux).
    """
    found: set[Path] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if os.getpgid(int(maps.parent.name)) != group:
                continue
            text = maps.read_text(encoding="utf-8", errors="replace")
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
        for line in text.splitlines():
            at = line.find(_BACKEND_REGION_PREFIX)
            if at >= 0:
                found.add(Path(line[at:].removesuffix(" (deleted)")))
    return found


def _reap(process: subprocess.Popen, regions: Iterable[Path] = ()) -> None:
    """SIGKILL what is left of the server's process group, then remove the backend's
    shared-memory files (``regions`` and those still mapped) that nobody removed."""
    regions = set(regions) | _backend_regions(process.pid)
    _kill_group(process)
    for path in regions:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
