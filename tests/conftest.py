import os
from pathlib import Path

import pytest


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


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for a module, started as the indexer starts its own (a job's run leaves a Ray
    it did not start running)."""
    import ray

    from xmodal.indexer.pipeline import start_ray

    start_ray()
    yield
    ray.shutdown()
