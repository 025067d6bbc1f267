"""The Milvus side of the clients: the collections one client searches, checked against its model.

Shared by ``Client`` (called directly) and ``AsyncClient`` (called in a thread executor:
pymilvus is synchronous). pymilvus, numpy and xmodal.store only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from pymilvus.exceptions import MilvusException

from xmodal import store
from xmodal.card import ModelCard
from xmodal.contract import GLOBAL, CollectionKind, vector_field
from xmodal.client.hits import Hit

# How many query vectors go into one Milvus search call.
SEARCH_CHUNK = 256
# Milvus refuses a larger top-k (its `topk` limit).
MAX_K = 16384
# Rows read to list a field's distinct values (for the web page's style menu).
DISTINCT_SCAN_LIMIT = 16384
# A level-weighted search ranks the union of each level's best `level_candidates(k)` rows.
LEVEL_CANDIDATES_PER_K = 4
LEVEL_CANDIDATES_MIN = 64
# Level weights add similarities; a distance (L2) would need its own rule.
SIMILARITY_METRICS = ("IP", "COSINE")


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


def level_candidates(k: int) -> int:
    """Rows each level's search hands to the weighted ranker for a top-`k` answer."""
    return min(MAX_K, max(LEVEL_CANDIDATES_MIN, LEVEL_CANDIDATES_PER_K * k))


def check_level_weights(level_weights: Any, card: ModelCard) -> dict[str, float]:
    """The weights of a level-weighted search, normalised to sum to 1, levels weighted 0 left out.

    ValueError naming the problem: not a mapping, a level the card does not have (the
    message lists those it has), a weight that is not a finite number >= 0, all weights 0.
    """
    levels = store.card_levels(card)
    example = "{'concept': 0.5, 'exterior': 0.5}"
    if not isinstance(level_weights, Mapping) or not level_weights:
        raise ValueError(f"level_weights must be a non-empty mapping of level name to weight, e.g. {example}; "
                         f"got {level_weights!r}")
    unknown = [level for level in level_weights if level not in card.embeddings]
    if unknown:
        hint = ("" if len(levels) > 1
                else "; level weights are for hierarchical models, which add 'concept' and 'exterior'")
        raise ValueError(f"unknown level{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
                         f"in level_weights: model {card.name!r} has the levels {', '.join(map(repr, levels))}{hint}")
    weights = {}
    for level in levels:
        if level not in level_weights:
            continue
        weight = level_weights[level]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the weight of level {level!r} must be a finite number >= 0, got {weight!r}")
        weights[level] = float(weight)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"level_weights are all 0 ({dict(level_weights)}): give at least one level a positive weight")
    if card.metric.upper() not in SIMILARITY_METRICS:
        raise ValueError(f"level weights add similarities, but model {card.name!r} uses the metric {card.metric!r} "
                         f"(one of {', '.join(SIMILARITY_METRICS)} is needed)")
    return {level: weight / total for level, weight in weights.items() if weight > 0}


def fuse_levels(level_hits: list[Any], weights: list[float], k: int, kind: CollectionKind) -> list[Hit]:
    """The top `k` rows of one query by ``Σ weight × similarity`` over the levels' hit lists
    (a row missing from a level's list adds 0 for it); ties keep the order first seen."""
    scores: dict[str, float] = {}
    first: dict[str, Any] = {}
    for hits, weight in zip(level_hits, weights):
        for hit in hits:
            key = str(hit.get("id"))
            scores[key] = scores.get(key, 0.0) + weight * float(hit.get("distance", 0.0))
            first.setdefault(key, hit)
    best = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
    return [dataclasses.replace(Hit.from_milvus(first[key], kind), score=scores[key]) for key in best]


class Searcher:
    """One Milvus connection and the collections opened on it.

    A collection is opened once, on first use: it must exist (ValueError listing the ones
    that do, with `hint` on how to fill it) and hold vectors of `card`'s model (ValueError
    naming both models). milvus-lite is called under a lock (one call at a time from this
    process); a Milvus server is called concurrently.
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
        self._kinds: dict[str, CollectionKind] = {}  # collection -> its kind
        self._vector_fields: dict[str, dict[str, int]] = {}  # collection -> vector field -> dim
        self._index_types: dict[tuple[str, str], str] = {}  # (collection, vector field) -> index type

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
            kind = self._kinds[name] = store.collection_kind(milvus, name)
            self._vector_fields[name] = store.collection_vector_fields(milvus, name)
            for field in self._vector_fields[name]:
                self._index_types[(name, field)] = store.index_type(milvus, name, field)
            self._fields[name] = [f for f in kind.output_fields if f in present]
            return self._fields[name]

    def search(self, name: str, vectors: np.ndarray, k: int, filter: str | None = None, *,
               field: str = GLOBAL) -> list[list[Hit]]:
        """Hit lists, one per row of `vectors` [N, D], from the vector `field` ("global", the
        model's fused vector, by default); a filter the server refuses is a ValueError."""
        expression = store.normalize_filter(filter)
        output_fields = self.open(name)
        self._require_fields(name, [field])
        params = self.search_params(name, k, field)
        results: list[list[Hit]] = []
        for start in range(0, len(vectors), SEARCH_CHUNK):
            chunk = vectors[start:start + SEARCH_CHUNK]
            found = self._filtered(name, expression, lambda: self.milvus.search(
                name, data=chunk.tolist(), filter=expression, limit=k, anns_field=field,
                output_fields=output_fields, search_params=params,
                consistency_level=self.consistency_level, timeout=self.timeout,
            ))
            results.extend([Hit.from_milvus(hit, self._kinds[name]) for hit in hits] for hits in found)
        return results

    def search_levels(self, name: str, vectors: Mapping[str, np.ndarray], weights: Mapping[str, float], k: int,
                      filter: str | None = None) -> list[list[Hit]]:
        """Hit lists by the weighted sum of the levels' similarities, one per query.

        `weights` as ``check_level_weights`` returns them (positive, summing to 1); `vectors`
        holds each weighted level's query vectors [N, D_level]. One search per level for its
        best ``level_candidates(k)`` rows (the filter given to each), then ``fuse_levels``
        sums ``weight × similarity`` over the levels whose list holds the row (a row missing
        from a level's list scores 0 there), as Milvus's WeightedRanker with
        ``norm_score=False`` would. Not Milvus's hybrid search: milvus-lite 2.5.1 ignores
        ``norm_score=False`` and maps each level's similarity through ``0.5 + arctan(s)/π``
        before weighting, which changes the scores (an even mix of cosines 0.8 and 0.0 scores
        about 0.61 instead of 0.4) and can change the order. One level is a plain search
        of its field.
        """
        if len(weights) == 1:
            (level,) = weights
            return self.search(name, vectors[level], k, filter, field=vector_field(level))
        expression = store.normalize_filter(filter)
        output_fields = self.open(name)
        fields = {level: vector_field(level) for level in weights}
        self._require_fields(name, list(fields.values()))
        candidates = level_candidates(k)
        params = {level: self.search_params(name, candidates, field) for level, field in fields.items()}
        count = len(vectors[next(iter(weights))])
        results: list[list[Hit]] = []
        for start in range(0, count, SEARCH_CHUNK):
            per_level = []
            for level, field in fields.items():
                chunk = vectors[level][start:start + SEARCH_CHUNK].tolist()
                per_level.append(self._filtered(name, expression, lambda chunk=chunk, level=level, field=field: (
                    self.milvus.search(
                        name, data=chunk, filter=expression, limit=candidates, anns_field=field,
                        output_fields=output_fields, search_params=params[level],
                        consistency_level=self.consistency_level, timeout=self.timeout))))
            level_weights = list(weights.values())
            results.extend(fuse_levels([found[i] for found in per_level], level_weights, k, self._kinds[name])
                           for i in range(len(per_level[0])))
        return results

    def search_params(self, name: str, k: int, field: str = GLOBAL) -> dict[str, Any]:
        """The search parameters for `field`'s index, from the index type read when the collection
        was opened (not described again on every search: a round trip each)."""
        return store.search_params(None, name, self.card.metric, k, field, index=self._index_types.get((name, field), ""))

    def _require_fields(self, name: str, fields: list[str]) -> None:
        present = self._vector_fields.get(name, {})
        if any(field not in present for field in fields):
            raise ValueError(store.missing_levels_message(name, self.card, present))

    def _filtered(self, name: str, expression: str, call: Callable[[], Any]) -> Any:
        """`call()` under the lock; when it fails and the server refuses the filter on its own,
        a ValueError naming the expression and the server's reason."""
        try:
            with self._lock, _quiet_pymilvus(bool(expression)):
                return call()
        except MilvusException as exc:
            if expression and self._refuses(name, expression):
                # Name the expression and the server's reason; leave pymilvus' traceback
                # out of what the user sees.
                raise store.filter_error(expression, exc) from None
            raise

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

    def image_roots(self, name: str) -> list[str]:
        """The directories (or URIs) collection `name`'s rows name images under, as its indexing
        runs recorded them (``store.collection_image_roots``)."""
        with self._lock:
            return store.collection_image_roots(self.milvus, name)

    def distinct(self, name: str, field: str, *, scan_limit: int = DISTINCT_SCAN_LIMIT) -> list[str]:
        """Sorted distinct values of `field` among the first `scan_limit` rows."""
        self.open(name)
        with self._lock:
            rows = self.milvus.query(name, filter="", output_fields=[field], limit=scan_limit,
                                     timeout=self.timeout)
        return sorted({str(row[field]) for row in rows if row.get(field) not in (None, "")})
