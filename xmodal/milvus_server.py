"""A Milvus server on this machine: ``xmodal milvus start|stop|status``.

PyPI ``milvus==2.3.5`` ships the real Milvus 2.3.5 standalone binaries (embedded etcd, local
storage); it is the newest Milvus server installable here. It listens on every interface: 2.3
has no setting for the address its gRPC servers bind (milvus-io/milvus#26538), only for the one
they advertise. So on a loopback host the server runs in a network namespace of its own (an
unprivileged user namespace with a network namespace, whose only interface is its loopback):
its ten ports are reachable by nobody, and one port on this machine's 127.0.0.1 is relayed to
its proxy port. Several servers can run side by side that way (the tests run one per worker).
Given a host that is not a loopback address (``--host 0.0.0.0`` for clients on other machines)
it runs without a namespace, its proxy on that port, every other port open too: put it behind
the network's own access control (docs/scale-out.md).

A supervisor process (``python -m xmodal.milvus_server``, started in its own session) holds the
relay's socket, makes the namespace, starts Milvus in it, relays, and stops Milvus when told
(SIGTERM). Its state is ``server.json`` in the server's directory (``<data>/milvus-server``, the
Milvus data under it): the supervisor's pid, the URI, and whether it is ready or why it failed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xmodal import settings
from xmodal.files import write_atomic

DEFAULT_PORT = 19530
STATE_FILE = "server.json"
LOG_FILE = "supervisor.log"
# Milvus 2.3 is slow to become ready, and slower on a loaded machine: a generous bound.
DEFAULT_START_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0
# Milvus's own proxy port inside the namespace (the package's default).
INNER_PORT = 19530

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class MilvusServerError(RuntimeError):
    """The server could not be started, or is not running."""


@dataclass
class ServerState:
    pid: int  # the supervisor's
    host: str
    port: int
    directory: str
    isolated: bool  # in a network namespace of its own (a loopback host)
    state: str  # "starting", "ready" or "failed"
    reason: str = ""  # why it failed
    started: float = 0.0

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def default_directory() -> Path:
    return settings.data_dir() / "milvus-server"


def read_state(directory: Path) -> ServerState | None:
    try:
        record = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        return ServerState(**record)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _write_state(directory: Path, state: ServerState) -> None:
    write_atomic(directory / STATE_FILE, (json.dumps(asdict(state), indent=1) + "\n").encode("utf-8"))


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (a child of this process not yet reaped) is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def running(directory: Path | None = None) -> ServerState | None:
    """The state of the server of `directory` if its supervisor is alive, else None."""
    state = read_state(Path(directory or default_directory()))
    return state if state is not None and process_alive(state.pid) else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(directory: Path | None = None, *, host: str = settings.HOST, port: int = DEFAULT_PORT,
          timeout: float = DEFAULT_START_TIMEOUT, say=None) -> ServerState:
    """Start the server of `directory` (default ``<data>/milvus-server``) and wait until it
    answers; its state (its URI: ``state.uri``). `port` 0: a free port the system picks. A
    server of that directory already running is returned as it is.

    MilvusServerError naming the reason when it cannot start (the port taken, no network
    namespace to be had for a loopback host, Milvus failing: its log's path)."""
    directory = Path(directory or default_directory()).resolve()
    existing = running(directory)
    if existing is not None:
        if existing.host != host or port not in (0, existing.port):
            raise MilvusServerError(f"the Milvus server of {directory} is running at {existing.uri}, not "
                                    f"{host}:{port}: stop it first (xmodal milvus stop)")
        return wait_ready(directory, timeout=timeout, say=say)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    log = (directory / LOG_FILE).open("ab")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "xmodal.milvus_server", "--directory", str(directory), "--host", host,
             "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    return wait_ready(directory, timeout=timeout, say=say, pid=process.pid)


def wait_ready(directory: Path, *, timeout: float = DEFAULT_START_TIMEOUT, say=None,
               pid: int | None = None) -> ServerState:
    """Wait for the server of `directory` to be ready; MilvusServerError when it fails or
    `timeout` passes (then it is stopped)."""
    directory = Path(directory)
    started = time.monotonic()
    last_said = 0.0
    while True:
        state = read_state(directory)
        if state is not None and state.state == "ready":
            return state
        if state is not None and state.state == "failed":
            raise MilvusServerError(f"the Milvus server did not start: {state.reason}")
        supervisor = state.pid if state is not None else pid
        if supervisor is not None and not process_alive(supervisor):
            raise MilvusServerError(f"the Milvus server's supervisor exited while starting; see "
                                    f"{directory / LOG_FILE}")
        waited = time.monotonic() - started
        if waited > timeout:
            stop(directory)
            raise MilvusServerError(f"the Milvus server was not ready after {timeout:.0f} s (stopped); see "
                                    f"{directory / 'logs'}")
        if say is not None and waited - last_said >= 10:
            last_said = waited
            say(f"waiting for the Milvus server to be ready ({waited:.0f} s)")
        time.sleep(0.2)


def stop(directory: Path | None = None, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the server of `directory`: True if one was running. The supervisor stops Milvus
    (SIGTERM, then SIGKILL after a grace period); a supervisor that does not exit in `timeout`
    is killed with its whole session."""
    directory = Path(directory or default_directory())
    state = read_state(directory)
    if state is None or not process_alive(state.pid):
        (directory / STATE_FILE).unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(state.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.pid, signal.SIGKILL)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return True


# ---- the supervisor --------------------------------------------------------------------------

def _enter_network_namespace() -> None:
    """Move this (single-threaded) process into a new user and network namespace and bring its
    loopback up. OSError when the kernel or a container's policy refuses."""
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare(CLONE_NEWUSER | CLONE_NEWNET): {os.strerror(error)}")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(control, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(control, _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _relay_connection(client_reader, client_writer) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", INNER_PORT)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def _relay(listener: socket.socket, stopping: asyncio.Event) -> None:
    server = await asyncio.start_server(_relay_connection, sock=listener)
    async with server:
        await stopping.wait()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise MilvusServerError(f"cannot listen on {host}:{port}: {exc.strerror} (another server there? "
                                "choose another --port)") from None
    listener.listen(128)
    return listener


def supervise(directory: Path, host: str, port: int) -> int:
    """The supervisor's body (see the module's docstring)."""
    state = ServerState(pid=os.getpid(), host=host, port=port, directory=str(directory),
                        isolated=is_loopback(host), state="starting", started=time.time())
    _write_state(directory, state)

    def fail(reason: str) -> int:
        state.state, state.reason = "failed", reason
        _write_state(directory, state)
        return 1

    listener = None
    try:
        if state.isolated:
            listener = _bind(host, port)
            state.port = listener.getsockname()[1]
            _write_state(directory, state)
            try:
                _enter_network_namespace()
            except OSError as exc:
                return fail(f"cannot keep Milvus 2.3's ports to this machine: a network namespace is not "
                            f"allowed here ({exc.strerror or exc}). Milvus 2.3 listens on every interface; "
                            f"to run it that way deliberately, behind your firewall, pass --host 0.0.0.0")
        else:
            probe = _bind(host, port)  # the port is free (or, for 0, one is): Milvus takes it itself
            state.port = probe.getsockname()[1]
            probe.close()
            _write_state(directory, state)
    except MilvusServerError as exc:
        return fail(str(exc))
    from milvus import MilvusServer  # the pinned `milvus` package: imported where it is needed

    milvus = MilvusServer(wait_for_started=False)
    milvus.set_base_dir(str(directory))
    if not state.isolated:
        milvus.listen_port = state.port
    def on_term(signum, frame) -> None:  # while Milvus starts: stop it, as after
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            milvus.start()
            milvus.wait_started(timeout=DEFAULT_START_TIMEOUT * 1000)
        except (RuntimeError, TimeoutError, OSError) as exc:
            return fail(f"{exc}; see {directory / 'logs'}")
        state.state = "ready"
        _write_state(directory, state)
        if listener is not None:
            event_loop = asyncio.new_event_loop()
            stop_event = asyncio.Event()
            event_loop.add_signal_handler(signal.SIGTERM, stop_event.set)
            event_loop.run_until_complete(_relay(listener, stop_event))
        else:
            signal.signal(signal.SIGTERM, lambda *_: milvus.server_proc and milvus.server_proc.terminate())
            while milvus.running and milvus.server_proc.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_milvus(milvus)
        if listener is not None:
            listener.close()
        kept = read_state(directory)
        if kept is not None and kept.pid == os.getpid():
            (directory / STATE_FILE).unlink(missing_ok=True)
    return 0


def _stop_milvus(milvus, grace: float = 30.0) -> None:
    """Let Milvus stop on SIGTERM (it flushes and closes etcd), killing it after `grace` seconds."""
    process = milvus.server_proc
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    milvus.server_proc = None
    for handle in milvus.proc_fds.values():
        handle.close()
    milvus.proc_fds.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmodal.milvus_server",
                                     description="the supervisor of `xmodal milvus start` (not for direct use)")
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--host", default=settings.HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    return supervise(args.directory.resolve(), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
