"""Embedded batches -> Milvus rows, and the parallel writer stage for a Milvus server.

milvus-lite is a database file one process holds: there the driver is the one writer
(``pipeline._Writer``). A Milvus server takes upserts from many clients at once: there the
rows are written by a pool of ``MilvusWriteStage`` actors, the last ``map_batches`` stage of
the pipeline, in batches of ``--write-batch`` rows, and only the small columns (item, id,
error, ...) travel on to the driver, which keeps the progress and dead-letter files.
"""
from __future__ import annotations

import time
from pathlib import Path
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
    """One row per distinct key of the batch's good items (one upsert may not repeat a key):
    for a kind that merges (images) the rows of a key made one, else the last item of a key wins."""
    from xmodal import store

    collection_kind = contract.KINDS[kind]
    rows: dict[str, dict[str, Any]] = {}
    for record, vectors in records(batch, levels):
        if record["error"]:
            continue
        put_row(rows, record["id"], {**collection_kind.row(record), **store.vector_values(vectors)}, collection_kind)
    return list(rows.values())


def put_row(rows: dict[str, dict[str, Any]], key: str, row: dict[str, Any],
            kind: contract.CollectionKind | None) -> None:
    """`row` into `rows` (one a key, in order): merged with the row of its key for a kind that
    merges (images), else replacing it (the later item of a key wins, as a later upsert would)."""
    if key in rows and kind is not None and kind.merge is not None:
        rows[key], _ = kind.merge(rows[key], row)
    else:
        rows.pop(key, None)
        rows[key] = row


# Keys per get: an expression of 32-hex-digit keys stays well under Milvus's limits.
_GET_KEYS = 1000


def merged_with_kept(client, collection: str, kind: contract.CollectionKind,
                     rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """`rows` (one a key), each merged with the row its key already has in the collection, for
    a kind that merges (an image's bytes under another path: one row, every path kept); and how
    many paths the collection's rows gain beyond their first (a new row's, all but its first).
    Read at Strong consistency: a row upserted a moment before is seen."""
    if kind.merge is None or not rows:
        return rows, 0
    kept: dict[str, dict[str, Any]] = {}
    for start in range(0, len(rows), _GET_KEYS):
        ids = [row["id"] for row in rows[start:start + _GET_KEYS]]
        for found in client.get(collection, ids=ids, output_fields=kind.output_fields, consistency_level="Strong"):
            kept[str(found["id"])] = found
    merged, added = [], 0
    for row in rows:
        if row["id"] in kept:
            row, more = kind.merge(kept[row["id"]], row)
            added += more
        else:
            added += len(contract.decode_string_list(row["paths"])) - 1
        merged.append(row)
    return merged, added


# The column in which a writer actor returns the server's refusal of its batch ("" when written)
WRITE_REFUSED = "write_refused"


class MilvusWriteStage:
    """map_batches callable class for a Milvus server: upsert the batch's rows, pass on the
    rest. A batch comes back to the driver only after Milvus acknowledged its rows, so the
    driver records a shard only when all of it is written; a batch the server refuses comes back
    with the refusal in its ``write_refused`` column. A retried batch (a worker that
    died) upserts the same keys again: no duplicates. Image rows are merged with the rows their
    keys have (every path of the same bytes kept); two actors writing the same key at the same
    moment may each keep only their own paths. The token, if any, reaches the actor as a
    constructor argument and is never logged."""

    def __init__(self, uri: str, token: str | None, collection: str, kind: str, levels: list[str],
                 timeout: float = 60.0):
        from xmodal import store

        self.client = store.connect(uri, token=token, timeout=timeout)
        self.collection, self.kind, self.levels = collection, kind, list(levels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pymilvus.exceptions import MilvusException

        started = time.perf_counter()
        n = len(batch["item"])
        refused = ""
        rows = milvus_rows(batch, self.kind, self.levels)
        try:
            rows, added = merged_with_kept(self.client, self.collection, contract.KINDS[self.kind], rows)
            if rows:
                self.client.upsert(self.collection, rows)
        except MilvusException as exc:
            # returned, not raised: raised, it would reach the driver as a Ray stack trace,
            # the Milvus error's own type and code lost on the way
            refused, rows, added = f"{exc.message} (code {exc.code})", [], 0
        vectors = {vector_column(level) for level in self.levels}
        out = {key: value for key, value in batch.items() if key not in vectors}
        out[WRITE_REFUSED] = np.full(n, refused, dtype=object)
        out["write_seconds"] = np.full(n, (time.perf_counter() - started) / max(1, n))
        out["rows_upserted"] = np.full(n, len(rows) / max(1, n))
        out["paths_merged"] = np.full(n, added / max(1, n))
        return out

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing at interpreter exit
                pass


def release_paths(client, collection: str, root: str, paths: Iterable[tuple[str, str]]) -> int:
    """Rows of a folder's images let paths go (`paths`: (path, the key of its row)): a row left
    with none is deleted; a row whose first path went is described by its next one (its file
    read again for its place, time and sidecar captions). The rows deleted."""
    from xmodal import readers, store
    from xmodal.indexer.sources import folder_of

    let_go: dict[str, list[str]] = {}
    for path, key in paths:
        let_go.setdefault(key, []).append(path)
    if not let_go:
        return 0
    kept_rows, deleted = [], []
    keys = list(let_go)
    for start in range(0, len(keys), _GET_KEYS):
        for row in client.get(collection, ids=keys[start:start + _GET_KEYS], output_fields=["*"],
                              consistency_level="Strong"):
            key = str(row["id"])
            paths = [path for path in contract.decode_string_list(row.get("paths")) or [row["image"]]
                     if path not in let_go[key]]
            if not paths:
                deleted.append(key)
                continue
            row = {name: value.tolist() if hasattr(value, "tolist") else value for name, value in row.items()}
            if row["image"] != paths[0]:
                first = Path(paths[0])
                relative = first.relative_to(root).as_posix() if first.is_relative_to(root) else str(first)
                row.update(image=paths[0], relative_path=relative, folder=folder_of(relative),
                           concept=f"{row['style']}/{relative}")
                if first.is_file():
                    row["mtime"] = int(first.stat().st_mtime)
                    row["captions"] = contract.json_list(readers.folder_row(Path(root), first).captions)
            row["paths"] = contract.json_list(paths)
            kept_rows.append(row)
    if deleted:
        client.delete(collection, ids=deleted)
    if kept_rows:
        store.upsert_rows(client, collection, kept_rows)
    return len(deleted)
