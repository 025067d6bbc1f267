"""Several Triton servers of one model: the embedder, the indexer and the client SDK go to the
one that answers, and a server killed mid-run loses nothing (two real tritonserver processes)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tinymodel
from test_indexer import ids, letters_of
from xmodal import contract, triton
from xmodal.client import Client
from xmodal.indexer import IndexJob

pytestmark = pytest.mark.slow


def closed_port() -> str:
    """host:port where nothing listens (a connection is refused, as by a server killed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_an_embedder_asks_the_next_server_when_one_does_not_answer(tiny_triton):
    down = closed_port()
    alone = triton.Embedder(tiny_triton.url, contract.EMBED_TEXT, contract.TEXT_INPUT)
    both = triton.Embedder(f"http://{down}, {tiny_triton.url}", contract.EMBED_TEXT, contract.TEXT_INPUT)
    try:
        assert both.servers == [tiny_triton.url, down]  # set aside when it did not answer
        vectors, errors = both.embed([b"a red apple", b"a cat"])
        expected, _ = alone.embed([b"a red apple", b"a cat"])
        assert errors == [None, None] and np.array_equal(vectors, expected)
    finally:
        alone.close()
        both.close()
    other = closed_port()
    with pytest.raises(ConnectionError) as none:
        triton.Embedder([down, other], contract.EMBED_TEXT, contract.TEXT_INPUT)
    message = str(none.value)
    assert message.startswith("no Triton server answered the config of embed_text: ")
    assert f"Triton at {down} did not answer" in message and f"Triton at {other} did not answer" in message


@pytest.fixture(scope="module")
def indexed(tiny_triton, tmp_path_factory):
    """(milvus-lite database, the hits of "a red circle" through the session's server alone)."""
    directory = tmp_path_factory.mktemp("failover")
    manifest, _ = tinymodel.write_corpus(directory)
    db = str(directory / "x.db")
    IndexJob(manifest=manifest, triton_url=tiny_triton.url, milvus_uri=db, batch_size=4, progress=False).run()
    with Client(tiny_triton.url, db) as alone:
        return db, alone.search_text("a red circle", k=3)


def test_the_client_takes_several_servers_and_goes_on_when_one_is_down(tiny_repository, tiny_triton, indexed):
    _, repository = tiny_repository
    db, expected = indexed
    with tinymodel.serving(repository, stop_timeout=0) as second:
        with Client([second.url, tiny_triton.url], db) as client:
            assert client.search_text("a red circle", k=3) == expected
            second.stop(0)  # killed
            assert client.search_text("a red circle", k=3) == expected
            assert client._text.servers == [tiny_triton.url, second.url]
    down, other = closed_port(), closed_port()
    with pytest.raises(ConnectionError) as none:
        Client([down, other], db)
    assert f"cannot reach Triton at {down}: " in str(none.value) and f"cannot reach Triton at {other}: " in str(none.value)


def test_the_async_client_takes_several_servers_and_goes_on_when_one_is_down(tiny_repository, tiny_triton, indexed):
    import asyncio

    from xmodal.client import AsyncClient

    _, repository = tiny_repository
    db, expected = indexed
    down = closed_port()

    async def searches(second) -> tuple:
        async with AsyncClient([down, second.url, tiny_triton.url], db) as client:
            before = await client.search_text("a red circle", k=3)
            second.stop(0)  # killed
            after = await client.search_text("a red circle", k=3)
            return before, after, list(client._servers)

    with tinymodel.serving(repository, stop_timeout=0) as second:
        before, after, servers = asyncio.run(searches(second))
    assert before == after == expected
    assert servers == [tiny_triton.url, second.url, down]  # those that did not answer set aside, in turn

    async def nowhere():
        async with AsyncClient([down, closed_port()], db):
            pass

    with pytest.raises(ConnectionError, match=f"cannot reach Triton at {down}: .*; cannot reach Triton at "):
        asyncio.run(nowhere())


def test_a_triton_server_killed_mid_run_loses_no_row(tiny_repository, tiny_triton, ray_local, tmp_path):
    """Two servers, two embedding actors spread over them; one server is killed once a shard is
    written: its batches go to the other, and the run ends with an uninterrupted run's rows."""
    import ray

    _, repository = tiny_repository
    manifest = tinymodel.many_images(tmp_path, 1200, bad_every=25)
    db = tmp_path / "x.db"
    with tinymodel.serving(repository, stop_timeout=0) as second:
        command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all",
                   "--triton-url", f"{second.url},{tiny_triton.url}", "--milvus-uri", str(db),
                   "--collection", "survived", "--workers", "2", "--batch-size", "4", "--shard-size", "20",
                   "--write-batch", "20", "--json", "--address", ray.get_runtime_context().gcs_address]
        books = tinymodel.RunBooks(db, "survived")
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not books.finished_shards() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second.stop(0)
        at_kill = books.finished_shards()
        out, err = run.communicate(timeout=300)
    assert 1 <= at_kill < 60, f"killed after {at_kill} of 60 shards: not mid-run"
    assert run.returncode == 0, err[-3000:]
    report = json.loads(out)
    reference = IndexJob(manifest=manifest, triton_url=tiny_triton.url, milvus_uri=str(db), collection="reference",
                         split=None, batch_size=4, shard_size=20, progress=False).run()
    assert (reference.rows_written, reference.dead_letters) == (1200 - 48, 48)
    assert (report["rows_written"], report["dead_letters"]) == (1200 - 48, 48)
    survived = ids(db, "survived")
    assert len(survived) == len(set(survived)) == 1200 - 48 and set(survived) == set(ids(db, "reference"))
    assert letters_of(db, "survived") == letters_of(db, "reference")


def test_servers_of_different_models_are_refused(tiny_repository, tiny_triton, tmp_path):
    """Vectors of two models cannot share a collection: the run stops before any work."""
    (tmp_path / "other").mkdir()
    other_card, other_repository = tinymodel.build_repository(tmp_path / "other", max_batch_size=4, seed=1)
    assert other_card.fingerprint != tiny_repository[0].fingerprint
    with tinymodel.serving(other_repository, stop_timeout=0) as other:
        job = IndexJob(manifest=tinymodel.many_images(tmp_path, 4, bad_every=99), triton_url=[tiny_triton.url, other.url],
                       milvus_uri=str(tmp_path / "x.db"), split=None, progress=False)
        with pytest.raises(ValueError, match="the Triton servers serve different models"):
            job.run()


def test_an_actor_asks_the_servers_on_its_own_node_first_and_the_actors_spread():
    from xmodal.indexer.embed import order_servers

    servers = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.3:8000"]
    assert order_servers(servers, "10.0.0.2", 0) == ["10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.1:8000", "10.0.0.3:8000"]
    assert order_servers(servers, "10.0.0.2", 1) == ["10.0.0.2:8001", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.1:8000"]
    assert order_servers(servers, "10.0.0.9", 3)[0] == "10.0.0.3:8000"  # no server of its own: spread
    assert order_servers(["127.0.0.1:8000", "10.0.0.1:8000"], "10.0.0.2", 1)[0] == "127.0.0.1:8000"  # loopback is its own
    assert {order_servers(servers, "10.0.0.9", turn)[0] for turn in range(4)} == set(servers)
