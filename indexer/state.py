"""The records an indexing run keeps of its collection: the progress that lets a killed run
resume, and the dead letters of the items that could not be indexed.

Where they live follows the store, so that whoever can reach the collection can read them:

- milvus-lite (a database file one machine holds): files beside the database,
  ``<db>.<collection>.progress.json`` and ``<db>.<collection>.deadletter.jsonl`` (``FileRecords``);
- a Milvus server: rows of the server's metadata collection ``xmodal_books``, keyed
  ``progress/<collection>`` and ``letter/<collection>/<item>`` (``MilvusRecords``), so a run from
  another machine resumes this one's progress and any machine reads the letters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xmodal import store
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

    records: "FileRecords | MilvusRecords"
    identity: dict[str, Any]
    shards: int
    finished: set[int] = field(default_factory=set)
    complete: bool = False

    def save(self) -> None:
        self.records.save_progress({"format": PROGRESS_FORMAT, **self.identity, "shards": self.shards,
                                    "finished": sorted(self.finished), "complete": self.complete, "updated": _now()})


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file as written, None when there is none; ValueError when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return _progress_record(text, f"progress file {path}")


def _progress_record(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{where} is not an xmodal progress record of format {PROGRESS_FORMAT}")
    return record


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "…" + text[-16:]


def continue_or_start(records: "FileRecords | MilvusRecords", identity: dict[str, Any], shards: int, *,
                      collection_created: bool, restart: bool) -> tuple[Progress, str | None]:
    """The progress to continue from, and why an existing progress record was set aside (None
    when there was none or the run continues it)."""
    fresh = Progress(records, identity, shards)
    try:
        stored = records.read_progress()
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
    return Progress(records, identity, shards, finished), None


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
        self.where = str(path)
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


def read_letters(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        return []


class FileRecords:
    """The progress file and the dead-letter file beside a milvus-lite database."""

    def __init__(self, milvus_uri: str, collection: str):
        self.progress_file = progress_path(milvus_uri, collection)
        self.letters_file = deadletter_path(milvus_uri, collection)
        self.progress_where = str(self.progress_file)
        self.letters_where = str(self.letters_file)

    def read_progress(self) -> dict[str, Any] | None:
        return read_progress(self.progress_file)

    def save_progress(self, record: dict[str, Any]) -> None:
        self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a kill while writing must leave the previous state, never half a file
        write_atomic(self.progress_file, (json.dumps(record, indent=1) + "\n").encode("utf-8"))

    def dead_letters(self, keep_items: Any = None) -> DeadLetters:
        return DeadLetters(self.letters_file, keep_items=keep_items)

    def letters(self) -> list[dict[str, Any]]:
        return read_letters(self.letters_file)

    def count_letters(self) -> int:
        return count_deadletters(self.letters_file)

    def remove(self) -> list[str]:
        removed = []
        for path in (self.progress_file, self.letters_file):
            if path.exists():
                path.unlink()
                removed.append(str(path))
        return removed


def _ranges(numbers: list[int]) -> list[list[int]]:
    """Sorted numbers as [first, last] runs: a long run's finished shards in a few bytes."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return runs


PAGE_ROWS = 5000  # keys of xmodal_books one delete call removes


class MilvusRecords:
    """The progress and the dead letters of `collection` as rows of a Milvus server's ``xmodal_books``.

    Reads are ``Strong``: a run resumed at once after a kill sees every row the killed one wrote.
    A letter's key is its item's number, so writing it again (a shard redone) replaces it.
    """

    def __init__(self, client, milvus_uri: str, collection: str):
        self.client = client
        self.progress_key = f"progress/{collection}"
        self.letter_prefix = f"letter/{collection}/"
        self.progress_where = f"{store.BOOKS_COLLECTION}[{self.progress_key}] in {milvus_uri}"
        self.letters_where = f"{store.BOOKS_COLLECTION}[{self.letter_prefix}*] in {milvus_uri}"
        self.letters_filter = f"{store.RECORD_KEY} like {json.dumps(self.letter_prefix + '%')}"
        self._ready = False

    def _books(self, *, create: bool) -> bool:
        if not self._ready:
            if not create and not self.client.has_collection(store.BOOKS_COLLECTION):
                return False
            store.ensure_record_collection(self.client, store.BOOKS_COLLECTION,
                                           description="xmodal: the progress and dead letters of each collection",
                                           key_max_length=store.BOOKS_KEY_MAX_LENGTH,
                                           record_max_length=store.BOOKS_RECORD_MAX_LENGTH)
            self._ready = True
        return True

    def _query(self, expression: str, fields: list[str]) -> list[dict[str, Any]]:
        if not self._books(create=False):
            return []
        # One query without a limit: Milvus returns every match (17,000 letters tested). Not
        # query_iterator: pymilvus caches a collection's schema across clients, and an iterator
        # over xmodal_books dropped and made again in this process read the old one (no rows).
        return self.client.query(store.BOOKS_COLLECTION, filter=expression, output_fields=fields,
                                 consistency_level="Strong")

    def read_progress(self) -> dict[str, Any] | None:
        rows = self._query(f"{store.RECORD_KEY} == {json.dumps(self.progress_key)}", [store.RECORD_TEXT])
        if not rows:
            return None
        record = _progress_record(rows[0][store.RECORD_TEXT], self.progress_where)
        record["finished"] = [n for first, last in record.pop("finished_runs", []) for n in range(first, last + 1)]
        return record

    def save_progress(self, record: dict[str, Any]) -> None:
        stored = {key: value for key, value in record.items() if key != "finished"}
        stored["finished_runs"] = _ranges(record["finished"])
        self._books(create=True)
        self.client.upsert(store.BOOKS_COLLECTION, store.record_rows({self.progress_key: json.dumps(stored)}))

    def _letter_rows(self) -> list[dict[str, Any]]:
        return self._query(self.letters_filter, [store.RECORD_KEY, store.RECORD_TEXT])

    def letters(self) -> list[dict[str, Any]]:
        return sorted((json.loads(row[store.RECORD_TEXT]) for row in self._letter_rows()),
                      key=lambda letter: letter.get("item", -1))

    def count_letters(self) -> int:
        return len(self._query(self.letters_filter, [store.RECORD_KEY]))

    def dead_letters(self, keep_items: Any = None) -> "MilvusDeadLetters":
        return MilvusDeadLetters(self, keep_items)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), PAGE_ROWS):
            self.client.delete(store.BOOKS_COLLECTION, ids=keys[start:start + PAGE_ROWS])

    def remove(self) -> list[str]:
        keys = [row[store.RECORD_KEY] for row in self._letter_rows()]
        had_progress = self.read_progress() is not None
        self.delete(keys + ([self.progress_key] if had_progress else []))
        return ([self.progress_where] if had_progress else []) + ([self.letters_where] if keys else [])


class MilvusDeadLetters:
    """DeadLetters' contract (fresh, or kept for the finished shards, then appended) on ``MilvusRecords``."""

    def __init__(self, records: MilvusRecords, keep_items: Any = None):
        self.records = records
        self.where = records.letters_where
        letters = {row[store.RECORD_KEY]: row for row in records._letter_rows()}
        drop = [key for key in letters
                if keep_items is None or not keep_items(_item_number(letters[key][store.RECORD_TEXT]))]
        records.delete(drop)
        self.count = len(letters) - len(drop)

    def write(self, record: dict[str, Any]) -> None:
        text = _dumps({**record, "at": _now()})
        if len(text.encode("utf-8")) > store.BOOKS_RECORD_MAX_LENGTH:  # a letter of a very long caption
            text = _dumps({**{key: value[:1000] + "…" if isinstance(value, str) else value
                              for key, value in record.items()}, "at": _now()})
        self.records._books(create=True)
        # acknowledged before the call returns: a shard is recorded as finished only with its letters kept
        self.records.client.upsert(store.BOOKS_COLLECTION,
                                   store.record_rows({f"{self.records.letter_prefix}{record['item']}": text}))
        self.count += 1

    def close(self) -> None:
        pass


def run_records(milvus_uri: str, collection: str, client=None) -> FileRecords | MilvusRecords:
    """Where `collection`'s run records live: files beside a milvus-lite database, else the
    server's ``xmodal_books`` (through `client`, an open client of that server)."""
    if store.is_local_uri(milvus_uri):
        return FileRecords(milvus_uri, collection)
    if client is None:
        raise ValueError("the run records of a Milvus server are read through a client of it")
    return MilvusRecords(client, milvus_uri, collection)
