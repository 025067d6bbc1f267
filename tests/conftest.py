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

import tinymodel


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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, started as the indexer starts its own: a job's run leaves
    a Ray it did not start running, so every run in the session reuses this one."""
    import ray

    from xmodal.indexer.pipeline import start_ray

    start_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory):
    """(card, repository) of the tiny model (tinymodel.build_repository), built once; read only."""
    return tinymodel.build_repository(tmp_path_factory.mktemp("tiny-model"), max_batch_size=4)


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository):
    """The real tritonserver serving the tiny repository, one for the session; never stopped by a test."""
    _, repository = tiny_repository
    with tinymodel.serving(repository) as server:
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
