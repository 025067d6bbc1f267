"""The image–text formats users bring: read as rows, and turned into the project's manifest (docs/architecture.md).

Formats: ``csv`` (or ``.tsv``) and ``jsonl`` tables of ``image`` + ``caption``/``captions``, the
Karpathy split JSON (Flickr30k, MSCOCO), ``parquet`` with an image-bytes or image-path column, and
``webdataset`` tar shards (``key.jpg`` + ``key.txt``/``key.json``).

Each format is read by one generator of positioned rows (``file_rows``: ``csv_rows``, ``jsonl_rows``,
``karpathy_rows``, ``parquet_rows``, ``wds_rows``), which can start again at a row's position: the
indexer (``xmodal.indexer.formats``) streams the same rows shard by shard, ``import_corpus`` collects
them into a manifest. A file that cannot be read as its format at all raises ``ValueError`` naming
it; a malformed row is a row with a ``problem`` (import raises it, the indexer dead-letters it).

Import: images stored as bytes inside the source (Parquet, WebDataset) are written once
to ``out_dir/images/<sha256[:2]>/<sha256[:32]>.<ext>``; images on disk stay where they are.
Each image is one row: its ``concept`` and ``id`` are ``<style>/<key>`` where the key is the image
path relative to its root (path formats) or its content hash (byte formats), so rows describing the
same image are merged into one with all their captions. ``category`` becomes ``group``. A source
split is kept (``restval`` → train); without one, the split is drawn from a hash of the id, so a
re-import gives the same split. Malformed input raises ``ValueError("<file>:<line>: …")`` (Parquet:
``<file>: row <i>`` counted from 0; WebDataset: ``<shard>:<member>``); an image that cannot be found
or bytes that are no image are recorded in ``out_dir/skipped.jsonl`` and left out.

An image path must lie under the corpus root (the image root, else the source file's directory),
symlinks followed, or under a directory allowed on purpose (``allowed_image_roots``): a row that
names another file (``../``, an absolute path, a link leading out) is malformed.
"""
from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from xmodal import settings
from xmodal.files import ImageRoots, SkipLog, filesystem, is_uri, write_atomic, write_location
from xmodal.manifest import ManifestRow, json_object, record_imported_roots, write_manifest

FORMATS = ("csv", "jsonl", "karpathy", "parquet", "webdataset")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
# A folder's images also include SVG drawings: the indexer renders them (xmodal/svg.py).
FOLDER_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS | {"svg"}
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_ALIASES = {"restval": "train", "training": "train", "validation": "val", "valid": "val", "dev": "val",
                 "testing": "test"}
# Parquet column names tried in order when none is given.
PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes",
                         "image_path", "path", "file_name", "filename", "filepath", "file")
PARQUET_CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "txt", "sentence", "alt_text",
                           "description", "raw")
PARQUET_BATCH_ROWS = 512
HASH_HEX = 32  # content hashes: the first 32 hex digits of sha256, as the Milvus ids


@dataclass
class Entry:
    """One image being gathered: rows naming the same image add their captions here."""
    key: str
    image: Path
    captions: list[str]
    split: str | None
    group: str | None


@dataclass
class Collector:
    """The images seen so far, by key, in first-seen order."""
    entries: dict[str, Entry] = field(default_factory=dict)
    merged: int = 0

    def add(self, key: str, image: Path, captions: Sequence[str], split: str | None, group: str | None) -> None:
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = Entry(key, image, list(dict.fromkeys(captions)), split, group)
            return
        self.merged += 1
        entry.captions.extend(c for c in captions if c not in entry.captions)
        entry.split = entry.split or split
        entry.group = entry.group or group


# --- small shared pieces -------------------------------------------------------------------


def normalise_split(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: 'split' must be a string, got {value!r}")
    value = value.strip().lower()
    return SPLIT_ALIASES.get(value, value)


def hash_split(item_id: str, *, test_fraction: float, val_fraction: float = 0.0, seed: int = 0) -> str:
    """train / val / test from a hash of ``seed`` and the id: the same id always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def clean_captions(value: Any, where: str) -> list[str]:
    """A caption string or a list of them → a non-empty list of stripped captions (an empty one
    stays ``""``: whoever collects the row decides what an empty caption means)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: captions must be a string or a list of strings, got {value!r}")
    if not value:
        raise ValueError(f"{where}: empty caption")
    return [c.strip() for c in value]


def optional_text(value: Any, where: str, name: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string, got {value!r}")
    return value.strip() or None


def default_style(source: Path) -> str:
    if is_glob(Path(source.name)):
        name = source.parent.name  # a glob of shards: name the corpus after their folder
    else:
        name = source.name if source.is_dir() else source.stem
    name = re.sub(r"^dataset_", "", name.split(".")[0])  # dataset_flickr30k.json → flickr30k
    style = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return style or "corpus"


def sniff_extension(data: bytes) -> str | None:
    """The image type from its first bytes, for bytes that came without a file name."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    try:  # anything else Pillow can identify (reads the header only)
        from PIL import Image, UnidentifiedImageError

        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "").lower() or None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


class ImageStore:
    """Image bytes written once under a root, named by content: ``<sha256[:2]>/<sha256[:32]>.<ext>``.

    The root is a directory, or a filesystem URI (``xmodal.files``: s3://, gs://, file://, ...)
    whose files are then named by URI."""

    def __init__(self, root: Path | str) -> None:
        self.root = root if is_uri(root) else Path(root)
        if isinstance(self.root, str):
            filesystem(self.root)  # a URI pyarrow does not know: said now, not at the first image
        self.written = 0

    def put(self, data: bytes, name_hint: str | None) -> tuple[str, Path | str] | None:
        """``(content key, path or URI)``, or None when the bytes are not a recognisable image.

        The file keeps the original extension where the name had an image one, else the sniffed type's.
        """
        sniffed = sniff_extension(data)
        if sniffed is None:
            return None
        ext = name_hint.rsplit(".", 1)[1].lower() if name_hint and "." in name_hint else ""
        ext = ext if ext in IMAGE_EXTENSIONS else sniffed
        key = hashlib.sha256(data).hexdigest()[:HASH_HEX]
        if isinstance(self.root, str):
            location = f"{self.root.rstrip('/')}/{key[:2]}/{key}.{ext}"
            self.written += write_location(location, data)
            return key, location
        path = self.root / key[:2] / f"{key}.{ext}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            self.written += 1
        return key, path


@dataclass
class SourceRow:
    """One row of a source as its format gives it, before rows naming the same image are merged.

    The image is a file (``image``, ``key`` its path relative to the root) or bytes inside the
    source (``in_source``: ``data``, ``name`` a hint to their type; ``data`` is None where the bytes
    were not asked for, as when the indexer's driver scans a source). ``location`` says where the
    image is (its file, or the place of its bytes: ``<shard>:<key>.jpg``, ``<file>: row 3``).
    ``problem`` marks a malformed row (its message starts with ``where``); ``missing`` a row without
    an image. Captions are stripped; an empty one stays ``""`` (import refuses it, the indexer
    sends it to its dead letters).
    """

    where: str
    captions: list[str] = field(default_factory=list)
    split: str | None = None
    group: str | None = None
    image: Path | None = None
    key: str | None = None
    in_source: bool = False
    data: bytes | None = None
    name: str | None = None
    location: str = ""
    problem: str = ""
    missing: str = ""


# Where a row starts in its file: a byte offset (CSV, JSONL, a tar member's header) or a row
# index (Parquet, Karpathy), and its line, row or sample number for messages.
Positioned = tuple[int, int, SourceRow]


def _parsed(where: str, parse: Callable[[], SourceRow]) -> SourceRow:
    """The row `parse` makes, or a row that carries its ValueError as its problem."""
    try:
        return parse()
    except ValueError as exc:
        return SourceRow(where, problem=str(exc), location=where)


def path_row(image_value: Any, root: Path, captions: list[str], split: str | None, group: str | None,
             where: str) -> SourceRow:
    """A row whose image is a file under ``root``."""
    if not isinstance(image_value, str) or not image_value.strip():
        raise ValueError(f"{where}: 'image' must be a non-empty path, got {image_value!r}")
    relative = Path(image_value.strip())
    image = (root / relative).absolute()
    return SourceRow(where, captions, split, group, image=image,
                     key=Path(os.path.normpath(relative)).as_posix().lstrip("/"), location=str(image))


def bytes_row(data: bytes | None, name: str | None, captions: list[str], split: str | None, group: str | None,
              where: str, location: str) -> SourceRow:
    return SourceRow(where, captions, split, group, in_source=True, data=data, name=name, location=location)


@dataclass
class Context:
    style: str
    collector: Collector
    skip_log: SkipLog
    store: ImageStore
    bar: tqdm

    def add(self, row: SourceRow) -> None:
        """Collect a row: a malformed one stops the import; one whose image is not there is skipped."""
        if row.problem:
            raise ValueError(row.problem)
        if not all(row.captions):
            raise ValueError(f"{row.where}: empty caption")
        for caption in row.captions:
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{row.where}: a caption is not valid UTF-8 text: {caption!r}") from None
        self.bar.update(1)
        if row.missing:
            self.skip_log.record(row.where, row.missing)
            return
        if row.in_source:
            stored = self.store.put(row.data or b"", row.name)
            if stored is None:
                self.skip_log.record(row.location, "bytes are not a recognised image (png, jpeg, webp, gif, bmp, tiff)")
                return
            key, image = stored
        else:
            assert row.image is not None and row.key is not None
            if not row.image.is_file():
                self.skip_log.record(str(row.image), f"image file not found ({row.where})")
                return
            key, image = row.key, row.image
        self.collector.add(key, image, row.captions, row.split, row.group)


# --- csv / jsonl ---------------------------------------------------------------------------


class _Lines:
    """The lines of a binary file as text, from a byte offset; knows where the next line starts.

    Bytes that are not UTF-8 become lone surrogates (``surrogateescape``): the row that holds
    them is refused by whoever checks its text, not the whole file.
    """

    def __init__(self, handle: BinaryIO, offset: int = 0, line: int = 1) -> None:
        self.handle = handle
        self.seek(offset, line)

    def seek(self, offset: int, line: int) -> None:
        self.handle.seek(offset)
        self.offset, self.line = offset, line

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = self.handle.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.line += 1
        return raw.decode("utf-8", "surrogateescape")


def table_captions(record: dict[str, Any], where: str, *, json_list_text: bool,
                   require_captions: bool = True) -> list[str]:
    """``captions`` (a list, or in CSV a JSON list) or ``caption``; without `require_captions` a
    record with neither has none."""
    if record.get("captions") not in (None, ""):
        value = record["captions"]
        if json_list_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: 'captions' is not a JSON list ({exc})") from None
        return clean_captions(value, where)
    if "caption" in record:
        return clean_captions(record["caption"] if record["caption"] is not None else "", where)
    if not require_captions:
        return []
    raise ValueError(f"{where}: missing 'caption' or 'captions'")


def table_row(record: dict[str, Any], root: Path, where: str, *, json_list_text: bool,
              require_captions: bool = True) -> SourceRow:
    captions = table_captions(record, where, json_list_text=json_list_text, require_captions=require_captions)
    split = normalise_split(record.get("split"), where)
    group = optional_text(record.get("category"), where, "category")
    return path_row(record.get("image"), root, captions, split, group, where)


def csv_rows(path: Path, root: Path, *, offset: int = 0, line: int = 1,
             require_captions: bool = True) -> Iterator[Positioned]:
    """The records of a CSV (``.tsv``: tab-separated) table with a header, from `offset` (the
    start of a record after the header; 0: the first) on. A missing column is a ValueError (the
    caption column only with `require_captions`)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("rb") as handle:
        lines = _Lines(handle)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            columns = next(reader, [])
        except csv.Error as exc:
            raise ValueError(f"{path}:1: not a CSV header ({exc})") from None
        if columns:
            columns[0] = columns[0].removeprefix("\ufeff")  # a byte-order mark
        if "image" not in columns:
            raise ValueError(f"{path}:1: missing column 'image' (columns: {', '.join(columns) or 'none'})")
        if require_captions and "caption" not in columns and "captions" not in columns:
            raise ValueError(f"{path}:1: missing column 'caption' or 'captions' (columns: {', '.join(columns)})")
        if offset > lines.offset:
            lines.seek(offset, line)  # the reader holds nothing between records
        while True:
            start, number = lines.offset, lines.line
            where = f"{path}:{number}"
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, number, SourceRow(where, problem=f"{where}: not a CSV record ({exc})", location=where)
                continue
            if not values:
                continue  # a blank line
            if len(values) > len(columns):
                yield start, number, SourceRow(where, problem=f"{where}: more fields than the header has",
                                               location=where)
                continue
            record = dict(zip(columns, values + [None] * (len(columns) - len(values))))
            yield start, number, _parsed(where, lambda: table_row(record, root, where, json_list_text=True,
                                                                        require_captions=require_captions))


def jsonl_rows(path: Path, root: Path, *, offset: int = 0, line: int = 1,
               require_captions: bool = True) -> Iterator[Positioned]:
    """The rows of a JSONL table (one object a line with ``image`` and ``caption``/``captions``;
    without `require_captions` the captions may be absent)."""

    def parse(text: str, where: str) -> SourceRow:
        record = json_object(text, where=where)
        if "image" not in record:
            raise ValueError(f"{where}: missing key 'image'")
        return table_row(record, root, where, json_list_text=False, require_captions=require_captions)

    with path.open("rb") as handle:
        lines = _Lines(handle, offset, line)
        while True:
            start, number = lines.offset, lines.line
            text = next(lines, None)
            if text is None:
                return
            if text.strip():
                where = f"{path}:{number}"
                yield start, number, _parsed(where, lambda: parse(text, where))


# --- Karpathy split JSON -------------------------------------------------------------------


def karpathy_row(image: Any, root: Path, where: str) -> SourceRow:
    if not isinstance(image, dict):
        raise ValueError(f"{where}: expected an object, got {type(image).__name__}")
    filename = image.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise ValueError(f"{where}: missing 'filename'")
    where = f"{where} ({filename})"
    sentences = image.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{where}: missing 'sentences'")
    raw: list[Any] = []
    for sentence in sentences:
        if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
            raw.append(sentence["raw"])
        elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
            raw.append(" ".join(str(t) for t in sentence["tokens"]))
        else:
            raise ValueError(f"{where}: a sentence without 'raw' text: {sentence!r}")
    captions = clean_captions(raw, where)
    filepath = image.get("filepath")
    folder = filepath.strip("/") if isinstance(filepath, str) else ""
    relative = f"{folder}/{filename}" if folder else filename
    return path_row(relative, root, captions, normalise_split(image.get("split"), where), None, where)


def karpathy_rows(path: Path, root: Path) -> Iterator[Positioned]:
    """The images of a Karpathy split JSON (one document: parsed whole), positioned by their index."""
    try:
        with path.open(encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list (the Karpathy split format)")
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        yield index, index, _parsed(where, lambda: karpathy_row(image, root, where))


# --- Parquet -------------------------------------------------------------------------------


def pick_column(
    schema_names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path
) -> str:
    if wanted is not None:
        if wanted not in schema_names:
            raise ValueError(f"{path}: no {what} column {wanted!r} (columns: {', '.join(schema_names)})")
        return wanted
    lowered = {name.lower(): name for name in schema_names}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(
        f"{path}: no {what} column (tried {', '.join(candidates)}; columns: {', '.join(schema_names)}); "
        f"name it with {what}_column="
    )


@dataclass(frozen=True)
class ParquetLayout:
    """The columns of a Parquet file that hold a row's image, captions, split and category."""

    image: str
    caption: str | None  # None: the file has no caption column (allowed where captions are optional)
    extra: tuple[str, ...]
    image_kind: str  # "path" (strings), "bytes" or "struct" (Hugging Face's Image: {"bytes", "path"})


def parquet_layout(path: Path, image_column: str | None, caption_column: str | None,
                   require_captions: bool = True) -> tuple[Any, ParquetLayout]:
    """The opened file and its layout; ValueError naming the file when it is no Parquet file or
    has no image column of a usable type, or no caption column (when one is named, or `require_captions`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    image_col = pick_column(names, image_column, PARQUET_IMAGE_COLUMNS, "image", path)
    caption_col: str | None = None
    if require_captions or caption_column is not None or any(c in PARQUET_CAPTION_COLUMNS for c in map(str.lower, names)):
        caption_col = pick_column(names, caption_column, PARQUET_CAPTION_COLUMNS, "caption", path)
    extra = tuple(c for c in ("split", "category") if c in names and c not in (image_col, caption_col))
    image_type = parquet.schema_arrow.field(image_col).type
    if pa.types.is_struct(image_type):
        kind = "struct"
    elif pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type):
        kind = "bytes"
    elif pa.types.is_string(image_type) or pa.types.is_large_string(image_type):
        kind = "path"
    else:
        raise ValueError(f"{path}: image column {image_col!r} has type {image_type}; "
                         "expected bytes, a path string or a struct of bytes and path")
    return parquet, ParquetLayout(image_col, caption_col, extra, kind)


def parquet_row(layout: ParquetLayout, image: Any, caption: Any, split: Any, group: Any, root: Path, where: str,
                read_images: bool) -> SourceRow:
    if caption is not None and isinstance(caption, list) and caption and isinstance(caption[0], dict):
        caption = [c.get("raw") for c in caption]  # Karpathy-style sentence structs
    captions = [] if layout.caption is None else clean_captions(caption if caption is not None else "", where)
    split = normalise_split(split, where)
    group = optional_text(group, where, "category")
    if layout.image_kind == "path":
        return path_row(image, root, captions, split, group, where)
    if not read_images:  # the bytes were not read: the row is described by where it is
        return bytes_row(None, None, captions, split, group, where, where)
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        if image.get("bytes"):
            return bytes_row(image["bytes"], image.get("path"), captions, split, group, where, where)
        if image.get("path"):
            # a file, but no key: whether a struct holds bytes or a path is known only once read
            return replace(path_row(image["path"], root, captions, split, group, where), key=None, location=where)
        missing = f"image {layout.image!r} has neither bytes nor a path"
    elif isinstance(image, bytes):
        return bytes_row(image, None, captions, split, group, where, where)
    else:
        missing = f"image {layout.image!r} is missing"
    return SourceRow(where, captions, split, group, in_source=True, location=where, missing=missing)


def parquet_rows(path: Path, root: Path, *, image_column: str | None, caption_column: str | None,
                 offset: int = 0, read_images: bool = True, require_captions: bool = True) -> Iterator[Positioned]:
    """The rows of a Parquet file from row `offset` (counted from 0) on, streamed in record
    batches of the columns needed: without `read_images`, an image column of bytes is not read."""
    parquet, layout = parquet_layout(path, image_column, caption_column, require_captions)
    columns = [name for name in (layout.caption, *layout.extra) if name is not None]
    if read_images or layout.image_kind == "path":
        columns.insert(0, layout.image)
    groups, first = [], 0  # the row groups from the one holding `offset`, and that group's first row
    for group_index in range(parquet.metadata.num_row_groups):
        rows_in_group = parquet.metadata.row_group(group_index).num_rows
        if groups or offset < first + rows_in_group:
            groups.append(group_index)
        elif not groups:
            first += rows_in_group
    if not groups:
        return
    row = first
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        absent = [None] * batch.num_rows
        images, captions, splits, groups_ = (
            batch.column(name).to_pylist() if name in batch.schema.names else absent
            for name in (layout.image, layout.caption, "split", "category"))
        for image, caption, split, group in zip(images, captions, splits, groups_):
            if row >= offset:
                where = f"{path}: row {row}"
                yield row, row, _parsed(where, lambda: parquet_row(layout, image, caption, split, group, root, where,
                                                                   read_images))
            row += 1


# --- WebDataset ----------------------------------------------------------------------------


def wds_key(member_name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ``dir/abc.seg.jpg`` → ``("dir/abc", "seg.jpg")``."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext if dot else "")


def _open_tar(shard: Path) -> BinaryIO:
    """The shard's tar stream, seekable: gzip-compressed shards are decompressed as they are read
    (a seek there decompresses everything before the offset)."""
    if shard.name.lower().endswith((".gz", ".tgz")):
        return gzip.open(shard, "rb")  # type: ignore[return-value]
    return shard.open("rb")


def iter_wds_samples(shard: Path, *, offset: int = 0, number: int = 0,
                     read: Callable[[str], bool] = lambda ext: True
                     ) -> Iterator[tuple[int, int, str, dict[str, bytes | None]]]:
    """``(offset, number, key, {extension: bytes})`` per sample from the member header at byte
    `offset` of the tar stream (`number`: that sample's number in the shard, from 0). A sample's
    files are consecutive members; an extension that `read` declines maps to None (its bytes are
    skipped, not read)."""
    key: str | None = None
    start = 0
    files: dict[str, bytes | None] = {}
    try:
        with _open_tar(shard) as handle:
            handle.seek(offset)
            archive = tarfile.TarFile(fileobj=handle)
            while (member := archive.next()) is not None:
                archive.members.clear()  # a TarFile keeps every member it met: memory would grow with the shard
                if not member.isfile():
                    continue
                member_key, ext = wds_key(member.name)
                if member_key.rsplit("/", 1)[-1].startswith("_") or not ext:
                    continue  # metadata such as __index__ files
                if member_key != key:
                    if key is not None:
                        yield start, number, key, files
                        number += 1
                    key, start, files = member_key, member.offset, {}
                ext = ext.lower()
                if read(ext):
                    data = archive.extractfile(member)
                    assert data is not None
                    files[ext] = data.read()
                else:
                    files[ext] = None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{shard}: not a readable tar shard ({exc})") from None
    if key is not None:
        yield start, number, key, files


def sidecar_fields(where: str, json_data: bytes | None, txt_data: bytes | None
                   ) -> tuple[list[str] | None, str | None, str | None]:
    """(captions, split, category) from a sample's ``.json`` and ``.txt`` (a WebDataset sample's
    members, an image file's sidecars in a folder): the JSON's ``captions``/``caption``/``text``
    first, else the text's non-empty lines; captions None where neither holds any. `where` is the
    sample without its extension."""
    captions: list[str] | None = None
    split = group = None
    if json_data is not None:
        try:
            meta = json.loads(json_data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}.json: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}.json: expected a JSON object, got {type(meta).__name__}")
        for name in ("captions", "caption", "text"):
            if meta.get(name) is not None:
                captions = clean_captions(meta[name], f"{where}.json")
                break
        split = normalise_split(meta.get("split"), f"{where}.json")
        group = optional_text(meta.get("category"), f"{where}.json", "category")
    if captions is None and txt_data is not None:
        text = txt_data.decode("utf-8", "surrogateescape")
        captions = clean_captions([line for line in text.splitlines() if line.strip()] or "", f"{where}.txt")
    return captions, split, group


def wds_row(shard: Path, key: str, files: dict[str, bytes | None], *, require_captions: bool = True) -> SourceRow:
    where = f"{shard}:{key}"
    captions, split, group = sidecar_fields(where, (files["json"] or b"") if "json" in files else None,
                                            (files["txt"] or b"") if "txt" in files else None)
    if captions is None and not require_captions:
        captions = []
    if captions is None:
        raise ValueError(f"{where}: no caption (expected {key}.txt, or {key}.json with 'caption' or 'captions')")
    image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None:
        return SourceRow(where, captions, split, group, in_source=True, location=where,
                         missing=f"no image in the sample (expected {'/'.join(WDS_IMAGE_EXTENSIONS)})")
    return bytes_row(files[image_ext], f"{key}.{image_ext}", captions, split, group, where,
                     f"{where}.{image_ext}")


def wds_rows(shard: Path, *, offset: int = 0, number: int = 0, read_images: bool = True,
             require_captions: bool = True) -> Iterator[Positioned]:
    """The samples of a WebDataset tar shard, from the sample whose first member's header is at
    byte `offset` of the tar stream. Without `read_images` the image members are skipped unread."""
    def wanted(ext: str) -> bool:  # the other members (and without read_images, the images) are skipped unread
        return ext in ("txt", "json") or (read_images and ext in WDS_IMAGE_EXTENSIONS)

    for start, sample, key, files in iter_wds_samples(shard, offset=offset, number=number, read=wanted):
        yield start, sample, _parsed(f"{shard}:{key}", lambda: wds_row(shard, key, files, require_captions=require_captions))


# --- a folder of images -------------------------------------------------------------------
#
# Not one of the import FORMATS (import needs captions): the indexer reads a folder as a corpus
# whose rows are its image files, captions optional, from same-name sidecars.

FOLDER = "folder"
SIDECAR_EXTENSIONS = ("txt", "json")


@dataclass
class FolderWalk:
    """The image files under a folder, in walk order, and what the walk skipped: `hidden` (files
    and directories whose name starts with "."; a directory counts once, unread), `not_images`
    (files that are neither an image nor an image's sidecar: SVG among them, for now) and
    `outside_links` (symlinks whose target leaves the folder, or is missing: not followed)."""

    images: list[Path] = field(default_factory=list)
    hidden: int = 0
    not_images: int = 0
    outside_links: int = 0


def _extension(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


def walk_folder(root: Path, allowed_image_roots: Sequence[str | os.PathLike[str]] = ()) -> FolderWalk:
    """Every image file under `root` (FOLDER_IMAGE_EXTENSIONS, any case), depth first with each
    directory's entries sorted by name: the same tree gives the same order, so its shards are
    reproducible. Symlinks inside the tree are read as files (a link to a directory is not
    descended: its target is walked where it is), links leaving it are not followed, but for
    links to files under `allowed_image_roots`."""
    root = root.resolve()
    roots = ImageRoots([root, *allowed_image_roots])
    walk = FolderWalk()

    def visit(directory: Path) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as exc:
            raise ValueError(f"{directory}: cannot list the folder ({exc.strerror or exc})") from None
        stems = {entry.name.rpartition(".")[0] for entry in entries
                 if _extension(entry.name) in FOLDER_IMAGE_EXTENSIONS and not entry.name.startswith(".")}
        for entry in entries:
            if entry.name.startswith("."):
                walk.hidden += 1
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = roots.place(path)
                if target is None or not target.exists():
                    walk.outside_links += 1
                    continue
                if target.is_dir():
                    continue
            if entry.is_dir(follow_symlinks=False):
                visit(path)
            elif _extension(entry.name) in FOLDER_IMAGE_EXTENSIONS:
                walk.images.append(path)
            elif not (_extension(entry.name) in SIDECAR_EXTENSIONS and entry.name.rpartition(".")[0] in stems):
                walk.not_images += 1

    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    visit(root)
    return walk


def folder_row(root: Path, image: Path) -> SourceRow:
    """The row of one image file of a folder: its path, its key the path relative to `root`, and
    the captions (split, category) of its sidecars ``<name>.json``/``<name>.txt`` beside it, if any
    (read as a WebDataset sample's ``.json`` and ``.txt``)."""
    stem = image.with_name(image.name.rpartition(".")[0])
    where = str(image)

    def sidecar(ext: str) -> bytes | None:
        try:
            return stem.with_name(f"{stem.name}.{ext}").read_bytes()
        except FileNotFoundError:
            return None

    def parse() -> SourceRow:
        captions, split, group = sidecar_fields(str(stem), sidecar("json"), sidecar("txt"))
        return SourceRow(where, captions or [], split, group, image=image,
                         key=image.relative_to(root).as_posix(), location=where)

    return _parsed(where, parse)


# --- sources and formats -------------------------------------------------------------------


def is_glob(source: Path) -> bool:
    return any(ch in str(source) for ch in "*?[")


def expand_source(source: Path, suffixes: Sequence[str]) -> list[Path]:
    """A file, a directory (its files with one of ``suffixes``, sorted) or a glob pattern."""
    if is_glob(source):
        files = sorted(Path(p) for p in glob.glob(str(source)))
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    else:
        files = [source]
    if not files:
        raise ValueError(f"{source}: no {'/'.join(suffixes)} files found")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}: no such file")
    return files


WDS_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def source_files(source: Path, format: str) -> list[Path]:
    """The files of a source: the file itself (csv, jsonl, karpathy), or for parquet and webdataset a
    file, a directory of them or a glob."""
    if format in ("parquet", "webdataset"):
        return expand_source(source, PARQUET_SUFFIXES if format == "parquet" else WDS_SUFFIXES)
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    return [source]


def corpus_root(file: Path, image_root: Path | None) -> Path:
    """Where a source file's relative image paths start, and its images must lie: `image_root`,
    else the file's directory."""
    return Path(image_root) if image_root is not None else file.parent


def file_rows(format: str, file: Path, *, image_root: Path | None = None, image_column: str | None = None,
              caption_column: str | None = None, offset: int = 0, number: int | None = None,
              read_images: bool = True, require_captions: bool = True,
              allowed_image_roots: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Positioned]:
    """``(offset, number, row)`` for each row of one file of a source, from `offset` on (a byte
    offset for csv, jsonl and a tar stream, a row index for parquet and karpathy), `number` being
    that row's line (from 1) or sample number (from 0) for messages. Image paths are relative to
    `image_root`, else to the file's directory. A file that cannot be read as its format at all is a
    ValueError naming it; a malformed row is a row with a ``problem``, and so is a row whose image
    lies outside that root and `allowed_image_roots`. Without `require_captions`
    (the indexer's images) a table, Parquet file or sample with no captions gives rows without
    any; a caption column named by `caption_column` must still be there."""
    root = corpus_root(file, image_root)
    if format == "csv":
        rows = csv_rows(file, root, offset=offset, line=number or 1, require_captions=require_captions)
    elif format == "jsonl":
        rows = jsonl_rows(file, root, offset=offset, line=number or 1, require_captions=require_captions)
    elif format == "karpathy":
        rows = itertools.islice(karpathy_rows(file, root), offset, None)
    elif format == "parquet":
        rows = parquet_rows(file, root, image_column=image_column, caption_column=caption_column, offset=offset,
                            read_images=read_images, require_captions=require_captions)
    elif format == "webdataset":  # its images are bytes in the shard: no path to confine
        return wds_rows(file, offset=offset, number=number or 0, read_images=read_images,
                        require_captions=require_captions)
    else:
        raise ValueError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    return _confined(rows, ImageRoots([root, *allowed_image_roots]))


def _confined(rows: Iterator[Positioned], roots: ImageRoots) -> Iterator[Positioned]:
    """`rows`, those whose image file lies outside `roots` made malformed rows that say so."""
    for offset, number, row in rows:
        refused = roots.refusal(row.image, row.where) if row.image is not None and not row.problem else ""
        if refused:
            row = SourceRow(row.where, problem=refused, location=row.where)
        yield offset, number, row


def detect_format(source: Path) -> str:
    name = source.name.lower()
    if is_glob(source):
        if name.endswith(WDS_SUFFIXES):
            return "webdataset"
        if name.endswith(PARQUET_SUFFIXES):
            return "parquet"
    elif source.is_dir():
        kinds = set()
        for file in source.iterdir():
            if file.name.lower().endswith(WDS_SUFFIXES):
                kinds.add("webdataset")
            elif file.name.lower().endswith(PARQUET_SUFFIXES):
                kinds.add("parquet")
        if len(kinds) == 1:
            return kinds.pop()
        if not kinds:
            return FOLDER
    elif name.endswith((".csv", ".tsv")):
        return "csv"
    elif name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    elif name.endswith(".json"):
        return "karpathy"
    elif name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    elif name.endswith(WDS_SUFFIXES):
        return "webdataset"
    raise ValueError(f"{source}: cannot tell its format; pass format= one of {', '.join(FORMATS)}")


def import_corpus(
    source: Path,
    out_dir: Path,
    *,
    format: str = "auto",
    split: str | None = None,
    image_root: Path | None = None,
    style: str | None = None,
    test_fraction: float = 0.1,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_column: str | None = None,
    caption_column: str | None = None,
    progress: bool = True,
    allowed_image_roots: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Convert ``source`` into ``out_dir/manifest.jsonl`` and return that path.

    ``format``: ``auto`` (from the name), ``csv``, ``jsonl``, ``karpathy``, ``parquet`` or ``webdataset``;
    Parquet and WebDataset accept a file, a directory of them or a glob. Image paths are relative to
    ``image_root``, else to the source file's directory. ``split`` puts every row in that split;
    otherwise the source's split is kept and rows without one go to test with probability
    ``test_fraction`` (val: ``val_fraction``), decided by a hash of ``seed`` and the row id.
    ``style`` defaults to the source's name (``dataset_flickr30k.json`` → ``flickr30k``).
    ``image_column``/``caption_column`` name Parquet columns when detection by name is not enough.
    An image path must lie under the image root (else the source file's directory) or under one
    of ``allowed_image_roots`` (and ``$XMODAL_ALLOWED_IMAGE_ROOTS``: ``settings.allowed_image_roots``);
    a row naming another file stops the import, as a malformed one does.
    """
    started = time.perf_counter()
    source = Path(source)
    out_dir = Path(out_dir)
    if format == "auto":
        format = detect_format(source)
    if format == FOLDER:
        raise ValueError(f"{source} is a folder of images: import needs captions, index it directly "
                         "(xmodal index --input FOLDER)")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    if not 0.0 <= test_fraction <= 1.0 or not 0.0 <= val_fraction <= 1.0 or test_fraction + val_fraction > 1.0:
        raise ValueError(
            f"test_fraction {test_fraction} and val_fraction {val_fraction} must be in [0, 1] and sum to at most 1"
        )
    forced_split = normalise_split(split, "split=") if split is not None else None
    style = style or default_style(source)
    allowed_image_roots = settings.allowed_image_roots(allowed_image_roots)

    out_dir.mkdir(parents=True, exist_ok=True)
    skip_log = SkipLog(out_dir / "skipped.jsonl")
    collector = Collector()
    with tqdm(desc=f"import {style}", unit="row", disable=not progress, file=sys.stderr) as bar:
        ctx = Context(style, collector, skip_log, ImageStore(out_dir / "images"), bar)
        read_roots: list[Path] = []
        for file in source_files(source, format):
            read_roots.append(corpus_root(file, image_root).resolve())
            for _, _, row in file_rows(format, file, image_root=image_root, image_column=image_column,
                                       caption_column=caption_column, allowed_image_roots=allowed_image_roots):
                ctx.add(row)

    rows: list[ManifestRow] = []
    for entry in collector.entries.values():
        item_id = f"{style}/{entry.key}"
        rows.append(ManifestRow(
            id=item_id,
            concept=item_id,
            style=style,
            split=forced_split or entry.split or hash_split(
                item_id, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed),
            image=entry.image,
            captions=entry.captions,
            group=entry.group,
        ))
    manifest = write_manifest(out_dir / "manifest.jsonl", rows)
    elsewhere = _roots_outside(out_dir, [*read_roots, *allowed_image_roots], [row.image for row in rows])
    # The manifest's images must lie under its directory unless its reader allows theirs: the
    # directories this import was told to read are recorded for its readers (manifest.imported_roots,
    # honoured inside the data directory).
    record_imported_roots(out_dir, elsewhere)
    if elsewhere and not out_dir.resolve().is_relative_to(settings.data_dir().resolve()):
        print(f"the manifest names images outside {out_dir}, under {', '.join(elsewhere)}: to read it, allow "
              f"those (XMODAL_ALLOWED_IMAGE_ROOTS={os.pathsep.join(elsewhere)}, or xmodal index --allow-image-root "
              "DIR, or allowed_image_roots= in Python)", flush=True)
    splits: dict[str, int] = {}
    for row in rows:
        splits[row.split] = splits.get(row.split, 0) + 1
    split_text = ", ".join(f"{name} {count}" for name, count in sorted(splits.items()))
    print(
        f"import {format}: {len(rows)} images, {sum(len(r.captions) for r in rows)} captions "
        f"({split_text or 'none'}); {collector.merged} rows merged into earlier images, "
        f"{ctx.store.written} images written, {skip_log.count} skipped; "
        f"{time.perf_counter() - started:.1f} s -> {manifest}",
        flush=True,
    )
    return manifest


def _roots_outside(out_dir: Path, roots: Sequence[Path | str], images: Sequence[Path]) -> list[str]:
    """Those of `roots` that hold images lying outside `out_dir`: what a reader of the manifest
    written there must allow."""
    inside = ImageRoots([out_dir])
    outside = [image for image in images if image not in inside]
    holding = []
    for root in dict.fromkeys(map(str, roots)):
        under = ImageRoots([root])
        if any(image in under for image in outside):
            holding.append(root)
    return holding
