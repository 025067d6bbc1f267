"""Manifest rows -> Ray datasets, and the CPU stage that reads image files.

Columns carried through the pipeline (numpy batches):
  images:   path, concept, style, captions (JSON text) -> + id, data (bytes), error
  captions: caption, concept, style, image, id, data (UTF-8 bytes), error
`error` is "" for a good item and the reason otherwise; bad items travel on to the driver,
which writes them to the dead-letter file instead of Milvus.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any, Sequence

import numpy as np

from xmodal.training.manifest import ManifestRow


def content_id(data: bytes) -> str:
    """The primary key: sha256 of the content, first 32 hex digits."""
    return hashlib.sha256(data).hexdigest()[:32]


def image_items(rows: Sequence[ManifestRow]) -> list[dict[str, str]]:
    return [
        {"path": str(row.image), "concept": row.concept, "style": row.style,
         "captions": json.dumps(list(row.captions), ensure_ascii=False)}
        for row in rows
    ]


def caption_items(rows: Sequence[ManifestRow]) -> tuple[list[dict[str, Any]], int]:
    """One item per distinct caption text (the id is its hash); also the number of captions read."""
    items: dict[str, dict[str, Any]] = {}
    read = 0
    for row in rows:
        for caption in row.captions:
            read += 1
            data = caption.encode("utf-8")
            key = content_id(data)
            if key in items:
                continue
            items[key] = {"caption": caption, "concept": row.concept, "style": row.style,
                          "image": str(row.image), "id": key, "data": data,
                          "error": "" if caption.strip() else "empty caption"}
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
    the server does anyway; what slips through is caught by Triton, item by item.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode image: {exc}"
    return ""


def read_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches: read each file, hash it, and check that it is an image."""
    n = len(batch["path"])
    ids = np.empty(n, dtype=object)
    data = np.empty(n, dtype=object)
    errors = np.empty(n, dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except OSError as exc:
            ids[i], data[i], errors[i] = "", b"", f"cannot read file: {exc.strerror or exc}"
            continue
        ids[i], data[i], errors[i] = content_id(content), content, check_image(content)
    return {**batch, "id": ids, "data": data, "error": errors}
