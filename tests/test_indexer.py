"""The Ray indexer end to end: tiny ONNX encoders on the real tritonserver, a real local Ray,
milvus-lite in tmp_path. One server and one Ray for the module."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import tinymodel
from xmodal import store
from xmodal.client import Client
from xmodal.indexer import deadletter_path, index_captions, index_images
from xmodal.indexer.embed import TritonEmbedder

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("indexer")
    card, repository = tinymodel.build_repository(directory, max_batch_size=4)
    with tinymodel.serving(repository) as server:
        yield {"card": card, "url": server.url, "dir": directory}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (index_images leaves a Ray it did not start running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "milvus" / "test.db"
    yield path
    store.release_local(path)


def count(db, collection):
    client = store.connect(db)
    try:
        return client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        client.close()


def test_every_image_once_and_reruns_are_idempotent(stack, ray_local, tmp_path, db):
    copy = tinymodel.record("images/tiny/red-again.png", "red-again")  # same bytes as red.png: same row
    manifest, images = tinymodel.write_corpus(tmp_path, extra=[copy])
    (tmp_path / copy["image"]).write_bytes(images[0].read_bytes())
    report = index_images(manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4,
                          embed_workers=2, progress=False)
    assert (report.items_read, report.rows_written, report.dead_letters) == (len(images) + 1, len(images), 0)
    assert report.duplicates == 1
    assert report.fingerprint == stack["card"].fingerprint and report.items_per_second > 0
    assert report.deadletter_path is None and not deadletter_path(str(db), "xmodal_images").exists()
    assert count(db, "xmodal_images") == len(images)

    again = index_images(manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=3, progress=False)
    assert again.rows_written == len(images)
    assert count(db, "xmodal_images") == len(images)

    client = store.connect(db)
    try:
        row = client.query("xmodal_images", filter='concept == "green"',
                           output_fields=["id", "image", "captions", "style", "global"])[0]
    finally:
        client.close()
    assert row["image"] == str(images[1]) and row["style"] == "tiny"
    assert row["captions"] == ["green rectangle", "a green star"]
    assert len(row["id"]) == 32 and abs(np.linalg.norm(row["global"]) - 1) < 1e-4


def test_bad_inputs_go_to_the_dead_letter_file(stack, ray_local, tmp_path, db):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    extra = [tinymodel.record("images/corrupt.png", "corrupt"), tinymodel.record("images/missing.png", "missing")]
    manifest, images = tinymodel.write_corpus(tmp_path, extra=extra)
    report = index_images(manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4, progress=False)
    assert (report.items_read, report.rows_written, report.dead_letters) == (len(images) + 2, len(images), 2)
    assert count(db, "xmodal_images") == len(images)
    letters = [json.loads(line) for line in open(report.deadletter_path)]
    reasons = {letter["path"]: letter["reason"] for letter in letters}
    assert reasons.keys() == {str(tmp_path / "images" / "corrupt.png"), str(tmp_path / "images" / "missing.png")}
    assert "cannot decode image" in reasons[str(tmp_path / "images" / "corrupt.png")]
    assert "cannot read file" in reasons[str(tmp_path / "images" / "missing.png")]


def test_items_the_server_rejects_get_its_message(stack):
    """Bytes that pass the reader's check but not Triton's: the batch is retried item by item."""
    good = (tinymodel.write_png(stack["dir"] / "one.png", (200, 10, 10))).read_bytes()
    embedder = TritonEmbedder(stack["url"], "embed_image", "IMAGE", tinymodel.DIM)
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "data": np.array([good, b"garbage", good], dtype=object),
             "error": np.array(["", "", ""], dtype=object)}
    out = embedder(batch)
    assert "data" not in out
    assert out["error"][0] == "" and out["error"][2] == ""
    assert out["error"][1].startswith("triton: ") and "not an image" in out["error"][1]
    assert np.allclose(out["vector"][0], out["vector"][2]) and not out["vector"][1].any()
    embedder.embedder.close()


def test_a_collection_of_another_model_is_refused(stack, tmp_path, db):
    manifest, _ = tinymodel.write_corpus(tmp_path)
    client = store.connect(db)
    store.ensure_collection(client, "xmodal_images", tinymodel.make_card("0123456789abcdef", "older"))
    client.close()
    with pytest.raises(ValueError) as raised:
        # limit=0 selects nothing: the check must come before any work
        index_images(manifest, triton_url=stack["url"], milvus_uri=str(db), limit=0, progress=False)
    message = str(raised.value)
    assert "'older'" in message and "0123456789abcdef" in message
    assert "'tiny'" in message and stack["card"].fingerprint in message


def test_triton_down_is_a_connection_error(tmp_path, db):
    manifest, _ = tinymodel.write_corpus(tmp_path)
    (port,) = tinymodel.free_ports(1)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        index_images(manifest, triton_url=f"127.0.0.1:{port}", milvus_uri=str(db), progress=False)


def test_captions_one_row_per_distinct_text(stack, ray_local, tmp_path, db):
    manifest, images = tinymodel.write_corpus(tmp_path)
    report = index_captions(manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4, progress=False)
    assert report.items_read == 2 * len(images)
    assert report.rows_written == count(db, "xmodal_captions") == 2 * len(images)  # all distinct here
    again = index_captions(manifest, triton_url=stack["url"], milvus_uri=str(db), progress=False)
    assert again.rows_written == count(db, "xmodal_captions") == 2 * len(images)

    with Client(stack["url"], db, "xmodal_captions") as client:  # image -> captions works the same way
        hit = client.search_text("a blue face", k=1)[0]
    assert (hit.captions, hit.concept, hit.image) == (["a blue face"], "blue", str(images[2]))
    assert hit.score == pytest.approx(1.0, abs=1e-4)
