"""Session fixtures: each real part of the tiny stack is built or started once per test run.

What they hold is shared by every module that asks for it, so a test must leave it as it
found it: it reads the tiny repository, queries the tiny Triton server, reads the corpora,
and writes collections only into its own database (tmp_path, or a module's own directory).
A test that changes a repository, or stops, kills or restarts a server, builds or starts
its own (tinymodel.build_repository, tinymodel.serving).
"""
import os
from pathlib import Path

import pytest

# pytest-xdist runs the suite in several worker processes (addopts in pyproject.toml). torch
# would give each of them a thread per core, so the workers' threads would outnumber the cores
# and every step would wait on the others: each worker gets its share of the cores instead. Set
# before torch is imported, and inherited by the training commands the tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import tinymodel  # noqa: E402

pytest_plugins = ["skip_policy", "pytester"]


@pytest.fixture(scope="session")
def npm_cache():
    """One download of the npm packages per machine, not per test run (they are pinned, so never stale)."""
    cache = Path(os.environ.get("XMODAL_NPM_CACHE", Path.home() / ".cache" / "xmodal" / "npm"))
    cache.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("XMODAL_NPM_CACHE")
    os.environ["XMODAL_NPM_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("XMODAL_NPM_CACHE", None)
    else:
        os.environ["XMODAL_NPM_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first. pytest-xdist hands whole modules to its workers in this
    order (pyproject.toml's addopts), so a module fixture is built once, and the quick modules
    come last, where they fill whichever worker finishes first."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


# The Ray every test of the run uses, started once by pytest-xdist's controller before its
# workers start. Ray 2.60 is not safe to start twice at once on one machine (two workers'
# local clusters starting together: one GCS never came up, and its start waited out Ray's
# GCS timeout; ray#53906, ray#60991), and one cluster costs one start. Four logical CPUs: two workers' jobs at once, each
# with an actor holding a CPU, still leave CPUs for their read tasks.
SHARED_RAY_ADDRESS = "XMODAL_TEST_RAY_ADDRESS"
SHARED_RAY_CPUS = 4


def pytest_configure(config):
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return  # a worker, or a run in one process: the ray_local fixture starts Ray itself
    import ray

    from xmodal.indexer.pipeline import start_ray

    start_ray(num_cpus=SHARED_RAY_CPUS)
    os.environ[SHARED_RAY_ADDRESS] = ray.get_runtime_context().gcs_address


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.pop(SHARED_RAY_ADDRESS, None):
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local():
    """The run's Ray: the controller's shared one under pytest-xdist, else a local Ray started as
    the indexer starts its own. A job's run leaves a Ray it did not start running, so every run
    in the session reuses this one."""
    import ray

    from xmodal.indexer.pipeline import start_ray

    start_ray(os.environ.get(SHARED_RAY_ADDRESS))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory):
    """(card, repository) of the tiny model (tinymodel.build_repository), built once; read only."""
    return tinymodel.build_repository(tmp_path_factory.mktemp("tiny-model"), max_batch_size=4)


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository):
    """The real tritonserver serving the tiny repository, one for the session; never stopped by a
    test. Killed at the end (a clean shutdown is tested in test_serving.py, and costs seconds here)."""
    _, repository = tiny_repository
    with tinymodel.serving(repository, stop_timeout=0) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(manifest, images) of tinymodel.write_corpus, written once; read only."""
    return tinymodel.write_corpus(tmp_path_factory.mktemp("tiny-corpus"))


@pytest.fixture(scope="session")
def emoji_manifest(tmp_path_factory, npm_cache):
    """The first 12 emoji concepts in three styles (36 images), fetched and rendered once; read only."""
    from xmodal.training.emoji import fetch_emoji

    return fetch_emoji(tmp_path_factory.mktemp("emoji"), limit=12, progress=False)



@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus 2.3.5 server (PyPI `milvus`, as `xmodal milvus start` runs it: in a network
    namespace, its proxy relayed to 127.0.0.1) for the session, one per pytest-xdist worker; its
    URI. Tests share it: each drops the collections it made (``empty_server``)."""
    from xmodal import milvus_server as server

    directory = tmp_path_factory.mktemp("milvus-server")
    state = server.start(directory, port=0)  # the port the system picks: no race with the other workers
    yield state.uri
    server.stop(directory)


def empty_server(uri: str) -> None:
    """Drop every collection of the server at `uri`, the model records' included."""
    from xmodal import store

    client = store.connect(uri)
    try:
        for name in client.list_collections():
            client.drop_collection(name)
    finally:
        client.close()


# The two stores the store, indexer and client tests run against (``milvus_backend``).
MILVUS_BACKENDS = ("milvus-lite", "milvus-server")


@pytest.fixture(params=MILVUS_BACKENDS)
def milvus_backend(request, tmp_path, monkeypatch):
    """A Milvus URI of each backend in turn: a milvus-lite database in tmp_path, or the session's
    Milvus server, emptied before and after the test. The test's data directory is in its tmp_path."""
    from xmodal import store

    monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "data"))
    if request.param == "milvus-lite":
        path = tmp_path / "milvus" / "test.db"
        yield str(path)
        store.release_local(path)
        return
    uri = request.getfixturevalue("milvus_server")
    empty_server(uri)
    yield uri
    empty_server(uri)
