"""What a collection holds of a folder's files, so that indexing the folder again does only what changed.

A SQLite file beside the collection (``<db>.<collection>.files.sqlite``, or in the data
directory for a Milvus server) keeps, for each folder indexed into the collection, each
image file's stamp (its size and modification time, and its sidecars') and the key of the
row that holds its bytes. A file is written here only after its row is acknowledged, so
a run killed at any point leaves the file either recorded with its row or not recorded;
the next run compares the walk with it:

- ``unchanged``: recorded with the same stamp: not read, not embedded;
- ``changed``: recorded with another stamp: read and embedded again; the row of its old
  bytes lets its path go (and goes when no path is left);
- ``added``: not recorded;
- ``gone``: recorded, no longer in the folder: with ``sync`` their rows let their paths go.

SQLite: a rescan of a large tree reads every record in one query (benchmarks/folder_rescan.py
times a whole rescan), and a shard's records are one transaction.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from xmodal.sidestore import beside_collection


def files_path(milvus_uri: str, collection: str) -> Path:
    return beside_collection(milvus_uri, collection, "files.sqlite")


@dataclass
class FolderChanges:
    """A walk compared with the record: the paths to index, and what the record said of the others."""

    added: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)  # path -> the key its old bytes had
    unchanged: int = 0
    gone: dict[str, str] = field(default_factory=dict)  # path -> the key of its row

    @property
    def to_index(self) -> set[str]:
        return {*self.added, *self.changed}


class FolderFiles:
    """The record of one folder's files in one collection."""

    def __init__(self, path: Path, root: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.root = path, root
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (root TEXT NOT NULL, path TEXT NOT NULL, "
                        "stamp TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (root, path))")
        self.db.commit()

    def known(self) -> dict[str, tuple[str, str]]:
        """path -> (stamp, key) of every file recorded for this folder."""
        return {path: (stamp, key) for path, stamp, key in
                self.db.execute("SELECT path, stamp, id FROM files WHERE root = ?", (self.root,))}

    def compare(self, stamps: dict[str, str]) -> FolderChanges:
        """The walk's files (path -> stamp) against the record."""
        known = self.known()
        changes = FolderChanges()
        for path, stamp in stamps.items():
            if path not in known:
                changes.added.append(path)
            elif known[path][0] == stamp:
                changes.unchanged += 1
            else:
                changes.changed[path] = known[path][1]
        changes.gone = {path: key for path, (_, key) in known.items() if path not in stamps}
        return changes

    def record(self, entries: list[tuple[str, str, str]]) -> None:
        """(path, stamp, key) of files whose rows are written, in one transaction."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files (root, path, stamp, id) VALUES (?, ?, ?, ?)",
                                [(self.root, path, stamp, key) for path, stamp, key in entries])

    def forget(self, paths: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM files WHERE root = ? AND path = ?", [(self.root, path) for path in paths])

    def close(self) -> None:
        self.db.close()
