"""The client SDK against the session's tiny tritonserver (tiny ONNX encoders) and each Milvus
backend (milvus-lite, then the session's Milvus server), filled once for the module by the indexer. Its parts that need no server: test_client_no_server.py."""
from __future__ import annotations

import numpy as np
import pytest

import tinymodel
from conftest import MILVUS_BACKENDS, empty_server
from xmodal import store
from xmodal.client import AsyncClient, Client, Hit, Retry, format_hits
from xmodal.indexer import IndexJob

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module", params=MILVUS_BACKENDS)
def stack(request, tmp_path_factory, tiny_repository, tiny_triton, tiny_corpus, ray_local):
    card, _ = tiny_repository
    manifest, images = tiny_corpus
    server = tiny_triton
    directory = tmp_path_factory.mktemp("client")
    if request.param == "milvus-lite":
        db = directory / "milvus" / "xmodal.db"
    else:
        db = request.getfixturevalue("milvus_server")
        empty_server(db)
    data = pytest.MonkeyPatch()
    data.setenv("XMODAL_DATA", str(directory / "data"))
    report = IndexJob(manifest=manifest, triton_url=server.url, milvus_uri=str(db), batch_size=4, progress=False).run()
    assert report.rows_written == len(images)
    captions = IndexJob(kind="caption", manifest=manifest, triton_url=server.url, milvus_uri=str(db), batch_size=8,
                        progress=False).run()
    assert captions.rows_written == 2 * len(images)
    milvus = store.connect(db)  # a collection of another model, for the mismatch test
    store.ensure_collection(milvus, "older_model", tinymodel.make_card("0123456789abcdef", "older"))
    milvus.close()
    yield {"card": card, "url": server.url, "db": db, "images": images}
    store.release_local(db)
    data.undo()


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


def test_level_weights_on_a_single_level_model(client):
    with pytest.raises(ValueError, match=r"unknown level 'concept' in level_weights: model 'tiny' has the levels "
                                         r"'global'; level weights are for hierarchical models"):
        client.search_text("red", level_weights={"concept": 1.0})
    # its one level, weighted: the default search
    assert client.search_text("red face", k=3, level_weights={"global": 2}) == client.search_text("red face", k=3)
    assert list(client.embed_text_levels("red")) == ["global"]


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


def test_searches_do_not_describe_the_index_each_time(client, stack, monkeypatch):
    """The index type is read once when a collection is opened (milvus-lite 3.2.2 scanned its
    rows for every describe_index, benchmarks/query.py; a server call is a round trip)."""
    expected = client.search_text("a red face", k=3)
    milvus = client.searcher.milvus

    def refuse(*args, **kwargs):
        raise AssertionError("describe_index called during a search")
    monkeypatch.setattr(milvus, "describe_index", refuse)
    assert client.search_text("a red face", k=3) == expected
    assert client.searcher.search_params(client.collection, 3) == store.search_params(
        None, client.collection, client.card.metric, 3, index=store.default_index(milvus)[0])


# -- image -> captions, filters, k -----------------------------------------------------------

def test_search_captions_returns_caption_rows(client, stack):
    hits = client.search_captions(stack["images"][3], k=4)
    assert len(hits) == 4 and len({hit.id for hit in hits}) == 4
    indexed = {f"{name} {shape}" for name, shape in zip(tinymodel.COLOURS, ["ellipse", "rectangle"] * 3)}
    indexed |= {f"a {name} {'face' if i % 2 == 0 else 'star'}" for i, name in enumerate(tinymodel.COLOURS)}
    for hit in hits:
        assert len(hit.captions) == 1 and hit.captions[0] in indexed
        assert hit.image in {str(p) for p in stack["images"]} and hit.style == "tiny"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The same as searching the caption collection with the image's vector.
    vector = client.embed_image(stack["images"][3])[0]
    assert hits == client.search_vector(vector, k=4, collection=client.caption_collection)
    many = client.search_captions(stack["images"][:2], k=2)
    assert len(many) == 2 and all(len(h) == 2 for h in many)


def test_search_captions_with_a_filter(client, stack):
    hits = client.search_captions(stack["images"][0], k=5, filter='concept == "red"')
    assert sorted(hit.captions[0] for hit in hits) == ["a red face", "red ellipse"]


def test_missing_caption_collection_says_how_to_fill_it(stack):
    with Client(stack["url"], stack["db"], caption_collection="no_captions_here") as client:
        assert client.search_text("red", k=1)  # the image side works without it
        with pytest.raises(ValueError, match="'no_captions_here' does not exist.*index --captions"):
            client.search_captions(stack["images"][0])
    with Client(stack["url"], stack["db"], caption_collection=None) as client:
        with pytest.raises(ValueError, match="no caption collection"):
            client.search_captions(stack["images"][0])


def test_filters_on_every_search(client, stack):
    hits = client.search_text("red", k=6, filter='concept in ["red", "blue"]')
    assert sorted(hit.concept for hit in hits) == ["blue", "red"]
    hits = client.search_image(stack["images"][0], k=3, filter='concept != "red"')
    assert len(hits) == 3 and "red" not in {hit.concept for hit in hits}
    vector = client.embed_image(stack["images"][0])[0]
    assert client.search_vector(vector, k=3, filter='concept != "red"') == hits
    assert client.search_text("red", k=3, filter='style == "nothing like this"') == []
    assert client.search_text("red", k=2, filter="  ") == client.search_text("red", k=2)


@pytest.mark.parametrize("expression", ['style = = "tiny"', 'colour == "red"', "concept in [", "42"])
def test_a_bad_filter_is_a_value_error_naming_it(client, expression):
    with pytest.raises(ValueError) as raised:
        client.search_text("red", k=2, filter=expression)
    message = str(raised.value)
    assert message.startswith(f"invalid filter {expression!r}: ") and len(message) > len(expression) + 20
    assert raised.value.__suppress_context__  # no pymilvus traceback chained to it


def test_filter_must_be_a_string(client):
    with pytest.raises(ValueError, match="filter must be a string"):
        client.search_text("red", filter=["style"])


def test_k_has_an_upper_bound(client):
    with pytest.raises(ValueError, match="k must be at most 16384"):
        client.search_text("red", k=16385)


# -- retries -----------------------------------------------------------------------------------

class FlakyProxy:
    """An HTTP proxy in front of Triton whose first `failures` inference requests get 503."""

    def __init__(self, target: str, failures: int = 0):
        import http.client
        import http.server
        import threading

        proxy = self
        self.failures, self.infers, self.target = failures, 0, target
        self.lock = threading.Lock()
        self.connections = set()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy.connections.add(self.connection)

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/infer"):
                    with proxy.lock:
                        proxy.infers += 1
                        fail = proxy.infers <= proxy.failures
                    if fail:
                        payload = b'{"error":"Server unavailable"}'
                        self.send_response(503)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                upstream = http.client.HTTPConnection(proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        """Stop listening and drop the open keep-alive connections too: the server is gone."""
        import socket

        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_client_retries_503_then_answers(stack, client):
    proxy = FlakyProxy(stack["url"])
    try:
        with Client(proxy.url, stack["db"], retry=Retry(attempts=4, backoff=0.01)) as flaky:
            proxy.failures = proxy.infers + 2
            assert flaky.search_text("red face", k=3) == client.search_text("red face", k=3)
            assert proxy.infers == proxy.failures + 1
            proxy.failures = proxy.infers + 10
            with pytest.raises(ConnectionError, match=r"did not answer embed_text \(4 attempts\).*503"):
                flaky.search_text("red face", k=3)
            proxy.failures = 0
            before = proxy.infers
            with pytest.raises(ValueError, match="Triton rejected image"):  # a 400: sent once
                flaky.search_image(b"not an image at all")
            assert proxy.infers == before + 1
    finally:
        proxy.close()


def test_client_gives_up_on_a_server_that_went_away(stack):
    proxy = FlakyProxy(stack["url"])
    flaky = Client(proxy.url, stack["db"], retry=Retry(attempts=3, backoff=0.01))
    try:
        proxy.close()
        with pytest.raises(ConnectionError, match=r"did not answer embed_text \(3 attempts\).*(Refused|refused)"):
            flaky.search_text("red", k=1)
    finally:
        flaky.close()


# -- AsyncClient -------------------------------------------------------------------------------

def test_async_client_gives_the_same_hits(client, stack):
    import asyncio

    async def main():
        async with AsyncClient(stack["url"], stack["db"]) as aclient:
            assert aclient.card.fingerprint == client.card.fingerprint
            texts = await asyncio.gather(*(aclient.search_text(q, k=4) for q in ["red", "a green star", "dog"]))
            images = await aclient.search_image(stack["images"][:3], k=2)
            captions = await aclient.search_captions(stack["images"][3], k=3)
            filtered = await aclient.search_text("red", k=6, filter='concept in ["red", "blue"]')
            vector = await aclient.search_vector(client.embed_image(stack["images"][1])[0], k=1)
            with pytest.raises(ValueError, match="invalid filter"):
                await aclient.search_text("red", filter="style = = 1")
            with pytest.raises(ValueError, match="Triton rejected image"):
                await aclient.search_image(b"nope")
            with pytest.raises(ValueError, match="query text is empty"):
                await aclient.search_text(" ")
            return texts, images, captions, filtered, vector

    texts, images, captions, filtered, vector = asyncio.run(main())
    assert texts == [client.search_text(q, k=4) for q in ["red", "a green star", "dog"]]
    assert images == client.search_image(stack["images"][:3], k=2)
    assert captions == client.search_captions(stack["images"][3], k=3)
    assert filtered == client.search_text("red", k=6, filter='concept in ["red", "blue"]')
    assert vector[0].image == str(stack["images"][1])


def test_async_client_retries_and_reports_a_missing_server(stack, client):
    import asyncio

    proxy = FlakyProxy(stack["url"])

    async def main():
        async with AsyncClient(proxy.url, stack["db"], retry=Retry(attempts=4, backoff=0.01)) as aclient:
            proxy.failures = proxy.infers + 2
            hits = await aclient.search_text("red face", k=3)
            proxy.failures = proxy.infers + 10
            with pytest.raises(ConnectionError, match=r"did not answer embed_text \(4 attempts\)"):
                await aclient.search_text("red face", k=3)
            return hits

    try:
        assert asyncio.run(main()) == client.search_text("red face", k=3)
    finally:
        proxy.close()
    (port,) = tinymodel.free_ports(1)

    async def down():
        async with AsyncClient(f"127.0.0.1:{port}", stack["db"], retry=Retry(attempts=2, backoff=0.01)):
            pass

    with pytest.raises(ConnectionError, match=f"cannot reach Triton at 127.0.0.1:{port}.*2 attempts"):
        asyncio.run(down())
