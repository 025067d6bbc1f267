"""The client SDK against the real tritonserver (tiny ONNX encoders) and milvus-lite, filled
once for the module by the indexer."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tinymodel
from xmodal import store
from xmodal.client import Client, Hit, format_hits
from xmodal.indexer import index_images

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("client")
    card, repository = tinymodel.build_repository(directory, max_batch_size=4)
    manifest, images = tinymodel.write_corpus(directory)
    db = directory / "milvus" / "xmodal.db"
    with tinymodel.serving(repository) as server:
        report = index_images(manifest, triton_url=server.url, milvus_uri=str(db), batch_size=4, progress=False)
        assert report.rows_written == len(images)
        milvus = store.connect(db)  # a collection of another model, for the mismatch test
        store.ensure_collection(milvus, "older_model", tinymodel.make_card("0123456789abcdef", "older"))
        milvus.close()
        yield {"card": card, "url": server.url, "db": db, "images": images}
    store.release_local(db)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack["url"], stack["db"]) as client:
        yield client


def test_connects_with_the_served_card(client, stack):
    assert client.card.fingerprint == stack["card"].fingerprint and client.dim == tinymodel.DIM


@pytest.mark.parametrize("form", ["path", "str", "bytes", "pil"])
def test_search_image_finds_the_indexed_image_first(client, stack, form):
    from PIL import Image

    path = stack["images"][3]
    query = {"path": path, "str": str(path), "bytes": path.read_bytes(), "pil": Image.open(path)}[form]
    hits = client.search_image(query, k=3)
    assert len(hits) == 3 and all(isinstance(hit, Hit) for hit in hits)
    assert hits[0].image == str(path) and hits[0].concept == "yellow"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].captions == ["yellow rectangle", "a yellow star"]
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_search_image_with_a_list_gives_a_list_per_image(client, stack):
    results = client.search_image(stack["images"][:2], k=2)
    assert [hits[0].image for hits in results] == [str(p) for p in stack["images"][:2]]


def test_search_text_returns_k_hits(client, stack):
    hits = client.search_text("a red face", k=4)
    assert len(hits) == 4 and len({hit.id for hit in hits}) == 4
    assert {hit.image for hit in hits} <= {str(p) for p in stack["images"]}
    many = client.search_text(["red", "green star", "dog with eyes"], k=2)
    assert len(many) == 3 and all(len(hits) == 2 for hits in many)
    assert many[0] == client.search_text("red", k=2)


def test_search_vector_and_embeddings(client, stack):
    texts = client.embed_text(["red heart", "blue"])
    images = client.embed_image([stack["images"][0], stack["images"][1]])
    for vectors in (texts, images):
        assert vectors.shape == (2, tinymodel.DIM) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    hits = client.search_vector(images[1], k=1)
    assert hits[0].image == str(stack["images"][1])
    assert [h[0].image for h in client.search_vector(images, k=1)] == [str(p) for p in stack["images"][:2]]
    with pytest.raises(ValueError, match="expected a vector of 8"):
        client.search_vector(np.zeros(3), k=1)


@pytest.mark.parametrize("query", ["", "   \n\t", ["fine", " "]])
def test_empty_query_is_refused(client, query):
    with pytest.raises(ValueError, match="query text is empty"):
        client.search_text(query)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_must_be_positive(client, k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        client.search_text("red", k=k)


def test_an_image_the_server_rejects_is_a_value_error(client):
    with pytest.raises(ValueError, match="Triton rejected image: .*not an image"):
        client.search_image(b"this is not an image")


def test_unknown_collection_names_it_and_the_existing_ones(stack):
    with pytest.raises(ValueError) as raised:
        Client(stack["url"], stack["db"], "no_such_collection")
    message = str(raised.value)
    assert "'no_such_collection' does not exist" in message
    assert "'xmodal_images'" in message and "'older_model'" in message


def test_collection_of_another_model_is_refused(stack):
    with pytest.raises(ValueError) as raised:
        Client(stack["url"], stack["db"], "older_model")
    message = str(raised.value)
    assert "'older'" in message and "0123456789abcdef" in message
    assert "'tiny'" in message and stack["card"].fingerprint in message


def test_missing_database_is_a_clear_error(stack, tmp_path):
    with pytest.raises(ValueError, match="no milvus-lite database at"):
        Client(stack["url"], tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()


def test_server_down_is_a_connection_error_naming_the_url(stack):
    (port,) = tinymodel.free_ports(1)
    with pytest.raises(ConnectionError, match=f"cannot reach Triton at 127.0.0.1:{port}"):
        Client(f"http://127.0.0.1:{port}", stack["db"], timeout=2)


def test_format_hits(client, stack):
    table = format_hits(client.search_image(stack["images"][0], k=3))
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "score", "concept", "caption", "image"]
    assert len(lines) == 5 and lines[2].split()[:3] == ["1", "1.0000", "red"]
    assert lines[2].rstrip().endswith(str(stack["images"][0]))
    assert format_hits([]) == "(no results)"


def test_import_loads_neither_torch_nor_ray():
    code = ("import sys, xmodal.client; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
