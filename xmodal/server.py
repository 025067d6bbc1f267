"""Launching the local ``tritonserver`` that the ``nvidia-pytriton`` wheel bundles.

The wheel ships a real Triton 2.51 binary with the Python backend but without the native
``onnxruntime`` backend. :class:`TritonServer` assembles what the binary needs to run from
the virtual environment (see docs/architecture.md and DESIGN.md "Serving"):

- ``LD_LIBRARY_PATH``: the wheel's ``nvidia_pytriton.libs`` and the running Python's
  ``LIBDIR`` (the Python-backend stub links ``libpython3.X``);
- ``PATH``: the directory of ``sys.executable`` first, so the stub's embedded interpreter
  finds this virtual environment (and its onnxruntime, tokenizers, Pillow);
- a private backend directory (a temporary directory, removed on stop)::

      backends/python/libtriton_python.so             (copied from the wheel)
      backends/python/triton_python_backend_utils.py  (copied from the wheel)
      backends/python/triton_python_backend_stub      (python_backend_stubs/<X.Y>/, this Python)
      backends/onnxruntime/model.py                   (xmodal/backends/onnxruntime/model.py)

- a unique shared-memory prefix for the Python backend, so that after stopping it removes
  exactly this server's ``/dev/shm`` regions and no one else's.

The server binds to 127.0.0.1 by default and logs (its own log and its Python models'
stdout/stderr) to ``tritonserver.log`` in the temporary directory.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from xmodal import settings

SHM_DIR = Path("/dev/shm")
# The Python backend names its regions "<prefix><uuid>"; its default prefix is this one.
SHM_PREFIX = "triton_python_backend_shm_region_"
LOG_FILENAME = "tritonserver.log"
# Triton's own shutdown budget (--exit-timeout-secs, default 30). On SIGTERM it first waits
# for open HTTP connections to close -- an idle keep-alive connection of a client that was
# not closed counts -- then unloads the models, all within this budget; past it, it exits
# with code 1 at once. 5 s keeps stop() well inside its default 10 s. Override it with
# extra_args=["--exit-timeout-secs=N"].
EXIT_TIMEOUT_S = 5
ONNXRUNTIME_BACKEND = Path(__file__).resolve().parent / "backends" / "onnxruntime" / "model.py"


class ServerError(RuntimeError):
    """The local Triton server cannot be started, or died."""


def _triton_dist() -> Path:
    """The wheel's ``pytriton/tritonserver`` folder, found without importing pytriton."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the nvidia-pytriton package is not installed; it bundles the tritonserver binary")
    path = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (path / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {path}")
    return path


def _libs_dir(dist: Path) -> Path:
    return dist.parent.parent / "nvidia_pytriton.libs"


def _python_stub(dist: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version} ({stub})")
    return stub


def check_model_repository(model_repository: Path) -> Path:
    """A directory with at least one ``<model>/config.pbtxt``; a clear error otherwise."""
    path = Path(model_repository).expanduser()
    if not path.exists():
        raise ServerError(f"model repository {path} does not exist (write one with `xmodal export`)")
    if not path.is_dir():
        raise ServerError(f"model repository {path} is not a directory")
    if not any(child.is_dir() and (child / "config.pbtxt").is_file() for child in path.iterdir()):
        raise ServerError(
            f"{path} is not a Triton model repository: no <model>/config.pbtxt in it")
    return path.resolve()


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on (host, port); the same test Triton's own bind makes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Triton binds with SO_REUSEADDR too: a port in TIME_WAIT is free for it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise ServerError(f"cannot bind {host}:{port}: {exc}") from exc
    return False


_handed_out: set[int] = set()


def free_port(host: str = settings.HOST) -> int:
    """A TCP port nothing listens on now, never the same one twice in this process.

    The port is free when returned, not reserved: start the server soon after.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ServerError(f"no free port found on {host}")


def _tail(path: Path | None, lines: int = 40) -> str:
    """The end of the log, without the option tables Triton prints, its errors first."""
    try:
        text = path.read_text(errors="replace") if path else ""
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines()
            if line.strip() and not line.startswith(("|", "+"))]
    # Triton's error lines start with "E<date>"; the CUDA one is expected on a CPU machine.
    errors = list(dict.fromkeys(
        line[:2000] for line in kept
        if line[:1] == "E" and line[1:2].isdigit() and "CudaDriverHelper" not in line))
    tail = kept[-lines:]
    if errors and not set(errors) <= set(tail):
        return "errors:\n" + "\n".join(errors[:10]) + "\n...\n" + "\n".join(kept[-10:])
    return "\n".join(tail)


class TritonServer:
    """One local ``tritonserver`` process serving ``model_repository``.

    ``with TritonServer(repo, http_port=...) as server:`` starts it, waits until it is ready
    and stops it on exit (process, stubs, temporary directory and shared memory).
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        host: str = settings.HOST,
        http_port: int = settings.HTTP_PORT,
        grpc_port: int = settings.GRPC_PORT,
        metrics_port: int = settings.METRICS_PORT,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository)
        self.host = host
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        self.log_verbose = int(log_verbose)
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_handle = None
        self._shm_prefix = f"{SHM_PREFIX}xmodal_{os.getpid()}_{secrets.token_hex(4)}_"
        self.log_path: Path | None = None

    # -- public --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``host:http_port``, what ``tritonclient.http.InferenceServerClient`` takes."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def shm_prefix(self) -> str:
        """This server's Python-backend regions in /dev/shm all start with this."""
        return self._shm_prefix

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self._process is not None:
            raise ServerError("this server was already started")
        repository = check_model_repository(self.model_repository)
        ports = {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ: {ports}")
        for name, port in ports.items():
            if port_in_use(self.host, port):
                raise ServerError(
                    f"port {port} ({name}) on {self.host} is already in use; "
                    f"stop whatever listens there or choose another port")
        if not ONNXRUNTIME_BACKEND.is_file():
            raise ServerError(f"xmodal's onnxruntime backend is missing: {ONNXRUNTIME_BACKEND}")
        dist = _triton_dist()
        stub = _python_stub(dist)

        self._workdir = Path(tempfile.mkdtemp(prefix="xmodal-triton-"))
        try:
            backends = self._assemble_backends(dist, stub)
            self.log_path = self._workdir / LOG_FILENAME
            self._log_handle = open(self.log_path, "ab")
            command = [
                str(dist / "bin" / "tritonserver"),
                f"--model-repository={repository}",
                f"--backend-directory={backends}",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
                f"--http-address={self.host}",
                f"--grpc-address={self.host}",
                f"--metrics-address={self.host}",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false",
                "--pinned-memory-pool-byte-size=0",
                "--exit-on-error=true",
                "--strict-readiness=true",
                f"--log-verbose={self.log_verbose}",
                *([] if any(a.startswith("--exit-timeout-secs") for a in self.extra_args)
                  else [f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]),
                *self.extra_args,
            ]
            self._process = subprocess.Popen(
                command,
                env=self._environment(dist),
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C in a terminal reaches only us (we stop it
                # in order), and the group lets stop() find the Python-backend stubs.
                start_new_session=True,
            )
        except BaseException:
            self._cleanup_files()
            raise

    def wait_ready(self, timeout: float = 60) -> None:
        """Poll ``/v2/health/ready``; raise if the process dies first or time runs out."""
        if self._process is None:
            raise ServerError("the server was not started")
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(model repository {self.model_repository}); its log:\n{_tail(self.log_path)}")
            try:
                with opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"tritonserver was not ready after {timeout:.0f} s "
                    f"(model repository {self.model_repository}); its log:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; then stubs, temp dir and shm are gone.

        Returns the server's exit code (None if it was never started): 0 after a clean
        shutdown, 1 when Triton's exit timeout ran out (typically a client that kept an idle
        HTTP connection open: close clients before stopping), -9 when it had to be killed.
        Safe to call twice.
        """
        process, self._process = self._process, None
        code = None
        if process is not None:
            group = process.pid  # start_new_session: the server leads its own group
            try:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self._kill_group(group, signal.SIGKILL)
                        process.wait()
                code = process.returncode
                self._reap_group(group)
            except BaseException:  # e.g. a second Ctrl-C: still leave nothing behind
                self._kill_group(group, signal.SIGKILL)
                self._cleanup_files()
                raise
        self._cleanup_files()
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave a server behind
        if getattr(self, "_process", None) is not None:
            try:
                self.stop(timeout=2)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    # -- internals -----------------------------------------------------------------------

    def _assemble_backends(self, dist: Path, stub: Path) -> Path:
        backends = self._workdir / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True)
        wheel_python = dist / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(wheel_python / name, python_dir / name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        (python_dir / "triton_python_backend_stub").chmod(0o755)
        ort_dir = backends / "onnxruntime"
        ort_dir.mkdir()
        shutil.copy2(ONNXRUNTIME_BACKEND, ort_dir / "model.py")
        return backends

    def _environment(self, dist: Path) -> dict[str, str]:
        env = dict(os.environ)
        libdirs = [str(_libs_dir(dist))]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libdirs.append(libdir)
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
        # Not resolved: a venv's bin/python is a symlink, and the venv is what must be found.
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        env["PATH"] = os.pathsep.join([bindir] + ([env["PATH"]] if env.get("PATH") else []))
        return env

    @staticmethod
    def _kill_group(group: int, sig: int) -> bool:
        try:
            os.killpg(group, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def _reap_group(self, group: int, grace: float = 3.0) -> None:
        """Stubs outlive a killed server for a moment; end whatever is left of its group."""
        deadline = time.monotonic() + grace
        while self._kill_group(group, 0):
            if time.monotonic() > deadline:
                self._kill_group(group, signal.SIGKILL)
                time.sleep(0.1)
                break
            time.sleep(0.05)

    def _cleanup_files(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        for region in SHM_DIR.glob(self._shm_prefix + "*"):
            try:
                region.unlink()
            except FileNotFoundError:
                pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def serve(
    model_repository: Path | str | None = None,
    *,
    host: str = settings.HOST,
    http_port: int = settings.HTTP_PORT,
    grpc_port: int = settings.GRPC_PORT,
    metrics_port: int = settings.METRICS_PORT,
    log_verbose: int = 0,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 120,
) -> int:
    """``xmodal serve``: start, wait until ready, print the URLs, block until SIGINT/SIGTERM, stop.

    Returns the process exit code: 0 after a clean stop on a signal, 1 if the server could
    not start or died on its own. Errors are printed, not raised, as a command should.
    """
    repository = Path(model_repository) if model_repository else settings.default_model_repository()
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, log_verbose=log_verbose, extra_args=extra_args)
    stop_requested = threading.Event()
    received: list[int] = []
    ready = False

    def on_signal(signum, _frame):
        received.append(signum)
        stop_requested.set()
        if not ready:  # interrupt start-up (wait_ready sleeps and polls)
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
            print(f"starting tritonserver on {repository} (log: {server.log_path})", flush=True)
            server.wait_ready(ready_timeout)
        except ServerError as exc:
            print(f"xmodal serve: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("interrupted before the server was ready, stopping tritonserver ...", flush=True)
            return 0
        ready = True
        print(f"Triton is ready:\n  HTTP     http://{server.url}\n  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n"
              f"  health   http://{server.url}/v2/health/live, http://{server.url}/v2/health/ready\n"
              f"Press Ctrl-C to stop.", flush=True)
        while not stop_requested.wait(0.5):
            if not server.is_running():
                print(f"xmodal serve: tritonserver exited on its own; the end of its log:\n"
                      f"{server.log_tail()}", file=sys.stderr, flush=True)
                return 1
        print(f"received {signal.Signals(received[0]).name}, stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
