"""xmodal.store against a real milvus-lite database and a real Milvus 2.3.5 server (no Triton, no Ray).

The tests that take ``client`` run on both backends; those that open databases of their own test
what only milvus-lite does (a database file one process holds)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pymilvus import DataType

from xmodal import contract, store
from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec

from conftest import MILVUS_BACKENDS, empty_server

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

DIM = 8


def card(fingerprint: str = "f00dfeedf00dfeed", name: str = "tiny") -> ModelCard:
    return ModelCard(
        name=name, version=3, fingerprint=fingerprint, embeddings={"global": {"dim": DIM}}, metric="IP",
        image=ImagePreprocessing(size=16, mean=[0.5] * 3, std=[0.25] * 3),
        tokenizer=TokenizerSpec(kind="wordlevel", file="tokenizer.json", vocab_hash="v", max_length=6),
        recipe="test")


@pytest.fixture(scope="module", params=MILVUS_BACKENDS)
def database(request, tmp_path_factory):
    """One database of each backend for the module: a milvus-lite file (each start of its server
    costs half a second: milvus-lite waits that long to see it stay up), or the session's Milvus
    server."""
    if request.param == "milvus-lite":
        db = tmp_path_factory.mktemp("store") / "test.db"
        client = store.connect(db)
        yield client
        client.close()
        store.release_local(db)
        return
    uri = request.getfixturevalue("milvus_server")
    empty_server(uri)
    client = store.connect(uri)
    yield client
    client.close()


@pytest.fixture
def client(database):
    """The module's database, empty for each test: the collections a test made are dropped after it."""
    assert database.list_collections() == []
    yield database
    for name in database.list_collections():
        database.drop_collection(name)


def count(client, name: str) -> int:
    """Rows in `name`, every write before seen (a server answers Bounded reads from a moment ago)."""
    return client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]


def test_connect_creates_parent_directories(tmp_path):
    db = tmp_path / "nested" / "dir" / "test.db"
    client = store.connect(db)
    try:
        assert (tmp_path / "nested" / "dir").is_dir()
        assert client.list_collections() == []
    finally:
        client.close()
        store.release_local(db)


def test_connect_rejects_a_path_without_db_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.db"):
        store.connect(tmp_path / "milvus")
    (tmp_path / "old.db").mkdir()  # what milvus-lite 3.x left
    with pytest.raises(ValueError, match=r"is a directory, a milvus-lite 3.x database"):
        store.connect(tmp_path / "old.db")


def test_uri_kinds():
    assert store.is_local_uri("xmodal-data/xmodal.db") and store.is_local_uri("/abs/x.db")
    assert not store.is_local_uri("http://127.0.0.1:19530") and not store.is_local_uri("https://milvus:443")


def test_image_collection_schema_and_model(client):
    assert store.ensure_collection(client, "images", card()) is True
    described = client.describe_collection("images")
    fields = {f["name"]: f for f in described["fields"]}
    assert set(fields) == {"id", "global", "image", "captions", "concept", "style", *contract.FILE_FIELDS, "paths"}
    assert fields["id"]["is_primary"] and fields["id"]["params"]["max_length"] == 64
    assert [fields[name]["type"] for name in contract.FILE_FIELDS] == [DataType.VARCHAR] * 2 + [DataType.INT64] * 4
    assert fields["global"]["params"]["dim"] == DIM
    index = client.describe_index("images", "global")
    index_type, params = store.default_index(client)  # IVF_FLAT on milvus-lite, HNSW on a server
    assert index["metric_type"] == "IP" and index["index_type"] == index_type
    assert {key: index[key] for key in params} == {key: str(value) for key, value in params.items()}
    assert store.collection_model(client, "images") == {
        "name": "tiny", "version": "3", "fingerprint": "f00dfeedf00dfeed", "dim": str(DIM), "metric": "IP",
        "kind": "image", "index": f'{{"type": "{index_type}", "params": {json.dumps(params)}}}'}
    # same model again: nothing to create, the check passes
    assert store.ensure_collection(client, "images", card()) is False


def hierarchical_card(fingerprint: str = "abcdabcdabcdabcd") -> ModelCard:
    return dataclasses.replace(card(fingerprint, "levels"), embeddings={
        "global": {"dim": 2 * DIM}, "concept": {"dim": DIM}, "exterior": {"dim": DIM + 4}})


@pytest.mark.parametrize("kind", ["image", "caption"])
def test_one_vector_field_per_level(client, kind):
    if not store.holds_several_vector_fields(client):
        with pytest.raises(ValueError) as raised:
            store.ensure_collection(client, "levels", hierarchical_card(), kind=contract.KINDS[kind])
        message = str(raised.value)
        assert "Milvus v2.3.5" in message and "one vector field per collection" in message
        assert "'levels' (global, concept, exterior)" in message and "milvus-lite" in message
        assert not client.has_collection("levels")
        return
    assert store.ensure_collection(client, "levels", hierarchical_card(), kind=contract.KINDS[kind])
    assert store.collection_vector_fields(client, "levels") == {
        "global": 2 * DIM, "concept_vector": DIM, "exterior_vector": DIM + 4}
    for field in ("global", "concept_vector", "exterior_vector"):
        index = client.describe_index("levels", field)
        assert (index["metric_type"], index["index_type"]) == ("IP", store.default_index(client)[0])
    scalar = {"image": {"image", "captions", "concept", "style", *contract.FILE_FIELDS, "paths"},
              "caption": {"caption", "concept", "style", "image"}}
    fields = {f["name"] for f in client.describe_collection("levels")["fields"]}
    assert fields == {"id", "global", "concept_vector", "exterior_vector"} | scalar[kind]
    assert store.ensure_collection(client, "levels", hierarchical_card(), kind=contract.KINDS[kind]) is False


def test_vector_field_names():
    assert [contract.vector_field(level) for level in ("global", "concept", "exterior")] == [
        "global", "concept_vector", "exterior_vector"]
    vectors = {"global": np.ones(2, dtype=np.float32), "concept": [0.5, 0.25]}
    assert store.vector_values(vectors) == {"global": [1.0, 1.0], "concept_vector": [0.5, 0.25]}


def test_a_collection_without_the_cards_level_fields_is_refused(client):
    """Filled by an earlier xmodal with the same hierarchical model: only the fused field."""
    levels = hierarchical_card()
    store.create_collection(client, "old", dataclasses.replace(levels, embeddings={"global": {"dim": 2 * DIM}}),
                            contract.IMAGE_KIND)
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
             "captions": contract.json_list([f"caption {i}", "second, with \"quotes\" and ünïcode"]), "concept": f"c{i}",
             "style": "s", **contract.NO_FILE} for i in range(4)]
    client.upsert("images", rows)
    client.upsert("images", rows[:2])
    assert count(client, "images") == 4
    found = client.search("images", data=[vectors[2].tolist()], limit=2, anns_field="global",
                          output_fields=contract.IMAGE_KIND.output_fields,
                          search_params=store.search_params(client, "images", "IP", 2))[0]
    assert found[0]["id"] == f"{2:032x}" and found[0]["distance"] == pytest.approx(1.0, abs=1e-5)
    assert contract.decode_string_list(found[0]["entity"]["captions"]) == rows[2]["captions"]["values"]


def test_search_params_follow_the_index_type(client):
    assert store.search_params(None, "c", "IP", 5, index="HNSW") == {"metric_type": "IP",
                                                                      "params": {"ef": store.DEFAULT_EF}}
    assert store.search_params(None, "c", "IP", 500, index="HNSW")["params"] == {"ef": 500}
    assert store.search_params(None, "c", "IP", 5, index="IVF_FLAT")["params"] == {"nprobe": store.DEFAULT_NPROBE}
    assert store.search_params(None, "c", "COSINE", 5, index="")["params"] == {}
    store.ensure_collection(client, "images", card())
    index_type = store.default_index(client)[0]
    assert store.index_type(client, "images") == index_type
    assert store.index_type(client, "no_such_collection") == ""
    assert store.search_params(client, "images", "IP", 5) == store.search_params(None, "images", "IP", 5,
                                                                                 index=index_type)


def test_default_index_is_ivf_flat_on_milvus_lite_and_hnsw_is_refused_clearly(client):
    if not store.is_lite_client(client):  # a server builds HNSW, the default there
        assert store.default_index(client) == ("HNSW", store.DEFAULT_INDEX_PARAMS)
        store.ensure_collection(client, "images", card(), index_type="IVF_PQ", index_params={"nlist": 16, "m": 4})
        assert store.index_type(client, "images") == "IVF_PQ"
        assert json.loads(store.collection_model(client, "images")["index"]) == {
            "type": "IVF_PQ", "params": {"nlist": 16, "m": 4}}
        return
    assert store.default_index(client) == ("IVF_FLAT", store.LITE_INDEX_PARAMS)
    with pytest.raises(ValueError, match=r"milvus-lite builds only FLAT, IVF_FLAT, AUTOINDEX indexes, not 'HNSW'"):
        store.ensure_collection(client, "images", card(), index_type="HNSW")
    assert not client.has_collection("images")
    store.ensure_collection(client, "flat", card(), index_type="FLAT")
    assert store.index_type(client, "flat") == "FLAT"


def test_search_through_the_default_index_is_exact_on_a_small_collection(client):
    """Tests check recall on tiny corpora through Milvus: the default index must find the exact
    top 10 at the sizes they use (milvus-lite searches a collection that small exhaustively,
    whatever its index: docs/query-benchmark.md, "What milvus-lite 2.5.1 searches")."""
    rng = np.random.default_rng(0)
    dim = 32
    big = dataclasses.replace(card(), embeddings={"global": {"dim": dim}})
    for n in (200, 2000):
        name = f"recall_{n}"
        store.ensure_collection(client, name, big)
        centres = rng.normal(size=(n // 20, dim))
        x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        store.upsert_rows(client, name, [{"id": f"{i:032x}", "global": v.tolist(), "image": "", "captions": contract.json_list([]),
                                          "concept": "", "style": "", **contract.NO_FILE}
                                         for i, v in enumerate(x)])
        client.flush(name)
        queries = x[rng.choice(n, 20, replace=False)] + 0.05 * rng.normal(size=(20, dim)).astype(np.float32)
        truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
        found = client.search(name, data=queries.tolist(), limit=10, anns_field="global",
                              search_params=store.search_params(client, name, "IP", 10))
        recall = np.mean([len({int(h["id"], 16) for h in hits} & set(t.tolist())) / 10
                          for hits, t in zip(found, truth)])
        assert recall >= 0.99, (n, recall)


def test_upserts_into_milvus_lite_are_cut_into_calls_it_takes_fast(client, monkeypatch):
    store.ensure_collection(client, "images", card())
    sizes = []
    real_upsert = client.upsert

    def counting(name, rows, **kwargs):
        sizes.append(len(rows))
        return real_upsert(name, rows, **kwargs)
    monkeypatch.setattr(client, "upsert", counting)
    vector = [1.0] + [0.0] * (DIM - 1)
    store.upsert_rows(client, "images", [{"id": f"{i:032x}", "global": vector, "image": "", "captions": contract.json_list([]),
                                          "concept": "", "style": "", **contract.NO_FILE} for i in range(12_000)])
    # one call to a server
    assert sizes == ([5000, 5000, 2000] if store.is_lite_client(client) else [12_000])
    assert count(client, "images") == 12_000
    # wider rows: at most 5,000 x 256 vector floats a call (three 256-d levels: 1,666 rows)
    assert store.lite_rows_per_call({"id": "x", "global": [0.5] * 256, "captions": ["a", "b"]}) == 5000
    assert store.lite_rows_per_call({"id": "x", "global": [0.5] * 256, "concept_vector": [0.5] * 256,
                                     "exterior_vector": [0.5] * 256}) == 1666
    assert store.lite_rows_per_call({"id": "x", "global": [0.5] * 8}) == 5000


def test_caption_collection(client):
    assert store.ensure_collection(client, "captions", card(), kind=contract.CAPTION_KIND)
    fields = {f["name"] for f in client.describe_collection("captions")["fields"]}
    assert fields == {"id", "global", "caption", "concept", "style", "image"}
    assert store.collection_model(client, "captions")["fingerprint"] == card().fingerprint
    # the collection records its kind: the client decodes its hits by it, never by its fields
    assert store.collection_model(client, "captions")["kind"] == "caption"
    assert store.collection_kind(client, "captions") is contract.CAPTION_KIND
    assert store.ensure_collection(client, "images", card())
    assert store.collection_kind(client, "images") is contract.IMAGE_KIND


def test_a_collection_made_before_kinds_were_recorded_has_the_kind_of_its_fields(client):
    for name, kind in (("old_images", contract.IMAGE_KIND), ("old_captions", contract.CAPTION_KIND)):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        for field in kind.fields:
            if field.added_later:
                continue
            if field.type == "json":
                schema.add_field(field.name, DataType.JSON)
            else:
                schema.add_field(field.name, DataType.VARCHAR, max_length=field.max_length, is_primary=field.primary)
        schema.add_field("global", DataType.FLOAT_VECTOR, dim=DIM)
        client.create_collection(name, schema=schema)
        assert "kind" not in store.collection_model(client, name)
        assert store.collection_kind(client, name) is kind


def test_rows_do_not_go_into_a_collection_made_before_the_file_fields(client):
    older = dataclasses.replace(contract.IMAGE_KIND, fields=tuple(
        field for field in contract.IMAGE_KIND.fields if not field.added_later))
    store.create_collection(client, "before_file_fields", card(), older)
    with pytest.raises(ValueError, match=r"'before_file_fields' was made by an earlier xmodal: it has no field "
                                         r"relative_path, folder, size, mtime, width, height, paths.*xmodal index delete"):
        store.ensure_collection(client, "before_file_fields", card())


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


def test_the_model_record_survives_a_reopen_on_milvus_lite(tmp_path):
    """milvus-lite 2.5.1 keeps no collection properties: the record lives in the metadata
    collection, and after the server is stopped and started again it still refuses another
    model's card."""
    db = tmp_path / "reopen.db"
    client = store.connect(db)
    try:
        store.ensure_collection(client, "images", card("aaaa000000000000", "first"))
        assert client.describe_collection("images").get("properties") in ({}, None)  # why the record is needed
        assert store.list_collections(client) == ["images"]  # the metadata collection is not listed
    finally:
        client.close()
        store.release_local(db)
    client = store.connect(db)
    try:
        assert store.collection_model(client, "images") == {
            "name": "first", "version": "3", "fingerprint": "aaaa000000000000", "dim": str(DIM), "metric": "IP",
            "kind": "image", "index": '{"type": "IVF_FLAT", "params": {"nlist": 1024}}'}
        with pytest.raises(ValueError) as raised:
            store.check_collection_model(client, "images", card("bbbb111111111111", "second"))
        assert "'first'" in str(raised.value) and "bbbb111111111111" in str(raised.value)
        with pytest.raises(ValueError, match="'second'"):
            store.ensure_collection(client, "images", card("bbbb111111111111", "second"))
        assert store.ensure_collection(client, "images", card("aaaa000000000000", "first")) is False
    finally:
        client.close()
        store.release_local(db)


def test_delete_drops_the_record(tmp_path):
    from xmodal.indexer.manage import delete_collection

    db = tmp_path / "delete.db"
    client = store.connect(db)
    try:
        store.ensure_collection(client, "images", card("aaaa000000000000", "first"))
        store.ensure_collection(client, "captions", card("aaaa000000000000", "first"), kind=contract.CAPTION_KIND)
        assert delete_collection(str(db), "images") == ["collection 'images'"]
        assert not client.has_collection("images")
        assert client.get(store.MODELS_COLLECTION, ids=["images"]) == []
        assert store.collection_model(client, "captions")["fingerprint"] == "aaaa000000000000"  # the other stays
        # the name is free for another model, whose record is the one read back
        assert store.ensure_collection(client, "images", card("bbbb111111111111", "second")) is True
        assert store.collection_model(client, "images")["name"] == "second"
        assert store.drop_collection(client, "images") is True and store.drop_collection(client, "images") is False
        assert client.get(store.MODELS_COLLECTION, ids=["images"]) == []
        with pytest.raises(ValueError, match=r"nothing to delete: collection 'images' does not exist "
                                             r"\(existing collections: 'captions'\)"):
            delete_collection(str(db), "images")
    finally:
        client.close()
        store.release_local(db)


def test_a_record_outliving_its_collection_is_not_believed(client):
    """A collection dropped outside xmodal and made again by something else under the same
    name: the record names other vector fields, so the collection has no recorded model."""
    store.ensure_collection(client, "images", card("aaaa000000000000", "first"))
    client.drop_collection("images")
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, max_length=64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_collection("images", schema=schema, index_params=index)
    assert store.collection_model(client, "images") == {}
    with pytest.raises(ValueError, match="'<unknown>'"):
        store.check_collection_model(client, "images", card("aaaa000000000000", "first"))


def test_the_metadata_collection_names_are_reserved(client):
    for name in (store.MODELS_COLLECTION, store.BOOKS_COLLECTION, "images" + store.SIDES_SUFFIX):
        with pytest.raises(ValueError, match=f"'{name}' is a name xmodal keeps for its own records"):
            store.ensure_collection(client, name, card())
    store.ensure_collection(client, "images", card())
    with pytest.raises(ValueError, match="does not exist"):
        store.collection_model(client, store.MODELS_COLLECTION)


def test_one_process_at_a_time_until_released(tmp_path):
    """milvus-lite 2.5.1's server holds the database until this process exits or releases it."""
    db = tmp_path / "locked.db"
    probe = textwrap.dedent(f"""
        from xmodal import store
        try:
            store.connect({str(db)!r}).close()
        except ConnectionError as exc:
            print(exc)
            raise SystemExit(3)
    """)
    client = store.connect(db)
    client.close()
    held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert held.returncode == 3, held.stdout + held.stderr
    assert "milvus-lite allows one process at a time" in held.stdout
    store.release_local(db)
    released = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert released.returncode == 0, released.stdout + released.stderr
    store.release_local(db)  # not opened here any more: nothing to do, no error
    store.release_local("http://127.0.0.1:19530")
