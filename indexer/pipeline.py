"""Assembly: manifest -> Ray Data (read, embed in an actor pool) -> one writer into Milvus.

The driver is the only writer: milvus-lite is an in-process database that one process
locks, and ``upsert`` on content-hash keys makes re-runs idempotent. The input is cut into
shards of consecutive items; the progress file records the finished ones, so a killed run
started again skips them (docs/indexing.md).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import numpy as np

from xmodal import settings, store
from xmodal.card import ModelCard
from xmodal.client import triton
from xmodal.indexer import DEFAULT_SHARD_SIZE, DEFAULT_WRITE_BATCH, sources, state
from xmodal.indexer.embed import TritonEmbedder, vector_column
from xmodal.indexer.state import deadletter_path, progress_path  # noqa: F401 - re-exported by xmodal.indexer
from xmodal.training.manifest import read_manifest

logger = logging.getLogger(__name__)


@dataclass
class IndexReport:
    collection: str
    model: str
    fingerprint: str
    items_read: int  # items in the input (for captions: every caption, repeats included)
    rows_written: int  # distinct rows (primary keys) upserted by this run
    dead_letters: int  # letters on file for the whole input, those of shards resumed past included
    seconds: float  # wall time of this run, start-up included
    deadletter_path: str | None = None
    duplicates: int = 0  # items of this run whose content equals an earlier item's: they share its row
    shards: int = 0
    shards_skipped: int = 0  # finished by an earlier run that was cut short
    items_skipped: int = 0  # the items of those shards
    progress_path: str | None = None
    fresh_start: str | None = None  # why the progress of an earlier run was set aside, if it was
    # busy seconds per stage (read: reading and checking files; embed: waiting on Triton;
    # write: upserts and flushes), summed over workers, and the items (rows) each handled
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_items: dict[str, int] = field(default_factory=dict)

    @property
    def items_processed(self) -> int:
        """The distinct items this run sent through the pipeline."""
        return self.stage_items.get("read", 0)

    @property
    def items_per_second(self) -> float:
        return self.items_processed / self.seconds if self.seconds > 0 else 0.0

    def stage_rates(self) -> dict[str, float]:
        """Items (rows, for write) per busy second of each stage: what one worker of it sustains."""
        return {stage: round(self.stage_items.get(stage, 0) / seconds, 1)
                for stage, seconds in self.stage_seconds.items() if seconds > 0}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_processed": self.items_processed,
                "items_per_second": round(self.items_per_second, 2), "stage_items_per_second": self.stage_rates()}

    def __str__(self) -> str:
        text = (f"indexed into {self.collection!r} with {self.model} ({self.fingerprint}): "
                f"{self.items_read} read, {self.rows_written} written, {self.dead_letters} dead letters, "
                f"{self.duplicates} duplicates")
        if self.shards_skipped:
            text += (f"; {self.shards_skipped} of {self.shards} shards ({self.items_skipped} items) "
                     f"skipped, finished by an earlier run")
        text += f"\n  {self.seconds:.1f} s wall, {self.items_per_second:.1f} items/s"
        rates = self.stage_rates()
        if rates:
            unit = {"write": "rows/s"}
            text += "; busy time per stage: " + ", ".join(
                f"{stage} {self.stage_seconds[stage]:.2f} s ({rate:.0f} {unit.get(stage, 'items/s')})"
                for stage, rate in rates.items())
        if self.dead_letters:
            text += f"\n  dead letters: {self.deadletter_path}"
        return text


def start_ray(address: str | None = None) -> bool:
    """Connect to `address`, or start a small local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False,
                                  configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray waits 30 s for its GCS server by default; a busy 2-core machine can take longer.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        try:
            ray.init(num_cpus=2, include_dashboard=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            # Ray gives its raylet a fixed 30 s to register (not configurable); seen once here
            # in a test run on a 2-core machine: start it once more before giving up.
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            ray.init(num_cpus=2, include_dashboard=False, **kwargs)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the tqdm bar over the written rows
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def _fetch_card(triton_url: str, model: str, timeout: float) -> ModelCard:
    client = triton.connect(triton_url, timeout=timeout, models=(model,))
    try:
        return triton.fetch_card(client, model)
    finally:
        client.close()


class _Writer:
    """Rows into Milvus in upserts of up to `batch_rows`; after each upsert, the shards whose
    items have all come back are recorded in the progress file.

    A row waits in `pending` until the next upsert, so a shard is recorded only once its
    rows are acknowledged. milvus-lite lives in this process and dies with it, so there the
    upserts are also flushed before a shard is recorded; a Milvus server has them in its log
    once it acknowledges them (a flush per shard would only make small segments).
    """

    def __init__(self, client, collection: str, progress: state.Progress, *, batch_rows: int, flush: bool):
        self.client = client
        self.collection = collection
        self.progress = progress
        self.batch_rows = batch_rows
        self.flush = flush
        self.pending: dict[str, dict[str, Any]] = {}  # one row a key: an upsert may not repeat one
        self.written: set[str] = set()
        self.done: set[int] = set()  # shards complete since the last upsert
        self.rows_sent = 0
        self.seconds = 0.0

    def add(self, key: str, row: dict[str, Any]) -> bool:
        """Queue a row; True when its key was seen before in this run (a duplicate)."""
        seen = key in self.written or key in self.pending
        self.pending[key] = row
        if len(self.pending) >= self.batch_rows:
            self.write()
        return seen

    def write(self) -> None:
        started = time.perf_counter()
        if self.pending:
            self.client.upsert(self.collection, list(self.pending.values()))
            self.written.update(self.pending)
            self.rows_sent += len(self.pending)
            self.pending = {}
        if self.done:
            if self.flush:
                self.client.flush(self.collection)
            self.progress.finished |= self.done
            self.done = set()
            self.progress.save()
        self.seconds += time.perf_counter() - started


def _run(*, items: list[dict[str, Any]], items_read: int, input_identity: dict[str, Any], prepare: Callable | None,
         model: str, input_name: str, kind: str, to_row: Callable[[dict[str, Any]], dict[str, Any]],
         to_deadletter: Callable[[dict[str, Any]], dict[str, Any]], triton_url: str | None,
         model_repository: str | os.PathLike[str] | None, milvus_uri: str | None,
         collection: str, batch_size: int, embed_workers: int, shard_size: int, write_batch: int, restart: bool,
         ray_address: str | None, progress: bool, timeout: float, started: float,
         driver_read_seconds: float = 0.0) -> IndexReport:
    for name, value in (("batch_size", batch_size), ("embed_workers", embed_workers),
                        ("shard_size", shard_size), ("write_batch", write_batch)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    if (triton_url is None) == (model_repository is None):
        raise ValueError("give either triton_url (embed with a Triton server) or model_repository "
                         "(embed in-process with ONNX Runtime, no server), not both or neither")
    if model_repository is not None:
        from xmodal.indexer import local

        model_repository = Path(model_repository).expanduser().resolve()
        card = local.repository_card(model_repository)
    else:
        card = _fetch_card(triton_url, model, timeout)
    # Every level of the card is asked of the ensemble and stored in its own vector field.
    dims = {level: int(spec["dim"]) for level, spec in card.embeddings.items()}

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)
        else:
            logger.info(message)

    shard_of = lambda number: number // shard_size  # noqa: E731 - items are numbered in input order
    shards = math.ceil(len(items) / shard_size)
    identity = {**input_identity, "items": len(items), "items_sha256": state.items_sha256(items),
                "model": card.name, "fingerprint": card.fingerprint, "shard_size": shard_size}
    stage_seconds = {"read": driver_read_seconds, "embed": 0.0, "write": 0.0}
    stage_items = {"read": 0, "embed": 0, "write": 0}
    duplicates = 0
    ray_started = False
    bar = client = dead = None
    try:
        if items:
            # Ray first: started while this process has no gRPC threads (pymilvus and
            # milvus-lite bring them), its forks make grpcio print no fork warnings.
            ray_started = start_ray(ray_address)
        client = store.connect(milvus_uri)
        created = store.ensure_collection(client, collection, card, kind=kind)
        if not items:  # nothing selected: the files of earlier runs stay as they are
            return _finish(IndexReport(collection=collection, model=card.name, fingerprint=card.fingerprint,
                                       items_read=items_read, rows_written=0, dead_letters=0,
                                       seconds=time.perf_counter() - started), progress)
        run_progress, fresh_start = state.continue_or_start(
            state.progress_path(milvus_uri, collection), identity, shards, collection_created=created,
            restart=restart)
        if fresh_start:
            say(f"{run_progress.path}: {fresh_start}")
        finished_before = frozenset(run_progress.finished)
        dead = state.DeadLetters(
            state.deadletter_path(milvus_uri, collection),
            keep_items=(lambda n: n is not None and shard_of(n) in finished_before) if finished_before else None)
        todo = [item for item in items if shard_of(item["item"]) not in finished_before]
        if finished_before:
            say(f"resuming: {len(finished_before)} of {shards} shards were finished by an earlier run "
                f"and are skipped; {len(todo)} items to go")
        run_progress.save()
        writer = _Writer(client, collection, run_progress, batch_rows=write_batch, flush=store.is_local_uri(milvus_uri))
        if todo:
            import ray.data
            from tqdm import tqdm

            left = Counter(shard_of(item["item"]) for item in todo)
            ds = sources.dataset(todo, batch_size=batch_size, parallelism=embed_workers)
            if prepare is not None:
                ds = ds.map_batches(prepare, batch_size=batch_size, batch_format="numpy")
            if model_repository is not None:
                # The actors compute: up to a CPU each, the rest of the local Ray left to the readers.
                stage, stage_args, cpus = (local.LocalEmbedder, (str(model_repository), kind_of_input[kind], dims),
                                           min(1.0, 1.0 / embed_workers))
            else:
                # The actors mostly wait on Triton: a fraction of a CPU each leaves the local
                # two-CPU Ray room for the reading tasks.
                stage, stage_args, cpus = (TritonEmbedder, (triton_url, model, input_name, dims, max(timeout, 60.0)),
                                           min(0.5, 1.0 / embed_workers))
            ds = ds.map_batches(
                stage, batch_size=batch_size, batch_format="numpy", fn_constructor_args=stage_args,
                compute=ray.data.ActorPoolStrategy(size=embed_workers), num_cpus=cpus,
            )
            bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=f"index {collection}",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                if "read_seconds" in batch:
                    stage_seconds["read"] += float(batch["read_seconds"].sum())
                stage_seconds["embed"] += float(batch["embed_seconds"].sum())
                stage_items["embed"] += int(np.count_nonzero(batch["embed_seconds"]))
                for record, vectors in _records(batch, dims):
                    if record["error"]:
                        dead.write({"item": record["item"], **to_deadletter(record)})
                    else:
                        duplicates += writer.add(record["id"], {**to_row(record), **store.vector_values(vectors)})
                    shard = shard_of(record["item"])
                    left[shard] -= 1
                    if not left[shard]:
                        writer.done.add(shard)
                bar.update(len(batch["item"]))
                bar.set_postfix(written=len(writer.written) + len(writer.pending), dead=dead.count, refresh=False)
        writer.write()
        client.flush(collection)
        run_progress.complete = True
        run_progress.save()
    finally:
        if bar is not None:
            bar.close()
        if dead is not None:
            dead.close()
        if client is not None:
            client.close()
        if ray_started:
            import ray

            ray.shutdown()
    stage_seconds["write"] = writer.seconds
    stage_items["read"] = len(todo)
    stage_items["write"] = writer.rows_sent
    report = IndexReport(
        collection=collection, model=card.name, fingerprint=card.fingerprint, items_read=items_read,
        rows_written=len(writer.written), dead_letters=dead.count, seconds=time.perf_counter() - started,
        deadletter_path=str(dead.path) if dead.count else None, duplicates=duplicates, shards=shards,
        shards_skipped=len(finished_before), items_skipped=len(items) - len(todo),
        progress_path=str(run_progress.path), fresh_start=fresh_start,
        stage_seconds={k: round(v, 6) for k, v in stage_seconds.items()}, stage_items=stage_items,
    )
    return _finish(report, progress)


# What the in-process embedder runs for each kind of collection.
kind_of_input = {"image": "image", "caption": "text"}


def _finish(report: IndexReport, progress: bool) -> IndexReport:
    if progress:
        print(report, file=sys.stderr, flush=True)
    return report


def _records(batch: dict[str, np.ndarray],
             levels: Iterable[str]) -> Iterable[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(the item's scalar columns, its vector by level) for each item of an embedded batch."""
    columns = {level: vector_column(level) for level in levels}
    keys = [k for k in batch if k not in columns.values()]
    for i in range(len(batch["item"])):
        yield {k: _plain(batch[k][i]) for k in keys}, {level: batch[column][i] for level, column in columns.items()}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _read_rows(manifest: str | os.PathLike[str], split: str | None, styles: Collection[str] | str | None,
               limit: int | None) -> list:
    try:
        return read_manifest(manifest, split=split, styles=styles, limit=limit)
    except UnicodeDecodeError as exc:
        # its own message names neither the file nor that the file is to blame
        raise ValueError(f"manifest {manifest} is not UTF-8 text: {exc}") from None


def _input_identity(kind: str, manifest: str | os.PathLike[str], split: str | None,
                    styles: Collection[str] | str | None, limit: int | None) -> dict[str, Any]:
    """What the progress file records of the input, besides the items themselves."""
    if isinstance(styles, str):
        styles = [styles]
    return {"kind": kind, "manifest": str(Path(manifest).resolve()), "split": split,
            "styles": sorted(styles) if styles is not None else None, "limit": limit}


def index_images(
    manifest: str | os.PathLike[str],
    *,
    triton_url: str | None = None,
    model_repository: str | os.PathLike[str] | None = None,
    milvus_uri: str | None = None,
    collection: str = settings.IMAGE_COLLECTION,
    split: str | None = "test",
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    embed_workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    restart: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> IndexReport:
    """Embed a manifest's images with Triton's ``embed_image`` and upsert them into Milvus.

    Embedding is by the Triton server at `triton_url`, or, given `model_repository`
    instead, in-process with ONNX Runtime from that repository (``xmodal index --local``,
    ``xmodal.indexer.local``): the same preprocessing and encoders, the same rows.

    Keys are content hashes, so re-running writes the same rows again (no duplicates), and
    identical image files become one row. Unreadable files and images the server rejects go
    to the dead-letter file (see :func:`deadletter_path`) and the run goes on. A run that
    was cut short continues where it stopped when started again with the same input and
    model: the shards (`shard_size` items) it finished are skipped (`restart` ignores them).
    """
    started = time.perf_counter()
    rows = _read_rows(manifest, split, styles, limit)
    items = sources.image_items(rows)

    def to_row(record: dict[str, Any]) -> dict[str, Any]:
        return {"id": record["id"], "image": record["path"],
                "captions": json.loads(record["captions"]), "concept": record["concept"],
                "style": record["style"]}

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return {"path": record["path"], "reason": record["error"], "collection": collection}

    return _run(items=items, items_read=len(items), input_identity=_input_identity("image", manifest, split, styles, limit),
                prepare=sources.read_images, model=triton.IMAGE_MODEL, input_name=triton.IMAGE_INPUT, kind="image",
                to_row=to_row, to_deadletter=to_deadletter, triton_url=triton_url, model_repository=model_repository,
                milvus_uri=milvus_uri, collection=collection, batch_size=batch_size, embed_workers=embed_workers,
                shard_size=shard_size, write_batch=write_batch, restart=restart, ray_address=ray_address,
                progress=progress, timeout=timeout, started=started)


def index_captions(
    manifest: str | os.PathLike[str],
    *,
    triton_url: str | None = None,
    model_repository: str | os.PathLike[str] | None = None,
    milvus_uri: str | None = None,
    collection: str = settings.CAPTION_COLLECTION,
    split: str | None = "test",
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    embed_workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    restart: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> IndexReport:
    """Embed the manifest's captions with ``embed_text`` into the caption collection.

    One row per distinct caption text (its hash is the key); the row keeps the concept,
    style and image of the first manifest row that has it. ``items_read`` counts captions.
    Empty captions and text Milvus cannot store (not UTF-8, too long) go to the dead-letter
    file. Resumes as :func:`index_images` does.
    """
    started = time.perf_counter()
    rows = _read_rows(manifest, split, styles, limit)
    read_started = time.perf_counter()
    items, read = sources.caption_items(rows)
    read_seconds = time.perf_counter() - read_started

    def to_row(record: dict[str, Any]) -> dict[str, Any]:
        return {"id": record["id"], "caption": record["caption"],
                "concept": record["concept"], "style": record["style"], "image": record["image"]}

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return {"caption": record["caption"], "image": record["image"], "reason": record["error"],
                "collection": collection}

    return _run(items=items, items_read=read, input_identity=_input_identity("caption", manifest, split, styles, limit),
                prepare=None, model=triton.TEXT_MODEL, input_name=triton.TEXT_INPUT, kind="caption", to_row=to_row,
                to_deadletter=to_deadletter, triton_url=triton_url, model_repository=model_repository,
                milvus_uri=milvus_uri, collection=collection,
                batch_size=batch_size, embed_workers=embed_workers, shard_size=shard_size, write_batch=write_batch,
                restart=restart, ray_address=ray_address, progress=progress, timeout=timeout, started=started,
                driver_read_seconds=read_seconds)
