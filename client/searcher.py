"""The Milvus side of the clients: the collections one client searches, checked against its model.

Shared by ``Client`` (called directly) and ``AsyncClient`` (called in a thread executor:
pymilvus is synchronous). pymilvus, numpy and xmodal.store only.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus.exceptions import MilvusException

from xmodal import store
from xmodal.card import ModelCard
from xmodal.client.hits import Hit

# How many query vectors go into one Milvus search call.
SEARCH_CHUNK = 256
# Milvus refuses a larger top-k (its `topk` limit).
MAX_K = 16384
# Rows read to list a field's distinct values (for the web page's style menu).
DISTINCT_SCAN_LIMIT = 16384


# pymilvus logs every failed call with its traceback (logger "pymilvus.decorators") before
# raising. A filter the server refuses becomes a ValueError with the server's reason, so that
# log record is noise on the user's terminal: it is dropped while this thread runs a filtered
# call. Other failures still raise their MilvusException, traceback included.
_quiet = threading.local()


class _DuringFilteredCalls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "active", False)


logging.getLogger("pymilvus.decorators").addFilter(_DuringFilteredCalls())


@contextlib.contextmanager
def _quiet_pymilvus(active: bool):
    previous = getattr(_quiet, "active", False)
    _quiet.active = active or previous
    try:
        yield
    finally:
        _quiet.active = previous


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K}, got {k}")
    return int(k)


class Searcher:
    """One Milvus connection and the collections opened on it.

    A collection is opened once, on first use: it must exist (ValueError listing the ones
    that do, with `hint` on how to fill it) and hold vectors of `card`'s model (ValueError
    naming both models). milvus-lite is called under a lock (one call at a time in-process);
    a Milvus server is called concurrently.
    """

    def __init__(self, uri: str, card: ModelCard, *, token: str | None = None, timeout: float = 10.0,
                 consistency_level: str = "Bounded") -> None:
        self.uri = str(uri)
        self.card = card
        self.timeout = timeout
        self.consistency_level = consistency_level
        if store.is_local_uri(self.uri) and not Path(self.uri).expanduser().exists():
            raise ValueError(f"no milvus-lite database at {self.uri}; index some data first")
        self._milvus = store.connect(self.uri, token=token, timeout=timeout)
        self._lock = threading.RLock() if store.is_local_uri(self.uri) else contextlib.nullcontext()
        self._open_lock = threading.Lock()
        self._fields: dict[str, list[str]] = {}  # collection -> output fields

    def close(self) -> None:
        milvus, self._milvus = self._milvus, None
        if milvus is not None:
            milvus.close()

    @property
    def milvus(self):
        if self._milvus is None:
            raise RuntimeError("the client is closed")
        return self._milvus

    def open(self, name: str, *, hint: str = "index some data first") -> list[str]:
        """Check and load collection `name` once; its output fields."""
        fields = self._fields.get(name)
        if fields is not None:
            return fields
        with self._open_lock, self._lock:
            if name in self._fields:
                return self._fields[name]
            milvus = self.milvus
            if not milvus.has_collection(name):
                message = store.missing_collection_message(milvus, name)
                raise ValueError(message.replace("index some data first", hint))
            store.check_collection_model(milvus, name, self.card)
            store.ensure_loaded(milvus, name)
            present = {f["name"] for f in milvus.describe_collection(name)["fields"]}
            wanted = store.CAPTION_OUTPUT_FIELDS if "caption" in present else store.IMAGE_OUTPUT_FIELDS
            self._fields[name] = [f for f in wanted if f in present]
            return self._fields[name]

    def search(self, name: str, vectors: np.ndarray, k: int, filter: str | None = None) -> list[list[Hit]]:
        """Hit lists, one per row of `vectors` [N, D]; a filter the server refuses is a ValueError."""
        expression = store.normalize_filter(filter)
        output_fields = self.open(name)
        params = store.search_params(self.milvus, name, self.card.metric, k)
        results: list[list[Hit]] = []
        for start in range(0, len(vectors), SEARCH_CHUNK):
            chunk = vectors[start:start + SEARCH_CHUNK]
            try:
                with self._lock, _quiet_pymilvus(bool(expression)):
                    found = self.milvus.search(
                        name, data=chunk.tolist(), filter=expression, limit=k, anns_field=store.VECTOR_FIELD,
                        output_fields=output_fields, search_params=params,
                        consistency_level=self.consistency_level, timeout=self.timeout,
                    )
            except MilvusException as exc:
                if expression and self._refuses(name, expression):
                    # Name the expression and the server's reason; leave pymilvus' traceback
                    # out of what the user sees.
                    raise store.filter_error(expression, exc) from None
                raise
            results.extend([Hit.from_milvus(hit) for hit in hits] for hits in found)
        return results

    def _refuses(self, name: str, expression: str) -> bool:
        """Whether the server refuses `expression` on its own (so a failed search was its fault)."""
        try:
            with self._lock, _quiet_pymilvus(True):
                self.milvus.query(name, filter=expression, output_fields=["id"], limit=1, timeout=self.timeout)
        except MilvusException:
            return True
        return False

    def get(self, name: str, row_id: str, fields: list[str] | None = None) -> dict[str, Any] | None:
        """The row with primary key `row_id`, or None."""
        output_fields = fields or self.open(name)
        with self._lock:
            rows = self.milvus.get(name, ids=[row_id], output_fields=output_fields, timeout=self.timeout)
        return dict(rows[0]) if rows else None

    def distinct(self, name: str, field: str, *, scan_limit: int = DISTINCT_SCAN_LIMIT) -> list[str]:
        """Sorted distinct values of `field` among the first `scan_limit` rows."""
        self.open(name)
        with self._lock:
            rows = self.milvus.query(name, filter="", output_fields=[field], limit=scan_limit,
                                     timeout=self.timeout)
        return sorted({str(row[field]) for row in rows if row.get(field) not in (None, "")})
