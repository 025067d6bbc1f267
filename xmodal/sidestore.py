"""The side store: each indexed image's re-ranker side (CRAN, MCSM), keyed by the collection's id.

A pair scorer re-ranks the first stage's top N with tensors computed once per image at index time
(``export/reranker.py``: ``image_<key>``, e.g. CRAN's 16 patch vectors, their mask and the
relation vector, 2,192 floats an image). They are kept in SQLite beside the collection
(``<db>.<collection>.sides.sqlite`` beside a milvus-lite database, else in the data directory),
not in Milvus, because:

- they are read only by primary key, N rows a query, after the vector search: a B-tree lookup,
  no index or search over them;
- Milvus holds one vector per vector field (at most four fields by default) and scalar arrays of
  at most 4,096 elements; a side is several tensors, and a field per tensor would make every
  collection's schema depend on the re-ranker;
- a collection stays what the first stage searches: models without a re-ranker, and clients that
  do not re-rank, never load the sides, and dropping the sides (or computing them again for a new
  re-ranker) leaves the collection and its index untouched.

The store records the re-ranker's fingerprint and side shapes, and refuses a re-ranker with
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
        self.sizes = {name: int(np.prod(shape)) for name, shape in self.shapes.items()}
        self.width = sum(self.sizes.values())
        if not create and not self.path.is_file():
            raise SideStoreError(f"no re-ranker side store at {self.path}: index the collection's sides first "
                                 "(xmodal index sides)")
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
        mine = {"format": str(FORMAT), "fingerprint": self.fingerprint, "kind": reranker.kind,
                "shapes": json.dumps({name: list(shape) for name, shape in self.shapes.items()})}
        if not meta:
            self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", mine.items())
            return
        if meta.get("fingerprint") != self.fingerprint or meta.get("shapes") != mine["shapes"]:
            raise SideStoreError(
                f"{self.path} holds the sides of re-ranker {meta.get('kind')} {meta.get('fingerprint')}, not of "
                f"{mine['kind']} {self.fingerprint}: index the sides again into a new store "
                "(xmodal index sides --restart)")

    def put(self, ids: Sequence[str], side: Mapping[str, np.ndarray]) -> None:
        """Store (or replace) the sides of ``ids``; ``side[name]`` is ``[len(ids), *shape]``."""
        rows = self._pack(len(ids), side)
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
        return self._unpack(flat), [i for i in ids if i not in found]

    def missing(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        have = {row[0] for row in self._select("id", ids)}
        return [i for i in ids if i not in have]

    def _select(self, columns: str, ids: Iterable[str]) -> Iterable[tuple]:
        """Rows of ``ids`` (each once), in chunks below SQLite's bound-parameter limit."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
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

    def _pack(self, count: int, side: Mapping[str, np.ndarray]) -> np.ndarray:
        if set(side) != set(self.shapes):
            raise ValueError(f"side tensors {sorted(side)} are not the re-ranker's {sorted(self.shapes)}")
        parts = []
        for name, shape in self.shapes.items():
            value = np.asarray(side[name], dtype=np.float32)
            if value.shape != (count, *shape):
                raise ValueError(f"side tensor {name!r} has shape {list(value.shape)}, expected {[count, *shape]}")
            parts.append(value.reshape(count, -1))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def _unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, start = {}, 0
        for name, shape in self.shapes.items():
            out[name] = flat[:, start:start + self.sizes[name]].reshape(len(flat), *shape)
            start += self.sizes[name]
        return out
