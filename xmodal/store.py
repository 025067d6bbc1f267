"""Milvus access shared by the indexer and the client: connect, create, check the model.

pymilvus only (the client imports this module; no torch, no ray). A URI is either a local
path ending in ``.db`` (milvus-lite 2.5.1: its C++ server runs as a child process on a unix
socket and keeps the database in that file) or ``http(s)://host:port`` (a Milvus server,
optionally with a token).

The model that filled a collection travels with it in two places, read in this order:

1. collection *properties* (``xmodal.model``, ``xmodal.fingerprint``, ...), given to
   ``create_collection(properties=...)``: a Milvus server keeps them;
2. a row in the metadata collection ``xmodal_models`` of the same database (primary key:
   the collection's name; the record as JSON), written only when the properties did not
   stick: milvus-lite 2.5.1 keeps no properties and no description (``describe_collection``
   returns ``properties {}``, ``alter_collection_properties`` is UNIMPLEMENTED).

The directories (or filesystem URIs) a collection's rows name images under travel the same
way (``xmodal.image_roots``, ``record_image_roots``): the indexer adds its input's before it
writes a row, and the web page serves no file outside them.

``drop_collection`` drops a collection and its record; ``ensure_collection`` overwrites the
record of a collection it creates. The metadata collections (``xmodal_models``, the indexing
runs' books ``xmodal_books``, and each collection's re-ranker sides ``<collection>__sides`` on a
server) are hidden from the collection lists xmodal prints, and no data collection may take
their names.
"""
from __future__ import annotations

import json
import re
import warnings
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from xmodal import contract
from xmodal.card import ModelCard
from xmodal.contract import GLOBAL, CollectionKind, vector_field
from xmodal.files import ImageRoots, is_uri

# Collection properties (all values are strings in Milvus).
MODEL_KEY = "xmodal.model"
VERSION_KEY = "xmodal.model_version"
FINGERPRINT_KEY = "xmodal.fingerprint"
DIM_KEY = "xmodal.dim"
METRIC_KEY = "xmodal.metric"
KIND_KEY = "xmodal.kind"  # the collection kind: contract.KINDS
INDEX_KEY = "xmodal.index"  # the vector index it was made with: {"type": ..., "params": {...}} as JSON
# The directories (or filesystem URIs) its rows name images under, as a JSON list: the web page
# serves no file outside them (``record_image_roots``)
IMAGE_ROOTS_KEY = "xmodal.image_roots"

# The index each vector field gets when the caller names none (``default_index``):
# - a Milvus server: HNSW, which benchmarks/query.py measures on a server (docs/scale-out.md,
#   docs/query-benchmark.md); `ef` at search time is max(DEFAULT_EF, k);
# - milvus-lite 2.5.1 takes only FLAT, IVF_FLAT and AUTOINDEX ("local mode only support FLAT
#   IVF_FLAT AUTOINDEX") and builds none of them as asked: a collection is one growing segment
#   it never seals (flush does nothing), searched exhaustively until the segment reaches a row
#   count milvus-lite fixes, then through segcore's interim IVF_FLAT_CC index with segcore's own
#   list and probe counts: the nlist asked for and the nprobe a search sends are not used.
#   AUTOINDEX gets the same; FLAT is searched exhaustively at every size. describe_index reports
#   any of them Finished with no row counts. IVF_FLAT stays the default so that a large
#   collection gets that index (exhaustive search slows with the rows and was slower than
#   numpy's exact search); its recall is the data's: full on clustered vectors, far below the
#   target on random ones (benchmarks/store_index.py, docs/query-benchmark.md "What milvus-lite
#   2.5.1 searches"). `--index-type FLAT` asks for exact search.
DEFAULT_INDEX_TYPE = "HNSW"
DEFAULT_INDEX_PARAMS = {"M": 16, "efConstruction": 200}
DEFAULT_EF = 64
LITE_INDEX_TYPE = "IVF_FLAT"
LITE_INDEX_PARAMS = {"nlist": 1024}
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX")
# The parameters an index type gets when the caller names the type but no parameters.
INDEX_PARAMS = {DEFAULT_INDEX_TYPE: DEFAULT_INDEX_PARAMS, LITE_INDEX_TYPE: LITE_INDEX_PARAMS}
# IVF indexes: the lists probed per search; benchmarks/query.py measures recall@10 and
# latency against it. milvus-lite 2.5.1 replaces it with its interim index's own (above).
DEFAULT_NPROBE = 16
# Rows per insert/upsert call into milvus-lite 2.5.1 (``upsert_rows``). Through pymilvus 3.0.2
# a call slows down out of all proportion once it carries more than a few MB of vectors, by
# rows and by floats alike (three 256-d levels a row count as 768 floats). So a call holds at
# most 5,000 rows and at most 5,000 x 256 vector floats, a size that stays fast.
LITE_MAX_ROWS_PER_CALL = 5000
LITE_MAX_FLOATS_PER_CALL = 5000 * 256

# The metadata collection that records each collection's model where properties are not kept.
MODELS_COLLECTION = "xmodal_models"
# The fields of a metadata collection (``ensure_record_collection``).
RECORD_KEY = "collection"  # the key: the collection's name in xmodal_models, which came first
RECORD_TEXT = "record"
RECORD_VECTOR = "unused_vector"  # every Milvus collection needs a vector field
_MODELS_RECORD_MAX_LENGTH = 8192
_MODELS_NAME_MAX_LENGTH = 256  # Milvus collection names are at most 255 characters
# The metadata collection of the indexing runs against a server (``xmodal.indexer.state``):
# each collection's progress and dead letters, keyed by ``<what>/<collection>[/<item>]``.
BOOKS_COLLECTION = "xmodal_books"
BOOKS_KEY_MAX_LENGTH = 512
BOOKS_RECORD_MAX_LENGTH = 65535  # Milvus's longest VARCHAR
# A collection's re-ranker sides on a server (``xmodal.sidestore``): ``<collection>__sides``.
SIDES_SUFFIX = "__sides"

# Clients that `connect` opened on a milvus-lite database (see `is_lite_client`).
_lite_clients: weakref.WeakSet = weakref.WeakSet()
# The unix socket milvus-lite's server manager starts: "unix:/tmp/tmpXXXX_<name>.db.sock".
_LITE_ADDRESS = re.compile(r"^unix:.*\.db\.sock$")


def is_metadata_collection(name: str) -> bool:
    """A collection xmodal keeps for itself: never listed, created or dropped as data."""
    return name in (MODELS_COLLECTION, BOOKS_COLLECTION) or name.endswith(SIDES_SUFFIX)


def is_local_uri(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme.lower() not in ("http", "https", "tcp", "grpc", "unix")


def connect(uri: str | Path, *, token: str | None = None, timeout: float | None = None) -> MilvusClient:
    """A `MilvusClient` for a milvus-lite path (parent directories are created) or a server URL.

    milvus-lite 2.5.1 runs its server as a child process that holds a lock on the database:
    a second process cannot open the same path until this one exits or calls
    ``release_local`` (closing the clients is not enough).
    """
    uri = str(uri)
    if is_local_uri(uri):
        path = Path(uri).expanduser()
        if path.suffix != ".db":
            raise ValueError(f"a milvus-lite database path must end in .db, got {uri!r}")
        if path.is_dir():  # milvus-lite 3.x kept a database as a directory; 2.5.1 keeps one file
            raise ValueError(f"{path} is a directory, a milvus-lite 3.x database, which milvus-lite 2.5.1 "
                             "cannot open: index into another path (or delete it and index again)")
        path.parent.mkdir(parents=True, exist_ok=True)
        _import_milvus_lite()
        try:
            client = MilvusClient(uri=str(path.resolve()), timeout=timeout)
        except MilvusException as exc:
            raise ConnectionError(
                f"cannot open the milvus-lite database {path}: {exc.message}. milvus-lite allows one "
                "process at a time: stop the other process using it (an `xmodal index` run, a web "
                "server, a notebook) or use a Milvus server URI"
            ) from exc
        except RuntimeError as exc:  # milvus-lite refuses some file names (characters, length)
            raise ValueError(f"cannot open the milvus-lite database {path}: {exc}") from exc
        _lite_clients.add(client)
        return client
    kwargs: dict[str, Any] = {"uri": uri, "timeout": timeout}
    if token:
        kwargs["token"] = token
    try:
        return MilvusClient(**kwargs)
    except Exception as exc:  # pymilvus raises MilvusException subclasses for refused connections
        raise ConnectionError(f"cannot reach Milvus at {uri}: {exc}") from exc


def _import_milvus_lite() -> None:
    """Import milvus-lite once, without its warning: 2.5.1 imports ``pkg_resources`` (hence the
    ``setuptools<81`` pin), which warns that it is deprecated on every command."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import milvus_lite  # noqa: F401


def is_lite_client(client: MilvusClient) -> bool:
    """Whether `client` talks to milvus-lite: opened by `connect` on a .db path, or (a client
    made elsewhere) connected to the unix socket milvus-lite's server manager starts."""
    if client in _lite_clients:
        return True
    address = getattr(getattr(client, "_config", None), "address", "")
    return isinstance(address, str) and bool(_LITE_ADDRESS.match(address))


def default_index(client: MilvusClient) -> tuple[str, dict[str, Any]]:
    """(index type, parameters) for vector fields when none is named: IVF_FLAT on milvus-lite,
    HNSW on a Milvus server."""
    if is_lite_client(client):
        return LITE_INDEX_TYPE, dict(LITE_INDEX_PARAMS)
    return DEFAULT_INDEX_TYPE, dict(DEFAULT_INDEX_PARAMS)


def lite_rows_per_call(row: dict[str, Any]) -> int:
    """Rows of `row`'s shape that one upsert into milvus-lite may carry: at most
    LITE_MAX_ROWS_PER_CALL, and at most LITE_MAX_FLOATS_PER_CALL floats of vectors."""
    floats = sum(len(value) for value in row.values()
                 if isinstance(value, (list, tuple)) and value and isinstance(value[0], float))
    return max(1, min(LITE_MAX_ROWS_PER_CALL, LITE_MAX_FLOATS_PER_CALL // max(1, floats)))


def upsert_rows(client: MilvusClient, name: str, rows: list[dict[str, Any]], *, timeout: float | None = None) -> None:
    """Upsert `rows`: on milvus-lite in calls of at most ``lite_rows_per_call`` rows (larger
    calls slow down pathologically there), on a Milvus server in one call."""
    if not rows:
        return
    step = lite_rows_per_call(rows[0]) if is_lite_client(client) else len(rows)
    kwargs = {} if timeout is None else {"timeout": timeout}
    for start in range(0, len(rows), step):
        client.upsert(name, rows[start:start + step], **kwargs)


def card_levels(card: ModelCard) -> list[str]:
    """The card's embedding levels, "global" first, then the others by name."""
    return sorted(card.embeddings, key=lambda level: (level != GLOBAL, level))


def vector_fields(card: ModelCard) -> dict[str, int]:
    """Vector field -> dim, one per entry of the card's embeddings, "global" first."""
    return {vector_field(level): int(card.embeddings[level]["dim"]) for level in card_levels(card)}


def vector_values(vectors: dict[str, Any]) -> dict[str, list[float]]:
    """A row's vector fields from its embeddings by level (numpy arrays or lists)."""
    return {vector_field(level): vector.tolist() if hasattr(vector, "tolist") else list(vector)
            for level, vector in vectors.items()}


def card_properties(card: ModelCard, kind: CollectionKind, index: tuple[str, dict[str, Any]]) -> dict[str, str]:
    index_type, params = index
    return {
        MODEL_KEY: card.name,
        VERSION_KEY: str(card.version),
        FINGERPRINT_KEY: card.fingerprint,
        DIM_KEY: str(card.dim),
        METRIC_KEY: card.metric,
        KIND_KEY: kind.name,
        INDEX_KEY: json.dumps({"type": index_type, "params": params}),
    }


def server_version(client: MilvusClient) -> tuple[int, int] | None:
    """(major, minor) of the Milvus server behind `client`; None for milvus-lite or an answer
    that is not a version."""
    if is_lite_client(client):
        return None
    match = re.match(r"v?(\d+)\.(\d+)", str(client.get_server_version()))
    return (int(match.group(1)), int(match.group(2))) if match else None


def holds_several_vector_fields(client: MilvusClient) -> bool:
    """Whether a collection may hold several vector fields there: milvus-lite 2.5 and Milvus
    2.4+ do; Milvus 2.3 holds one per collection."""
    version = server_version(client)
    return version is None or version >= (2, 4)


def _check_levels_fit(client: MilvusClient, name: str, card: ModelCard) -> None:
    """A model of several levels needs a vector field each: ValueError on a server that holds
    one per collection, naming the limit and the ways out."""
    if len(card.embeddings) > 1 and not holds_several_vector_fields(client):
        raise ValueError(
            f"Milvus {client.get_server_version()} holds one vector field per collection, and model "
            f"{describe_model(card)} embeds each item at {len(card.embeddings)} levels, stored in one vector "
            f"field each in collection {name!r} ({', '.join(card_levels(card))}): index it into milvus-lite "
            "(a .db path) or a Milvus 2.4+ server, or serve a single-level model (every recipe but mthcn)")


def _varchar(schema, name: str, max_length: int, **kwargs) -> None:
    schema.add_field(name, DataType.VARCHAR, max_length=max_length, **kwargs)


def _add_vector_fields(schema, card: ModelCard, scalar_fields: tuple[str, ...]) -> None:
    for field, dim in vector_fields(card).items():
        if field in scalar_fields or not field.isidentifier():
            raise ValueError(f"the card of {describe_model(card)} names an embedding whose field {field!r} "
                             f"cannot be a Milvus vector field here (scalar fields: {', '.join(scalar_fields)})")
        schema.add_field(field, DataType.FLOAT_VECTOR, dim=dim)


def _index_choice(client: MilvusClient, index_type: str | None,
                  index_params: dict | None) -> tuple[str, dict[str, Any]]:
    if index_type is None:
        kind, params = default_index(client)
        return kind, dict(index_params) if index_params is not None else params
    kind = index_type.upper()
    if is_lite_client(client) and kind not in LITE_INDEX_TYPES:
        raise ValueError(f"milvus-lite builds only {', '.join(LITE_INDEX_TYPES)} indexes, not {index_type!r}; "
                         f"use one of those or a Milvus server URI")
    params = index_params if index_params is not None else INDEX_PARAMS.get(kind, {})
    return kind, dict(params)


def create_collection(client: MilvusClient, name: str, card: ModelCard, kind: CollectionKind, *,
                      index_type: str | None = None, index_params: dict | None = None) -> None:
    """Create a collection of `kind` (its scalar fields: ``xmodal.contract``) with a vector field
    per level of `card`, and record the card's model and the kind with it.

    `index_type` None: ``default_index`` (IVF_FLAT on milvus-lite, HNSW on a server)."""
    if is_metadata_collection(name):
        raise ValueError(f"{name!r} is a name xmodal keeps for its own records ({MODELS_COLLECTION}, "
                         f"{BOOKS_COLLECTION}, *{SIDES_SUFFIX}): choose another collection name")
    _check_levels_fit(client, name, card)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    for field in kind.fields:
        if field.type == "json":
            schema.add_field(field.name, DataType.JSON)
        elif field.type == "int64":
            schema.add_field(field.name, DataType.INT64)
        else:
            _varchar(schema, field.name, field.max_length, is_primary=field.primary)
    _add_vector_fields(schema, card, kind.field_names)
    index_kind, params = _index_choice(client, index_type, index_params)
    index = client.prepare_index_params()
    for field in vector_fields(card):
        index.add_index(field, index_type=index_kind, metric_type=card.metric, params=dict(params))
    properties = card_properties(card, kind, (index_kind, params))
    client.create_collection(
        name, schema=schema, index_params=index, description=kind.description, properties=properties,
    )
    kept = client.describe_collection(name).get("properties") or {}
    if kept.get(FINGERPRINT_KEY) == card.fingerprint:
        _forget_model(client, name)  # a record left from a collection of that name dropped elsewhere
    else:  # milvus-lite: no properties; the record goes to the metadata collection
        _record_model(client, name, properties, vector_fields(card))


_RECORD_KEYS = {MODEL_KEY: "name", VERSION_KEY: "version", FINGERPRINT_KEY: "fingerprint",
                DIM_KEY: "dim", METRIC_KEY: "metric", KIND_KEY: "kind", INDEX_KEY: "index"}


def collection_model(client: MilvusClient, name: str) -> dict[str, str]:
    """The model recorded with a collection: {"name", "version", "fingerprint", "dim", "metric",
    "kind", "index"} ("index": the vector index it was made with, as JSON).

    From the collection's properties (a Milvus server), else from its row in the metadata
    collection (milvus-lite). Values missing from both (a collection not made by xmodal)
    are absent from the dict.
    """
    if is_metadata_collection(name) or not client.has_collection(name):
        raise ValueError(missing_collection_message(client, name))
    described = client.describe_collection(name)
    properties = described.get("properties") or {}
    if FINGERPRINT_KEY not in properties:
        properties = _recorded_model(client, name, described) or properties
    return {short: str(properties[key]) for key, short in _RECORD_KEYS.items() if key in properties}


def collection_kind(client: MilvusClient, name: str) -> CollectionKind:
    """The kind recorded with collection `name`. A collection made before xmodal recorded kinds
    has none: its kind is the one whose scalar fields it has."""
    recorded = collection_model(client, name).get("kind")
    if recorded:
        return contract.collection_kind(recorded)
    present = {f["name"] for f in client.describe_collection(name)["fields"]}
    for kind in contract.KINDS.values():
        if set(kind.first_field_names) <= present:
            return kind
    raise ValueError(f"collection {name!r} was not made by xmodal: it has none of its kinds' fields "
                     f"(it has {', '.join(sorted(present))})")


def _described_vector_fields(described: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: int(f["params"]["dim"]) for f in described["fields"] if f["type"] == DataType.FLOAT_VECTOR}


def ensure_record_collection(client: MilvusClient, name: str, *, description: str, key_max_length: int,
                             record_max_length: int) -> None:
    """A metadata collection of text records by text key (``RECORD_KEY``, ``RECORD_TEXT``), loaded."""
    index = client.prepare_index_params()
    index.add_index(RECORD_VECTOR, index_type="FLAT", metric_type="L2")
    if not client.has_collection(name):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
        _varchar(schema, RECORD_KEY, key_max_length, is_primary=True)
        _varchar(schema, RECORD_TEXT, record_max_length)
        schema.add_field(RECORD_VECTOR, DataType.FLOAT_VECTOR, dim=2)
        client.create_collection(name, schema=schema, index_params=index)
    elif not client.list_indexes(name):
        # Another process (another machine's run) created it and has not built its index yet, or
        # died before it did: a collection without an index cannot load. The same index twice is
        # accepted.
        client.create_index(name, index)
    ensure_loaded(client, name)


def record_rows(records: dict[str, str]) -> list[dict[str, Any]]:
    """Rows of a metadata collection for `records` (key -> text)."""
    return [{RECORD_KEY: key, RECORD_TEXT: text, RECORD_VECTOR: [0.0, 0.0]} for key, text in records.items()]


def _ensure_models_collection(client: MilvusClient) -> None:
    ensure_record_collection(client, MODELS_COLLECTION, description="xmodal: the model of each collection",
                             key_max_length=_MODELS_NAME_MAX_LENGTH, record_max_length=_MODELS_RECORD_MAX_LENGTH)


def _record_model(client: MilvusClient, name: str, properties: dict[str, str], fields: dict[str, int]) -> None:
    """Write `name`'s model record (its properties and the vector fields it was made with) into
    the metadata collection, replacing any earlier one; flushed at once."""
    _ensure_models_collection(client)
    record = {**properties, "vector_fields": fields}
    client.upsert(MODELS_COLLECTION, record_rows({name: json.dumps(record)}))
    client.flush(MODELS_COLLECTION)


def _model_record(client: MilvusClient, name: str, described: dict[str, Any]) -> dict[str, Any] | None:
    """`name`'s record in the metadata collection, as written; None when there is none or it
    names other vector fields than the collection has (a record outliving its collection)."""
    if not client.has_collection(MODELS_COLLECTION):
        return None
    ensure_loaded(client, MODELS_COLLECTION)
    rows = client.get(MODELS_COLLECTION, ids=[name], output_fields=[RECORD_TEXT])
    if not rows:
        return None
    try:
        record = json.loads(rows[0][RECORD_TEXT])
    except (TypeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("vector_fields") != _described_vector_fields(described):
        return None
    return record


def _recorded_model(client: MilvusClient, name: str, described: dict[str, Any]) -> dict[str, str] | None:
    """`name`'s record in the metadata collection, as properties (``_model_record``)."""
    record = _model_record(client, name, described)
    if record is None:
        return None
    return {key: str(value) for key, value in record.items() if key in _RECORD_KEYS}


def collection_image_roots(client: MilvusClient, name: str) -> list[str]:
    """The directories (or filesystem URIs) collection `name`'s rows name images under, as the
    indexer recorded them (``record_image_roots``); [] for a collection filled before xmodal
    recorded them. Kept beside its model: in its properties on a Milvus server, in its record
    in the metadata collection on milvus-lite."""
    described = client.describe_collection(name)
    properties = described.get("properties") or {}
    if FINGERPRINT_KEY in properties:
        try:
            roots = json.loads(properties.get(IMAGE_ROOTS_KEY) or "[]")
        except ValueError:
            roots = []
    else:
        roots = (_model_record(client, name, described) or {}).get(IMAGE_ROOTS_KEY, [])
    return [str(root) for root in roots] if isinstance(roots, list) else []


def record_image_roots(client: MilvusClient, name: str, roots: list[str | Path]) -> list[str]:
    """Add `roots` (directories or filesystem URIs) to those collection `name` records, in
    order, leaving out any that lies under one recorded already; the roots recorded now. Two
    runs adding roots to one collection at the same moment may keep only one's."""
    recorded = collection_image_roots(client, name)
    added = False
    for root in roots:
        text = str(root).rstrip("/") if is_uri(root) else str(Path(root).expanduser().resolve())
        if text not in ImageRoots(recorded):
            recorded.append(text)
            added = True
    if not added:
        return recorded
    described = client.describe_collection(name)
    if FINGERPRINT_KEY in (described.get("properties") or {}):
        client.alter_collection_properties(name, properties={IMAGE_ROOTS_KEY: json.dumps(recorded)})
        return recorded
    record = _model_record(client, name, described) or {"vector_fields": _described_vector_fields(described)}
    record[IMAGE_ROOTS_KEY] = recorded
    text = json.dumps(record)
    if len(text) > _MODELS_RECORD_MAX_LENGTH:
        raise ValueError(f"collection {name!r} would record {len(recorded)} image roots, more than its record "
                         f"holds ({_MODELS_RECORD_MAX_LENGTH} characters): index inputs from fewer directories, "
                         "or name one directory above them (--image-root, --allow-image-root)")
    _ensure_models_collection(client)
    client.upsert(MODELS_COLLECTION, record_rows({name: text}))
    client.flush(MODELS_COLLECTION)
    return recorded


def _forget_model(client: MilvusClient, name: str) -> None:
    if client.has_collection(MODELS_COLLECTION):
        ensure_loaded(client, MODELS_COLLECTION)
        client.delete(MODELS_COLLECTION, ids=[name])
        client.flush(MODELS_COLLECTION)


def drop_collection(client: MilvusClient, name: str) -> bool:
    """Drop collection `name` and its model record; False when there was no such collection
    (a record left without one is removed all the same)."""
    if is_metadata_collection(name):
        raise ValueError(f"{name!r} holds xmodal's own records; drop the data collections instead")
    exists = client.has_collection(name)
    if exists:
        client.drop_collection(name)
    _forget_model(client, name)
    return exists


def list_collections(client: MilvusClient) -> list[str]:
    """The data collections, sorted (the metadata collections left out)."""
    return sorted(c for c in client.list_collections() if not is_metadata_collection(c))


def describe_model(model: dict[str, str] | ModelCard) -> str:
    if isinstance(model, ModelCard):
        return f"{model.name!r} (fingerprint {model.fingerprint})"
    return f"{model.get('name', '<unknown>')!r} (fingerprint {model.get('fingerprint', '<none>')})"


def check_collection_model(client: MilvusClient, name: str, card: ModelCard) -> dict[str, str]:
    """Raise ValueError unless the collection was made with `card`'s model; return its record."""
    stored = collection_model(client, name)
    if stored.get("fingerprint") != card.fingerprint:
        raise ValueError(
            f"collection {name!r} holds vectors of model {describe_model(stored)}, "
            f"but the model in use is {describe_model(card)}; "
            f"use the matching model or another collection (or drop this one and re-index)"
        )
    return stored


def collection_vector_fields(client: MilvusClient, name: str) -> dict[str, int]:
    """The collection's FLOAT_VECTOR fields and their dims, in schema order."""
    return _described_vector_fields(client.describe_collection(name))


def missing_levels_message(name: str, card: ModelCard, present: dict[str, int] | list[str]) -> str:
    wanted = [field for field in vector_fields(card) if field not in present]
    return (f"collection {name!r} has no vector field {', '.join(repr(f) for f in wanted)} for the levels of "
            f"{describe_model(card)} (its vector fields: {', '.join(present) or 'none'}); it was filled before "
            f"xmodal stored one vector field per level: drop it (xmodal index delete) and index again")


def ensure_collection(client: MilvusClient, name: str, card: ModelCard, *,
                      kind: CollectionKind = contract.IMAGE_KIND, **index_kwargs) -> bool:
    """Create the collection for `card` if missing, else check its model. True when created.

    An existing collection must also have a vector field for every level of the card (one
    filled by an earlier xmodal with a hierarchical model has only "global").
    """
    if client.has_collection(name):
        check_collection_model(client, name, card)
        described = client.describe_collection(name)
        present = _described_vector_fields(described)
        if any(field not in present for field in vector_fields(card)):
            raise ValueError(missing_levels_message(name, card, present))
        scalars = {field["name"] for field in described["fields"]}
        missing = [field for field in kind.field_names if field not in scalars]
        if missing:
            raise ValueError(
                f"collection {name!r} was made by an earlier xmodal: it has no field {', '.join(missing)} "
                f"that rows of {kind.name}s now carry. Index into another collection (--collection), or "
                f"delete this one (xmodal index delete --collection {name}) and index again")
        ensure_loaded(client, name)
        return False
    create_collection(client, name, card, kind, **index_kwargs)
    ensure_loaded(client, name)
    return True


def ensure_loaded(client: MilvusClient, name: str) -> None:
    """Load the collection for search. milvus-lite reopens every collection as released."""
    state = client.get_load_state(name).get("state")
    if getattr(state, "name", str(state)) != "Loaded":
        client.load_collection(name)


def missing_collection_message(client: MilvusClient, name: str) -> str:
    existing = list_collections(client)
    listed = ", ".join(repr(c) for c in existing) if existing else "none"
    return f"collection {name!r} does not exist (existing collections: {listed}); index some data first"


def index_type(client: MilvusClient, name: str, field: str = GLOBAL) -> str:
    """The index type of the collection's vector `field` ("" when none is described).

    One ``describe_index`` call (cheap on milvus-lite 2.5.1; milvus-lite 3.2.2 counted the
    live rows for it, a cost that grew with the collection): callers that search often ask
    once and keep it.
    """
    try:
        return str((client.describe_index(name, field) or {}).get("index_type", "") or "")
    except Exception:  # no index described: search with defaults
        return ""


def search_params(client: MilvusClient | None, name: str, metric: str, k: int, field: str = GLOBAL, *,
                  index: str | None = None) -> dict[str, Any]:
    """Search parameters for the index of the collection's vector `field`.

    `index`: its index type when the caller knows it (``index_type``); else it is described.
    HNSW searches with ``ef = max(DEFAULT_EF, k)``, IVF indexes with ``nprobe = DEFAULT_NPROBE``.
    """
    kind = (index if index is not None else index_type(client, name, field)).upper()
    params: dict[str, Any] = {}
    if kind.startswith("HNSW"):
        params["ef"] = max(DEFAULT_EF, k)
    elif kind.startswith("IVF"):
        params["nprobe"] = DEFAULT_NPROBE
    return {"metric_type": metric, "params": params}


# -- filters ----------------------------------------------------------------------------------
# A filter is a Milvus boolean expression on the scalar fields (``style == "openmoji"``,
# ``concept in ["1f600", "1f601"]``). The server parses it; these helpers normalise it, build
# safe ones from values, and turn the server's refusal into a ValueError naming both.

FILTER_MAX_LENGTH = 4096


def normalize_filter(expression: str | None) -> str:
    """The expression to send: "" for none; ValueError for what is not an expression at all."""
    if expression is None:
        return ""
    if not isinstance(expression, str):
        raise ValueError(f"filter must be a string (a Milvus boolean expression), got {type(expression).__name__}")
    expression = expression.strip()
    if len(expression) > FILTER_MAX_LENGTH:
        raise ValueError(f"filter is {len(expression)} characters long; at most {FILTER_MAX_LENGTH} are allowed")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in expression):
        raise ValueError(f"invalid filter {expression!r}: control characters are not allowed")
    return expression


def quote_string(value: str) -> str:
    """A Milvus string literal for `value` (double quotes, backslash escapes)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string value, got {type(value).__name__}")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"invalid value {value!r}: control characters are not allowed")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def equals_filter(field: str, value: str) -> str:
    """``field == "value"`` with the value quoted, for filters built from user input."""
    if not field.isidentifier():
        raise ValueError(f"invalid field name {field!r}")
    return f"{field} == {quote_string(value)}"


def combine_filters(*expressions: str | None) -> str:
    """The conjunction of the non-empty expressions, each parenthesised."""
    parts = [normalize_filter(e) for e in expressions]
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return " and ".join(f"({p})" for p in parts)


def filter_error(expression: str, exc: BaseException) -> ValueError:
    """The ValueError for a filter the server refused: the expression and the server's reason."""
    reason = getattr(exc, "message", None) or str(exc)
    return ValueError(f"invalid filter {expression!r}: {reason}")


def release_local(uri: str | Path) -> None:
    """Stop this process's milvus-lite server for `uri`, unlocking the database for others.

    milvus-lite 2.5.1 keeps its server (a child process) running and the database locked
    until this process exits, even after every client is closed; this stops it. Every client
    of that database in this process stops working; ``connect`` starts a new server.
    Nothing happens for a server URI or a database this process has not opened.
    """
    if not is_local_uri(uri):
        return
    _import_milvus_lite()
    from milvus_lite.server_manager import server_manager_instance

    path = str(Path(uri).expanduser().resolve())
    if path in getattr(server_manager_instance, "_servers", {path: None}):
        server_manager_instance.release_server(path)
