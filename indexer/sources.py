"""The input as a streaming Ray datasource, and the CPU stage that reads image files.

`scan` makes one pass over the input (a manifest, or another format users bring:
``formats.py``) in the driver (O(shards) memory); `dataset` reads the shards still to do in Ray
read tasks, one per shard (see the section below).

Columns carried through the pipeline (numpy batches):
  images:   item, path, relative_path, folder, concept, style, captions (JSON text), error, letter,
            in_source, mtime, stamp (a folder image's), data
            -> + id, size, width, height, read_seconds (data: the image's bytes); the read stage
            sets mtime for an image file (before it, that of the source file holding the bytes)
  captions: item, caption, concept, style, image, id, data (UTF-8 bytes), error, letter, read_seconds
  the embedding stage adds vector (and vector_<level> for each other level of a
  hierarchical model's card) and embed_seconds, and drops data.
`item` numbers the items in input order (it places an item in its shard). `error` is ""
for a good item and the reason otherwise; bad items travel on to the driver, which writes
them to the dead-letter file instead of Milvus. `letter` is "" or, for an item whose text
Milvus (and Arrow) cannot hold, that text exactly, as JSON, for its dead letter.
`in_source` marks an image whose bytes the source holds (a Parquet column, a tar member): it
comes with its `data` from the read task, its `path` says where it is in the source until the
read stage writes it to a file beside the collection.
`*_seconds` are each item's share of the stage's busy time, summed by the driver for the
report.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from xmodal import contract
from xmodal.indexer import formats
from xmodal.indexer.formats import InputSpec


def content_id(data: bytes) -> str:
    """The primary key: sha256 of the content, first 32 hex digits."""
    return hashlib.sha256(data).hexdigest()[:32]


def text_problem(what: str, value: str, max_bytes: int | None = None) -> str:
    """"" when `value` can go into a Milvus VARCHAR of `max_bytes`, else why it cannot.

    A lone surrogate is what text that was not UTF-8 turns into in Python: a ``\\udcff``
    escape in a JSON manifest, or bytes decoded with ``surrogateescape``. Milvus would refuse
    the whole upsert that carries it, so the item is refused here instead.
    """
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return (f"{what} is not valid UTF-8 text: {value!r} has the lone surrogate "
                f"{value[exc.start]!r} at character {exc.start}")
    if max_bytes is not None and size > max_bytes:
        return f"{what} is {size} bytes of UTF-8; the collection holds at most {max_bytes}"
    return ""


def _first_problem(*problems: str) -> str:
    return next((p for p in problems if p), "")


# ---- The input, streamed -----------------------------------------------------------------
#
# The driver makes one streaming pass over the input (`scan`): it numbers the items, cuts them
# into shards and keeps, per shard, where it starts (file, offset: `formats` says what an offset
# is in each format) and a digest of its items: O(shards) memory, whatever the corpus. The read
# tasks (`InputDatasource`, one per shard still to do) start at their shard, read its items and
# check the digest, so an input edited during a run fails the run instead of mislabelling shards.

IMAGE, CAPTION = "image", "caption"


@dataclass(frozen=True)
class Shard:
    """One shard of the input: where it starts and what it holds."""

    number: int
    offset: int  # where its first item's row starts in files[0] (formats.py: a byte offset, a row index)
    line: int  # that row's line (from 1), row or sample number, for messages
    first_item: int  # the number of its first item
    items: int  # its items (images: rows; captions: every caption, repeats included)
    skip: int  # captions: the captions of that first row that belong to the shard before
    emitted: int  # rows its read yields: every image; one per distinct caption text
    digest: str  # sha256 of its items' descriptions
    files: tuple[str, ...] = ()  # the files its rows are in, in order
    rows: tuple[formats.Row, ...] | None = None  # Karpathy: its rows, parsed by the driver


@dataclass
class InputPlan:
    spec: InputSpec
    limit: int | None
    shard_size: int
    items: int
    items_sha256: str
    shards: list[Shard]
    # a folder's files its walk skipped (formats.InputFiles): hidden, neither image nor sidecar, links leaving it
    hidden_skipped: int = 0
    not_images_skipped: int = 0
    outside_links_skipped: int = 0
    # the directories its images lie under (formats.image_roots): what the collection records
    image_roots: tuple[str, ...] = ()


def _units(kind: str, row: formats.Row) -> list[str | None]:
    """The items a row makes: itself (images), each of its captions, or a malformed row's letter."""
    return [None] if kind == IMAGE or row.problem else list(row.captions)


def _description(kind: str, number: int, row: formats.Row, caption: str | None) -> bytes:
    if kind == IMAGE:
        described = {"item": number, "path": row.image, "concept": row.concept, "style": row.style,
                     "captions": list(row.captions)}
    else:
        described = {"item": number, "caption": caption, "concept": row.concept, "style": row.style,
                     "image": row.image}
    described.update(row.extra)  # another format's: where the row is, its problem, its file's stamp
    # ensure_ascii: a caption with a lone surrogate must hash, not raise
    return json.dumps(described, sort_keys=True).encode("ascii") + b"\n"


def caption_key(caption: str) -> str:
    # surrogatepass: a caption that is not UTF-8 still gets a key, to de-duplicate its letters
    return content_id(caption.encode("utf-8", "surrogatepass"))


def _unit_key(row: formats.Row, caption: str | None) -> str:
    """A caption item's key: its text's, or for a malformed row's letter one of its own."""
    return caption_key(f"\0{row.where}" if row.problem else caption or "")


def scan(source: formats.Source | str | os.PathLike[str], *, kind: str, split: Any = formats.SPLIT_DEFAULT,
         styles: Collection[str] | str | None = None, limit: int | None = None,
         shard_size: int = 1000, only: Collection[str] | None = None,
         allowed_image_roots: Sequence[str | os.PathLike[str]] = ()) -> InputPlan:
    """One streaming pass over the input: the items' number, their hash, and the shards.

    `only`: of a folder, the files to read (those new or changed since the collection's record of it).
    `allowed_image_roots`: directories outside the input's corpus root its rows may name images in.

    `source`: a manifest path, or a ``formats.Source``. Raises ValueError (naming the file, and
    for a manifest the line) for an input that cannot be read as its format, before any work is
    started; a malformed row of another format is an item that goes to the dead letters.
    """
    if kind not in (IMAGE, CAPTION):
        raise ValueError(f"kind must be {IMAGE!r} or {CAPTION!r}, got {kind!r}")
    if not isinstance(source, formats.Source):
        source = formats.Source(source, format=formats.MANIFEST)
    spec = formats.input_spec(source, kind=kind, split=split, styles=styles, allowed_image_roots=allowed_image_roots)
    found = formats.input_files(spec)
    files = found.files if only is None else [file for file in found.files if file in only]
    keep_rows = spec.format == "karpathy"  # one document, parsed here: the read tasks carry its rows
    shards: list[Shard] = []
    total = hashlib.sha256()
    number = rows = 0
    current: dict[str, Any] | None = None

    def close() -> None:
        digest = current["hash"].hexdigest()
        emitted = current["items"] if kind == IMAGE else len(current["keys"])
        shards.append(Shard(len(shards), current["offset"], current["line"], current["first"], current["items"],
                            current["skip"], emitted, digest, tuple(files[current["file"]:current["last_file"] + 1]),
                            tuple(current["rows"]) if keep_rows else None))
        total.update(digest.encode("ascii") + b"\n")

    if limit is None or limit > 0:
        for file_index, offset, line_number, row in formats.rows(spec, files):
            for index, caption in enumerate(_units(kind, row)):
                if current is None or current["items"] == shard_size:
                    if current is not None:
                        close()
                    current = {"file": file_index, "offset": offset, "line": line_number, "first": number,
                               "skip": index, "items": 0, "hash": hashlib.sha256(), "keys": set(), "rows": []}
                if keep_rows and (not current["rows"] or current["rows"][-1] is not row):
                    current["rows"].append(row)
                current["last_file"] = file_index
                current["hash"].update(_description(kind, number, row, caption))
                if kind == CAPTION:
                    current["keys"].add(_unit_key(row, caption))  # at most shard_size of them
                current["items"] += 1
                number += 1
            rows += 1
            if limit is not None and rows >= limit:
                break
    if current is not None:
        close()
    return InputPlan(spec, limit, shard_size, number, total.hexdigest(), shards,
                     found.hidden, found.not_images, found.outside_links,
                     tuple(formats.image_roots(spec, found.files)))


def _safe_text(value: str) -> str:
    """`value`, or where it is not UTF-8 (a lone surrogate) a readable stand-in that is."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def folder_of(relative_path: str) -> str:
    """The folder of a relative path, "" at the root (or for an absolute path's root)."""
    parent = PurePosixPath(relative_path).parent.as_posix()
    return "" if parent in (".", "/") else parent


def _image_item(number: int, row: formats.Row) -> dict[str, Any]:
    path = row.file or row.image
    captions = [caption for caption in row.captions if caption.strip()]
    error = _first_problem(
        row.problem,
        row.missing,
        text_problem("image path", path, contract.PATH_MAX_LENGTH),
        text_problem("relative path", row.relative_path, contract.PATH_MAX_LENGTH),
        text_problem("concept", row.concept, contract.KEY_MAX_LENGTH),
        text_problem("style", row.style, contract.KEY_MAX_LENGTH),
        *(text_problem(f"caption {i + 1}", caption) for i, caption in enumerate(captions)),
    )
    # A refused item keeps its exact text in `letter` (JSON with \u escapes) for the dead-letter
    # file; its columns carry stand-ins Arrow can hold (it cannot hold a lone surrogate).
    letter = json.dumps({"path": path}) if error else ""
    return {"item": number, "path": _safe_text(path), "relative_path": _safe_text(row.relative_path),
            "folder": _safe_text(folder_of(row.relative_path)), "concept": _safe_text(row.concept),
            "style": _safe_text(row.style), "captions": json.dumps(captions),  # \u escapes
            "error": error, "letter": letter, "in_source": row.in_source, "mtime": row.source_mtime,
            "stamp": row.stamp, "data": b"" if error else row.data or b""}


def _caption_item(number: int, row: formats.Row, caption: str | None) -> dict[str, Any]:
    caption = caption or ""
    error = _first_problem(
        row.problem,
        "empty caption" if not caption.strip() else "",
        text_problem("caption", caption, contract.TEXT_MAX_LENGTH),
        text_problem("image path", row.image, contract.PATH_MAX_LENGTH),
        text_problem("concept", row.concept, contract.KEY_MAX_LENGTH),
        text_problem("style", row.style, contract.KEY_MAX_LENGTH),
    )
    letter = json.dumps({"caption": caption, "image": row.image}) if error else ""
    return {"item": number, "caption": _safe_text(caption), "concept": _safe_text(row.concept),
            "style": _safe_text(row.style), "image": _safe_text(row.image), "id": _unit_key(row, caption),
            "data": b"" if error else caption.encode("utf-8"), "error": error, "letter": letter}


# How a shard's start is named in messages, per format.
_POSITION_WORDS = {"csv": "line", "jsonl": "line", "parquet": "row", "webdataset": "sample", "karpathy": "image",
                   "folder": "image"}


def _changed(spec: InputSpec, shard: Shard, why: str = "no longer holds the items it held") -> ValueError:
    if spec.format == formats.MANIFEST:
        return ValueError(f"manifest {spec.path} changed during the run (shard {shard.number}, from line "
                          f"{shard.line}, {why}): run the command again")
    where = f"{shard.files[0] if shard.files else spec.path}, {_POSITION_WORDS[spec.format]} {shard.line}"
    return ValueError(f"{spec.format} input {spec.path} changed during the run (shard {shard.number} from "
                      f"{where}, {why}): run the command again")


def read_shard(spec: InputSpec, shard: Shard) -> list[dict[str, Any]]:
    """The items of one shard, as the pipeline carries them (images: every row; captions: one
    item per distinct text, the last of its occurrences in the shard).

    ValueError when the input no longer holds what `scan` found there.
    """
    started = time.perf_counter()
    end = shard.first_item + shard.items
    number = shard.first_item
    digest = hashlib.sha256()
    items: list[dict[str, Any]] = []
    if shard.rows is not None:
        positioned: Iterator[tuple[int, int, int, formats.Row]] = ((0, 0, 0, row) for row in shard.rows)
    else:
        positioned = formats.rows(spec, shard.files, offset=shard.offset, number=shard.line,
                                  read_images=spec.kind == IMAGE)
    try:
        first = True
        for _, _, _, row in positioned:
            units = _units(spec.kind, row)
            start = shard.skip if first else 0
            first = False
            for caption in units[start:]:
                if number == end:
                    break
                digest.update(_description(spec.kind, number, row, caption))
                items.append(_image_item(number, row) if spec.kind == IMAGE else _caption_item(number, row, caption))
                number += 1
            if number == end:
                break
    except (ValueError, OSError) as exc:  # the scan read it: it was changed or removed since
        if spec.format == formats.MANIFEST and isinstance(exc, ValueError):
            raise
        raise _changed(spec, shard, f"now: {exc}") from None
    if number != end or digest.hexdigest() != shard.digest:
        raise _changed(spec, shard)
    if spec.kind == CAPTION:
        distinct: dict[str, dict[str, Any]] = {}
        for item in items:  # the last occurrence of a text stands for it
            distinct.pop(item["id"], None)
            distinct[item["id"]] = item
        items = list(distinct.values())
        share = (time.perf_counter() - started) / max(1, len(items))
        for item in items:
            item["read_seconds"] = share
    return items


def _columns(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key in ("item", "mtime"):
            columns[key] = np.array(values, dtype=np.int64)
        elif key.endswith("_seconds"):
            columns[key] = np.array(values, dtype=np.float64)
        elif key == "in_source":
            columns[key] = np.array(values, dtype=bool)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            columns[key] = column
    return columns


def _read_blocks(spec: InputSpec, shard: Shard, block_rows: int) -> Iterator[Any]:
    from ray.data.block import BlockAccessor

    items = read_shard(spec, shard)
    for start in range(0, len(items), block_rows):
        yield BlockAccessor.batch_to_block(_columns(items[start:start + block_rows]))


def _datasource_class():
    from ray.data import Datasource

    class InputDatasource(Datasource):
        """A Ray Data datasource over a scanned input: one read task per shard to do,
        yielding blocks of `block_rows` items (a shard's items in several blocks, so the
        embedding actors share a shard)."""

        def __init__(self, spec: InputSpec, shards: Sequence[Shard], block_rows: int):
            self.spec, self.shards, self.block_rows = spec, list(shards), block_rows

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            from ray.data import ReadTask
            from ray.data.block import BlockMetadata

            return [ReadTask(functools.partial(_read_blocks, self.spec, shard, self.block_rows),
                             BlockMetadata(num_rows=shard.emitted, size_bytes=None, exec_stats=None,
                                           input_files=None))
                    for shard in self.shards]

        def get_name(self) -> str:
            return f"Read{self.spec.format.capitalize()}"

    return InputDatasource


def dataset(spec: InputSpec, shards: Sequence[Shard], *, block_rows: int, num_cpus: float = 1.0):
    """A Ray dataset of the items of `shards` (in shard order), each read task holding `num_cpus`."""
    import ray.data

    if not shards:
        raise ValueError("no shards to read")
    return ray.data.read_datasource(_datasource_class()(spec, shards, block_rows),
                                    override_num_blocks=len(shards), num_cpus=num_cpus)


def reblocked(ds, rows: int, *, num_cpus: float):
    """`ds` in blocks of about `rows` rows, re-blocked by tasks holding `num_cpus` each.

    Ray Data gathers a task's output into blocks of up to 128 MiB, so without this a whole
    shard would go to one embedding actor. ``Dataset.repartition(target_num_rows_per_block=)``
    does the same but its tasks hold a whole CPU, and takes no resources: on nodes of one CPU
    whose embedding actors hold a share each, such a task fits nowhere and the run waits for
    ever. So the same logical operator is built here with the share the reading tasks hold
    (which also lets Ray fuse it into the task before it).
    """
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": num_cpus})
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def check_image(data: bytes) -> tuple[str, int, int]:
    """("", width, height) when Pillow recognises the bytes as an intact image, else (the reason, 0, 0).

    `verify()` checks the structure (PNG chunks and CRCs) without decoding the pixels, which
    the server does anyway; what slips through is caught by Triton, item by item. The size
    is checked against the limit the server's preprocessing sets: Pillow refuses images over
    twice that by itself but only warns below, and the server would then decode them.
    """
    from PIL import Image, UnidentifiedImageError

    import xmodal.preprocessing  # noqa: F401 - sets Image.MAX_IMAGE_PIXELS to the server's limit

    if not data:
        return "empty file", 0, 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object, which tells the reader nothing
        return "cannot decode image: not in an image format Pillow knows", 0, 0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode image: {exc}", 0, 0
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return (f"image too large: {width}x{height} is {width * height:,} pixels, over the limit of "
                f"{limit:,} (a decompression bomb?)"), 0, 0
    return "", width, height


def read_images(batch: dict[str, np.ndarray], image_store: str | None = None) -> dict[str, np.ndarray]:
    """map_batches: read each file (or take the bytes the source held), hash it, check that it
    is an image, and note its size, width and height (and a file's modification time). Bytes
    held by the source that are an image are written once, by content, under
    `image_store` (``<sha256[:2]>/<sha256[:32]>.<ext>``, as ``xmodal data import`` writes them), and
    the item's path becomes that file's: the collection's rows point at files the client can show."""
    from xmodal.readers import ImageStore
    from xmodal.svg import INDEX_RENDER_SIZE, SVGError, render_svg

    n = len(batch["path"])
    ids = np.full(n, "", dtype=object)
    data = np.full(n, b"", dtype=object)
    paths = np.array(batch["path"], dtype=object)
    errors = np.array(batch["error"], dtype=object)
    seconds = np.zeros(n, dtype=np.float64)
    sizes, widths, heights = (np.zeros(n, dtype=np.int64) for _ in range(3))
    mtimes = np.array(batch["mtime"], dtype=np.int64) if "mtime" in batch else np.zeros(n, dtype=np.int64)
    in_source = batch["in_source"] if "in_source" in batch else np.zeros(n, dtype=bool)
    stored = ImageStore(image_store) if image_store is not None else None
    for i, path in enumerate(paths):
        if errors[i]:
            continue
        started = time.perf_counter()
        if in_source[i]:
            content = batch["data"][i]
        else:
            try:
                with open(path, "rb") as handle:
                    content = handle.read()
                    mtimes[i] = int(os.fstat(handle.fileno()).st_mtime)
            except OSError as exc:
                errors[i] = f"cannot read file: {exc.strerror or exc}"
                seconds[i] = time.perf_counter() - started
                continue
        ids[i], data[i], errors[i], sizes[i] = content_id(content), content, "", len(content)
        if not in_source[i] and str(path).lower().endswith(".svg"):
            # a folder's drawing: embedded as rendered, keyed and shown by its own file
            try:
                data[i] = render_svg(content, INDEX_RENDER_SIZE)
            except SVGError as exc:
                errors[i] = str(exc)
        if not errors[i]:
            errors[i], widths[i], heights[i] = check_image(data[i])
        if in_source[i] and not errors[i]:
            if stored is None:
                raise ValueError("images held by the source need an image_store to be written to")
            written = stored.put(content, path)  # the name's extension where it is an image's (a tar member's)
            if written is None:
                errors[i] = "cannot decode image: not in an image format Pillow knows"
            else:
                paths[i] = str(written[1])
        seconds[i] = time.perf_counter() - started
    return {**batch, "path": paths, "id": ids, "data": data, "error": errors, "size": sizes, "mtime": mtimes,
            "width": widths, "height": heights, "read_seconds": seconds}
