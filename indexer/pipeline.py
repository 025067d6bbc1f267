"""Assembly: input -> Ray Data (read, embed in an actor pool) -> writer(s) into Milvus.

The input (a manifest, or another format users bring: ``formats.py``) is scanned once by the
driver (item count, hash, where each shard starts) and read by Ray tasks, one per shard still
to do (``sources.dataset``): memory does not grow with the corpus. With milvus-lite (a
database one process locks: its server is a child of the process that opened it) the driver is
the only writer; with a Milvus server a pool of writer actors upserts (``write.py``).
``upsert`` on content-hash keys makes re-runs idempotent. The progress file records the
finished shards, so a killed run started again skips them (docs/indexing.md).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np

from xmodal import contract, settings, store
from xmodal.card import ModelCard
from xmodal.client import triton
from xmodal.indexer import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_WRITE_BATCH, formats, sources, state
from xmodal.indexer.embed import TritonEmbedder
from xmodal.indexer.state import deadletter_path, progress_path  # noqa: F401 - re-exported by xmodal.indexer
from xmodal.indexer.write import MilvusWriteStage, records

# Writer actors for a Milvus server when not told (milvus-lite always has one writer: the driver).
DEFAULT_SERVER_WRITERS = 2

logger = logging.getLogger(__name__)


@dataclass
class IndexReport:
    collection: str
    model: str
    fingerprint: str
    items_read: int  # items in the input (for captions: every caption, repeats included)
    rows_written: int  # rows upserted by this run: distinct keys per shard (a key in two shards counts twice)
    dead_letters: int  # letters on file for the whole input, those of shards resumed past included
    seconds: float  # wall time of this run, start-up included
    deadletter_path: str | None = None
    duplicates: int = 0  # items whose content equals an earlier item's of the same shard: they share its row
    shards: int = 0
    shards_skipped: int = 0  # finished by an earlier run that was cut short
    items_skipped: int = 0  # the items of those shards
    progress_path: str | None = None
    fresh_start: str | None = None  # why the progress of an earlier run was set aside, if it was
    # busy seconds per stage (read: reading and checking files; embed: waiting on Triton;
    # write: upserts and flushes), summed over workers, and the items (rows) each handled
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_items: dict[str, int] = field(default_factory=dict)
    scan_seconds: float = 0.0  # the driver's pass over the input (count, hash, shard offsets)
    startup_seconds: float = 0.0  # from the start until the first embedded batch was back (Ray, actors, models)
    startup_items: int = 0  # the items of that first batch

    @property
    def items_processed(self) -> int:
        """The distinct items this run sent through the pipeline."""
        return self.stage_items.get("read", 0)

    @property
    def items_per_second(self) -> float:
        return self.items_processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_second(self) -> float:
        """Items/s once the first batch was back: the rate a long run approaches, without the
        fixed start-up (the collection created, the actors started, their models loaded)."""
        seconds = self.seconds - self.startup_seconds
        return (self.items_processed - self.startup_items) / seconds if self.startup_seconds and seconds > 0 else 0.0

    def stage_rates(self) -> dict[str, float]:
        """Items (rows, for write) per busy second of each stage: what one worker of it sustains."""
        return {stage: round(self.stage_items.get(stage, 0) / seconds, 1)
                for stage, seconds in self.stage_seconds.items() if seconds > 0}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_processed": self.items_processed,
                "items_per_second": round(self.items_per_second, 2),
                "steady_items_per_second": round(self.steady_items_per_second, 2),
                "stage_items_per_second": self.stage_rates()}

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
        for attempt in range(3):
            try:
                ray.init(num_cpus=2, include_dashboard=False, **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for these
                # Ray gives its raylet a fixed 30 s to register, and waits a fixed time for
                # the GCS's port file (neither configurable). On a 2-core machine under load
                # both were seen to run out: start it again before giving up.
                if "timed out" not in str(exc).lower() or attempt == 2:
                    raise
                ray.shutdown()
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
    """Rows into milvus-lite in upserts of up to `batch_rows`; after each upsert, the shards
    whose items have all come back are recorded in the progress file.

    A row waits in `pending` until the next upsert, so a shard is recorded only once its
    rows are acknowledged. milvus-lite's server is a child of this process and stops with
    it, so there the upserts are also flushed before a shard is recorded; an upsert sends at
    most 5,000 rows per call there, fewer for rows of more than 256 vector floats
    (``store.upsert_rows``), whatever `batch_rows` is. With a Milvus server the rows are
    upserted by the writer actors before their items come back (`rows` None here): this
    keeps the books only, and records a shard as soon as all its items are back (a server
    has acknowledged rows in its log; a flush per shard would only make small segments).

    Memory is bounded: `pending` holds at most `batch_rows` rows and `shard_keys` the keys of
    the shards still in flight (a shard is dropped from it when its last item is back).
    """

    def __init__(self, client, collection: str, progress: state.Progress, *, batch_rows: int, flush: bool):
        self.client = client
        self.collection = collection
        self.progress = progress
        self.batch_rows = batch_rows
        self.flush = flush
        self.pending: dict[str, dict[str, Any]] = {}  # one row a key: an upsert may not repeat one
        self.shard_keys: dict[int, set[str]] = {}  # the keys seen so far in each shard in flight
        self.done: set[int] = set()  # shards complete since the last upsert
        self.rows = 0  # distinct keys per shard: the rows this run upserted
        self.rows_sent = 0
        self.seconds = 0.0

    def add(self, shard: int, key: str, row: dict[str, Any] | None) -> bool:
        """Count (and with `row`, queue) an item's row; True when its key came before in its shard."""
        keys = self.shard_keys.setdefault(shard, set())
        seen = key in keys
        if not seen:
            keys.add(key)
            self.rows += 1
        if row is not None:
            self.pending.pop(key, None)  # the later item of a key wins, as a later upsert would
            self.pending[key] = row
            if len(self.pending) >= self.batch_rows:
                self.write()
        return seen

    def shard_done(self, shard: int) -> None:
        self.shard_keys.pop(shard, None)
        self.done.add(shard)

    def write(self) -> None:
        started = time.perf_counter()
        if self.pending:
            # in calls of at most 5,000 rows (fewer for wide rows), whatever batch_rows is
            store.upsert_rows(self.client, self.collection, list(self.pending.values()))
            self.rows_sent += len(self.pending)
            self.pending = {}
        if self.done:
            if self.flush:
                self.client.flush(self.collection)
            self.progress.finished |= self.done
            self.done = set()
            self.progress.save()
        self.seconds += time.perf_counter() - started


def _run(*, plan: sources.InputPlan, input_identity: dict[str, Any], prepare: Callable | None,
         model: str, input_name: str, kind: str, to_deadletter: Callable[[dict[str, Any]], dict[str, Any]],
         triton_url: str | None, model_repository: str | os.PathLike[str] | None, milvus_uri: str | None,
         milvus_token: str | None, writers: int | None, collection: str, batch_size: int, embed_workers: int,
         embed_threads: int | None, write_batch: int, restart: bool, ray_address: str | None, progress: bool,
         timeout: float, started: float, scan_seconds: float, index_type: str | None = None,
         index_params: dict[str, Any] | None = None) -> IndexReport:
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    token = settings.milvus_token(milvus_token)
    local_db = store.is_local_uri(milvus_uri)
    if writers is None:
        writers = 1 if local_db else DEFAULT_SERVER_WRITERS
    if writers < 1:
        raise ValueError(f"writers must be at least 1, got {writers}")
    if local_db and writers > 1:
        raise ValueError(f"milvus-lite ({milvus_uri}) is a database one process holds: it takes one writer, "
                         f"not {writers}; use a Milvus server URI for parallel writers")
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

    shard_size = plan.shard_size
    shard_of = lambda number: number // shard_size  # noqa: E731 - items are numbered in input order
    shards = len(plan.shards)
    identity = {**input_identity, "items": plan.items, "items_sha256": plan.items_sha256,
                "model": card.name, "fingerprint": card.fingerprint, "shard_size": shard_size}
    stage_seconds = {"read": 0.0, "embed": 0.0, "write": 0.0}
    stage_items = {"read": 0, "embed": 0, "write": 0}
    duplicates = 0
    first_batch_at, first_batch_items = 0.0, 0
    ray_started = False
    bar = client = dead = None
    todo: list[sources.Shard] = []
    try:
        if plan.items:
            # Ray first: started while this process has no gRPC threads (pymilvus and
            # milvus-lite bring them), its forks make grpcio print no fork warnings.
            ray_started = start_ray(ray_address)
        client = store.connect(milvus_uri, token=token)
        created = store.ensure_collection(client, collection, card, kind=contract.KINDS[kind], index_type=index_type,
                                          index_params=index_params)
        if not plan.items:  # nothing selected: the files of earlier runs stay as they are
            return _finish(IndexReport(collection=collection, model=card.name, fingerprint=card.fingerprint,
                                       items_read=0, rows_written=0, dead_letters=0,
                                       seconds=time.perf_counter() - started, scan_seconds=round(scan_seconds, 6)),
                           progress)
        run_progress, fresh_start = state.continue_or_start(
            state.progress_path(milvus_uri, collection), identity, shards, collection_created=created,
            restart=restart)
        if fresh_start:
            say(f"{run_progress.path}: {fresh_start}")
        finished_before = frozenset(run_progress.finished)
        dead = state.DeadLetters(
            state.deadletter_path(milvus_uri, collection),
            keep_items=(lambda n: n is not None and shard_of(n) in finished_before) if finished_before else None)
        todo = [shard for shard in plan.shards if shard.number not in finished_before]
        items_todo = sum(shard.items for shard in todo)
        if finished_before:
            say(f"resuming: {len(finished_before)} of {shards} shards were finished by an earlier run "
                f"and are skipped; {items_todo} items to go")
        run_progress.save()
        writer = _Writer(client, collection, run_progress, batch_rows=write_batch, flush=local_db)
        if todo:
            import ray.data
            from tqdm import tqdm

            # In input order: a key met in several shards gets the row of its last item, with
            # a resumed run as with an uninterrupted one (shards also finish in order).
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            left = {shard.number: shard.emitted for shard in todo}  # items still out, per shard
            unsent = {shard.number: shard.items - shard.emitted for shard in todo}  # repeated captions
            ds = sources.dataset(plan.spec, todo, block_rows=2 * batch_size)
            if prepare is not None:
                ds = ds.map_batches(prepare, batch_size=batch_size, batch_format="numpy")
            # Ray Data gathers a task's output into blocks of up to 128 MiB: a whole shard would
            # go to one embedding actor. Blocks of about two batches (a streaming repartition)
            # let the actors share a shard, and reach the driver as they are done.
            ds = ds.repartition(target_num_rows_per_block=2 * batch_size)
            if model_repository is not None:
                # The actors compute: up to a CPU each, the rest of the local Ray left to the readers.
                stage, stage_args, cpus = (local.LocalEmbedder,
                                           (str(model_repository), kind_of_input[kind], dims, embed_threads),
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
            if not local_db:
                # A Milvus server: the rows are upserted by a pool of writer actors, in batches
                # of write_batch rows; only the small columns come back to the driver. They wait
                # on the server and hold no CPU slot, as the driver's writer does not: with a
                # share each, a 2-CPU Ray with one --local embedding actor (1 CPU) had no CPU
                # left for a read task, and the run stalled.
                ds = ds.map_batches(
                    MilvusWriteStage, batch_size=write_batch, batch_format="numpy",
                    fn_constructor_args=(milvus_uri, token, collection, kind, list(dims), max(timeout, 60.0)),
                    compute=ray.data.ActorPoolStrategy(size=writers), num_cpus=0,
                )
            build_row = contract.KINDS[kind].row
            bar = tqdm(total=plan.items, initial=plan.items - items_todo, unit="item", desc=f"index {collection}",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["item"])
                if not first_batch_at:
                    first_batch_at, first_batch_items = time.perf_counter(), n
                stage_seconds["read"] += float(batch["read_seconds"].sum()) if "read_seconds" in batch else 0.0
                stage_seconds["embed"] += float(batch["embed_seconds"].sum())
                stage_items["embed"] += int(np.count_nonzero(batch["embed_seconds"]))
                if "write_seconds" in batch:
                    stage_seconds["write"] += float(batch["write_seconds"].sum())
                    writer.rows_sent += int(round(float(batch["rows_upserted"].sum())))
                done_items = n
                for record, vectors in records(batch, dims):
                    shard = shard_of(record["item"])
                    if record["error"]:
                        dead.write({"item": record["item"], **to_deadletter(record)})
                    else:
                        row = {**build_row(record), **store.vector_values(vectors)} if local_db else None
                        duplicates += writer.add(shard, record["id"], row)
                    left[shard] -= 1
                    if not left[shard]:
                        del left[shard]
                        writer.shard_done(shard)
                        done_items += unsent.pop(shard)
                if not local_db:
                    writer.write()  # these rows are acknowledged: record the shards they finished
                bar.update(done_items)
                bar.set_postfix(written=writer.rows, dead=dead.count, refresh=False)
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
    if local_db:
        stage_seconds["write"] = writer.seconds
    stage_items["read"] = sum(shard.emitted for shard in todo)
    stage_items["write"] = writer.rows_sent
    report = IndexReport(
        collection=collection, model=card.name, fingerprint=card.fingerprint, items_read=plan.items,
        rows_written=writer.rows, dead_letters=dead.count, seconds=time.perf_counter() - started,
        deadletter_path=str(dead.path) if dead.count else None, duplicates=duplicates, shards=shards,
        shards_skipped=len(finished_before), items_skipped=plan.items - items_todo,
        progress_path=str(run_progress.path), fresh_start=fresh_start, scan_seconds=round(scan_seconds, 6),
        startup_seconds=round(first_batch_at - started, 6) if first_batch_at else 0.0, startup_items=first_batch_items,
        stage_seconds={k: round(v, 6) for k, v in stage_seconds.items()}, stage_items=stage_items,
    )
    return _finish(report, progress)


# What the in-process embedder runs for each kind of collection.
kind_of_input = {"image": "image", "caption": "text"}


def _finish(report: IndexReport, progress: bool) -> IndexReport:
    if progress:
        print(report, file=sys.stderr, flush=True)
    return report


def _scan(kind: str, source: formats.Source, split: Any, styles: Collection[str] | str | None,
          limit: int | None, shard_size: int, **sizes: int) -> tuple[sources.InputPlan, float]:
    for name, value in (("shard_size", shard_size), *sizes.items()):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    started = time.perf_counter()
    plan = sources.scan(source, kind=kind, split=split, styles=styles, limit=limit, shard_size=shard_size)
    return plan, time.perf_counter() - started


def _input_identity(plan: sources.InputPlan) -> dict[str, Any]:
    """What the progress file records of the input, besides the items themselves: for another
    format than the manifest also the format and the options that shape its rows."""
    return {**plan.spec.identity(), "limit": plan.limit}


def _letter(record: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The dead letter's fields; an item whose text Arrow could not carry brings it in `letter`."""
    if record.get("letter"):
        fields.update(json.loads(record["letter"]))
    return fields


def index_images(
    manifest: str | os.PathLike[str] | None = None,
    *,
    input: formats.Source | str | os.PathLike[str] | None = None,  # noqa: A002 - the CLI's --input
    triton_url: str | None = None,
    model_repository: str | os.PathLike[str] | None = None,
    milvus_uri: str | None = None,
    milvus_token: str | None = None,
    collection: str = settings.IMAGE_COLLECTION,
    split: str | None = formats.SPLIT_DEFAULT,
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embed_workers: int = 1,
    embed_threads: int | None = None,
    writers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    restart: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
    index_type: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> IndexReport:
    """Embed the images of a manifest, or of `input` in another format, with Triton's
    ``embed_image`` and upsert them into Milvus.

    `input`: a path (its format found from its name) or a ``formats.Source`` (format, image root,
    Parquet columns, name): CSV/TSV or JSONL tables with an image folder, the Karpathy split
    JSON, Parquet with an image-bytes or image-path column, WebDataset tar shards
    (docs/indexing.md). Images the source holds as bytes are written once, by content, beside
    the collection, and their rows point at those files. `split`: a manifest's ``test`` split
    unless given; every row of another format unless given (None: every row).

    Embedding is by the Triton server at `triton_url`, or, given `model_repository`
    instead, in-process with ONNX Runtime from that repository (``xmodal index --local``,
    ``xmodal.indexer.local``): the same preprocessing and encoders, the same rows.

    The input is streamed: one pass in the driver finds the shards, Ray tasks read them
    (memory does not grow with the corpus). Keys are content hashes, so re-running writes
    the same rows again (no duplicates), and identical image files become one row (with the
    path and captions of the last of them in the input). Unreadable files and images the server rejects go
    to the dead-letter file (see :func:`deadletter_path`) and the run goes on. A run that
    was cut short continues where it stopped when started again with the same input and
    model: the shards (`shard_size` items) it finished are skipped (`restart` ignores them).

    `milvus_token` (else $XMODAL_MILVUS_TOKEN) authenticates to a Milvus server; with a
    server, `writers` actors upsert in parallel (default 2; milvus-lite takes one, the
    driver). `embed_threads` sets ONNX Runtime's intra-op threads per actor with a
    `model_repository` (default: ONNX Runtime's choice). `index_type`/`index_params` choose
    the vector index of a collection this run creates (default: IVF_FLAT, nlist 1024 on
    milvus-lite; HNSW, M 16, efConstruction 200 on a server); an existing collection keeps its own.
    """
    started = time.perf_counter()
    plan, scan_seconds = _scan("image", formats.source_of(manifest, input), split, styles, limit, shard_size,
                               batch_size=batch_size, embed_workers=embed_workers, write_batch=write_batch)
    # where the images a source holds as bytes are written: beside the collection, by content
    image_store = state.image_store_path(str(milvus_uri or settings.default_milvus_uri()), collection)

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return _letter(record, {"path": record["path"], "reason": record["error"], "collection": collection})

    return _run(plan=plan, input_identity=_input_identity(plan),
                prepare=functools.partial(sources.read_images, image_store=str(image_store)),
                model=contract.EMBED_IMAGE, input_name=contract.IMAGE_INPUT, kind="image",
                to_deadletter=to_deadletter, triton_url=triton_url, model_repository=model_repository,
                milvus_uri=milvus_uri, milvus_token=milvus_token, writers=writers, collection=collection,
                batch_size=batch_size, embed_workers=embed_workers, embed_threads=embed_threads,
                write_batch=write_batch, restart=restart, ray_address=ray_address, progress=progress,
                timeout=timeout, started=started, scan_seconds=scan_seconds, index_type=index_type,
                index_params=index_params)


def index_captions(
    manifest: str | os.PathLike[str] | None = None,
    *,
    input: formats.Source | str | os.PathLike[str] | None = None,  # noqa: A002 - the CLI's --input
    triton_url: str | None = None,
    model_repository: str | os.PathLike[str] | None = None,
    milvus_uri: str | None = None,
    milvus_token: str | None = None,
    collection: str = settings.CAPTION_COLLECTION,
    split: str | None = formats.SPLIT_DEFAULT,
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embed_workers: int = 1,
    embed_threads: int | None = None,
    writers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    restart: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
    index_type: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> IndexReport:
    """Embed the captions of a manifest, or of `input` in another format (as
    :func:`index_images` takes it), with ``embed_text`` into the caption collection.

    One row per distinct caption text (its hash is the key); the row keeps the concept,
    style and image of the last row that has it (an image the source holds as bytes is named
    by where it is there: ``<shard>:<key>.jpg``, ``<file>: row 3``; its bytes are not read). The items are the captions, repeats
    included (``items_read`` counts them); a shard sends each distinct text of it once, and
    a text repeated in later shards is embedded and upserted again, to the same row.
    Empty captions and text Milvus cannot store (not UTF-8, too long) go to the dead-letter
    file. Resumes as :func:`index_images` does.
    """
    started = time.perf_counter()
    plan, scan_seconds = _scan("caption", formats.source_of(manifest, input), split, styles, limit, shard_size,
                               batch_size=batch_size, embed_workers=embed_workers, write_batch=write_batch)

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return _letter(record, {"caption": record["caption"], "image": record["image"], "reason": record["error"],
                                "collection": collection})

    return _run(plan=plan, input_identity=_input_identity(plan),
                prepare=None, model=contract.EMBED_TEXT, input_name=contract.TEXT_INPUT, kind="caption",
                to_deadletter=to_deadletter, triton_url=triton_url, model_repository=model_repository,
                milvus_uri=milvus_uri, milvus_token=milvus_token, writers=writers, collection=collection,
                batch_size=batch_size, embed_workers=embed_workers, embed_threads=embed_threads,
                write_batch=write_batch, restart=restart, ray_address=ray_address, progress=progress,
                timeout=timeout, started=started, scan_seconds=scan_seconds, index_type=index_type,
                index_params=index_params)
