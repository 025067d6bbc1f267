"""`xmodal milvus start|stop|status`: the real Milvus 2.3.5 server, kept to this machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from xmodal import milvus_server, store


pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def xmodal(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmodal.cli", "--data-dir", str(data), "milvus", *args],
                          capture_output=True, text=True, timeout=240)


def listening(table: str) -> set[tuple[str, int]]:
    """(address, port) of the LISTEN sockets in a /proc/<pid>/net/tcp{,6} table."""
    found = set()
    for name in (table, table + "6"):
        with open(name, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":
                    address, port = local.split(":")
                    found.add((address, int(port, 16)))
    return found


def milvus_pid(supervisor: int) -> int:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_start_status_stop_keeps_milvus_to_this_machine(tmp_path):
    data = tmp_path / "data"
    assert xmodal(data, "status").returncode == 3
    started = xmodal(data, "start", "--port", "0")  # a free port the system picks
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        state = milvus_server.running(data / "milvus-server")
        port = state.port
        assert port > 0 and f"Milvus server ready at http://127.0.0.1:{port}, for this machine only" in started.stdout
        status = xmodal(data, "status")
        assert status.returncode == 0 and f"http://127.0.0.1:{port}: ready" in status.stdout, status.stdout
        milvus = milvus_pid(state.pid)
        # Milvus listens on every interface of a network namespace whose only interface is its loopback
        assert os.readlink(f"/proc/{milvus}/ns/net") != os.readlink("/proc/self/ns/net")
        interfaces = [line.split(":")[0].strip() for line in Path(f"/proc/{milvus}/net/dev").read_text().splitlines()[2:]]
        assert interfaces == ["lo"]
        assert ("0" * 32, 19530) in listening(f"/proc/{milvus}/net/tcp")  # its proxy, on every interface inside
        # on this machine's interfaces: only the relay, on 127.0.0.1
        assert ("0100007F", port) in listening("/proc/self/net/tcp")
        assert not any(p == port for address, p in listening("/proc/self/net/tcp") if address != "0100007F")

        client = store.connect(state.uri)
        try:
            assert client.get_server_version().startswith("v2.3.5")
            schema = client.create_schema(auto_id=False)
            schema.add_field("id", store.DataType.INT64, is_primary=True)
            schema.add_field("v", store.DataType.FLOAT_VECTOR, dim=2)
            client.create_collection("kept", schema=schema)
        finally:
            client.close()

        again = xmodal(data, "start", "--port", str(port + 1))
        assert again.returncode == 1 and "is running at" in again.stderr and "xmodal milvus stop" in again.stderr
    finally:
        stopped = xmodal(data, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    status = xmodal(data, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert not milvus_server.process_alive(state.pid) and not milvus_server.process_alive(milvus)  # zombies are not

    # its data stays: started again, the collection is there
    restarted = xmodal(data, "start", "--port", "0")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    try:
        client = store.connect(milvus_server.running(data / "milvus-server").uri)
        assert client.list_collections() == ["kept"]
        client.close()
    finally:
        xmodal(data, "stop")


def test_an_unreachable_server_is_named():
    with socket.socket() as held:  # bound, not listening: a connection is refused, and no one else takes the port
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(ConnectionError, match=f"cannot reach Milvus at http://127.0.0.1:{port}"):
            store.connect(f"http://127.0.0.1:{port}", timeout=3)


def test_a_taken_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = xmodal(tmp_path, "start", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "choose another --port" in result.stderr
