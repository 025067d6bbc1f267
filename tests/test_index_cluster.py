"""The indexer on a Ray cluster of several nodes on this machine (tests/raycluster.py: a raylet
and an object store per node, one CPU each), joined with `xmodal index --address` as on real
hosts: the embedding actors spread over the nodes, a node lost mid-run, a request no node can
place."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import tinymodel
from test_indexer import ids, letters_of

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("raycluster.py")


def kill_processes_under(directory: str) -> None:
    """SIGKILL every process whose command line or environment names `directory`, or that has a
    file under it open (a Ray's GCS, raylets and agents under that temporary directory: the
    agents retitle themselves, which overwrites both, but keep their logs there open). Not
    `ray stop`: it stops every Ray on the machine, the test session's own included."""
    mark = directory.encode()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            named = any(mark in (entry / part).read_bytes() for part in ("cmdline", "environ"))
            if named or any(os.readlink(fd).startswith(directory) for fd in (entry / "fd").iterdir()):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


class RayCluster:
    """tests/raycluster.py in its own process, under its own RAY_TMPDIR."""

    def __init__(self, *cpus: float):
        # short: Ray's socket paths under it must fit a Unix socket's 107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="xr", dir="/tmp")
        self.env = {**os.environ, "RAY_TMPDIR": self.temp_dir}
        self.process = subprocess.Popen([sys.executable, str(HELPER), *map(str, cpus)], env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.address = self.process.stdout.readline().strip()
        assert self.address, "the Ray cluster did not start"

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def stop(self) -> None:
        try:
            self.process.communicate("stop\n", timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        kill_processes_under(self.temp_dir)  # whatever the cluster's shutdown left
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def repository(tiny_repository):
    _, repository = tiny_repository
    return repository


def index_command(cluster: RayCluster, repository: Path, manifest: Path, db: Path, collection: str,
                  *options: str) -> list[str]:
    return [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all", "--local",
            "--model-repository", str(repository), "--milvus-uri", str(db), "--collection", collection,
            "--batch-size", "4", "--shard-size", "20", "--json", "--address", cluster.address, *options]


@pytest.fixture(scope="module")
def two_nodes():
    cluster = RayCluster(1, 1)
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("resources", [[], ["--worker-resources", '{"CPU": 0.5, "triton": 1}']],
                         ids=["default", "an-actor-per-triton"])
def test_two_nodes_of_one_cpu_each_embed_rows(two_nodes, repository, tmp_path, resources):
    """The issue's stall: two nodes of one CPU and --workers 2 (half a CPU an actor) waited for
    ever, a reading task asking for a whole CPU. Now the actors spread and both nodes embed; so
    they do when each asks for the one `triton` resource of a node (docs/scale-out.md's recipe)."""
    manifest = tinymodel.many_images(tmp_path, 200, bad_every=50)
    run = subprocess.run(index_command(two_nodes, repository, manifest, tmp_path / "x.db", "spread", "--workers", "2",
                                       *resources),
                         env=two_nodes.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["rows_written"], report["dead_letters"]) == (196, 4)
    per_node = report["items_per_node"]
    assert len(per_node) == 2 and all(n > 0 for n in per_node.values()) and sum(per_node.values()) == 196, per_node


@pytest.mark.parametrize("options, room", [
    (["--workers", "1", "--worker-resources", '{"GPU": 1}'], "room for 0 of them"),
    (["--workers", "3", "--worker-resources", '{"CPU": 1}'], "room for 2 of them"),
    (["--workers", "2", "--worker-resources", '{"CPU": 1}'], "room for them but then none for a reading task"),
], ids=["a resource no node has", "more actors than the nodes hold", "no room left to read"])
def test_a_request_the_cluster_cannot_place_is_said_at_once(two_nodes, repository, tmp_path, options, room):
    manifest = tinymodel.many_images(tmp_path, 8, bad_every=99)
    run = subprocess.run(index_command(two_nodes, repository, manifest, tmp_path / "x.db", "unplaced", *options),
                         env=two_nodes.env, capture_output=True, text=True, timeout=120)
    asked = json.loads(options[3])
    assert run.returncode == 1, run.stderr[-2000:]
    message = next(line for line in run.stderr.splitlines() if "the Ray cluster cannot place this run" in line)
    assert f"{options[1]} embedding actor(s) of {{" in message and room in message, message
    assert all(f"{name} {amount}" in message.split(" each")[0] for name, amount in asked.items()), message
    assert message.count(": CPU 1, GPU 0") == 2, message  # what each node has


def test_a_run_waiting_on_resources_other_work_holds_says_so_and_goes_on(two_nodes, repository, tmp_path):
    """Every node's CPU half held by another job: the run's actor (three quarters of a CPU) waits.
    It says what it asked for and what is free, and finishes once the CPUs are let go."""
    from xmodal.indexer.pipeline import WAIT_NOTE_SECONDS

    manifest = tinymodel.many_images(tmp_path, 40, bad_every=99)
    assert two_nodes.ask("hold 0.5") == "held"
    try:
        run = subprocess.Popen(index_command(two_nodes, repository, manifest, tmp_path / "x.db", "waited",
                                             "--worker-resources", '{"CPU": 0.75}'),
                               env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(WAIT_NOTE_SECONDS + 10)
        still_waiting = run.poll() is None
    finally:
        assert two_nodes.ask("release") == "released"
    out, err = run.communicate(timeout=180)
    assert still_waiting and run.returncode == 0, err[-2000:]
    note = next(line for line in err.splitlines() if line.startswith("no batch embedded after "))
    assert "1 embedding actor(s) of {CPU 0.75} each asked for; the cluster has free now CPU 1 of 2" in note, note
    assert json.loads(out)["rows_written"] == 40


def test_a_node_lost_mid_run_loses_no_row_and_writes_none_twice(repository, tmp_path):
    """A node holding an embedding actor is removed once a shard is written: Ray restarts the
    actor on a node left and recomputes the blocks the lost node held; the run ends with the
    rows and dead letters of an uninterrupted run on the same cluster."""
    cluster = RayCluster(1, 1, 1)
    try:
        manifest = tinymodel.many_images(tmp_path, 2000, bad_every=25)
        db = tmp_path / "x.db"
        command = index_command(cluster, repository, manifest, db, "survived", "--workers", "2", "--embed-threads", "1",
                                "--write-batch", "20")
        run = subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        books = tinymodel.RunBooks(db, "survived")
        deadline = time.monotonic() + 180
        while not books.finished_shards() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        removed = cluster.ask("remove-node-of LocalEmbedder")
        at_removal = books.finished_shards()
        out, err = run.communicate(timeout=300)
        assert removed.startswith("removed "), "no embedding actor off the head to remove"
        assert 1 <= at_removal < 100, f"removed after {at_removal} of 100 shards: not mid-run"
        assert run.returncode == 0, err
        report = json.loads(out)
        reference = subprocess.run(index_command(cluster, repository, manifest, db, "reference", "--workers", "2"),
                                   env=cluster.env, capture_output=True, text=True, timeout=300)
        assert reference.returncode == 0, reference.stderr
    finally:
        cluster.stop()
    assert tinymodel.run_progress(db, "survived")["complete"]
    expected = json.loads(reference.stdout)
    assert (expected["rows_written"], expected["dead_letters"]) == (2000 - 80, 80)
    assert (report["rows_written"], report["dead_letters"]) == (2000 - 80, 80)
    survived = ids(db, "survived")
    assert len(survived) == len(set(survived)) == 2000 - 80 and set(survived) == set(ids(db, "reference"))
    assert letters_of(db, "survived") == letters_of(db, "reference")
    assert len(letters_of(db, "survived")) == 80  # none twice
    lost = removed.split()[1][:8]
    assert any(node.endswith(lost) for node in report["items_per_node"]), report["items_per_node"]  # it embedded some first


def test_xmodal_index_joins_a_cluster_started_with_ray_start(repository, tmp_path):
    """Two nodes started as on real hosts (`ray start --head`, `ray start --address`), joined
    with `xmodal index --address`: without the token Ray 2.60's `ray start` asks for, one line
    saying what to set; with it, both nodes embed."""
    temp_dir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    env["RAY_TMPDIR"] = temp_dir
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as probe:  # Ray takes no port 0 for its head
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    try:
        head = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "1",
                               "--include-dashboard", "false", "--disable-usage-stats"],
                              env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stderr
        worker = subprocess.run([ray_cli, "start", "--address", address, "--num-cpus", "1", "--disable-usage-stats"],
                                env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr
        manifest = tinymodel.many_images(tmp_path, 120, bad_every=40)
        command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all",
                   "--local", "--model-repository", str(repository), "--milvus-uri", str(tmp_path / "x.db"),
                   "--batch-size", "4", "--shard-size", "20", "--json", "--workers", "2", "--address", address]
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        joined = subprocess.run(command, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                                timeout=300)
    finally:
        kill_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert refused.returncode == 1 and f"the Ray cluster at {address} asks for its authentication token: run with " \
        "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr[-3000:]
    assert joined.returncode == 0, joined.stderr
    report = json.loads(joined.stdout)
    assert (report["rows_written"], report["dead_letters"]) == (117, 3)
    assert len(report["items_per_node"]) == 2 and all(n > 0 for n in report["items_per_node"].values())
