"""Milvus access shared by the indexer and the client: connect, create, check the model.

pymilvus only (the client imports this module; no torch, no ray). A URI is either a local
path ending in ``.db`` (milvus-lite, which keeps the database as a directory at that path)
or ``http(s)://host:port`` (a Milvus server, optionally with a token).

The model that filled a collection travels with it as collection *properties*
(``xmodal.model``, ``xmodal.fingerprint``, ...). milvus-lite 3.2.2 persists properties given
to ``create_collection(properties=...)`` or ``alter_collection_properties`` and returns them
from ``describe_collection``; it does not keep the schema's or the collection's
``description``, so that is no fallback there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from xmodal.card import ModelCard

# Collection properties (all values are strings in Milvus).
MODEL_KEY = "xmodal.model"
VERSION_KEY = "xmodal.model_version"
FINGERPRINT_KEY = "xmodal.fingerprint"
DIM_KEY = "xmodal.dim"
METRIC_KEY = "xmodal.metric"
CARD_KEYS = (MODEL_KEY, VERSION_KEY, FINGERPRINT_KEY, DIM_KEY, METRIC_KEY)

# The fused vector every model has ("global") keeps the field name it always had. The other
# levels of a hierarchical model get a suffix: a level may share its name with a scalar field
# ("concept" is both an MT-HCN level and the emoji concept key).
VECTOR_FIELD = "global"
LEVEL_FIELD_SUFFIX = "_vector"
ID_MAX_LENGTH = 64
PATH_MAX_LENGTH = 4096
TEXT_MAX_LENGTH = 8192
KEY_MAX_LENGTH = 256
# Fields a search returns besides id and score.
IMAGE_OUTPUT_FIELDS = ["image", "captions", "concept", "style"]
CAPTION_OUTPUT_FIELDS = ["caption", "concept", "style", "image"]
IMAGE_SCALAR_FIELDS = ("id", *IMAGE_OUTPUT_FIELDS)
CAPTION_SCALAR_FIELDS = ("id", *CAPTION_OUTPUT_FIELDS)

# HNSW with the parameters DESIGN.md measured. milvus-lite 3.2.2 builds it with faiss when
# faiss-cpu is importable (else it falls back to brute force; search still works); on a
# Milvus server it is the usual choice. `ef` at search time is max(DEFAULT_EF, k).
DEFAULT_INDEX_TYPE = "HNSW"
DEFAULT_INDEX_PARAMS = {"M": 16, "efConstruction": 200}
DEFAULT_EF = 64
# IVF indexes (IVF_FLAT is what milvus-lite 2.5 and a Milvus server offer besides HNSW): the lists
# probed per search; benchmarks/query.py measures recall@10 and latency against it.
DEFAULT_NPROBE = 16


def is_local_uri(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme.lower() not in ("http", "https", "tcp", "grpc", "unix")


def connect(uri: str | Path, *, token: str | None = None, timeout: float | None = None) -> MilvusClient:
    """A `MilvusClient` for a milvus-lite path (parent directories are created) or a server URL.

    milvus-lite 3.2.2 runs in-process and locks the database for the life of the process:
    a second process cannot open the same path until the first exits.
    """
    uri = str(uri)
    if is_local_uri(uri):
        path = Path(uri).expanduser()
        if path.suffix != ".db":
            raise ValueError(f"a milvus-lite database path must end in .db, got {uri!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=str(path.resolve()), timeout=timeout)
        except MilvusException as exc:
            raise ConnectionError(
                f"cannot open the milvus-lite database {path}: {exc.message}. milvus-lite allows one "
                "process at a time: stop the other process using it (an `xmodal index` run, a web "
                "server, a notebook) or use a Milvus server URI"
            ) from exc
    kwargs: dict[str, Any] = {"uri": uri, "timeout": timeout}
    if token:
        kwargs["token"] = token
    try:
        return MilvusClient(**kwargs)
    except Exception as exc:  # pymilvus raises MilvusException subclasses for refused connections
        raise ConnectionError(f"cannot reach Milvus at {uri}: {exc}") from exc


def vector_field(level: str) -> str:
    """The vector field that holds the card's embedding `level`."""
    return VECTOR_FIELD if level == VECTOR_FIELD else f"{level}{LEVEL_FIELD_SUFFIX}"


def card_levels(card: ModelCard) -> list[str]:
    """The card's embedding levels, "global" first, then the others by name."""
    return sorted(card.embeddings, key=lambda level: (level != VECTOR_FIELD, level))


def vector_fields(card: ModelCard) -> dict[str, int]:
    """Vector field -> dim, one per entry of the card's embeddings, "global" first."""
    return {vector_field(level): int(card.embeddings[level]["dim"]) for level in card_levels(card)}


def vector_values(vectors: dict[str, Any]) -> dict[str, list[float]]:
    """A row's vector fields from its embeddings by level (numpy arrays or lists)."""
    return {vector_field(level): vector.tolist() if hasattr(vector, "tolist") else list(vector)
            for level, vector in vectors.items()}


def card_properties(card: ModelCard) -> dict[str, str]:
    return {
        MODEL_KEY: card.name,
        VERSION_KEY: str(card.version),
        FINGERPRINT_KEY: card.fingerprint,
        DIM_KEY: str(card.dim),
        METRIC_KEY: card.metric,
    }


def _varchar(schema, name: str, max_length: int, **kwargs) -> None:
    schema.add_field(name, DataType.VARCHAR, max_length=max_length, **kwargs)


def _add_vector_fields(schema, card: ModelCard, scalar_fields: tuple[str, ...]) -> None:
    for field, dim in vector_fields(card).items():
        if field in scalar_fields or not field.isidentifier():
            raise ValueError(f"the card of {describe_model(card)} names an embedding whose field {field!r} "
                             f"cannot be a Milvus vector field here (scalar fields: {', '.join(scalar_fields)})")
        schema.add_field(field, DataType.FLOAT_VECTOR, dim=dim)


def _create(client: MilvusClient, name: str, card: ModelCard, schema, description: str,
            index_type: str, index_params: dict | None) -> None:
    index = client.prepare_index_params()
    params = DEFAULT_INDEX_PARAMS if index_params is None and index_type == DEFAULT_INDEX_TYPE else index_params
    for field in vector_fields(card):
        index.add_index(field, index_type=index_type, metric_type=card.metric, params=dict(params or {}))
    client.create_collection(
        name, schema=schema, index_params=index, description=description,
        properties=card_properties(card),
    )


def create_image_collection(client: MilvusClient, name: str, card: ModelCard, *,
                            index_type: str = DEFAULT_INDEX_TYPE, index_params: dict | None = None) -> None:
    """Create the image collection (schema in docs/architecture.md) with the card's model recorded."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    _varchar(schema, "id", ID_MAX_LENGTH, is_primary=True)  # sha256 of the image bytes, 32 hex digits
    _add_vector_fields(schema, card, IMAGE_SCALAR_FIELDS)
    _varchar(schema, "image", PATH_MAX_LENGTH)  # absolute path
    schema.add_field("captions", DataType.JSON)  # a JSON list of strings
    _varchar(schema, "concept", KEY_MAX_LENGTH)
    _varchar(schema, "style", KEY_MAX_LENGTH)
    _create(client, name, card, schema, "xmodal images", index_type, index_params)


def create_caption_collection(client: MilvusClient, name: str, card: ModelCard, *,
                              index_type: str = DEFAULT_INDEX_TYPE, index_params: dict | None = None) -> None:
    """Create the caption collection: one row per distinct caption text of an image."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    _varchar(schema, "id", ID_MAX_LENGTH, is_primary=True)  # sha256 of the caption text, 32 hex digits
    _add_vector_fields(schema, card, CAPTION_SCALAR_FIELDS)
    _varchar(schema, "caption", TEXT_MAX_LENGTH)
    _varchar(schema, "concept", KEY_MAX_LENGTH)
    _varchar(schema, "style", KEY_MAX_LENGTH)
    _varchar(schema, "image", PATH_MAX_LENGTH)
    _create(client, name, card, schema, "xmodal captions", index_type, index_params)


def collection_model(client: MilvusClient, name: str) -> dict[str, str]:
    """The model recorded with a collection: {"name", "version", "fingerprint", "dim", "metric"}.

    Values missing from the collection (not made by xmodal) are absent from the dict.
    """
    if not client.has_collection(name):
        raise ValueError(missing_collection_message(client, name))
    properties = client.describe_collection(name).get("properties") or {}
    keys = {MODEL_KEY: "name", VERSION_KEY: "version", FINGERPRINT_KEY: "fingerprint",
            DIM_KEY: "dim", METRIC_KEY: "metric"}
    return {short: properties[key] for key, short in keys.items() if key in properties}


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
    return {f["name"]: int(f["params"]["dim"]) for f in client.describe_collection(name)["fields"]
            if f["type"] == DataType.FLOAT_VECTOR}


def missing_levels_message(name: str, card: ModelCard, present: dict[str, int] | list[str]) -> str:
    wanted = [field for field in vector_fields(card) if field not in present]
    return (f"collection {name!r} has no vector field {', '.join(repr(f) for f in wanted)} for the levels of "
            f"{describe_model(card)} (its vector fields: {', '.join(present) or 'none'}); it was filled before "
            f"xmodal stored one vector field per level: drop it (xmodal index delete) and index again")


def ensure_collection(client: MilvusClient, name: str, card: ModelCard, *, kind: str = "image",
                      **index_kwargs) -> bool:
    """Create the collection for `card` if missing, else check its model. True when created.

    An existing collection must also have a vector field for every level of the card (one
    filled by an earlier xmodal with a hierarchical model has only "global").
    """
    if client.has_collection(name):
        check_collection_model(client, name, card)
        present = collection_vector_fields(client, name)
        if any(field not in present for field in vector_fields(card)):
            raise ValueError(missing_levels_message(name, card, present))
        ensure_loaded(client, name)
        return False
    create = {"image": create_image_collection, "caption": create_caption_collection}[kind]
    create(client, name, card, **index_kwargs)
    ensure_loaded(client, name)
    return True


def ensure_loaded(client: MilvusClient, name: str) -> None:
    """Load the collection for search. milvus-lite 3.2.2 reopens every collection as released."""
    state = client.get_load_state(name).get("state")
    if getattr(state, "name", str(state)) != "Loaded":
        client.load_collection(name)


def missing_collection_message(client: MilvusClient, name: str) -> str:
    existing = sorted(client.list_collections())
    listed = ", ".join(repr(c) for c in existing) if existing else "none"
    return f"collection {name!r} does not exist (existing collections: {listed}); index some data first"


def index_type(client: MilvusClient, name: str, field: str = VECTOR_FIELD) -> str:
    """The index type of the collection's vector `field` ("" when none is described).

    One ``describe_index`` call: milvus-lite 3.2.2 counts the live rows for it (O(rows), ≈30 ms
    at 100,000 rows, benchmarks/query.py), so callers that search often ask once and keep it.
    """
    try:
        return str((client.describe_index(name, field) or {}).get("index_type", "") or "")
    except Exception:  # no index described: search with defaults
        return ""


def search_params(client: MilvusClient | None, name: str, metric: str, k: int, field: str = VECTOR_FIELD, *,
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


def decode_captions(value: Any) -> list[str]:
    """The captions field as a list, whether stored as JSON or as a JSON string."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return [str(c) for c in value]


def release_local(uri: str | Path) -> None:
    """Stop this process's milvus-lite server for `uri`, unlocking the database for others.

    milvus-lite 3.2.2 keeps a database open until the process exits, even after every
    client is closed; every client of that database in this process stops working.
    """
    if not is_local_uri(uri):
        return
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(Path(uri).expanduser().resolve()))
