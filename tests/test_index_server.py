"""The indexer against a Milvus server URI, and the collection's index options.

The server is milvus-lite's own `milvus` binary listening on a TCP port: a real Milvus gRPC
server (the lite engine: it builds FLAT, IVF_FLAT and AUTOINDEX, not HNSW), which the
indexer reaches as any server URI, so the server path runs: writer actors upserting in
parallel, no driver-side writes, the model record beside the collection.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import tinymodel
from xmodal import store
from xmodal.indexer import IndexJob
from xmodal.indexer.manage import collection_stats

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def repository(tiny_repository):
    _, repository = tiny_repository
    return repository


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A Milvus gRPC server on 127.0.0.1 (milvus-lite's binary on a TCP address); its URI."""
    from milvus_lite.server import Server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(str(tmp_path_factory.mktemp("milvus-server") / "server.db"), address=f"127.0.0.1:{port}")
    assert server.init() and server.start(), "milvus-lite's server did not start"
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            store.connect(uri, timeout=2).close()
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)
    yield uri
    server.stop()


def server_rows(uri: str, collection: str) -> dict[str, dict]:
    client = store.connect(uri)
    try:
        store.ensure_loaded(client, collection)
        return {row["id"]: row for row in client.query(collection, filter='id != ""', output_fields=["image"],
                                                        limit=16384)}
    finally:
        client.close()


def test_writer_actors_fill_a_server_collection_idempotently(repository, ray_local, tmp_path, milvus_server):
    manifest = tinymodel.many_images(tmp_path, 60, bad_every=20)
    options = dict(model_repository=repository, milvus_uri=milvus_server, collection="served", split=None,
                   batch_size=4, shard_size=16, write_batch=8, writers=2, index_type="IVF_FLAT",
                   index_params={"nlist": 8}, milvus_token="root:Milvus", progress=False)
    report = IndexJob(manifest=manifest, **options).run()
    assert (report.items_read, report.rows_written, report.dead_letters) == (60, 57, 3)
    assert report.stage_items["write"] == 57  # upserted by the writer actors, not the driver
    rows = server_rows(milvus_server, "served")
    assert len(rows) == 57 and all(row["image"].endswith(".png") for row in rows.values())

    stats = collection_stats(milvus_server, "served")
    assert stats["rows"] == 57
    assert stats["index"]["type"] == "IVF_FLAT" and stats["index"]["params"].get("nlist") in (8, "8")

    again = IndexJob(manifest=manifest, **{**options, "restart": True}).run()
    assert again.rows_written == 57 and server_rows(milvus_server, "served").keys() == rows.keys()


def test_index_options_are_checked(repository, ray_local, tmp_path) -> None:
    manifest = tinymodel.many_images(tmp_path, 4, bad_every=99)
    db = tmp_path / "lite.db"
    try:
        with pytest.raises(ValueError, match="milvus-lite builds only FLAT, IVF_FLAT, AUTOINDEX indexes, not 'HNSW'"):
            IndexJob(manifest=manifest, model_repository=repository, milvus_uri=str(db), split=None, index_type="HNSW",
                     progress=False).run()
        report = IndexJob(manifest=manifest, model_repository=repository, milvus_uri=str(db), split=None,
                          index_type="FLAT", progress=False).run()
        assert report.rows_written == 4
        assert collection_stats(str(db), "xmodal_images")["index"]["type"] == "FLAT"
    finally:
        store.release_local(db)

    command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--local",
               "--model-repository", str(repository), "--milvus-uri", str(tmp_path / "other.db"),
               "--index-params", "[16]"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--index-params: expected a JSON object, got '[16]'" in refused.stderr
