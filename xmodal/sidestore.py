"""The side store: each indexed image's re-ranker side (CRAN, MCSM), keyed by the collection's id.

A pair scorer re-ranks the first stage's top N with tensors computed once per image at index time
(``export/reranker.py``: ``image_<key>``, e.g. CRAN's 16 patch vectors, their mask and the
relation vector, 2,192 floats an image). Beside a milvus-lite database they are kept in SQLite
(``<db>.<collection>.sides.sqlite``, ``SideStore``), not in the database, because:

- they are read only by primary key, N rows a query, after the vector search: a B-tree lookup,
  no index or search over them;
- Milvus holds one vector per vector field (at most four fields by default) and scalar arrays of
  at most 4,096 elements; a side is several tensors, and a field per tensor would make every
  collection's schema depend on the re-ranker;
- a collection stays what the first stage searches: models without a re-ranker, and clients that
  do not re-rank, never load the sides, and dropping the sides (or computing them again for a new
  re-ranker) leaves the collection and its index untouched.

On a Milvus server, which clients on other machines reach and a file on one machine's disk would
not, they are a collection of their own, ``<collection>__sides`` (``MilvusSideStore``): the side
as one vector field of the concatenated tensors (a FLAT index only to load it; it is never
searched), read by primary key. The first-stage collection stays as it is, for the reasons above.

Either store records the re-ranker's fingerprint and side shapes, and refuses a re-ranker with
another (sides from one scorer are meaningless to another). Each side is stored as float32 bytes,
the tensors of one image concatenated in the card's order. Writes are transactions of many rows;
readers see whole rows. SQLite's WAL mode lets one writer and many readers share the file.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from xmodal import settings
from xmodal.card import RerankerSpec

SUFFIX = "sides.sqlite"
FORMAT = 1


def beside_collection(milvus_uri: str, collection: str, suffix: str) -> Path:
    """``<db>.<collection>.<suffix>`` beside a milvus-lite database, else in the data directory."""
    from xmodal.store import is_local_uri

    if is_local_uri(milvus_uri):
        db = Path(milvus_uri).expanduser()
        return db.with_name(f"{db.name}.{collection}.{suffix}")
    return settings.data_dir() / f"{collection}.{suffix}"


def side_store_path(milvus_uri: str, collection: str) -> Path:
    return beside_collection(milvus_uri, collection, SUFFIX)


def open_side_store(milvus_uri: str, collection: str, reranker: RerankerSpec, *, create: bool = False,
                    token: str | None = None, consistency_level: str = "Bounded") -> "SideStore | MilvusSideStore":
    """The side store of `collection`: SQLite beside a milvus-lite database, a collection of a server."""
    from xmodal import store

    if store.is_local_uri(milvus_uri):
        return SideStore(side_store_path(milvus_uri, collection), reranker, create=create)
    client = store.connect(milvus_uri, token=token)
    try:
        return MilvusSideStore(client, milvus_uri, collection, reranker, create=create, own_client=True,
                               consistency_level=consistency_level)
    except BaseException:
        client.close()
        raise


def drop_side_store(client, milvus_uri: str, collection: str) -> list[str]:
    """Remove `collection`'s side store (its files, or its collection on a server); what was removed."""
    from xmodal import store

    if not store.is_local_uri(milvus_uri):
        name = collection + store.SIDES_SUFFIX
        if not client.has_collection(name):
            return []
        client.drop_collection(name)
        return [f"collection {name!r}"]
    path = side_store_path(milvus_uri, collection)
    removed = []
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists():
            file.unlink()
            removed.append(str(file))
    return removed


class SideStoreError(ValueError):
    """The store does not fit the re-ranker asked of it, or is not a side store."""


class SideStore:
    """Sides by id for one re-ranker (the card's ``reranker``: kind, fingerprint, side shapes).

    ``create=False`` opens an existing store only, and says how to fill one when there is none.
    """

    def __init__(self, path: str | Path, reranker: RerankerSpec, *, create: bool = False):
        self.path = Path(path)
        self.fingerprint = reranker.fingerprint
        self.shapes = reranker.shapes
        self.width = side_width(self.shapes)
        if not create and not self.path.is_file():
            raise no_side_store(f"at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread off: a client shares one store between its threads; sqlite3 serialises.
        self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS sides (id TEXT PRIMARY KEY, side BLOB NOT NULL)")
            self._check_or_record(reranker)
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SideStoreError(f"{self.path} is not a side store: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _check_or_record(self, reranker: RerankerSpec) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        mine = side_record(reranker)
        if not meta:
            self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", mine.items())
            return
        check_side_record(str(self.path), meta, mine)

    def put(self, ids: Sequence[str], side: Mapping[str, np.ndarray]) -> None:
        """Store (or replace) the sides of ``ids``; ``side[name]`` is ``[len(ids), *shape]``."""
        rows = pack_sides(self.shapes, len(ids), side)
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO sides (id, side) VALUES (?, ?)",
                                 zip(ids, (row.tobytes() for row in rows)))

    def get(self, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The sides of ``ids`` in their order, ``[n, *shape]`` each, and the ids that have none
        (those are left out of the arrays)."""
        found: dict[str, bytes] = dict(self._select("id, side", ids))
        present = [i for i in ids if i in found]
        flat = (np.frombuffer(b"".join(found[i] for i in present), dtype=np.float32).reshape(len(present), self.width)
                if present else np.zeros((0, self.width), np.float32))
        return unpack_sides(self.shapes, flat), [i for i in ids if i not in found]

    def missing(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        have = {row[0] for row in self._select("id", ids)}
        return [i for i in ids if i not in have]

    def _select(self, columns: str, ids: Iterable[str]) -> Iterable[tuple]:
        """Rows of ``ids`` (each once), in chunks below SQLite's bound-parameter limit."""
        for chunk in in_chunks(ids):
            yield from self._db.execute(
                f"SELECT {columns} FROM sides WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM sides").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SideStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()



def pack_sides(shapes: Mapping[str, Sequence[int]], count: int, side: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[count, width]`` float32: the tensors of each image concatenated in the card's order."""
    if set(side) != set(shapes):
        raise ValueError(f"side tensors {sorted(side)} are not the re-ranker's {sorted(shapes)}")
    parts = []
    for name, shape in shapes.items():
        value = np.asarray(side[name], dtype=np.float32)
        if value.shape != (count, *shape):
            raise ValueError(f"side tensor {name!r} has shape {list(value.shape)}, expected {[count, *shape]}")
        parts.append(value.reshape(count, -1))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def unpack_sides(shapes: Mapping[str, Sequence[int]], flat: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = flat[:, start:start + size].reshape(len(flat), *shape)
        start += size
    return out

def side_width(shapes: Mapping[str, Sequence[int]]) -> int:
    """Floats in one image's side: its tensors concatenated."""
    return sum(int(np.prod(shape)) for shape in shapes.values())


def side_record(reranker: RerankerSpec) -> dict[str, str]:
    """What a store records of the re-ranker its sides are for."""
    return {"format": str(FORMAT), "fingerprint": reranker.fingerprint, "kind": reranker.kind,
            "shapes": json.dumps({name: list(shape) for name, shape in reranker.shapes.items()})}


def check_side_record(where: str, stored: Mapping[str, str | None], mine: Mapping[str, str]) -> None:
    """SideStoreError when the store at `where` holds the sides of another re-ranker than `mine`."""
    if stored.get("fingerprint") != mine["fingerprint"] or stored.get("shapes") != mine["shapes"]:
        raise SideStoreError(
            f"{where} holds the sides of re-ranker {stored.get('kind')} {stored.get('fingerprint')}, not of "
            f"{mine['kind']} {mine['fingerprint']}: index the sides again into a new store "
            "(xmodal index sides --restart)")


def no_side_store(where: str) -> SideStoreError:
    return SideStoreError(f"no re-ranker side store {where}: index the collection's sides first (xmodal index sides)")


def in_chunks(ids: Iterable[str], size: int = 500) -> Iterable[list[str]]:
    """`ids` once each, in chunks a query takes (below SQLite's bound-parameter limit)."""
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), size):
        yield unique[start:start + size]


class MilvusSideStore:
    """``SideStore``'s contract on a Milvus server: the collection ``<collection>__sides`` (id, side)."""

    def __init__(self, client, milvus_uri: str, collection: str, reranker: RerankerSpec, *, create: bool = False,
                 own_client: bool = False, consistency_level: str = "Bounded"):
        from pymilvus import DataType

        from xmodal import contract, store

        self.client = client
        self.name = collection + store.SIDES_SUFFIX
        self.path = f"collection {self.name!r} in {milvus_uri}"
        self.fingerprint = reranker.fingerprint
        self.shapes = reranker.shapes
        self.width = side_width(self.shapes)
        self.consistency_level = consistency_level
        self._own_client = own_client
        mine = side_record(reranker)
        if not client.has_collection(self.name):
            if not create:
                raise no_side_store(self.path)
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                          description=f"xmodal: the re-ranker sides of {collection}")
            schema.add_field("id", DataType.VARCHAR, max_length=contract.ID_MAX_LENGTH, is_primary=True)
            schema.add_field("side", DataType.FLOAT_VECTOR, dim=self.width)
            index = client.prepare_index_params()
            index.add_index("side", index_type="FLAT", metric_type="L2")
            client.create_collection(self.name, schema=schema, index_params=index,
                                     properties={f"xmodal.sides.{key}": value for key, value in mine.items()})
        kept = client.describe_collection(self.name).get("properties") or {}
        check_side_record(self.path, {key: kept.get(f"xmodal.sides.{key}") for key in mine}, mine)
        store.ensure_loaded(client, self.name)

    def put(self, ids: Sequence[str], side: Mapping[str, np.ndarray]) -> None:
        rows = pack_sides(self.shapes, len(ids), side)
        self.client.upsert(self.name, [{"id": i, "side": row.tolist()} for i, row in zip(ids, rows)])

    def _rows(self, ids: Iterable[str], fields: list[str], consistency_level: str) -> Iterable[dict]:
        for chunk in in_chunks(ids):
            yield from self.client.query(self.name, filter=f"id in {json.dumps(chunk)}", output_fields=fields,
                                         consistency_level=consistency_level)

    def get(self, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        found = {row["id"]: row["side"] for row in self._rows(ids, ["id", "side"], self.consistency_level)}
        present = [i for i in ids if i in found]
        flat = (np.asarray([found[i] for i in present], dtype=np.float32).reshape(len(present), self.width)
                if present else np.zeros((0, self.width), np.float32))
        return unpack_sides(self.shapes, flat), [i for i in ids if i not in found]

    def missing(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        have = {row["id"] for row in self._rows(ids, ["id"], "Strong")}
        return [i for i in ids if i not in have]

    def __len__(self) -> int:
        return int(self.client.query(self.name, filter="", output_fields=["count(*)"],
                                     consistency_level="Strong")[0]["count(*)"])

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> "MilvusSideStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
