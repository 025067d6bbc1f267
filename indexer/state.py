"""The files an indexing run keeps beside its collection: the progress file that lets a
killed run resume, and the dead-letter file of the items that could not be indexed.

Both sit beside a milvus-lite database (``<db>.<collection>.progress.json``,
``<db>.<collection>.deadletter.jsonl``) or, for a Milvus server, in the data directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xmodal.sidestore import beside_collection
from xmodal.files import write_atomic

PROGRESS_FORMAT = 1
# The identity fields a progress file must share with a run for the run to continue it
# ("input": the format and options of an input that is not a manifest; absent for a manifest).
IDENTITY_KEYS = ("kind", "manifest", "input", "split", "styles", "limit", "items", "items_sha256",
                 "fingerprint", "shard_size")


def deadletter_path(milvus_uri: str, collection: str) -> Path:
    """``<db>.<collection>.deadletter.jsonl`` beside a milvus-lite database, else in the data dir."""
    return beside_collection(milvus_uri, collection, "deadletter.jsonl")


def image_store_path(milvus_uri: str, collection: str) -> Path:
    """Where the images a source holds as bytes (Parquet, WebDataset) are written, by content."""
    return beside_collection(milvus_uri, collection, "images")


def progress_path(milvus_uri: str, collection: str) -> Path:
    """``<db>.<collection>.progress.json`` beside a milvus-lite database, else in the data dir."""
    return beside_collection(milvus_uri, collection, "progress.json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Progress:
    """Which shards of one run's input are in the collection for good.

    A shard is recorded only after every one of its items came back from the pipeline and
    its rows were acknowledged by Milvus (and flushed, for milvus-lite, whose database dies
    with the process); a shard cut short by a kill is done again, and content-hash keys
    make its second upsert write the same rows.
    """

    path: Path
    identity: dict[str, Any]
    shards: int
    finished: set[int] = field(default_factory=set)
    complete: bool = False

    def save(self) -> None:
        record = {"format": PROGRESS_FORMAT, **self.identity, "shards": self.shards,
                  "finished": sorted(self.finished), "complete": self.complete, "updated": _now()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a kill while writing must leave the previous state, never half a file
        write_atomic(self.path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file as written, None when there is none; ValueError when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"progress file {path} is not JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"progress file {path} is not an xmodal progress file of format {PROGRESS_FORMAT}")
    return record


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "…" + text[-16:]


def continue_or_start(path: Path, identity: dict[str, Any], shards: int, *, collection_created: bool,
                      restart: bool) -> tuple[Progress, str | None]:
    """The progress to continue from, and why an existing progress file was set aside (None
    when there was none or the run continues it)."""
    fresh = Progress(path, identity, shards)
    try:
        stored = read_progress(path)
    except ValueError as exc:
        return fresh, f"{exc}; starting afresh"
    if stored is None:
        return fresh, None
    if restart:
        return fresh, "--restart: the progress of the last run is ignored"
    if collection_created:
        # the rows that file vouches for went with the collection that was dropped
        return fresh, "the collection did not exist, so the progress of the last run is void"
    changed = [f"{key} {_short(stored.get(key))} -> {_short(identity.get(key))}"
               for key in IDENTITY_KEYS if stored.get(key) != identity.get(key)]
    if changed:
        return fresh, "the last run was over other input or another model (" + "; ".join(changed) + "); starting afresh"
    if stored.get("complete"):
        return fresh, "the last run over this input finished; indexing all of it again"
    finished = {int(s) for s in stored.get("finished", []) if 0 <= int(s) < shards}
    return Progress(path, identity, shards, finished), None


def _dumps(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a caption that is not UTF-8): keep it as \u escapes
        text = json.dumps(record)
    return text


class DeadLetters:
    """One JSON object a line per item that could not be indexed: its ``item`` number (its
    position in the run's input), what it was (path or caption), ``reason`` and ``at``.

    A fresh run starts a new file (a stale one would describe another run). A resumed run
    keeps the letters of the shards finished earlier, drops those of unfinished shards
    (they are redone and would be written twice) and appends, so the file ends as an
    uninterrupted run's would. The file exists only if there are letters.
    """

    def __init__(self, path: Path, *, keep_items: Any = None):
        """`keep_items`: None for a fresh file, else a predicate on item numbers to keep."""
        self.path = path
        self.count = 0
        self._handle = None
        if keep_items is None:
            path.unlink(missing_ok=True)
            return
        # streamed line by line into a file beside, then renamed: memory does not grow with the letters
        temporary = path.with_name(path.name + ".tmp")
        try:
            with path.open(encoding="utf-8") as lines, temporary.open("w", encoding="utf-8") as kept:
                for line in lines:
                    if line.strip() and keep_items(_item_number(line)):
                        kept.write(line.rstrip("\n") + "\n")
                        self.count += 1
        except FileNotFoundError:
            temporary.unlink(missing_ok=True)
            return
        if self.count:
            os.replace(temporary, path)
        else:
            temporary.unlink()
            path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(_dumps({**record, "at": _now()}) + "\n")
        # to the OS at once: a shard is recorded as finished only with its letters on file
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None




def _item_number(line: str) -> int | None:
    try:
        item = json.loads(line).get("item")
    except (json.JSONDecodeError, AttributeError):  # a line cut by a kill, or not ours
        return None
    return item if isinstance(item, int) else None


def count_deadletters(path: Path) -> int:
    try:
        with path.open(encoding="utf-8") as lines:
            return sum(1 for line in lines if line.strip())
    except FileNotFoundError:
        return 0
