"""The re-ranking second stage end to end, real at every joint: a tiny CRAN run → export (encoders
and re-ranker) → the real tritonserver → index (Ray → milvus-lite) → the side store through
Triton's ``embed_image_side`` → a first-stage search → Triton's ``rerank_text``; the served sides
and scores checked against the PyTorch model."""
from __future__ import annotations

import dataclasses
import math
import sqlite3

import numpy as np
import pytest
import torch

from xmodal.client import Client
from xmodal.client.rerank import Reranker
from xmodal.contract import RERANK_MODELS
from xmodal.export.onnx import export_run
from xmodal.export.repository import write_model_repository
from xmodal.indexer import IndexJob
from xmodal.indexer.sides import index_sides
from xmodal.indexer.sources import content_id
from xmodal.preprocessing import preprocess_image_bytes
from xmodal.server import TritonServer, free_port
from xmodal.sidestore import MilvusSideStore, SideStore, SideStoreError, side_store_path
from xmodal.manifest import read_manifest
from xmodal.training.run import load_run
from xmodal.training.train import tokenize, train

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SMALL = dict(image_encoder="small_cnn", text_encoder="small_text_cnn", image_size=32, dim=32, head_hidden=64,
             batch_size=8, minutes=60.0)
QUERY = "grinning face"


@pytest.fixture(scope="module")
def served(tmp_path_factory, emoji_manifest, ray_local):
    data = tmp_path_factory.mktemp("rerank")
    manifest = emoji_manifest
    run = data / "run"
    train(manifest, run, recipe="cran", progress=False, epochs=2, **SMALL)
    exported = export_run(run, run / "onnx")
    repository = write_model_repository(data / "model_repository", exported.card, image_onnx=exported.image_onnx,
                                        text_onnx=exported.text_onnx, tokenizer_json=exported.tokenizer_json)
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        server.wait_ready()
        milvus_uri = str(data / "xmodal.db")
        IndexJob(manifest=manifest, triton_url=server.url, milvus_uri=milvus_uri, split=None, progress=False).run()
        sides = index_sides(triton_url=server.url, milvus_uri=milvus_uri, progress=False)
        yield {"manifest": manifest, "run": run, "exported": exported, "server": server, "milvus_uri": milvus_uri,
               "sides": sides, "model": load_run(run)}
    finally:
        server.stop()


def _store(served) -> SideStore:
    return SideStore(side_store_path(served["milvus_uri"], "xmodal_images"), served["exported"].card.reranker)


def _images(served) -> dict[str, bytes]:
    """The indexed images by id (content hash), as the indexer keys them."""
    images = {}
    for row in read_manifest(served["manifest"]):
        data = row.image.read_bytes()
        images[content_id(data)] = data
    return images


def _pytorch_side(served, images: list[bytes]) -> dict[str, torch.Tensor]:
    model, _, config = served["model"]
    card = served["exported"].card
    pixels = torch.from_numpy(np.stack([
        preprocess_image_bytes(data, card.image.size, card.image.mean, card.image.std, card.image.background)
        for data in images]))
    with torch.no_grad():
        return model.scorer.image_side(model.image.backbone(pixels))


def test_the_repository_serves_the_reranker(served) -> None:
    card = served["exported"].card
    assert card.reranker.kind == "cran"
    assert card.reranker.parity_max_abs_diff["rerank"] <= 1e-4
    assert set(card.reranker.side) == {"image_fragments", "image_mask", "image_relation"}
    with Client(served["server"].url, served["milvus_uri"], caption_collection=None) as client:
        assert client.card.reranker.fingerprint == card.reranker.fingerprint
    import tritonclient.http as http

    triton = http.InferenceServerClient(served["server"].url)
    try:
        assert all(triton.is_model_ready(model) for model in RERANK_MODELS)
    finally:
        triton.close()


def test_stored_sides_are_the_pytorch_image_side(served) -> None:
    images = _images(served)
    report = served["sides"]
    assert report.rows == len(images) and report.computed == len(images) and report.failed == 0
    ids = sorted(images)
    with _store(served) as store:
        side, missing = store.get(ids)
    assert missing == []
    expected = _pytorch_side(served, [images[i] for i in ids])
    for name, value in side.items():
        np.testing.assert_allclose(value, expected[name.removeprefix("image_")].numpy(), rtol=0, atol=1e-4,
                                   err_msg=name)


def test_served_rerank_is_the_pytorch_scorer(served) -> None:
    model, tokenizer, _ = served["model"]
    images = _images(served)
    with Client(served["server"].url, served["milvus_uri"], caption_collection=None) as client, \
            _store(served) as store:
        hits = client.search_text(QUERY, k=len(images))
        reranker = Reranker(served["server"].url, client.card, store)
        try:
            reranked = reranker.rerank(QUERY, hits, k=len(hits))
        finally:
            reranker.close()
    assert reranker.last_missing == 0
    assert sorted(h.id for h in reranked) == sorted(h.id for h in hits)
    first_stage = torch.tensor([h.score for h in hits])
    image_side = _pytorch_side(served, [images[h.id] for h in hits])
    with torch.no_grad():
        text_side = model.scorer.text_side(model.text.backbone(tokenize(tokenizer, [QUERY])))
        expected = model.scorer.score(image_side, text_side, first_stage[:, None])["fused"][:, 0].numpy()
    by_id = {h.id: h for h in reranked}
    np.testing.assert_allclose([by_id[h.id].score for h in hits], expected, rtol=0, atol=1e-4)
    assert [h.first_stage for h in (by_id[h.id] for h in hits)] == pytest.approx([h.score for h in hits])
    # Best first by the scorer: the order PyTorch's scores give.
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    assert reranked[0].id == hits[int(np.argmax(expected))].id


def test_side_indexing_is_idempotent_and_fills_only_what_is_missing(served) -> None:
    again = index_sides(triton_url=served["server"].url, milvus_uri=served["milvus_uri"], progress=False)
    assert (again.computed, again.present, again.failed) == (0, again.rows, 0)
    path = side_store_path(served["milvus_uri"], "xmodal_images")
    with sqlite3.connect(path) as db:
        dropped = [row[0] for row in db.execute("SELECT id FROM sides ORDER BY id LIMIT 3")]
        db.execute(f"DELETE FROM sides WHERE id IN ({','.join('?' * len(dropped))})", dropped)
    with _store(served) as store:
        assert store.missing(dropped) == dropped
        with Client(served["server"].url, served["milvus_uri"], caption_collection=None) as client:
            hits = client.search_text(QUERY, k=20)
            reranker = Reranker(served["server"].url, client.card, store)
            try:
                reranked = reranker.rerank(QUERY, hits, k=len(hits))
            finally:
                reranker.close()
    # A hit without a side is not re-scored: it comes after every re-scored hit, in first-stage order.
    absent = [h for h in hits if h.id in dropped]
    assert reranker.last_missing == len(absent) > 0
    assert [h.id for h in reranked[-len(absent):]] == [h.id for h in absent]
    assert all(math.isnan(h.score) for h in reranked[-len(absent):])
    filled = index_sides(triton_url=served["server"].url, milvus_uri=served["milvus_uri"], progress=False)
    assert (filled.computed, filled.present) == (3, filled.rows - 3)


def test_a_bad_rerank_request_is_a_value_error_and_the_server_stays_ready(served) -> None:
    card = served["exported"].card
    with _store(served) as store:
        reranker = Reranker(served["server"].url, card, store)
        try:
            side, _ = store.get(list(_images(served))[:4])
            wrong = {**side, "image_fragments": side["image_fragments"][:, :1]}  # P = 1, not the model's
            with pytest.raises(ValueError, match="rerank_text refused"):
                reranker.scores(QUERY, np.zeros(4), wrong)
            with pytest.raises(ValueError, match="rerank_text refused"):
                reranker.scores("", np.zeros(4), side)  # empty text: the tokenizer's per-request error
            assert reranker.scores(QUERY, np.zeros(4), side).shape == (4,)
        finally:
            reranker.close()


def test_the_store_refuses_another_rerankers_sides(served, tmp_path) -> None:
    reranker = served["exported"].card.reranker
    path = tmp_path / "sides.sqlite"
    SideStore(path, reranker, create=True).close()
    with pytest.raises(SideStoreError, match="index the sides again"):
        SideStore(path, dataclasses.replace(reranker, fingerprint="0" * 16))
    with pytest.raises(SideStoreError, match="xmodal index sides"):
        SideStore(tmp_path / "none.sqlite", reranker)
    with SideStore(path, reranker) as store:
        with pytest.raises(ValueError, match="image_relation"):
            store.put(["x"], {"image_fragments": np.zeros((1, 4, 128)), "image_mask": np.zeros((1, 4))})


def test_client_search_text_reranks_and_async_agrees(served) -> None:
    import asyncio

    from xmodal.client import AsyncClient
    from xmodal.client.rerank import RerankedHit, rerank_depth

    url, milvus_uri = served["server"].url, served["milvus_uri"]
    with Client(url, milvus_uri, caption_collection=None) as client, _store(served) as store:
        first = client.search_text(QUERY, k=12)
        reranker = Reranker(url, client.card, store)
        try:
            expected = reranker.rerank(QUERY, first, k=5)
        finally:
            reranker.close()
        hits = client.search_text(QUERY, k=5, rerank=True, rerank_top=12)
        assert all(isinstance(h, RerankedHit) for h in hits)
        assert [(h.id, round(h.score, 5)) for h in hits] == [(h.id, round(h.score, 5)) for h in expected]
        batch = client.search_text([QUERY, "red heart"], k=3, rerank=True, rerank_top=12)
        assert [h.id for h in batch[0]] == [h.id for h in expected[:3]] and len(batch[1]) == 3
        assert len(client.search_text(QUERY, k=3, rerank=True)) == 3  # the card's top_n (20) first-stage hits
        with pytest.raises(ValueError, match="rerank_top must be an integer at least k=5"):
            client.search_text(QUERY, k=5, rerank=True, rerank_top=4)
        with pytest.raises(ValueError, match="no level_weights"):
            client.search_text(QUERY, k=5, rerank=True, level_weights={"global": 1.0})
        with pytest.raises(ValueError, match="has none"):
            rerank_depth(dataclasses.replace(client.card, reranker=None), 5, None)

    async def search():
        async with AsyncClient(url, milvus_uri, caption_collection=None) as aclient:
            return await aclient.search_text(QUERY, k=5, rerank=True, rerank_top=12)

    assert [h.id for h in asyncio.run(search())] == [h.id for h in expected]


def test_rerank_without_a_side_store_says_how_to_fill_it(served, tmp_path) -> None:
    import shutil

    from xmodal.store import release_local

    db = tmp_path / "copy.db"  # the same collection, without its side store beside it
    release_local(served["milvus_uri"])  # milvus-lite 2.5.1 keeps one file: copy it closed
    shutil.copy2(served["milvus_uri"], db)
    with Client(served["server"].url, str(db), caption_collection=None) as client:
        with pytest.raises(SideStoreError, match="xmodal index sides"):
            client.search_text(QUERY, k=5, rerank=True)
    release_local(db)


def test_the_cli_fills_the_sides_and_reranks(served) -> None:
    import json
    import subprocess
    import sys

    from xmodal.store import release_local

    url, milvus_uri = served["server"].url, served["milvus_uri"]
    release_local(milvus_uri)  # milvus-lite admits one process at a time
    base = [sys.executable, "-m", "xmodal.cli"]
    sides = subprocess.run(base + ["index", "sides", "--triton-url", url, "--milvus-uri", milvus_uri, "--json"],
                           capture_output=True, text=True, timeout=180)
    assert sides.returncode == 0, sides.stderr
    report = json.loads(sides.stdout)
    assert report["computed"] == 0 and report["present"] == report["rows"] > 0
    search = subprocess.run(base + ["search", QUERY, "-k", "3", "--rerank", "--rerank-top", "10", "--json",
                                    "--triton-url", url, "--milvus-uri", milvus_uri],
                            capture_output=True, text=True, timeout=180)
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)
    assert len(hits) == 3 and {"score", "first_stage"} <= set(hits[0])
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    refused = subprocess.run(base + ["search", "--image", str(read_manifest(served["manifest"])[0].image), "--rerank",
                                     "--triton-url", url, "--milvus-uri", milvus_uri],
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "give a text query" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_on_a_milvus_server_the_sides_are_the_servers_for_every_machine(served, milvus_server, tmp_path,
                                                                          monkeypatch) -> None:
    """Indexed and given their sides from one machine, re-ranked from another that has only the
    Triton URL and the Milvus URI: the sides are a collection of the server, not a file."""
    from conftest import empty_server
    from xmodal import store
    from xmodal.indexer.manage import delete_collection

    url = served["server"].url
    empty_server(milvus_server)
    try:
        monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "a"))
        IndexJob(manifest=served["manifest"], triton_url=url, milvus_uri=milvus_server, split=None,
                 progress=False).run()
        report = index_sides(triton_url=url, milvus_uri=milvus_server, progress=False)
        assert report.path == f"collection 'xmodal_images__sides' in {milvus_server}"
        assert report.computed == report.rows == served["sides"].rows and report.failed == 0
        again = index_sides(triton_url=url, milvus_uri=milvus_server, progress=False)
        assert (again.computed, again.present) == (0, report.rows)

        monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "b"))
        with Client(url, milvus_server, caption_collection=None, consistency_level="Strong") as remote, \
                Client(url, served["milvus_uri"], caption_collection=None) as local:
            got = remote.search_text(QUERY, k=5, rerank=True, rerank_top=12)
            assert remote._reranker.last_missing == 0
            want = local.search_text(QUERY, k=5, rerank=True, rerank_top=12)
        assert [h.id for h in got] == [h.id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
        assert [path for path in tmp_path.rglob("*") if path.is_file()] == []

        client = store.connect(milvus_server)
        try:
            assert store.list_collections(client) == ["xmodal_images"]  # the sides' collection is not listed
            with pytest.raises(SideStoreError, match="holds the sides of re-ranker"):
                MilvusSideStore(client, milvus_server, "xmodal_images",
                                dataclasses.replace(served["exported"].card.reranker, fingerprint="0" * 16))
        finally:
            client.close()
        assert "collection 'xmodal_images__sides'" in delete_collection(milvus_server, "xmodal_images")
    finally:
        empty_server(milvus_server)
