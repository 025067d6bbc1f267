"""xmodal.store against a real milvus-lite database in tmp_path (no Triton, no Ray)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xmodal import store
from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec

pytestmark = pytest.mark.timeout(120)

DIM = 8


def card(fingerprint: str = "f00dfeedf00dfeed", name: str = "tiny") -> ModelCard:
    return ModelCard(
        name=name, version=3, fingerprint=fingerprint, embeddings={"global": {"dim": DIM}}, metric="IP",
        image=ImagePreprocessing(size=16, mean=[0.5] * 3, std=[0.25] * 3),
        tokenizer=TokenizerSpec(kind="wordlevel", file="tokenizer.json", vocab_hash="v", max_length=6),
        recipe="test")


@pytest.fixture
def client(tmp_path):
    db = tmp_path / "nested" / "dir" / "test.db"
    client = store.connect(db)
    yield client
    client.close()
    store.release_local(db)


def test_connect_creates_parent_directories(tmp_path, client):
    assert (tmp_path / "nested" / "dir").is_dir()
    assert client.list_collections() == []


def test_connect_rejects_a_path_without_db_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.db"):
        store.connect(tmp_path / "milvus")


def test_uri_kinds():
    assert store.is_local_uri("xmodal-data/xmodal.db") and store.is_local_uri("/abs/x.db")
    assert not store.is_local_uri("http://127.0.0.1:19530") and not store.is_local_uri("https://milvus:443")


def test_image_collection_schema_and_model(client):
    assert store.ensure_collection(client, "images", card()) is True
    described = client.describe_collection("images")
    fields = {f["name"]: f for f in described["fields"]}
    assert set(fields) == {"id", "global", "image", "captions", "concept", "style"}
    assert fields["id"]["is_primary"] and fields["id"]["params"]["max_length"] == 64
    assert fields["global"]["params"]["dim"] == DIM
    index = client.describe_index("images", "global")
    assert index["metric_type"] == "IP" and index["index_type"] == store.DEFAULT_INDEX_TYPE
    assert store.collection_model(client, "images") == {
        "name": "tiny", "version": "3", "fingerprint": "f00dfeedf00dfeed", "dim": str(DIM), "metric": "IP"}
    # same model again: nothing to create, the check passes
    assert store.ensure_collection(client, "images", card()) is False


def hierarchical_card(fingerprint: str = "abcdabcdabcdabcd") -> ModelCard:
    return dataclasses.replace(card(fingerprint, "levels"), embeddings={
        "global": {"dim": 2 * DIM}, "concept": {"dim": DIM}, "exterior": {"dim": DIM + 4}})


@pytest.mark.parametrize("kind", ["image", "caption"])
def test_one_vector_field_per_level(client, kind):
    assert store.ensure_collection(client, "levels", hierarchical_card(), kind=kind)
    assert store.collection_vector_fields(client, "levels") == {
        "global": 2 * DIM, "concept_vector": DIM, "exterior_vector": DIM + 4}
    for field in ("global", "concept_vector", "exterior_vector"):
        index = client.describe_index("levels", field)
        assert (index["metric_type"], index["index_type"]) == ("IP", store.DEFAULT_INDEX_TYPE)
    scalar = {"image": {"image", "captions", "concept", "style"}, "caption": {"caption", "concept", "style", "image"}}
    fields = {f["name"] for f in client.describe_collection("levels")["fields"]}
    assert fields == {"id", "global", "concept_vector", "exterior_vector"} | scalar[kind]
    assert store.ensure_collection(client, "levels", hierarchical_card(), kind=kind) is False


def test_vector_field_names():
    assert [store.vector_field(level) for level in ("global", "concept", "exterior")] == [
        "global", "concept_vector", "exterior_vector"]
    vectors = {"global": np.ones(2, dtype=np.float32), "concept": [0.5, 0.25]}
    assert store.vector_values(vectors) == {"global": [1.0, 1.0], "concept_vector": [0.5, 0.25]}


def test_a_collection_without_the_cards_level_fields_is_refused(client):
    """Filled by an earlier xmodal with the same hierarchical model: only the fused field."""
    levels = hierarchical_card()
    store.create_image_collection(client, "old", dataclasses.replace(levels, embeddings={"global": {"dim": 2 * DIM}}))
    with pytest.raises(ValueError) as raised:
        store.ensure_collection(client, "old", levels)
    message = str(raised.value)
    assert "'old' has no vector field 'concept_vector', 'exterior_vector'" in message
    assert "(its vector fields: global)" in message and "xmodal index delete" in message


def test_another_model_is_refused_naming_both(client):
    store.ensure_collection(client, "images", card("aaaa000000000000", "first"))
    with pytest.raises(ValueError) as raised:
        store.ensure_collection(client, "images", card("bbbb111111111111", "second"))
    message = str(raised.value)
    for part in ("'images'", "'first'", "aaaa000000000000", "'second'", "bbbb111111111111"):
        assert part in message


def test_missing_collection_lists_existing(client):
    store.ensure_collection(client, "images", card())
    with pytest.raises(ValueError, match=r"'nope' does not exist \(existing collections: 'images'\)"):
        store.collection_model(client, "nope")


def test_upsert_is_idempotent_and_captions_round_trip(client):
    store.ensure_collection(client, "images", card())
    vectors = np.eye(DIM, dtype=np.float32)
    rows = [{"id": f"{i:032x}", "global": vectors[i].tolist(), "image": f"/img/{i}.png",
             "captions": [f"caption {i}", "second, with \"quotes\" and ünïcode"], "concept": f"c{i}",
             "style": "s"} for i in range(4)]
    client.upsert("images", rows)
    client.upsert("images", rows[:2])
    assert client.query("images", filter="", output_fields=["count(*)"])[0]["count(*)"] == 4
    found = client.search("images", data=[vectors[2].tolist()], limit=2, anns_field="global",
                          output_fields=store.IMAGE_OUTPUT_FIELDS,
                          search_params=store.search_params(client, "images", "IP", 2))[0]
    assert found[0]["id"] == f"{2:032x}" and found[0]["distance"] == pytest.approx(1.0, abs=1e-5)
    assert store.decode_captions(found[0]["entity"]["captions"]) == rows[2]["captions"]


def test_search_params_follow_the_index_type(client):
    assert store.search_params(None, "c", "IP", 5, index="HNSW") == {"metric_type": "IP",
                                                                      "params": {"ef": store.DEFAULT_EF}}
    assert store.search_params(None, "c", "IP", 500, index="HNSW")["params"] == {"ef": 500}
    assert store.search_params(None, "c", "IP", 5, index="IVF_FLAT")["params"] == {"nprobe": store.DEFAULT_NPROBE}
    assert store.search_params(None, "c", "COSINE", 5, index="")["params"] == {}
    store.ensure_collection(client, "images", card())
    assert store.index_type(client, "images") == store.DEFAULT_INDEX_TYPE
    assert store.index_type(client, "no_such_collection") == ""
    assert store.search_params(client, "images", "IP", 5) == store.search_params(None, "images", "IP", 5, index="HNSW")


def test_caption_collection(client):
    assert store.ensure_collection(client, "captions", card(), kind="caption")
    fields = {f["name"] for f in client.describe_collection("captions")["fields"]}
    assert fields == {"id", "global", "caption", "concept", "style", "image"}
    assert store.collection_model(client, "captions")["fingerprint"] == card().fingerprint


def test_model_persists_across_processes(tmp_path):
    """Another process creates the collection and exits; this one reads the model back."""
    db = tmp_path / "persist.db"
    script = textwrap.dedent(f"""
        from xmodal import store
        from xmodal.card import ModelCard
        card = ModelCard.from_json({card('cafe0000cafe0000', 'persisted').to_json()!r})
        client = store.connect({str(db)!r})
        store.ensure_collection(client, "images", card)
        client.close()
        store.release_local({str(db)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    client = store.connect(db)
    try:
        model = store.collection_model(client, "images")
        assert (model["name"], model["fingerprint"]) == ("persisted", "cafe0000cafe0000")
        store.ensure_loaded(client, "images")  # milvus-lite reopens collections released
        assert client.get_load_state("images")["state"].name == "Loaded"
    finally:
        client.close()
        store.release_local(db)
