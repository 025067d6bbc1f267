"""Embedded batches -> Milvus rows, and the parallel writer stage for a Milvus server.

milvus-lite is a database file one process holds: there the driver is the one writer
(``pipeline._Writer``). A Milvus server takes upserts from many clients at once: there the
rows are written by a pool of ``MilvusWriteStage`` actors, the last ``map_batches`` stage of
the pipeline, in batches of ``--write-batch`` rows, and only the small columns (item, id,
error, ...) travel on to the driver, which keeps the progress and dead-letter files.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import numpy as np

from xmodal import contract
from xmodal.indexer.embed import vector_column


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def records(batch: dict[str, np.ndarray],
            levels: Iterable[str]) -> Iterable[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(the item's scalar columns, its vector by level) for each item of an embedded batch."""
    columns = {level: vector_column(level) for level in levels}
    keys = [k for k in batch if k not in columns.values()]
    for i in range(len(batch["item"])):
        yield ({k: _plain(batch[k][i]) for k in keys},
               {level: batch[column][i] for level, column in columns.items() if column in batch})


def milvus_rows(batch: dict[str, np.ndarray], kind: str, levels: Iterable[str]) -> list[dict[str, Any]]:
    """One row per distinct key of the batch's good items (the last item of a key wins: one
    upsert may not repeat a key)."""
    from xmodal import store

    build = contract.KINDS[kind].row
    rows: dict[str, dict[str, Any]] = {}
    for record, vectors in records(batch, levels):
        if not record["error"]:
            rows.pop(record["id"], None)
            rows[record["id"]] = {**build(record), **store.vector_values(vectors)}
    return list(rows.values())


class MilvusWriteStage:
    """map_batches callable class for a Milvus server: upsert the batch's rows, pass on the
    rest. A batch comes back to the driver only after Milvus acknowledged its rows, so the
    driver records a shard only when all of it is written. A retried batch (a worker that
    died) upserts the same keys again: no duplicates. The token, if any, reaches the actor as
    a constructor argument and is never logged."""

    def __init__(self, uri: str, token: str | None, collection: str, kind: str, levels: list[str],
                 timeout: float = 60.0):
        from xmodal import store

        self.client = store.connect(uri, token=token, timeout=timeout)
        self.collection, self.kind, self.levels = collection, kind, list(levels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        rows = milvus_rows(batch, self.kind, self.levels)
        if rows:
            self.client.upsert(self.collection, rows)
        vectors = {vector_column(level) for level in self.levels}
        out = {key: value for key, value in batch.items() if key not in vectors}
        n = len(batch["item"])
        out["write_seconds"] = np.full(n, (time.perf_counter() - started) / max(1, n))
        out["rows_upserted"] = np.full(n, len(rows) / max(1, n))
        return out

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing at interpreter exit
                pass
