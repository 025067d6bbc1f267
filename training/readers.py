"""Turn the image–text formats users bring into the project's manifest (docs/architecture.md).

Formats: ``csv`` (or ``.tsv``) and ``jsonl`` tables of ``image`` + ``caption``/``captions``, the
Karpathy split JSON (Flickr30k, MSCOCO), ``parquet`` with an image-bytes or image-path column, and
``webdataset`` tar shards (``key.jpg`` + ``key.txt``/``key.json``). Training and indexing then read
the manifest only: images stored as bytes inside the source (Parquet, WebDataset) are written once
to ``out_dir/images/<sha256[:2]>/<sha256[:32]>.<ext>``; images on disk stay where they are.

Each image is one row: its ``concept`` and ``id`` are ``<style>/<key>`` where the key is the image
path relative to its root (path formats) or its content hash (byte formats), so rows describing the
same image are merged into one with all their captions. ``category`` becomes ``group``. A source
split is kept (``restval`` → train); without one, the split is drawn from a hash of the id, so a
re-import gives the same split. Malformed input raises ``ValueError("<file>:<line>: …")`` (Parquet:
``<file>: row <i>`` counted from 0; WebDataset: ``<shard>:<member>``); an image that cannot be found
is recorded in ``out_dir/skipped.jsonl`` and left out.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xmodal.training.emoji import SkipLog, write_atomic
from xmodal.training.manifest import ManifestRow, json_object, write_manifest

FORMATS = ("csv", "jsonl", "karpathy", "parquet", "webdataset")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
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
    """A caption string or a list of them → a non-empty list of stripped, non-empty captions."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: captions must be a string or a list of strings, got {value!r}")
    captions = [c.strip() for c in value]
    if not captions or not all(captions):
        raise ValueError(f"{where}: empty caption")
    return captions


def optional_text(value: Any, where: str, name: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string, got {value!r}")
    return value.strip() or None


def default_style(source: Path) -> str:
    if any(ch in source.name for ch in "*?["):
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
    """Image bytes written once under ``images/``, named by content: ``<sha256[:2]>/<sha256[:32]>.<ext>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written = 0

    def put(self, data: bytes, name_hint: str | None) -> tuple[str, Path] | None:
        """``(content key, path)``, or None when the bytes are not a recognisable image.

        The file keeps the original extension where the name had an image one, else the sniffed type's.
        """
        sniffed = sniff_extension(data)
        if sniffed is None:
            return None
        ext = name_hint.rsplit(".", 1)[1].lower() if name_hint and "." in name_hint else ""
        ext = ext if ext in IMAGE_EXTENSIONS else sniffed
        key = hashlib.sha256(data).hexdigest()[:HASH_HEX]
        path = self.root / key[:2] / f"{key}.{ext}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            self.written += 1
        return key, path


@dataclass
class Context:
    style: str
    collector: Collector
    skip_log: SkipLog
    store: ImageStore
    bar: tqdm

    def add_path(self, image_value: Any, root: Path, captions: list[str], split: str | None,
                 group: str | None, where: str) -> None:
        """A row whose image is a file under ``root``: kept as is, or skipped if the file is missing."""
        if not isinstance(image_value, str) or not image_value.strip():
            raise ValueError(f"{where}: 'image' must be a non-empty path, got {image_value!r}")
        relative = Path(image_value.strip())
        image = (root / relative).absolute()
        self.bar.update(1)
        if not image.is_file():
            self.skip_log.record(str(image), f"image file not found ({where})")
            return
        key = Path(os.path.normpath(relative)).as_posix().lstrip("/")
        self.collector.add(key, image, captions, split, group)

    def add_bytes(self, data: bytes, name_hint: str | None, captions: list[str], split: str | None,
                  group: str | None, where: str) -> None:
        self.bar.update(1)
        stored = self.store.put(data, name_hint)
        if stored is None:
            self.skip_log.record(where, "bytes are not a recognised image (png, jpeg, webp, gif, bmp, tiff)")
            return
        key, path = stored
        self.collector.add(key, path, captions, split, group)


# --- csv / jsonl ---------------------------------------------------------------------------


def table_captions(record: dict[str, Any], where: str, *, json_list_text: bool) -> list[str]:
    """``captions`` (a list, or in CSV a JSON list) or ``caption``."""
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
    raise ValueError(f"{where}: missing 'caption' or 'captions'")


def read_csv(path: Path, root: Path, ctx: Context) -> None:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        if "image" not in columns:
            raise ValueError(f"{path}:1: missing column 'image' (columns: {', '.join(columns) or 'none'})")
        if "caption" not in columns and "captions" not in columns:
            raise ValueError(f"{path}:1: missing column 'caption' or 'captions' (columns: {', '.join(columns)})")
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                raise ValueError(f"{where}: more fields than the header has")
            add_table_record(record, root, ctx, where, json_list_text=True)


def read_jsonl(path: Path, root: Path, ctx: Context) -> None:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            record = json_object(line, where=where)
            if "image" not in record:
                raise ValueError(f"{where}: missing key 'image'")
            add_table_record(record, root, ctx, where, json_list_text=False)


def add_table_record(record: dict[str, Any], root: Path, ctx: Context, where: str, *, json_list_text: bool) -> None:
    captions = table_captions(record, where, json_list_text=json_list_text)
    split = normalise_split(record.get("split"), where)
    group = optional_text(record.get("category"), where, "category")
    ctx.add_path(record.get("image"), root, captions, split, group, where)


# --- Karpathy split JSON -------------------------------------------------------------------


def read_karpathy(path: Path, root: Path, ctx: Context) -> None:
    try:
        with path.open(encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list (the Karpathy split format)")
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
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
        ctx.add_path(relative, root, captions, normalise_split(image.get("split"), where), None, where)


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


def read_parquet(path: Path, root: Path, ctx: Context, *, image_column: str | None, caption_column: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    image_col = pick_column(names, image_column, PARQUET_IMAGE_COLUMNS, "image", path)
    caption_col = pick_column(names, caption_column, PARQUET_CAPTION_COLUMNS, "caption", path)
    extra = [c for c in ("split", "category") if c in names and c not in (image_col, caption_col)]
    image_type = parquet.schema_arrow.field(image_col).type
    if not (pa.types.is_struct(image_type) or pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise ValueError(f"{path}: image column {image_col!r} has type {image_type}; "
                         "expected bytes, a path string or a struct of bytes and path")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[image_col, caption_col, *extra]):
        images = batch.column(image_col).to_pylist()
        captions = batch.column(caption_col).to_pylist()
        splits = batch.column("split").to_pylist() if "split" in extra else [None] * len(images)
        groups = batch.column("category").to_pylist() if "category" in extra else [None] * len(images)
        for image, caption, split, group in zip(images, captions, splits, groups):
            where = f"{path}: row {row}"
            row += 1
            if caption is not None and isinstance(caption, list) and caption and isinstance(caption[0], dict):
                caption = [c.get("raw") for c in caption]  # Karpathy-style sentence structs
            row_captions = clean_captions(caption if caption is not None else "", where)
            row_split = normalise_split(split, where)
            row_group = optional_text(group, where, "category")
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                if image.get("bytes"):
                    ctx.add_bytes(image["bytes"], image.get("path"), row_captions, row_split, row_group, where)
                elif image.get("path"):
                    ctx.add_path(image["path"], root, row_captions, row_split, row_group, where)
                else:
                    raise ValueError(f"{where}: image {image_col!r} has neither bytes nor a path")
            elif isinstance(image, bytes):
                if not image:
                    raise ValueError(f"{where}: image {image_col!r} is empty")
                ctx.add_bytes(image, None, row_captions, row_split, row_group, where)
            elif isinstance(image, str):
                ctx.add_path(image, root, row_captions, row_split, row_group, where)
            else:
                raise ValueError(f"{where}: image {image_col!r} is missing")


# --- WebDataset ----------------------------------------------------------------------------


def wds_key(member_name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ``dir/abc.seg.jpg`` → ``("dir/abc", "seg.jpg")``."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext if dot else "")


def iter_wds_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample; a sample's files are consecutive in the shard."""
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = wds_key(member.name)
                if member_key.rsplit("/", 1)[-1].startswith("_") or not ext:
                    continue  # metadata such as __index__ files
                if member_key != key:
                    if key is not None:
                        yield key, files
                    key, files = member_key, {}
                data = archive.extractfile(member)
                assert data is not None
                files[ext.lower()] = data.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{shard}: not a readable tar shard ({exc})") from None
    if key is not None:
        yield key, files


def read_webdataset_shard(shard: Path, ctx: Context) -> None:
    for key, files in iter_wds_samples(shard):
        where = f"{shard}:{key}"
        captions: list[str] | None = None
        split = group = None
        if "json" in files:
            try:
                meta = json.loads(files["json"])
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
        if captions is None and "txt" in files:
            try:
                text = files["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}.txt: not UTF-8 ({exc})") from None
            captions = clean_captions([line for line in text.splitlines() if line.strip()] or "", f"{where}.txt")
        if captions is None:
            raise ValueError(f"{where}: no caption (expected {key}.txt, or {key}.json with 'caption' or 'captions')")
        image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in files), None)
        if image_ext is None:
            ctx.bar.update(1)
            ctx.skip_log.record(where, f"no image in the sample (expected {'/'.join(WDS_IMAGE_EXTENSIONS)})")
            continue
        ctx.add_bytes(files[image_ext], f"{key}.{image_ext}", captions, split, group, f"{where}.{image_ext}")


# --- sources and formats -------------------------------------------------------------------


def expand_source(source: Path, suffixes: Sequence[str]) -> list[Path]:
    """A file, a directory (its files with one of ``suffixes``, sorted) or a glob pattern."""
    text = str(source)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
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


def detect_format(source: Path) -> str:
    name = source.name.lower()
    if any(ch in str(source) for ch in "*?["):
        if name.endswith(WDS_SUFFIXES):
            return "webdataset"
        if name.endswith((".parquet", ".pq")):
            return "parquet"
    elif source.is_dir():
        kinds = set()
        for file in source.iterdir():
            if file.name.lower().endswith(WDS_SUFFIXES):
                kinds.add("webdataset")
            elif file.name.lower().endswith((".parquet", ".pq")):
                kinds.add("parquet")
        if len(kinds) == 1:
            return kinds.pop()
    elif name.endswith((".csv", ".tsv")):
        return "csv"
    elif name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    elif name.endswith(".json"):
        return "karpathy"
    elif name.endswith((".parquet", ".pq")):
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
) -> Path:
    """Convert ``source`` into ``out_dir/manifest.jsonl`` and return that path.

    ``format``: ``auto`` (from the name), ``csv``, ``jsonl``, ``karpathy``, ``parquet`` or ``webdataset``;
    Parquet and WebDataset accept a file, a directory of them or a glob. Image paths are relative to
    ``image_root``, else to the source file's directory. ``split`` puts every row in that split;
    otherwise the source's split is kept and rows without one go to test with probability
    ``test_fraction`` (val: ``val_fraction``), decided by a hash of ``seed`` and the row id.
    ``style`` defaults to the source's name (``dataset_flickr30k.json`` → ``flickr30k``).
    ``image_column``/``caption_column`` name Parquet columns when detection by name is not enough.
    """
    started = time.perf_counter()
    source = Path(source)
    out_dir = Path(out_dir)
    if format == "auto":
        format = detect_format(source)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    if not 0.0 <= test_fraction <= 1.0 or not 0.0 <= val_fraction <= 1.0 or test_fraction + val_fraction > 1.0:
        raise ValueError(
            f"test_fraction {test_fraction} and val_fraction {val_fraction} must be in [0, 1] and sum to at most 1"
        )
    forced_split = normalise_split(split, "split=") if split is not None else None
    style = style or default_style(source)

    out_dir.mkdir(parents=True, exist_ok=True)
    skip_log = SkipLog(out_dir / "skipped.jsonl")
    collector = Collector()
    with tqdm(desc=f"import {style}", unit="row", disable=not progress, file=sys.stderr) as bar:
        ctx = Context(style, collector, skip_log, ImageStore(out_dir / "images"), bar)
        if format in ("csv", "jsonl", "karpathy"):
            if not source.is_file():
                raise ValueError(f"{source}: no such file")
            root = Path(image_root) if image_root is not None else source.parent
            {"csv": read_csv, "jsonl": read_jsonl, "karpathy": read_karpathy}[format](source, root, ctx)
        elif format == "parquet":
            for file in expand_source(source, (".parquet", ".pq")):
                root = Path(image_root) if image_root is not None else file.parent
                read_parquet(file, root, ctx, image_column=image_column, caption_column=caption_column)
        else:
            for shard in expand_source(source, WDS_SUFFIXES):
                read_webdataset_shard(shard, ctx)

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
