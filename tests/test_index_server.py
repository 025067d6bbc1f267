"""The indexer against a Milvus server URI, and the collection's index options.

The server is a real Milvus 2.3.5 (conftest's ``milvus_server``), which the indexer reaches as
any server URI, so the server path runs: writer actors upserting in parallel, no driver-side
writes, the model recorded in the collection's properties, a real ANN index.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import tinymodel
from xmodal import store
from xmodal.indexer import IndexJob
from xmodal.indexer.manage import collection_stats

from conftest import empty_server

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def repository(tiny_repository):
    _, repository = tiny_repository
    return repository


@pytest.fixture
def server(milvus_server, tmp_path, monkeypatch):
    """The session's Milvus 2.3.5 server, empty; the test's data directory its tmp_path."""
    monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "data"))
    empty_server(milvus_server)
    yield milvus_server
    empty_server(milvus_server)


def server_rows(uri: str, collection: str) -> dict[str, dict]:
    client = store.connect(uri)
    try:
        store.ensure_loaded(client, collection)
        return {row["id"]: row for row in client.query(collection, filter='id != ""', output_fields=["image"],
                                                        limit=16384, consistency_level="Strong")}
    finally:
        client.close()


def test_writer_actors_fill_a_server_collection_idempotently(repository, ray_local, tmp_path, server):
    milvus_server = server
    manifest = tinymodel.many_images(tmp_path, 60, bad_every=20)
    options = dict(model_repository=repository, milvus_uri=milvus_server, collection="served", split=None,
                   batch_size=4, shard_size=16, write_batch=8, writers=2, index_type="HNSW",
                   index_params={"M": 8, "efConstruction": 64}, milvus_token="root:Milvus", progress=False)
    report = IndexJob(manifest=manifest, **options).run()
    assert (report.items_read, report.rows_written, report.dead_letters) == (60, 57, 3)
    assert report.stage_items["write"] == 57  # upserted by the writer actors, not the driver
    rows = server_rows(milvus_server, "served")
    assert len(rows) == 57 and all(row["image"].endswith(".png") for row in rows.values())

    stats = collection_stats(milvus_server, "served")
    assert stats["rows"] == 57
    assert stats["index"]["type"] == "HNSW" and stats["index"]["params"].get("M") in (8, "8")
    reader = store.connect(milvus_server)
    recorded = json.loads(store.collection_model(reader, "served")["index"])
    reader.close()
    assert recorded == {"type": "HNSW", "params": {"M": 8, "efConstruction": 64}}

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


def test_a_write_the_server_refuses_is_named_not_a_ray_stack_trace(repository, ray_local, tmp_path, server):
    """The writer actors upsert into a collection the server does not have: the refusal comes
    back as one RuntimeError naming the server and the collection, and no shard is recorded."""
    from dataclasses import replace

    from xmodal.indexer import pipeline

    class WritesToAMissingCollection(pipeline.Sink):
        def apply(self, ds, levels):
            return pipeline.Sink.apply(replace(self, collection="never_created"), ds, levels)

    manifest = tinymodel.many_images(tmp_path, 8, bad_every=99)
    job = IndexJob(manifest=manifest, model_repository=repository, milvus_uri=server, collection="served",
                   split=None, batch_size=4, shard_size=4, writers=1, progress=False)
    sink = lambda job: WritesToAMissingCollection(**vars(pipeline.build_sink(job)))  # noqa: E731
    with pytest.raises(RuntimeError) as refused:
        pipeline.run(job, sink=sink)
    message = str(refused.value)
    assert message.startswith(f"Milvus at {server} refused a write to 'served': ") and "never_created" in message
    assert "Traceback" not in message and refused.value.__cause__ is None
    progress = tinymodel.run_progress(server, "served")
    assert progress["finished"] == [] and not progress["complete"]


# ---- two machines, one server ------------------------------------------------------------


def test_a_second_machine_resumes_the_first_ones_run_and_reads_everything_from_the_server(
        repository, tiny_triton, ray_local, tmp_path, server, monkeypatch):
    """Two data directories stand for two machines that share only the Milvus URI, the Triton URL
    and a filesystem URI for the images: the second resumes the first's killed run, and reads the
    hits, their images and the dead letters; neither machine's data directory holds anything."""
    import ray

    from xmodal.client import Client
    from xmodal.files import read_location
    from xmodal.indexer.sources import content_id

    images = {}
    samples = []
    for i in range(60):
        image = (b"not an image %d" % i if i % 12 == 11 else
                 tinymodel.write_png(tmp_path / "pngs" / f"{i}.png", (i * 4, 255 - i * 4, (i * 7) % 256)).read_bytes())
        images[f"{i:04d}"] = image
        samples.append((f"{i:04d}", {"png": image, "txt": f"item {i}".encode()}))
    shards = tmp_path / "shards"  # the input, at the same path on both machines (a shared mount)
    shards.mkdir()
    for n in range(2):
        tinymodel.write_shard(shards / f"part-{n}.tar", samples[30 * n:30 * (n + 1)])
    image_store = (tmp_path / "shared" / "images").as_uri()  # file:///...: any pyarrow filesystem URI
    command = [sys.executable, "-m", "xmodal.cli", "index", "--input", str(shards), "--local",
               "--model-repository", str(repository), "--milvus-uri", server, "--collection", "shared",
               "--image-store", image_store, "--shard-size", "4", "--write-batch", "4", "--batch-size", "2",
               "--json", "--address", ray.get_runtime_context().gcs_address]
    machine = {name: dict(os.environ, XMODAL_DATA=str(tmp_path / name)) for name in ("a", "b")}

    with tinymodel.RunBooks(server, "shared") as books:
        run = subprocess.Popen(command, env=machine["a"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not books.finished_shards() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run.kill()
        _, err = run.communicate()
        at_kill = books.progress()
    assert at_kill and 1 <= len(at_kill["finished"]) < at_kill["shards"] == 15 and not at_kill["complete"], err.decode()

    rerun = subprocess.run(command, env=machine["b"], capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["shards_skipped"] == len(at_kill["finished"]) and report["fresh_start"] is None
    assert report["items_skipped"] == 4 * len(at_kill["finished"]) and report["dead_letters"] == 5
    assert tinymodel.run_progress(server, "shared")["complete"]

    reference = IndexJob(input=shards, model_repository=repository, milvus_uri=server, collection="reference",
                         image_store=image_store, split=None, batch_size=2, shard_size=4, progress=False).run()
    assert (reference.rows_written, reference.dead_letters) == (55, 5)
    rows, expected = server_rows(server, "shared"), server_rows(server, "reference")
    assert len(rows) == 55 and rows == expected  # none lost, none twice, each image at the same URI
    for key, row in rows.items():
        assert row["image"].startswith(image_store + "/") and content_id(read_location(row["image"])) == key

    letters = subprocess.run([sys.executable, "-m", "xmodal.cli", "index", "letters", "--milvus-uri", server,
                              "--collection", "shared"], env=machine["b"], capture_output=True, text=True, timeout=60)
    assert letters.returncode == 0, letters.stderr
    got = sorted((letter["item"], letter["reason"]) for letter in map(json.loads, letters.stdout.splitlines()))
    assert got == sorted((letter["item"], letter["reason"]) for letter in tinymodel.run_letters(server, "reference"))
    assert [item for item, _ in got] == [11, 23, 35, 47, 59]

    monkeypatch.setenv("XMODAL_DATA", machine["b"]["XMODAL_DATA"])
    with Client(tiny_triton.url, server, "shared", caption_collection=None, consistency_level="Strong") as client:
        hits = client.search_image(images["0005"], k=55)
    assert len(hits) == 55 and all(content_id(read_location(hit.image)) == hit.id for hit in hits)
    kept = [path for name in ("a", "b") for path in (tmp_path / name).rglob("*") if path.is_file()]
    assert kept == [], "a machine's data directory holds what the server should"


def test_the_servers_books_hold_more_letters_than_one_query_returns(server):
    """Letters are read past 16,384 rows (one query's limit, when it has one), and a resumed run
    keeps exactly those of its finished shards."""
    from xmodal.indexer import state

    client = store.connect(server)
    try:
        records = state.run_records(server, "many", client)
        assert records.letters() == [] and records.read_progress() is None  # no books yet: none made by reading
        assert not client.has_collection(store.BOOKS_COLLECTION)
        letters = {f"letter/many/{item}": json.dumps({"item": item, "reason": "bad"}) for item in range(17000)}
        records.save_progress({"format": state.PROGRESS_FORMAT, "finished": [0, 1, 2, 5, 6, 9], "shards": 10})
        for start in range(0, 17000, 4000):
            chunk = dict(list(letters.items())[start:start + 4000])
            client.upsert(store.BOOKS_COLLECTION, store.record_rows(chunk))
        assert [letter["item"] for letter in records.letters()] == list(range(17000))
        assert records.read_progress()["finished"] == [0, 1, 2, 5, 6, 9]
        kept = records.dead_letters(keep_items=lambda item: item is not None and item % 2 == 0)
        kept.write({"item": 17001, "reason": "later"})
        assert kept.count == 8501 and records.count_letters() == 8501
        assert records.remove() == [records.progress_where, records.letters_where]
        assert records.letters() == [] and records.read_progress() is None
    finally:
        client.close()


def test_books_another_machine_created_but_has_not_indexed_yet_still_open(server):
    """Two machines' runs start at once: one has created xmodal_books and not yet built its index
    (a collection without an index cannot load); the other's reads and writes still work."""
    from pymilvus import DataType

    from xmodal.indexer import state

    client = store.connect(server)
    try:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(store.RECORD_KEY, DataType.VARCHAR, max_length=512, is_primary=True)
        schema.add_field(store.RECORD_TEXT, DataType.VARCHAR, max_length=65535)
        schema.add_field(store.RECORD_VECTOR, DataType.FLOAT_VECTOR, dim=2)
        client.create_collection(store.BOOKS_COLLECTION, schema=schema)  # no index, not loaded
        assert not client.list_indexes(store.BOOKS_COLLECTION)
        records = state.run_records(server, "raced", client)
        records.save_progress({"format": state.PROGRESS_FORMAT, "finished": [0], "shards": 2})
        assert records.read_progress()["finished"] == [0]
    finally:
        client.close()
