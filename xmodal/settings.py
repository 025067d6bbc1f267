"""Defaults every part shares; each can be overridden by an environment variable or a flag."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

HOST = "127.0.0.1"
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002

IMAGE_COLLECTION = "xmodal_images"
CAPTION_COLLECTION = "xmodal_captions"


def milvus_token(token: str | None = None) -> str | None:
    """The Milvus server token: `token`, else ``$XMODAL_MILVUS_TOKEN``, else None. Never printed."""
    return token or os.environ.get("XMODAL_MILVUS_TOKEN") or None


def data_dir() -> Path:
    """The cache for fetched corpora, runs, the model repository and milvus-lite: ``$XMODAL_DATA`` or ``./xmodal-data``."""
    return Path(os.environ.get("XMODAL_DATA", "xmodal-data"))


def default_milvus_uri() -> str:
    return str(data_dir() / "xmodal.db")


def default_model_repository() -> Path:
    return data_dir() / "model_repository"


def default_triton_url() -> str:
    return os.environ.get("XMODAL_TRITON_URL", f"{HOST}:{HTTP_PORT}")


def allowed_image_roots(given: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """Directories outside a corpus's root whose images may be read on purpose: `given`
    (``--allow-image-root``), then those of ``$XMODAL_ALLOWED_IMAGE_ROOTS`` (separated by
    ``os.pathsep``), which reaches the commands that take no such flag (``xmodal train``)."""
    listed = [root for root in os.environ.get("XMODAL_ALLOWED_IMAGE_ROOTS", "").split(os.pathsep) if root]
    return list(dict.fromkeys([*map(str, given), *listed]))
