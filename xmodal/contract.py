"""The names that cross xmodal's package boundaries, in one place.

Export writes a Triton repository with these model and tensor names, the indexer and the
client call them, the store makes each collection kind's schema from here, and the indexer
and the client build and decode rows with the same kind. Change a name here (and in
docs/architecture.md), never in one caller. Standard library only: the client, the indexer's
Ray workers and export all import it.

The Python models copied into a repository (``model_repository/*/1/model.py``) run in
NVIDIA's container without xmodal: they read their tensor names from their own config, which
export writes from these constants.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# ---- Triton: models of a repository --------------------------------------------------------
IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
PREPROCESS_IMAGE = "preprocess_image"
PREPROCESS_TEXT = "preprocess_text"
EMBED_IMAGE = "embed_image"  # ensemble: encoded image -> every embedding level of the card
EMBED_TEXT = "embed_text"  # ensemble: UTF-8 text -> every embedding level of the card
# A pair scorer's second stage (CRAN, MCSM)
RERANK_IMAGE_SIDE = "rerank_image_side"
RERANK = "rerank"
EMBED_IMAGE_SIDE = "embed_image_side"  # ensemble: encoded image -> its side tensors (the side store's)
RERANK_TEXT = "rerank_text"  # ensemble: text, first-stage scores, candidates' sides -> scores
EMBED_MODELS = (IMAGE_ENCODER, TEXT_ENCODER, PREPROCESS_IMAGE, PREPROCESS_TEXT, EMBED_IMAGE, EMBED_TEXT)
RERANK_MODELS = (RERANK_IMAGE_SIDE, RERANK, EMBED_IMAGE_SIDE, RERANK_TEXT)
ENSEMBLES = (EMBED_IMAGE, EMBED_TEXT, EMBED_IMAGE_SIDE, RERANK_TEXT)

# ---- Triton: the repository's layout ---------------------------------------------------------
# Each preprocessing version reads its parameters (image size and normalisation, pad id) from
# <model>/<version>/params.json, so two versions served side by side may differ there.
PARAMS_FILE = "params.json"


def pinned_version(repository: str | Path) -> int | None:
    """The version the ensembles of a repository run (their first step's ``model_version``);
    None where there is no xmodal repository."""
    config = Path(repository) / EMBED_TEXT / "config.pbtxt"
    if not config.is_file():
        return None
    match = re.search(r"model_version:\s*(-?\d+)", config.read_text())
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


# ---- Triton and ONNX: tensors ---------------------------------------------------------------
IMAGE_INPUT = "IMAGE"  # BYTES [1]: one encoded image a row
TEXT_INPUT = "TEXT"  # BYTES [1]: one UTF-8 text a row
PIXEL_VALUES = "pixel_values"  # FP32 [3, S, S]: the image encoder's input
INPUT_IDS = "input_ids"  # INT64 [L]: the text encoder's input, padded with the card's pad id
FIRST_STAGE = "first_stage"  # FP32 [N]: the vector search's scores of a query's N candidates
SCORES = "scores"  # FP32 [N]: the re-ranker's
SIDE_PREFIX = "image_"  # an image-side tensor is named image_<key> (export/reranker.py's keys)

# ---- Embedding levels and Milvus vector fields ----------------------------------------------
# The fused embedding every model has. Hierarchical models (mthcn) add levels named in the
# card's `embeddings` ("concept", "exterior"); each is an encoder output, an ensemble output
# and a vector field.
GLOBAL = "global"
# Every level but "global" is stored under a suffix: a level may share its name with a scalar
# field ("concept" is both an MT-HCN level and the emoji concept key).
LEVEL_FIELD_SUFFIX = "_vector"


def vector_field(level: str) -> str:
    """The Milvus vector field that holds the card's embedding `level`."""
    return GLOBAL if level == GLOBAL else f"{level}{LEVEL_FIELD_SUFFIX}"


def side_tensor(key: str) -> str:
    """The Triton tensor of a re-ranker's image-side `key`."""
    return f"{SIDE_PREFIX}{key}"


# ---- Collection kinds -----------------------------------------------------------------------
ID_MAX_LENGTH = 64
PATH_MAX_LENGTH = 4096
TEXT_MAX_LENGTH = 8192
KEY_MAX_LENGTH = 256


@dataclass(frozen=True)
class ScalarField:
    name: str
    type: str  # "varchar", "int64" or "json"
    max_length: int = 0  # varchar: bytes of UTF-8
    primary: bool = False
    # Added to the kind after collections of it were made: a collection may lack it (searched
    # without it; written to, refused: ``store.ensure_collection``).
    added_later: bool = False


@dataclass(frozen=True)
class CollectionKind:
    """What one kind of collection holds: its scalar fields (besides a vector field per level),
    the row the indexer writes for an embedded item, and what a search hit shows.

    `embeds`: which ensemble embeds an item ("image" via embed_image, "text" via embed_text).
    `row` takes the item's record (the pipeline's columns: ``sources.py``) and gives the scalar
    values of its row; `hit` takes a hit's entity and gives the fields of a client ``Hit``
    (image, captions, concept, style, and an image's file metadata: ``FILE_FIELDS``). `merge`,
    where a kind has it, makes one row of a row already kept (written, or earlier in the run)
    and a new row of the same key, and says how many of the new row's paths it added; without
    it the new row replaces the kept one.
    """

    name: str
    description: str
    embeds: str
    fields: tuple[ScalarField, ...]
    row: Callable[[dict[str, Any]], dict[str, Any]]
    hit: Callable[[dict[str, Any]], dict[str, Any]]
    merge: Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], int]] | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(field.name for field in self.fields)

    @property
    def first_field_names(self) -> tuple[str, ...]:
        """The fields every collection of this kind has, however old."""
        return tuple(field.name for field in self.fields if not field.added_later)

    @property
    def output_fields(self) -> list[str]:
        """The fields a search returns besides id and score."""
        return [field.name for field in self.fields if not field.primary]


# A list in a JSON field (captions, paths) is stored as {"values": [...]}: Milvus 2.3 takes only
# an object there ("json: cannot unmarshal array into Go value of type map[string]interface {}"),
# and one form on every backend keeps a filter the same on each
# (``json_contains(captions["values"], "a cat")``). Rows written as bare lists (milvus-lite, before)
# are read all the same.
LIST_KEY = "values"


def json_list(values: Any) -> dict[str, list]:
    """The JSON field value that holds the list `values`."""
    return {LIST_KEY: list(values)}


def decode_string_list(value: Any) -> list[str]:
    """A JSON list field (captions, paths) as a list of strings, whether stored as ``json_list``
    made it, as a bare list, or as a JSON string of either."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, dict):
        value = value.get(LIST_KEY) or []
    if isinstance(value, str):
        return [value]
    return [str(c) for c in value]


# What an image row keeps of its file, for filters (``folder == "2024/holidays"``,
# ``width >= 1024``): its path relative to the input's root (a folder's, a manifest's or a table's
# directory, or the image root) and that path's folder ("" at the root), its size in bytes, its
# modification time (seconds since the epoch; 0 for an image inside a Parquet or tar file: the
# source file's), and its width and height in pixels (a drawing's as rendered for the index).
FILE_FIELDS = ("relative_path", "folder", "size", "mtime", "width", "height")
# Their values where nothing is known of a file (a hit of a collection made before them).
FILE_DEFAULTS = {"relative_path": "", "folder": "", "size": 0, "mtime": 0, "width": 0, "height": 0}
# What an image row made without a file (benchmarks, tests) holds besides its key, vectors,
# image, captions, concept and style.
NO_FILE = {**FILE_DEFAULTS, "paths": json_list([])}


# An image row describes its first path (in input order): its file, captions, concept and
# style; `paths` lists every path whose file holds the same bytes (the key is their hash).
_DESCRIBED_BY_FIRST_PATH = ("image", "captions", "concept", "style", *FILE_FIELDS)


def _image_row(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "image": record["path"], "captions": json_list(json.loads(record["captions"])),
            "concept": record["concept"], "style": record["style"],
            "relative_path": record["relative_path"], "folder": record["folder"],
            **{name: int(record[name]) for name in ("size", "mtime", "width", "height")},
            "paths": json_list([record["path"]])}


def _image_hit(entity: dict[str, Any]) -> dict[str, Any]:
    # a collection made before the file fields (and paths) has none: the hit gets their defaults
    image = str(entity.get("image", ""))
    return {"image": image, "captions": decode_string_list(entity.get("captions")),
            "concept": str(entity.get("concept", "")), "style": str(entity.get("style", "")),
            **{name: type(default)(entity.get(name) or default) for name, default in FILE_DEFAULTS.items()},
            "paths": decode_string_list(entity.get("paths")) or ([image] if image else [])}


def _merge_image_rows(kept: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """One row for files of the same bytes: every path, the kept row's first; described by that
    first path (by the new row where it is that path: its file was read again)."""
    paths = decode_string_list(kept.get("paths")) or [kept["image"]]
    added = [path for path in decode_string_list(new["paths"]) if path not in paths]
    first = new if new["image"] == paths[0] else kept
    merged = {**new, **{name: first[name] for name in _DESCRIBED_BY_FIRST_PATH}, "paths": json_list(paths + added)}
    if first is kept:  # a row read back from Milvus: its captions as written
        merged["captions"] = json_list(decode_string_list(kept["captions"]))
    return merged, len(added)


def _caption_row(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "caption": record["caption"], "concept": record["concept"],
            "style": record["style"], "image": record["image"]}


def _caption_hit(entity: dict[str, Any]) -> dict[str, Any]:
    # one caption a row: the hit's only caption
    caption = entity.get("caption")
    return {"image": str(entity.get("image", "")), "captions": [] if caption is None else [str(caption)],
            "concept": str(entity.get("concept", "")), "style": str(entity.get("style", ""))}


IMAGE_KIND = CollectionKind(
    name="image", description="xmodal images", embeds="image",
    fields=(ScalarField("id", "varchar", ID_MAX_LENGTH, primary=True),  # sha256 of the image bytes, 32 hex digits
            ScalarField("image", "varchar", PATH_MAX_LENGTH),  # absolute path
            ScalarField("captions", "json"),  # json_list of strings
            ScalarField("concept", "varchar", KEY_MAX_LENGTH),
            ScalarField("style", "varchar", KEY_MAX_LENGTH),
            *(ScalarField(name, "varchar", PATH_MAX_LENGTH, added_later=True) for name in FILE_FIELDS[:2]),
            *(ScalarField(name, "int64", added_later=True) for name in FILE_FIELDS[2:]),
            ScalarField("paths", "json", added_later=True)),  # json_list: every path of these bytes
    row=_image_row, hit=_image_hit, merge=_merge_image_rows)
CAPTION_KIND = CollectionKind(
    name="caption", description="xmodal captions", embeds="text",
    fields=(ScalarField("id", "varchar", ID_MAX_LENGTH, primary=True),  # sha256 of the caption text, 32 hex digits
            ScalarField("caption", "varchar", TEXT_MAX_LENGTH),
            ScalarField("concept", "varchar", KEY_MAX_LENGTH),
            ScalarField("style", "varchar", KEY_MAX_LENGTH),
            ScalarField("image", "varchar", PATH_MAX_LENGTH)),
    row=_caption_row, hit=_caption_hit)
KINDS = {kind.name: kind for kind in (IMAGE_KIND, CAPTION_KIND)}


def collection_kind(name: str) -> CollectionKind:
    """The kind called `name` ("image" or "caption"); ValueError for any other."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {name!r}") from None
