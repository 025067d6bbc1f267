"""A hierarchical (two-level, MT-HCN-style) model end to end: one vector field per level in
Milvus, each filled with Triton's output of that level, and level-weighted search.

The real tritonserver, a real local Ray and milvus-lite; the tiny model is fitted to the
corpus's first captions (tinymodel.build_hierarchical_repository), once for the module."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tritonclient.http as triton_http

import tinymodel
from xmodal import contract, store
from xmodal.client import AsyncClient, Client
from xmodal.indexer import IndexJob

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

LEVELS = ["global", "concept", "exterior"]
FIELDS = {"global": "global", "concept": "concept_vector", "exterior": "exterior_vector"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_corpus, ray_local):
    directory = tmp_path_factory.mktemp("levels")
    manifest, images = tiny_corpus
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    pairs = [(manifest.parent / row["image"], row["captions"][0]) for row in rows]
    card, repository = tinymodel.build_hierarchical_repository(directory, pairs, max_batch_size=4)
    db = directory / "milvus" / "xmodal.db"
    try:
        with tinymodel.serving(repository) as server:
            report = IndexJob(manifest=manifest, triton_url=server.url, milvus_uri=str(db), batch_size=4,
                              progress=False).run()
            assert (report.rows_written, report.dead_letters) == (len(images), 0)
            captions = IndexJob(kind="caption", manifest=manifest, triton_url=server.url, milvus_uri=str(db),
                                progress=False).run()
            assert captions.rows_written == 2 * len(images)
            # A collection as an earlier xmodal filled it for this model: the fused vector only.
            milvus = store.connect(db)
            flat = dataclasses.replace(card, embeddings={"global": card.embeddings["global"]})
            store.create_collection(milvus, "global_only", flat, contract.IMAGE_KIND)
            milvus.close()
            yield {"card": card, "url": server.url, "db": db, "pairs": pairs, "images": images, "manifest": manifest,
                   "repository": repository}
    finally:
        store.release_local(db)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack["url"], stack["db"]) as client:
        yield client


def triton_outputs(url: str, model: str, input_name: str, items: list[bytes]) -> dict[str, np.ndarray]:
    """Every level straight from the ensemble, one request per item (no xmodal code in between)."""
    server = triton_http.InferenceServerClient(url)
    try:
        found = {level: [] for level in LEVELS}
        for item in items:
            data = np.array([[item]], dtype=object)
            request = triton_http.InferInput(input_name, [1, 1], "BYTES")
            request.set_data_from_numpy(data)
            result = server.infer(model, [request], outputs=[triton_http.InferRequestedOutput(n) for n in LEVELS])
            for level in LEVELS:
                found[level].append(result.as_numpy(level)[0])
        return {level: np.stack(vectors) for level, vectors in found.items()}
    finally:
        server.close()


def stored_rows(db, collection: str, key: str) -> list[dict]:
    milvus = store.connect(db)
    try:
        return milvus.query(collection, filter='id != ""', output_fields=[key, *FIELDS.values()], limit=100)
    finally:
        milvus.close()


def test_one_vector_field_per_level_with_the_cards_dims(stack):
    card = stack["card"]
    assert {level: spec["dim"] for level, spec in card.embeddings.items()} == {
        "global": 2 * tinymodel.DIM, "concept": tinymodel.DIM, "exterior": tinymodel.DIM}
    milvus = store.connect(stack["db"])
    try:
        for collection in ("xmodal_images", "xmodal_captions"):
            assert store.collection_vector_fields(milvus, collection) == {
                FIELDS[level]: card.embeddings[level]["dim"] for level in LEVELS}
            for field in FIELDS.values():
                index = milvus.describe_index(collection, field)
                assert (index["metric_type"], index["index_type"]) == ("IP", store.LITE_INDEX_TYPE)
    finally:
        milvus.close()


def test_each_field_holds_tritons_output_of_its_level(stack):
    rows = {row["image"]: row for row in stored_rows(stack["db"], "xmodal_images", "image")}
    images = [str(p) for p in stack["images"]]
    assert sorted(rows) == sorted(images)
    served = triton_outputs(stack["url"], "embed_image", "IMAGE", [open(p, "rb").read() for p in images])
    for level, field in FIELDS.items():
        stored = np.array([rows[p][field] for p in images], dtype=np.float32)
        assert np.array_equal(stored, served[level]), level

    rows = {row["caption"]: row for row in stored_rows(stack["db"], "xmodal_captions", "caption")}
    texts = sorted(rows)
    served = triton_outputs(stack["url"], "embed_text", "TEXT", [t.encode() for t in texts])
    for level, field in FIELDS.items():
        assert np.array_equal(np.array([rows[t][field] for t in texts], dtype=np.float32), served[level]), level


@pytest.mark.parametrize("weights", [{"concept": 0.5, "exterior": 0.5}, {"concept": 0.9, "exterior": 0.1},
                                     {"exterior": 1}, None])
def test_a_caption_finds_its_image_first(client, stack, weights):
    for image, caption in stack["pairs"]:
        hits = client.search_text(caption, k=2, level_weights=weights)
        assert hits[0].image == str(image), (caption, weights, hits)


def level_scores(db, query: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, float]:
    """The documented rule, by hand: Σ w·cos / Σ w over the stored level vectors of every row."""
    total = sum(weights.values())
    return {row["id"]: sum(w / total * float(np.dot(query[level], row[FIELDS[level]]))
                           for level, w in weights.items())
            for row in stored_rows(db, "xmodal_images", "id")}


@pytest.mark.parametrize("weights", [{"concept": 0.5, "exterior": 0.5}, {"concept": 3, "exterior": 1},
                                     {"concept": 0.2, "exterior": 0.8, "global": 1.0}])
def test_the_score_is_the_weighted_mean_of_the_levels_cosines(client, stack, weights):
    query = {level: v[0] for level, v in client.embed_text_levels("green rectangle").items()}
    expected = level_scores(stack["db"], query, weights)
    hits = client.search_text("green rectangle", k=len(expected), level_weights=weights)
    assert [hit.id for hit in hits] == sorted(expected, key=expected.get, reverse=True)
    assert [hit.score for hit in hits] == pytest.approx([expected[hit.id] for hit in hits], abs=1e-5)


def test_the_models_fusion_weights_give_the_global_fields_scores(client):
    """The served "global" is the levels fused with weights 0.5/0.5: <g(q), g(x)> = Σ 0.5 <q_l, x_l>."""
    fused = client.search_text("blue ellipse", k=6)
    weighted = client.search_text("blue ellipse", k=6, level_weights={"concept": 2, "exterior": 2})
    assert [h.id for h in weighted] == [h.id for h in fused]
    assert [h.score for h in weighted] == pytest.approx([h.score for h in fused], abs=1e-5)


def test_weight_zero_leaves_a_level_out(client, stack):
    """{concept: 1, exterior: 0} ranks exactly as a search of the concept field alone."""
    query = client.embed_text_levels("purple ellipse", ["concept"])["concept"]
    milvus = store.connect(stack["db"])
    try:
        alone = milvus.search("xmodal_images", data=query.tolist(), anns_field="concept_vector", limit=6,
                              search_params={"metric_type": "IP"})[0]
    finally:
        milvus.close()
    hits = client.search_text("purple ellipse", k=6, level_weights={"concept": 1, "exterior": 0})
    assert [h.id for h in hits] == [h["id"] for h in alone]
    assert [h.score for h in hits] == pytest.approx([h["distance"] for h in alone], abs=1e-6)


def test_images_vectors_captions_and_filters_take_level_weights(client, stack):
    weights = {"concept": 0.6, "exterior": 0.4}
    image = stack["images"][2]
    hits = client.search_image(image, k=3, level_weights=weights)
    assert hits[0].image == str(image) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    vectors = client.embed_image_levels(image)
    assert set(vectors) == set(LEVELS) and vectors["concept"].shape == (1, tinymodel.DIM)
    assert client.search_vector({level: v[0] for level, v in vectors.items()}, k=3, level_weights=weights) == hits
    assert client.search_vector(vectors, k=3, level_weights=weights) == [hits]
    captions = client.search_captions(image, k=3, level_weights=weights)
    assert captions == client.search_vector(vectors, k=3, level_weights=weights, collection="xmodal_captions")[0]
    assert len(captions) == 3 and all(len(hit.captions) == 1 for hit in captions)
    filtered = client.search_text("red ellipse", k=6, level_weights=weights, filter='concept in ["green", "blue"]')
    assert sorted(hit.concept for hit in filtered) == ["blue", "green"]
    with pytest.raises(ValueError, match="invalid filter"):
        client.search_text("red", level_weights=weights, filter="style = = 1")


@pytest.mark.parametrize("weights, message", [
    ({"colour": 1}, r"unknown level 'colour' in level_weights: model 'tiny-mthcn' has the levels "
                    r"'global', 'concept', 'exterior'"),
    ({"concept": 1, "Exterior": 1, "x": 0}, r"unknown levels 'Exterior', 'x'"),
    ({"concept": -0.5, "exterior": 1}, r"weight of level 'concept' must be a finite number >= 0, got -0.5"),
    ({"concept": math.nan}, r"weight of level 'concept' must be a finite number >= 0, got nan"),
    ({"concept": math.inf}, r"got inf"),
    ({"concept": True}, r"got True"),
    ({"concept": "0.5"}, r"got '0.5'"),
    ({"concept": 0, "exterior": 0.0}, r"level_weights are all 0"),
    ({}, r"non-empty mapping"),
    (["concept", "exterior"], r"non-empty mapping of level name to weight"),
])
def test_bad_level_weights_are_value_errors(client, weights, message):
    with pytest.raises(ValueError, match=message):
        client.search_text("red", level_weights=weights)


def test_search_vector_needs_a_vector_per_weighted_level(client):
    vectors = {level: v[0] for level, v in client.embed_text_levels("red").items()}
    weights = {"concept": 1, "exterior": 1}
    with pytest.raises(ValueError, match="vector must map each weighted level"):
        client.search_vector(vectors["global"], level_weights=weights)
    with pytest.raises(ValueError, match="weigh 'exterior' but vector has no such entry"):
        client.search_vector({"concept": vectors["concept"]}, level_weights=weights)
    with pytest.raises(ValueError, match="level 'concept': expected a vector of 8 values"):
        client.search_vector({"concept": vectors["global"], "exterior": vectors["exterior"]}, level_weights=weights)
    with pytest.raises(ValueError, match="need level_weights"):
        client.search_vector(vectors)
    with pytest.raises(ValueError, match="levels must be a non-empty list of the model's levels"):
        client.embed_text_levels("red", ["concept", "nope"])


def test_a_collection_without_level_fields_says_to_reindex(stack):
    with Client(stack["url"], stack["db"], "global_only") as client:
        assert client.search_text("red", k=1) == []  # the fused vector still searches (empty here)
        with pytest.raises(ValueError, match=r"no vector field 'concept_vector', 'exterior_vector'.*index again"):
            client.search_text("red", level_weights={"concept": 1, "exterior": 1})
    with pytest.raises(ValueError, match=r"'global_only' has no vector field 'concept_vector'"):
        IndexJob(manifest=stack["pairs"][0][0].parent.parent.parent / "manifest.jsonl", triton_url=stack["url"],
                 milvus_uri=str(stack["db"]), collection="global_only", limit=0, progress=False).run()


def test_async_client_gives_the_same_level_weighted_hits(client, stack):
    import asyncio

    weights = {"concept": 0.3, "exterior": 0.7}

    async def main():
        async with AsyncClient(stack["url"], stack["db"]) as aclient:
            texts = await asyncio.gather(*(aclient.search_text(c, k=3, level_weights=weights)
                                           for _, c in stack["pairs"][:3]))
            image = await aclient.search_image(stack["images"][1], k=3, level_weights=weights)
            captions = await aclient.search_captions(stack["images"][1], k=3, level_weights=weights)
            levels = await aclient.embed_image_levels(stack["images"][1])
            vector = await aclient.search_vector(levels, k=3, level_weights=weights)
            with pytest.raises(ValueError, match="unknown level 'colour'"):
                await aclient.search_text("red", level_weights={"colour": 1})
            return texts, image, captions, vector

    texts, image, captions, vector = asyncio.run(main())
    assert texts == [client.search_text(c, k=3, level_weights=weights) for _, c in stack["pairs"][:3]]
    assert image == client.search_image(stack["images"][1], k=3, level_weights=weights) == vector[0]
    assert captions == client.search_captions(stack["images"][1], k=3, level_weights=weights)


def test_cli_search_and_stats(stack, capsys):
    from xmodal import cli

    image, caption = stack["pairs"][4]
    common = ["--triton-url", stack["url"], "--milvus-uri", str(stack["db"])]
    assert cli.main(["search", caption, "-k", "2", "--json", "--level-weights", "concept=1, exterior=3", *common]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["image"] == str(image)
    for bad in ("concept", "concept=x", "concept=1,concept=2", "=1"):
        assert cli.main(["search", caption, "--level-weights", bad, *common]) == 1
        assert "--level-weights takes LEVEL=WEIGHT pairs" in capsys.readouterr().err
    assert cli.main(["search", caption, "--level-weights", "colour=1", *common]) == 1
    assert "unknown level 'colour'" in capsys.readouterr().err

    stats_command = ["index", "stats", "--json", "--milvus-uri", str(stack["db"]), "--collection", "xmodal_images"]
    assert cli.main(stats_command) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["vector_fields"] == {"global": 16, "concept_vector": 8, "exterior_vector": 8}


# -- xmodal index --local ----------------------------------------------------------------------

def rows_by_id(db, collection: str) -> dict[str, dict]:
    return {row["id"]: row for row in stored_rows(db, collection, "id")}


def test_local_indexing_gives_tritons_rows(stack, capsys, tmp_path):
    from xmodal import cli

    report = IndexJob(manifest=stack["manifest"], model_repository=stack["repository"], milvus_uri=str(stack["db"]),
                      collection="local_images", batch_size=4, progress=False).run()
    assert (report.rows_written, report.dead_letters) == (len(stack["images"]), 0)
    assert (report.model, report.fingerprint) == ("tiny-mthcn", stack["card"].fingerprint)
    assert cli.main(["index", "--local", "--model-repository", str(stack["repository"]), "--captions", "--json",
                     "--manifest", str(stack["manifest"]), "--milvus-uri", str(stack["db"]),
                     "--collection", "local_captions"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_written"] == 2 * len(stack["images"])
    for served, local in (("xmodal_images", "local_images"), ("xmodal_captions", "local_captions")):
        by_triton, in_process = rows_by_id(stack["db"], served), rows_by_id(stack["db"], local)
        assert sorted(in_process) == sorted(by_triton)
        for key, row in in_process.items():
            for field in FIELDS.values():
                assert np.abs(np.array(row[field]) - np.array(by_triton[key][field])).max() <= 1e-5, (local, field)

    with pytest.raises(ValueError, match="either triton_url .* or model_repository"):
        IndexJob(manifest=stack["manifest"], milvus_uri=str(stack["db"]), progress=False).run()
    with pytest.raises(ValueError, match="is not an xmodal model repository"):
        IndexJob(manifest=stack["manifest"], model_repository=tmp_path, milvus_uri=str(stack["db"]),
                 progress=False).run()
    assert cli.main(["index", "--model-repository", str(stack["repository"]), "--milvus-uri", str(stack["db"])]) == 1
    assert "--model-repository is for --local" in capsys.readouterr().err


def test_the_local_embedder_refuses_bad_items_one_by_one(stack):
    from xmodal.indexer.local import LocalEmbedder

    dims = {level: spec["dim"] for level, spec in stack["card"].embeddings.items()}
    good = stack["images"][0].read_bytes()
    out = LocalEmbedder(stack["repository"], "image", dims)(
        {"item": np.arange(3), "data": np.array([good, b"garbage", good], dtype=object),
         "error": np.array(["", "", ""], dtype=object)})
    assert "data" not in out and out["error"][0] == out["error"][2] == ""
    assert out["error"][1].startswith("local: not an image: ")
    assert not out["vector_concept"][1].any() and np.array_equal(out["vector_exterior"][0], out["vector_exterior"][2])
    served = triton_outputs(stack["url"], "embed_image", "IMAGE", [good])
    assert np.abs(out["vector"][0] - served["global"][0]).max() <= 1e-5

    texts = [b"red ellipse", b"  ", b"\xff\xfe", b"red ellipse"]
    out = LocalEmbedder(stack["repository"], "text", dims)(
        {"item": np.arange(4), "data": np.array(texts, dtype=object), "error": np.array([""] * 4, dtype=object)})
    assert list(out["error"]) == ["", "local: text is empty", out["error"][2], ""]
    assert out["error"][2].startswith("local: text is not valid UTF-8")
    served = triton_outputs(stack["url"], "embed_text", "TEXT", [texts[0]])
    for level in LEVELS:
        column = "vector" if level == "global" else f"vector_{level}"
        assert np.abs(out[column][3] - served[level][0]).max() <= 1e-5, level


def test_fuse_levels_counts_a_row_missing_from_a_levels_list_as_0():
    """The merge of the levels' hit lists (milvus-lite 2.5.1's hybrid search would squash the
    similarities through arctan even with norm_score=False, so the client merges them)."""
    from xmodal.client.searcher import fuse_levels

    concept = [{"id": "a", "distance": 0.9, "entity": {"image": "/a.png"}},
               {"id": "b", "distance": 0.5, "entity": {"image": "/b.png"}}]
    exterior = [{"id": "b", "distance": 0.8, "entity": {"image": "/b.png"}},
                {"id": "c", "distance": 0.7, "entity": {"image": "/c.png"}}]
    hits = fuse_levels([concept, exterior], [0.5, 0.5], 2, contract.IMAGE_KIND)
    assert [(h.id, h.image) for h in hits] == [("b", "/b.png"), ("a", "/a.png")]
    assert [h.score for h in hits] == pytest.approx([0.65, 0.45])
    assert [h.id for h in fuse_levels([concept, exterior], [0.5, 0.5], 10, contract.IMAGE_KIND)] == ["b", "a", "c"]
