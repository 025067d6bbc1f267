"""Manifest rows -> Ray datasets, and the CPU stage that reads image files.

Columns carried through the pipeline (numpy batches):
  images:   item, path, concept, style, captions (JSON text), error
            -> + id, data (bytes), read_seconds
  captions: item, caption, concept, style, image, id, data (UTF-8 bytes), error
  the embedding stage adds vector (and vector_<level> for each other level of a
  hierarchical model's card) and embed_seconds, and drops data.
`item` numbers the items in input order (it places an item in its shard). `error` is ""
for a good item and the reason otherwise; bad items travel on to the driver, which writes
them to the dead-letter file instead of Milvus. `*_seconds` are each item's share of the
stage's busy time, summed by the driver for the report.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from typing import Any, Sequence

import numpy as np

from xmodal.training.manifest import ManifestRow


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


def image_items(rows: Sequence[ManifestRow]) -> list[dict[str, Any]]:
    """One item per manifest row; a row whose text Milvus cannot store carries its `error`."""
    from xmodal import store  # here, not at the top: the workers that import this module need no pymilvus

    items = []
    for number, row in enumerate(rows):
        path = str(row.image)
        error = _first_problem(
            text_problem("image path", path, store.PATH_MAX_LENGTH),
            text_problem("concept", row.concept, store.KEY_MAX_LENGTH),
            text_problem("style", row.style, store.KEY_MAX_LENGTH),
            *(text_problem(f"caption {i + 1}", caption) for i, caption in enumerate(row.captions)),
        )
        items.append({"item": number, "path": path, "concept": row.concept, "style": row.style,
                      "captions": json.dumps(list(row.captions)),  # \u escapes: encodable whatever the text
                      "error": error})
    return items


def caption_items(rows: Sequence[ManifestRow]) -> tuple[list[dict[str, Any]], int]:
    """One item per distinct caption text (the id is its hash); also the number of captions read."""
    from xmodal import store

    items: dict[str, dict[str, Any]] = {}
    read = 0
    for row in rows:
        for caption in row.captions:
            read += 1
            # surrogatepass: a caption that is not UTF-8 still gets a key, to de-duplicate its letters
            data = caption.encode("utf-8", "surrogatepass")
            key = content_id(data)
            if key in items:
                continue
            error = _first_problem(
                "empty caption" if not caption.strip() else "",
                text_problem("caption", caption, store.TEXT_MAX_LENGTH),
                text_problem("image path", str(row.image), store.PATH_MAX_LENGTH),
                text_problem("concept", row.concept, store.KEY_MAX_LENGTH),
                text_problem("style", row.style, store.KEY_MAX_LENGTH),
            )
            items[key] = {"item": len(items), "caption": caption, "concept": row.concept, "style": row.style,
                          "image": str(row.image), "id": key, "data": b"" if error else data, "error": error}
    return list(items.values()), read


def dataset(items: list[dict[str, Any]], *, batch_size: int, parallelism: int = 1):
    """A Ray dataset of the items in blocks of about two batches (at least `parallelism`
    blocks when there are that many batches), so reading and embedding overlap."""
    import ray.data

    batches = max(1, math.ceil(len(items) / batch_size))
    blocks = min(batches, 64, max(parallelism, math.ceil(batches / 2)))
    return ray.data.from_items(items, override_num_blocks=blocks)


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
