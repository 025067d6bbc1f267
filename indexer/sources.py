"""The manifest as a streaming Ray datasource, and the CPU stage that reads image files.

`scan` makes one pass over the manifest in the driver (O(shards) memory); `dataset` reads
the shards still to do in Ray read tasks, one per shard (see the section below).

Columns carried through the pipeline (numpy batches):
  images:   item, path, concept, style, captions (JSON text), error, letter
            -> + id, data (bytes), read_seconds
  captions: item, caption, concept, style, image, id, data (UTF-8 bytes), error, letter, read_seconds
  the embedding stage adds vector (and vector_<level> for each other level of a
  hierarchical model's card) and embed_seconds, and drops data.
`item` numbers the items in input order (it places an item in its shard). `error` is ""
for a good item and the reason otherwise; bad items travel on to the driver, which writes
them to the dead-letter file instead of Milvus. `letter` is "" or, for an item whose text
Milvus (and Arrow) cannot hold, that text exactly, as JSON, for its dead letter.
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
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.training.manifest import ManifestRow, parse_row


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
# The driver makes one streaming pass over the manifest (`scan`): it numbers the items, cuts
# them into shards and keeps, per shard, where it starts in the file and a digest of its
# items: O(shards) memory, whatever the corpus. The read tasks (`ManifestDatasource`, one per
# shard still to do) seek to their shard, read its items and check the digest, so a manifest
# edited during a run fails the run instead of mislabelling shards.

IMAGE, CAPTION = "image", "caption"


@dataclass(frozen=True)
class Shard:
    """One shard of the input: where it starts in the manifest and what it holds."""

    number: int
    offset: int  # byte offset of the line that holds its first item
    line: int  # that line's number (from 1), for messages
    first_item: int  # the number of its first item
    items: int  # its items (images: rows; captions: every caption, repeats included)
    skip: int  # captions: the captions of that first line that belong to the shard before
    emitted: int  # rows its read yields: every image; one per distinct caption text
    digest: str  # sha256 of its items' descriptions


@dataclass(frozen=True)
class InputSpec:
    """What a read task needs to find a shard's items again (small: it travels with each task)."""

    kind: str
    manifest: str  # absolute
    split: str | None
    styles: tuple[str, ...] | None


@dataclass
class InputPlan:
    spec: InputSpec
    limit: int | None
    shard_size: int
    items: int
    items_sha256: str
    shards: list[Shard]


def _manifest_rows(handle, spec: InputSpec, first_line: int) -> Iterator[tuple[int, int, ManifestRow]]:
    """(line number, byte offset, row) for each row of `spec`'s split and styles, from the
    handle's position (a binary file), whose line is `first_line`."""
    manifest_dir = Path(spec.manifest).parent
    offset = handle.tell()
    for line_number, raw in enumerate(handle, start=first_line):
        start, offset = offset, offset + len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {spec.manifest} is not UTF-8 text: line {line_number}: {exc}") from None
        if not line.strip():
            continue
        row = parse_row(line, manifest_dir, where=f"{spec.manifest}:{line_number}")
        if spec.split is not None and row.split != spec.split:
            continue
        if spec.styles is not None and row.style not in spec.styles:
            continue
        yield line_number, start, row


def _units(kind: str, row: ManifestRow) -> list[str | None]:
    """The items a row makes: itself (images) or each of its captions."""
    return [None] if kind == IMAGE else list(row.captions)


def _description(kind: str, number: int, row: ManifestRow, caption: str | None) -> bytes:
    if kind == IMAGE:
        described = {"item": number, "path": str(row.image), "concept": row.concept, "style": row.style,
                     "captions": list(row.captions)}
    else:
        described = {"item": number, "caption": caption, "concept": row.concept, "style": row.style,
                     "image": str(row.image)}
    # ensure_ascii: a caption with a lone surrogate must hash, not raise
    return json.dumps(described, sort_keys=True).encode("ascii") + b"\n"


def caption_key(caption: str) -> str:
    # surrogatepass: a caption that is not UTF-8 still gets a key, to de-duplicate its letters
    return content_id(caption.encode("utf-8", "surrogatepass"))


def scan(manifest: str | os.PathLike[str], *, kind: str, split: str | None = None,
         styles: Collection[str] | str | None = None, limit: int | None = None,
         shard_size: int = 1000) -> InputPlan:
    """One streaming pass over the manifest: the items' number, their hash, and the shards.

    Raises ValueError (naming the file and line) for a manifest that is not UTF-8 or whose
    lines are not manifest rows, before any work is started.
    """
    if kind not in (IMAGE, CAPTION):
        raise ValueError(f"kind must be {IMAGE!r} or {CAPTION!r}, got {kind!r}")
    if isinstance(styles, str):
        styles = [styles]
    spec = InputSpec(kind, str(Path(manifest).resolve()), split, tuple(sorted(styles)) if styles is not None else None)
    shards: list[Shard] = []
    total = hashlib.sha256()
    number = rows = 0
    current: dict[str, Any] | None = None

    def close() -> None:
        digest = current["hash"].hexdigest()
        emitted = current["items"] if kind == IMAGE else len(current["keys"])
        shards.append(Shard(len(shards), current["offset"], current["line"], current["first"], current["items"],
                            current["skip"], emitted, digest))
        total.update(digest.encode("ascii") + b"\n")

    if limit is None or limit > 0:
        with open(spec.manifest, "rb") as handle:
            for line_number, offset, row in _manifest_rows(handle, spec, 1):
                for index, caption in enumerate(_units(kind, row)):
                    if current is None or current["items"] == shard_size:
                        if current is not None:
                            close()
                        current = {"offset": offset, "line": line_number, "first": number, "skip": index,
                                   "items": 0, "hash": hashlib.sha256(), "keys": set()}
                    current["hash"].update(_description(kind, number, row, caption))
                    if kind == CAPTION:
                        current["keys"].add(caption_key(caption))  # at most shard_size of them
                    current["items"] += 1
                    number += 1
                rows += 1
                if limit is not None and rows >= limit:
                    break
    if current is not None:
        close()
    return InputPlan(spec, limit, shard_size, number, total.hexdigest(), shards)


def _safe_text(value: str) -> str:
    """`value`, or where it is not UTF-8 (a lone surrogate) a readable stand-in that is."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _image_item(number: int, row: ManifestRow) -> dict[str, Any]:
    from xmodal import store  # here, not at the top: the workers that import this module need no pymilvus

    path = str(row.image)
    error = _first_problem(
        text_problem("image path", path, store.PATH_MAX_LENGTH),
        text_problem("concept", row.concept, store.KEY_MAX_LENGTH),
        text_problem("style", row.style, store.KEY_MAX_LENGTH),
        *(text_problem(f"caption {i + 1}", caption) for i, caption in enumerate(row.captions)),
    )
    # A refused item keeps its exact text in `letter` (JSON with \u escapes) for the dead-letter
    # file; its columns carry stand-ins Arrow can hold (it cannot hold a lone surrogate).
    letter = json.dumps({"path": path}) if error else ""
    return {"item": number, "path": _safe_text(path), "concept": _safe_text(row.concept),
            "style": _safe_text(row.style), "captions": json.dumps(list(row.captions)),  # \u escapes
            "error": error, "letter": letter}


def _caption_item(number: int, row: ManifestRow, caption: str) -> dict[str, Any]:
    from xmodal import store

    error = _first_problem(
        "empty caption" if not caption.strip() else "",
        text_problem("caption", caption, store.TEXT_MAX_LENGTH),
        text_problem("image path", str(row.image), store.PATH_MAX_LENGTH),
        text_problem("concept", row.concept, store.KEY_MAX_LENGTH),
        text_problem("style", row.style, store.KEY_MAX_LENGTH),
    )
    letter = json.dumps({"caption": caption, "image": str(row.image)}) if error else ""
    return {"item": number, "caption": _safe_text(caption), "concept": _safe_text(row.concept),
            "style": _safe_text(row.style), "image": _safe_text(str(row.image)), "id": caption_key(caption),
            "data": b"" if error else caption.encode("utf-8"), "error": error, "letter": letter}


def read_shard(spec: InputSpec, shard: Shard) -> list[dict[str, Any]]:
    """The items of one shard, as the pipeline carries them (images: every row; captions: one
    item per distinct text, the last of its occurrences in the shard).

    ValueError when the manifest no longer holds what `scan` found there.
    """
    started = time.perf_counter()
    end = shard.first_item + shard.items
    number = shard.first_item
    digest = hashlib.sha256()
    items: list[dict[str, Any]] = []
    with open(spec.manifest, "rb") as handle:
        handle.seek(shard.offset)
        first = True
        for _, _, row in _manifest_rows(handle, spec, shard.line):
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
    if number != end or digest.hexdigest() != shard.digest:
        raise ValueError(f"manifest {spec.manifest} changed during the run (shard {shard.number}, from line "
                         f"{shard.line}, no longer holds the items it held): run the command again")
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
        if key == "item":
            columns[key] = np.array(values, dtype=np.int64)
        elif key.endswith("_seconds"):
            columns[key] = np.array(values, dtype=np.float64)
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

    class ManifestDatasource(Datasource):
        """A Ray Data datasource over a scanned manifest: one read task per shard to do,
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
            return "ReadManifest"

    return ManifestDatasource


def dataset(spec: InputSpec, shards: Sequence[Shard], *, block_rows: int):
    """A Ray dataset of the items of `shards` (in shard order)."""
    import ray.data

    if not shards:
        raise ValueError("no shards to read")
    return ray.data.read_datasource(_datasource_class()(spec, shards, block_rows),
                                    override_num_blocks=len(shards))


def check_image(data: bytes) -> str:
    """"" when Pillow recognises the bytes as an intact image, else the reason.

    `verify()` checks the structure (PNG chunks and CRCs) without decoding the pixels, which
    the server does anyway; what slips through is caught by Triton, item by item. The size
    is checked against the limit the server's preprocessing sets: Pillow refuses images over
    twice that by itself but only warns below, and the server would then decode them.
    """
    from PIL import Image, UnidentifiedImageError

    import xmodal.preprocessing  # noqa: F401 - sets Image.MAX_IMAGE_PIXELS to the server's limit

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object, which tells the reader nothing
        return "cannot decode image: not in an image format Pillow knows"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode image: {exc}"
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return (f"image too large: {width}x{height} is {width * height:,} pixels, over the limit of "
                f"{limit:,} (a decompression bomb?)")
    return ""


def read_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches: read each file, hash it, and check that it is an image."""
    n = len(batch["path"])
    ids = np.full(n, "", dtype=object)
    data = np.full(n, b"", dtype=object)
    errors = np.array(batch["error"], dtype=object)
    seconds = np.zeros(n, dtype=np.float64)
    for i, path in enumerate(batch["path"]):
        if errors[i]:
            continue
        started = time.perf_counter()
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except OSError as exc:
            errors[i] = f"cannot read file: {exc.strerror or exc}"
        else:
            ids[i], data[i], errors[i] = content_id(content), content, check_image(content)
        seconds[i] = time.perf_counter() - started
    return {**batch, "id": ids, "data": data, "error": errors, "read_seconds": seconds}
