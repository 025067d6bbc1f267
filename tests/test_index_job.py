"""The indexing job and the parts it is assembled from, without Ray: the job's checks and
defaults, and what each builder makes of a job. Real files (a tiny corpus and model
repository) and a real milvus-lite, no mocks."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import tinymodel
from xmodal import contract, settings, store
from xmodal.indexer import IndexJob, sources
from xmodal.indexer.job import KINDS
from xmodal.indexer.local import LocalEmbedder
from xmodal.indexer.pipeline import build_embedding, build_reader, build_sink, run
from xmodal.indexer.state import image_store_path

pytestmark = pytest.mark.timeout(120)

SERVER = "http://127.0.0.1:19530"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    _, repository = tinymodel.build_repository(tmp_path_factory.mktemp("job"))
    return repository


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tinymodel.write_corpus(tmp_path_factory.mktemp("corpus"))


def test_a_job_fills_in_where_it_writes_and_never_shows_the_token():
    job = IndexJob(manifest="m.jsonl", triton_url="127.0.0.1:8000", milvus_token="root:Milvus")
    assert job.collection == settings.IMAGE_COLLECTION and job.milvus_uri == settings.default_milvus_uri()
    assert "root:Milvus" not in repr(job)
    assert IndexJob(kind="caption", manifest="m.jsonl", triton_url="t").collection == settings.CAPTION_COLLECTION
    assert IndexJob(kind="caption", manifest="m.jsonl", triton_url="t", collection="mine").collection == "mine"
    # writers: the driver alone for milvus-lite, two actors for a server unless told
    assert job.writer_count() == 1
    assert replace(job, milvus_uri=SERVER).writer_count() == 2
    assert replace(job, milvus_uri=SERVER, writers=3).writer_count() == 3


@pytest.mark.parametrize("options, message", [
    ({"manifest": None}, "give either a manifest or input="),
    ({"manifest": "m.jsonl", "input": "a.csv", "triton_url": "t"}, "not both or neither"),
    ({"kind": "text"}, "kind must be 'image' or 'caption', got 'text'"),
    ({"shard_size": 0}, "shard_size must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"embed_workers": 0}, "embed_workers must be at least 1, got 0"),
    ({"write_batch": -1}, "write_batch must be at least 1, got -1"),
    ({"writers": 0, "milvus_uri": SERVER}, "writers must be at least 1, got 0"),
    ({"writers": 2}, r"milvus-lite \(.*\) is a database one process holds: it takes one writer, not 2"),
    ({"triton_url": None}, "give either triton_url .* or model_repository"),
    ({"model_repository": "repo"}, "give either triton_url .* or model_repository .*not both or neither"),
])
def test_a_job_that_cannot_run_is_refused_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        IndexJob(**{"manifest": "m.jsonl", "triton_url": "t", **options})


def test_a_job_changed_after_it_was_made_is_checked_again_by_run():
    job = IndexJob(manifest="m.jsonl", triton_url="t")
    job.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        job.run()


def test_the_reader_plans_the_input_and_prepares_images_only(corpus, tmp_path):
    manifest, images = corpus
    db = str(tmp_path / "milvus" / "x.db")
    job = IndexJob(manifest=manifest, model_repository="repo", milvus_uri=db, shard_size=2)
    reader = build_reader(job)
    assert reader.plan.items == len(images) and len(reader.plan.shards) == -(-len(images) // 2)
    assert reader.batch_size == job.batch_size
    # images: read and checked before embedding, the bytes a source holds written beside the collection
    assert reader.prepare.func is sources.read_images
    assert reader.prepare.keywords == {"image_store": str(image_store_path(db, settings.IMAGE_COLLECTION))}
    identity = reader.identity()
    assert identity["kind"] == "image" and identity["manifest"] == str(manifest.resolve())
    assert (identity["split"], identity["limit"], identity["items"]) == ("test", None, len(images))

    captions = build_reader(replace(job, kind="caption", collection=None))
    assert captions.plan.items == 2 * len(images) and captions.prepare is None
    assert captions.identity()["items_sha256"] != identity["items_sha256"]


def test_the_sink_is_the_driver_for_milvus_lite_and_writer_actors_for_a_server(tmp_path, monkeypatch):
    record = {"id": "k", "path": "a.png", "captions": '["a cat"]', "concept": "cat", "style": "s",
              "relative_path": "a.png", "folder": "", "size": 3, "mtime": 1_700_000_000, "width": 4, "height": 2}
    vectors = {"global": np.ones(2, dtype=np.float32)}
    lite = build_sink(IndexJob(manifest="m.jsonl", triton_url="t", milvus_uri=str(tmp_path / "x.db")))
    assert lite.local and lite.writers == 1 and lite.collection == settings.IMAGE_COLLECTION
    dataset = object()  # milvus-lite adds no stage: the driver writes
    assert lite.apply(dataset, ["global"]) is dataset
    row = lite.row(record, vectors)
    assert (row["id"], row["image"], row["captions"]) == ("k", "a.png", {"values": ["a cat"]})
    assert (row["relative_path"], row["size"], row["mtime"], row["width"], row["height"]) == (
        "a.png", 3, 1_700_000_000, 4, 2)
    assert row[contract.vector_field("global")] == [1.0, 1.0]

    monkeypatch.setenv("XMODAL_MILVUS_TOKEN", "user:secret")
    server = build_sink(IndexJob(kind="caption", manifest="m.jsonl", triton_url="t", milvus_uri=SERVER,
                                 write_batch=7))
    assert not server.local and server.writers == 2 and server.write_batch == 7 and server.kind == "caption"
    assert server.token == "user:secret" and "user:secret" not in repr(server)
    assert server.row(record, vectors) is None  # the writer actors upserted it


def test_the_embedding_runs_the_repository_in_process(repository, tmp_path):
    job = IndexJob(manifest="m.jsonl", model_repository=repository, embed_workers=4, embed_threads=1)
    embedding = build_embedding(job)
    assert embedding.stage is LocalEmbedder and embedding.card.name == "tiny"
    assert embedding.args == (str(repository.resolve()), "image", embedding.dims, 1)
    assert embedding.dims == {level: int(spec["dim"]) for level, spec in embedding.card.embeddings.items()}
    assert (embedding.workers, embedding.resources, embedding.batch_size) == (4, {"CPU": 0.25}, job.batch_size)
    assert build_embedding(replace(job, kind="caption", collection=None, embed_workers=1)).args[1] == "text"
    assert build_embedding(replace(job, embed_workers=1)).resources == {"CPU": 1.0}
    assert build_embedding(replace(job, embed_resources={"GPU": 1, "CPU": 2})).resources == {"CPU": 2, "GPU": 1}
    with pytest.raises(ValueError, match="embed_resources: each resource needs a name and an amount of at least 0, got 'GPU': -1"):
        replace(job, embed_resources={"GPU": -1})
    with pytest.raises(ValueError, match="is not an xmodal model repository"):
        build_embedding(replace(job, model_repository=tmp_path))


def test_a_dead_letter_keeps_the_fields_of_its_kind():
    record = {"item": 3, "path": "a.png", "caption": "a cat", "image": "a.png", "error": "bad", "letter": ""}
    letter = KINDS["image"].letter(record, "mine")
    assert list(letter.items()) == [("path", "a.png"), ("reason", "bad"), ("collection", "mine")]
    assert list(KINDS["caption"].letter(record, "mine")) == ["caption", "image", "reason", "collection"]
    # an item whose text Arrow could not carry brings its fields in `letter`
    carried = {**record, "caption": "", "letter": json.dumps({"caption": "a \udcff cat"})}
    assert KINDS["caption"].letter(carried, "mine")["caption"] == "a \udcff cat"


def test_run_takes_other_builders(repository, corpus, tmp_path):
    manifest, _ = corpus
    db = tmp_path / "milvus" / "x.db"
    job = IndexJob(manifest=manifest, model_repository=repository, milvus_uri=str(db), progress=False)
    try:
        # a reader that selects nothing: the collection is made, no Ray is started, nothing is read
        report = run(job, reader=lambda job: build_reader(replace(job, limit=0)))
    finally:
        store.release_local(db)
    assert (report.items_read, report.rows_written, report.collection) == (0, 0, settings.IMAGE_COLLECTION)
    assert report.fingerprint == build_embedding(job).card.fingerprint
