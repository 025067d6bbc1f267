"""Assembly: an ``IndexJob`` -> reader, embedding, sink -> Ray Data -> Milvus.

The parts are built from the job, each by its own builder, as clip-retrieval assembles its
inference runner from a reader, a mapper and a writer builder; ``run`` takes other builders
in their place. `Reader`: the input (a manifest, or another format users bring:
``formats.py``) scanned once by the driver (item count, hash, where each shard starts) and read
by Ray tasks, one per shard still to do (``sources.dataset``): memory does not grow with the
corpus. `Embedding`: the model's card and the actor pool that embeds (Triton clients, or ONNX
Runtime in-process). `Sink`: with milvus-lite (a database one process locks: its server is a
child of the process that opened it) the driver is the only writer; with a Milvus server a pool
of writer actors upserts (``write.py``). ``upsert`` on content-hash keys makes re-runs
idempotent. The progress record (``state.py``: a file beside milvus-lite, a row of a server's
``xmodal_books``) holds the finished shards, so a killed run started again, from any machine,
skips them (docs/indexing.md).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus.exceptions import MilvusException

from xmodal import contract, readers, settings, store
from xmodal.card import ModelCard
from xmodal import triton
from xmodal.indexer import formats, sources, state
from xmodal.indexer.embed import NODE_COLUMN, EmbedStage, TritonEmbedder
from xmodal.indexer.job import KINDS, IndexJob
from xmodal.indexer.state import deadletter_path, progress_path  # noqa: F401 - re-exported by xmodal.indexer
from xmodal.indexer.folder_files import FolderChanges, FolderFiles, files_path
from xmodal.indexer.write import (WRITE_REFUSED, MilvusWriteStage, merged_with_kept, put_row, records,
                                  release_paths)

logger = logging.getLogger(__name__)


# The CPU share of a task that reads items (and of the one that checks images): reading waits on
# files as much as it computes, and a share this small still fits on a node of one CPU beside
# an embedding actor. With a whole CPU each, two nodes of one CPU whose embedding actors held
# half a CPU each had no room for any reading task, and the run waited for ever.
READ_CPUS = 0.25
# How long a run waits for its first embedded batch before it says what it waits on, and again
WAIT_NOTE_SECONDS = 20.0


class WriteRefused(Exception):
    """A writer actor's batch the Milvus server refused (its message)."""


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
    # images: paths the collection's rows gained beside their first (byte-identical files: one
    # row keeps every path); a rerun of the same files adds none
    paths_merged: int = 0
    # a folder: its files against the collection's record of them (folder_files.py); removed
    # (with sync): the files gone whose paths the rows let go
    files_added: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
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
    # a folder's files the walk left out (not dead letters): hidden ones (a hidden directory
    # counts once), files neither an image nor an image's sidecar, symlinks leaving the folder
    hidden_skipped: int = 0
    not_images_skipped: int = 0
    outside_links_skipped: int = 0
    # the items each Ray node's embedding actors embedded, by "<node address> <node id's first 8>"
    items_per_node: dict[str, int] = field(default_factory=dict)

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
        if self.paths_merged:
            text += f"; {self.paths_merged} paths of identical files kept beside their row's first"
        if self.files_added or self.files_changed or self.files_unchanged or self.files_removed:
            text += (f"; files: {self.files_added} added, {self.files_unchanged} unchanged, "
                     f"{self.files_changed} changed, {self.files_removed} removed")
        if self.shards_skipped:
            text += (f"; {self.shards_skipped} of {self.shards} shards ({self.items_skipped} items) "
                     f"skipped, finished by an earlier run")
        if self.hidden_skipped or self.not_images_skipped or self.outside_links_skipped:
            text += (f"; files left out: {self.hidden_skipped} hidden, {self.not_images_skipped} not images, "
                     f"{self.outside_links_skipped} links leaving the folder")
        text += f"\n  {self.seconds:.1f} s wall, {self.items_per_second:.1f} items/s"
        rates = self.stage_rates()
        if rates:
            unit = {"write": "rows/s"}
            text += "; busy time per stage: " + ", ".join(
                f"{stage} {self.stage_seconds[stage]:.2f} s ({rate:.0f} {unit.get(stage, 'items/s')})"
                for stage, rate in rates.items())
        if len(self.items_per_node) > 1:
            text += "\n  embedded per node: " + ", ".join(f"{node} {n}" for node, n in self.items_per_node.items())
        if self.dead_letters:
            text += f"\n  dead letters: {self.deadletter_path}"
        return text


def start_ray(address: str | None = None, *, num_cpus: int = 2) -> bool:
    """Connect to `address`, or start a small local Ray (of `num_cpus` logical CPUs); True if
    this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False,
                                  configure_logging=True)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            if "InvalidAuthToken" not in str(exc.__cause__):
                raise
            # `ray start` (Ray 2.60) turns token authentication on, and a client only sends the
            # token when told to; Ray reads the setting once, so it must come from the environment
            raise ConnectionError(
                f"the Ray cluster at {address} asks for its authentication token: run with "
                f"RAY_AUTH_MODE=token, the token where Ray looks for it (~/.ray/auth_token as `ray start` "
                f"wrote it on the head, or RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN)") from None
    else:
        # Ray waits 30 s for its GCS server by default; a busy 2-core machine can take longer.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        for attempt in range(3):
            try:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
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


def _fetch_card(triton_url: str | list[str], model: str, timeout: float) -> ModelCard:
    """The card of `model` on the Triton servers named (``triton.triton_urls``). A server that
    does not answer is named in a warning and stays on the list (the embedders ask it last);
    ConnectionError when none answers, ValueError when two serve different models."""
    cards, failures = {}, []
    for url in triton.triton_urls(triton_url):
        try:
            client = triton.connect(url, timeout=timeout, models=(model,))
        except ConnectionError as exc:
            failures.append(str(exc))
            continue
        try:
            cards[url] = triton.fetch_card(client, model)
        finally:
            client.close()
    if not cards:
        raise ConnectionError("; ".join(failures))
    for failure in failures:
        logger.warning("%s: the run goes on with the other servers, and asks this one when they fail", failure)
    if len({card.fingerprint for card in cards.values()}) > 1:
        raise ValueError("the Triton servers serve different models, whose vectors cannot share a collection: "
                         + ", ".join(f"{url} {card.name} ({card.fingerprint})" for url, card in cards.items())
                         + "; serve the same export (model repository) on every server")
    return next(iter(cards.values()))


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

    def __init__(self, client, collection: str, progress: state.Progress, *, batch_rows: int, flush: bool,
                 kind: contract.CollectionKind | None = None,
                 on_recorded: Callable[[set[int]], None] | None = None):
        self.client = client
        self.collection = collection
        # the rows' kind: one that merges rows of a key (images: every path of the same bytes)
        # is merged with the collection's rows too; None: the later row of a key replaces the earlier
        self.kind = kind
        self.on_recorded = on_recorded  # told the shards whose rows a write acknowledged, before the progress file
        self.progress = progress
        self.batch_rows = batch_rows
        self.flush = flush
        self.pending: dict[str, dict[str, Any]] = {}  # one row a key: an upsert may not repeat one
        self.shard_keys: dict[int, set[str]] = {}  # the keys seen so far in each shard in flight
        self.done: set[int] = set()  # shards complete since the last upsert
        self.rows = 0  # distinct keys per shard: the rows this run upserted
        self.rows_sent = 0
        self.paths_merged = 0  # paths the collection's rows gained beyond their first (kinds that merge)
        self.seconds = 0.0

    def add(self, shard: int, key: str, row: dict[str, Any] | None) -> bool:
        """Count (and with `row`, queue) an item's row; True when its key came before in its shard."""
        keys = self.shard_keys.setdefault(shard, set())
        seen = key in keys
        if not seen:
            keys.add(key)
            self.rows += 1
        if row is not None:
            put_row(self.pending, key, row, self.kind)
            if len(self.pending) >= self.batch_rows:
                self.write()
        return seen

    def shard_done(self, shard: int) -> None:
        self.shard_keys.pop(shard, None)
        self.done.add(shard)

    def write(self) -> None:
        started = time.perf_counter()
        if self.pending:
            rows = list(self.pending.values())
            if self.kind is not None:
                rows, added = merged_with_kept(self.client, self.collection, self.kind, rows)
                self.paths_merged += added
            # in calls of at most 5,000 rows (fewer for wide rows), whatever batch_rows is
            store.upsert_rows(self.client, self.collection, rows)
            self.rows_sent += len(self.pending)
            self.pending = {}
        if self.done:
            if self.flush:
                self.client.flush(self.collection)
            done, self.done = self.done, set()
            if self.on_recorded is not None:
                # before the progress file: a shard it records as finished is never done again,
                # so what is told of its rows (a folder's record of its files) must be written first
                self.on_recorded(done)
            self.progress.finished |= done
            self.progress.save()
        self.seconds += time.perf_counter() - started


# ---- the parts: each built from the job alone, each replaceable (``run``'s keyword arguments) ----

@dataclass
class Reader:
    """The input planned and read: `plan` from the driver's one pass over it (the items, their
    hash, where each shard starts), and the Ray dataset of the shards still to do."""

    plan: sources.InputPlan
    scan_seconds: float  # the driver's pass
    batch_size: int
    # the stage between reading and embedding (images: read and check the files), if any
    prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    # a folder of images: the collection's record of its files, and the walk compared with it
    folder: FolderFiles | None = None
    changes: FolderChanges | None = None

    def identity(self) -> dict[str, Any]:
        """What the progress file records of the input: its spec (for another format than the
        manifest also the format and the options that shape its rows), the limit, the items."""
        return {**self.plan.spec.identity(), "limit": self.plan.limit, "items": self.plan.items,
                "items_sha256": self.plan.items_sha256}

    def dataset(self, shards: list[sources.Shard]):
        """The items of `shards`, read by Ray tasks (one a shard), prepared, in blocks of two batches."""
        ds = sources.dataset(self.plan.spec, shards, block_rows=2 * self.batch_size, num_cpus=READ_CPUS)
        if self.prepare is not None:
            ds = ds.map_batches(self.prepare, batch_size=self.batch_size, batch_format="numpy", num_cpus=READ_CPUS)
        # blocks of about two batches let the actors share a shard, and reach the driver as they are done
        return sources.reblocked(ds, 2 * self.batch_size, num_cpus=READ_CPUS)


@dataclass
class Embedding:
    """The model that embeds, as its card (every level of it is asked for and stored in its own
    vector field), and the pool of `workers` actors of `stage` that runs it."""

    card: ModelCard
    stage: type[EmbedStage]
    args: tuple[Any, ...]  # the stage's constructor arguments
    resources: dict[str, float]  # the Ray resources each actor holds ("CPU" always named)
    workers: int
    batch_size: int

    @property
    def dims(self) -> dict[str, int]:
        return card_dims(self.card)

    @property
    def resource_names(self) -> list[str]:
        """The resources a message about placing the actors names: CPU, GPU and any other they ask for."""
        return ["CPU", "GPU", *sorted(set(self.resources) - {"CPU", "GPU"})]

    def apply(self, ds):
        import ray.data

        others = {name: amount for name, amount in self.resources.items() if name not in ("CPU", "GPU")}
        return ds.map_batches(self.stage, batch_size=self.batch_size, batch_format="numpy",
                              fn_constructor_args=self.args, compute=ray.data.ActorPoolStrategy(size=self.workers),
                              num_cpus=self.resources["CPU"], num_gpus=self.resources.get("GPU"),
                              resources=others or None)

    def check_room(self) -> None:
        """ValueError when the Ray cluster's nodes (what they have, not what is free now) cannot
        hold the actors and, beside them, a reading task: said at once, not waited on for ever."""
        import ray

        nodes = [node for node in ray.nodes() if node.get("Alive")]
        room = [dict(node["Resources"]) for node in nodes]
        placed = 0
        for _ in range(self.workers):  # each on the node with most CPU left that holds all it asks
            fits = [i for i, left in enumerate(room)
                    if all(left.get(name, 0.0) >= amount - 1e-9 for name, amount in self.resources.items())]
            if not fits:
                break
            i = max(fits, key=lambda i: room[i].get("CPU", 0.0))
            for name, amount in self.resources.items():
                room[i][name] = room[i].get(name, 0.0) - amount
            placed += 1
        reading = any(left.get("CPU", 0.0) >= READ_CPUS - 1e-9 for left in room)
        if placed == self.workers and reading:
            return
        names = self.resource_names
        have = "; ".join(f"{node['NodeManagerAddress']} {node['NodeID'][:8]}: " + ", ".join(
            f"{name} {_amount(node['Resources'].get(name, 0))}" for name in names) for node in nodes)
        room_for = (f"room for {placed} of them" if placed < self.workers
                    else "room for them but then none for a reading task")
        raise ValueError(
            f"the Ray cluster cannot place this run: {self.workers} embedding actor(s) of "
            f"{_resources(self.resources)} each, and reading tasks of {READ_CPUS} CPU beside them; it has "
            f"{room_for}. Its nodes: {have}. Ask for fewer workers or less each "
            f"(--workers, --worker-resources), or add nodes that have it")

    def waiting_note(self, seconds: float) -> str:
        """What a run that has had no embedded batch back for `seconds` waits on."""
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        names = self.resource_names
        return (f"no batch embedded after {seconds:.0f} s: {self.workers} embedding actor(s) of "
                f"{_resources(self.resources)} each asked for; the cluster has free now "
                + ", ".join(f"{name} {_amount(free.get(name, 0))} of {_amount(total.get(name, 0))}"
                            for name in names)
                + " (other jobs may hold the rest; the actors also load their model)")


def _amount(value: float) -> str:
    return f"{value:g}"


def _resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name} {_amount(amount)}" for name, amount in resources.items()) + "}"


@dataclass
class Sink:
    """Where the rows go. Into milvus-lite (a database one process holds) the driver upserts
    them, built by `row`; into a Milvus server a pool of `writers` actors upserts them, the
    dataset's last stage. Either way the driver keeps the books (``_Writer``)."""

    uri: str
    token: str | None = field(repr=False)  # never printed
    collection: str
    kind: str
    writers: int
    write_batch: int  # rows per upsert
    timeout: float
    index_type: str | None = None
    index_params: dict[str, Any] | None = None

    @property
    def local(self) -> bool:
        return store.is_local_uri(self.uri)

    def connect(self):
        return store.connect(self.uri, token=self.token)

    def ensure_collection(self, client, card: ModelCard) -> bool:
        """Create the collection for `card` if it is missing (True then); ValueError if it holds another model's."""
        return store.ensure_collection(client, self.collection, card, kind=contract.KINDS[self.kind],
                                       index_type=self.index_type,
                                       index_params=self.index_params)

    def apply(self, ds, levels: Collection[str]):
        if self.local:
            return ds
        import ray.data

        # A Milvus server: the rows are upserted by a pool of writer actors, in batches of
        # write_batch rows; only the small columns come back to the driver. They wait on the
        # server and hold no CPU slot, as the driver's writer does not: with a share each, a
        # 2-CPU Ray with one --local embedding actor (1 CPU) had no CPU left for a read task,
        # and the run stalled.
        return ds.map_batches(
            MilvusWriteStage, batch_size=self.write_batch, batch_format="numpy",
            fn_constructor_args=(self.uri, self.token, self.collection, self.kind, list(levels),
                                 max(self.timeout, 60.0)),
            compute=ray.data.ActorPoolStrategy(size=self.writers), num_cpus=0,
        )

    def row(self, record: dict[str, Any], vectors: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The row the driver upserts for an embedded item; None where a writer actor upserted it."""
        return {**contract.KINDS[self.kind].row(record), **store.vector_values(vectors)} if self.local else None

    def books(self, client, progress: state.Progress,
              on_recorded: Callable[[set[int]], None] | None = None) -> _Writer:
        return _Writer(client, self.collection, progress, batch_rows=self.write_batch, flush=self.local,
                       kind=contract.KINDS[self.kind], on_recorded=on_recorded)


def _note_while_waiting(embed: Embedding, first_back: threading.Event, warn: Callable[[str], None]) -> None:
    waited = 0.0
    while not first_back.wait(WAIT_NOTE_SECONDS):
        waited += WAIT_NOTE_SECONDS
        warn(embed.waiting_note(waited))


def _by_node_address(counts: Counter[str]) -> dict[str, int]:
    """`counts` by Ray node id, keyed by the node's address and the id's first 8 characters
    (nodes on one host share an address); a node removed since is still listed by Ray."""
    import ray

    address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    return {f"{address.get(node, '?')} {node[:8]}": n for node, n in sorted(counts.items()) if node}


def _walk_skipped(plan: sources.InputPlan) -> dict[str, int]:
    return {"hidden_skipped": plan.hidden_skipped, "not_images_skipped": plan.not_images_skipped,
            "outside_links_skipped": plan.outside_links_skipped}


def card_dims(card: ModelCard) -> dict[str, int]:
    """Each embedding level of the card and its width."""
    return {level: int(spec["dim"]) for level, spec in card.embeddings.items()}


def build_reader(job: IndexJob) -> Reader:
    """Scan the job's input (ValueError, naming the file, for one that cannot be read as its format)."""
    started = time.perf_counter()
    source = job.source()
    folder = changes = only = None
    if job.kind == sources.IMAGE:
        spec = formats.input_spec(source, kind=job.kind, split=job.split, styles=job.styles,
                                  allowed_image_roots=job.allowed_image_roots)
        if spec.format == formats.FOLDER:  # only the files new or changed since the record of it
            folder = FolderFiles(files_path(job.milvus_uri, job.collection), spec.path)
            changes = folder.compare({str(image): formats.file_stamp(image) for image in
                                      readers.walk_folder(Path(spec.path), spec.allowed_image_roots).images})
            only = None if job.restart else changes.to_index
    plan = sources.scan(source, kind=job.kind, split=job.split, styles=job.styles, limit=job.limit,
                        shard_size=job.shard_size, only=only, allowed_image_roots=job.allowed_image_roots)
    scan_seconds = time.perf_counter() - started
    prepare = KINDS[job.kind].prepare
    if prepare is not None:
        # where the images a source holds as bytes are written, by content: where the job says, else beside the collection
        prepare = functools.partial(prepare, image_store=job.image_store_location())
    return Reader(plan, scan_seconds, job.batch_size, prepare, folder, changes)


def _image_roots(job: IndexJob, plan: sources.InputPlan) -> list[str]:
    """Where the rows of this run name images: under the input's roots, and for images a source
    holds as bytes, the image store they are written to."""
    roots = list(plan.image_roots)
    if job.kind == sources.IMAGE and plan.spec.format in formats.BYTE_FORMATS:
        roots.append(job.image_store_location())
    return roots


def build_embedding(job: IndexJob) -> Embedding:
    """The in-process ONNX Runtime actors of a `model_repository`, or the Triton clients of a
    `triton_url` (ConnectionError when that server or its model is not ready)."""
    kind = KINDS[job.kind]
    if job.model_repository is not None:
        from xmodal.indexer import local

        repository = Path(job.model_repository).expanduser().resolve()
        card = local.repository_card(repository)
        # The actors compute: up to a CPU each, the rest of the local Ray left to the readers.
        return Embedding(card, local.LocalEmbedder, (str(repository), kind.local_input, card_dims(card),
                                                     job.embed_threads),
                         {"CPU": min(1.0, 1.0 / job.embed_workers), **(job.embed_resources or {})},
                         job.embed_workers, job.batch_size)
    card = _fetch_card(job.triton_url, kind.model, job.timeout)
    # The actors mostly wait on Triton: a fraction of a CPU each leaves the local two-CPU Ray
    # room for the reading tasks.
    return Embedding(card, TritonEmbedder, (job.triton_url, kind.model, kind.input_name, card_dims(card),
                                            max(job.timeout, 60.0)),
                     {"CPU": min(0.5, 1.0 / job.embed_workers), **(job.embed_resources or {})},
                     job.embed_workers, job.batch_size)


def build_sink(job: IndexJob) -> Sink:
    return Sink(job.milvus_uri, settings.milvus_token(job.milvus_token), job.collection, job.kind,
                job.writer_count(), job.write_batch, job.timeout, job.index_type, job.index_params)


# ---- the runner ----------------------------------------------------------------------------

def run(job: IndexJob, *, reader: Callable[[IndexJob], Reader] = build_reader,
        embedding: Callable[[IndexJob], Embedding] = build_embedding,
        sink: Callable[[IndexJob], Sink] = build_sink) -> IndexReport:
    """Run `job` (``IndexJob.run``): its input scanned, the shards still to do read by Ray
    tasks, embedded by an actor pool and written, the progress recorded shard by shard."""
    started = time.perf_counter()
    job.validate()
    kind = KINDS[job.kind]
    read = reader(job)
    write = sink(job)
    embed = embedding(job)
    plan, card, dims, collection = read.plan, embed.card, embed.dims, job.collection

    def say(message: str, level: int = logging.INFO) -> None:
        """On stderr beside the bar, or to the log when the run shows no progress."""
        if job.progress:
            print(message, file=sys.stderr, flush=True)
        else:
            logger.log(level, message)

    warn = functools.partial(say, level=logging.WARNING)

    shard_size = plan.shard_size
    shard_of = lambda number: number // shard_size  # noqa: E731 - items are numbered in input order
    shards = len(plan.shards)
    stage_seconds = {"read": 0.0, "embed": 0.0, "write": 0.0}
    stage_items = {"read": 0, "embed": 0, "write": 0}
    duplicates = 0
    first_batch_at, first_batch_items = 0.0, 0
    node_items: Counter[str] = Counter()
    first_back = threading.Event()  # the first embedded batch is back (or the run ended)
    items_per_node: dict[str, int] = {}
    ray_started = False
    bar = client = dead = None
    todo: list[sources.Shard] = []
    try:
        if plan.items:
            # Ray first: started while this process has no gRPC threads (pymilvus and
            # milvus-lite bring them), its forks make grpcio print no fork warnings.
            ray_started = start_ray(job.ray_address)
            embed.check_room()  # before anything is written
        client = write.connect()
        created = write.ensure_collection(client, card)
        if created and read.folder is not None and read.folder.known():
            # a record of the folder's files in a collection dropped since: all is new to this one
            read.folder.forget(list(read.folder.known()))
            read = reader(job)
            plan = read.plan
            shards = len(plan.shards)
            if plan.items and not ray_started:
                ray_started = start_ray(job.ray_address)
        # before any row is written: the web page serves a row's image only from under these
        store.record_image_roots(client, collection, _image_roots(job, read.plan))
        folder_counts = _sync_folder(read, job, client, collection, say)
        if (job.kind == sources.IMAGE and not write.local and job.image_store is None
                and read.plan.spec.format in formats.BYTE_FORMATS):
            say(f"the images held in the {read.plan.spec.format} input are written to "
                f"{state.image_store_path(write.uri, collection)} on this machine: clients on other machines "
                "cannot show them (--image-store names a location they reach)")
        if not plan.items:  # nothing selected: the files of earlier runs stay as they are
            return _finish(IndexReport(collection=collection, model=card.name, fingerprint=card.fingerprint,
                                       items_read=0, rows_written=0, dead_letters=0,
                                       seconds=time.perf_counter() - started,
                                       scan_seconds=round(read.scan_seconds, 6), **_walk_skipped(plan),
                                       **folder_counts),
                           job.progress)
        books = state.run_records(write.uri, collection, client)
        run_progress, fresh_start = state.continue_or_start(
            books,
            {**read.identity(), "model": card.name, "fingerprint": card.fingerprint, "shard_size": shard_size},
            shards, collection_created=created,
            restart=job.restart)
        if fresh_start:
            say(f"{books.progress_where}: {fresh_start}")
        finished_before = frozenset(run_progress.finished)
        dead = books.dead_letters(
            keep_items=(lambda n: n is not None and shard_of(n) in finished_before) if finished_before else None)
        todo = [shard for shard in plan.shards if shard.number not in finished_before]
        items_todo = sum(shard.items for shard in todo)
        if finished_before:
            say(f"resuming: {len(finished_before)} of {shards} shards were finished by an earlier run "
                f"and are skipped; {items_todo} items to go")
        run_progress.save()
        folder_entries: dict[int, list[tuple[str, str, str]]] = {}  # per shard: (path, stamp, key or "")

        def record_files(recorded: set[int]) -> None:
            """The files of shards whose rows are written: into the folder's record; a changed
            file's path let go by the row of its old bytes (a bad one's too, and forgotten)."""
            entries = [entry for shard in sorted(recorded) for entry in folder_entries.pop(shard, [])]
            if read.folder is None or not entries:
                return
            old_keys = read.changes.changed
            release_paths(client, collection, read.folder.root,
                          [(path, old_keys[path]) for path, _, key in entries if old_keys.get(path, key) != key])
            read.folder.record([entry for entry in entries if entry[2]])
            read.folder.forget([path for path, _, key in entries if not key])

        writer = write.books(client, run_progress, on_recorded=record_files)
        try:
            if todo:
                import ray.data
                from tqdm import tqdm

                # In input order: a key met in several shards gets the row of its last item, with
                # a resumed run as with an uninterrupted one (shards also finish in order).
                ray.data.DataContext.get_current().execution_options.preserve_order = True
                threading.Thread(target=_note_while_waiting, args=(embed, first_back, warn), daemon=True).start()
                left = {shard.number: shard.emitted for shard in todo}  # items still out, per shard
                unsent = {shard.number: shard.items - shard.emitted for shard in todo}  # repeated captions
                ds = write.apply(embed.apply(read.dataset(todo)), dims)
                bar = tqdm(total=plan.items, initial=plan.items - items_todo, unit="item", desc=f"index {collection}",
                           disable=not job.progress, file=sys.stderr, dynamic_ncols=True)
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    n = len(batch["item"])
                    if not first_batch_at:
                        first_batch_at, first_batch_items = time.perf_counter(), n
                        first_back.set()
                    stage_seconds["read"] += float(batch["read_seconds"].sum()) if "read_seconds" in batch else 0.0
                    stage_seconds["embed"] += float(batch["embed_seconds"].sum())
                    stage_items["embed"] += int(np.count_nonzero(batch["embed_seconds"]))
                    node_items.update(batch[NODE_COLUMN][batch["embed_seconds"] > 0].tolist())
                    if WRITE_REFUSED in batch and any(batch[WRITE_REFUSED]):
                        raise WriteRefused(next(reason for reason in batch[WRITE_REFUSED] if reason))
                    if "write_seconds" in batch:
                        stage_seconds["write"] += float(batch["write_seconds"].sum())
                        writer.rows_sent += int(round(float(batch["rows_upserted"].sum())))
                        writer.paths_merged += int(round(float(batch["paths_merged"].sum())))
                    done_items = n
                    for record, vectors in records(batch, dims):
                        shard = shard_of(record["item"])
                        if read.folder is not None and record.get("stamp"):
                            folder_entries.setdefault(shard, []).append(
                                (record["path"], record["stamp"], "" if record["error"] else record["id"]))
                        if record["error"]:
                            dead.write({"item": record["item"], **kind.letter(record, collection)})
                        else:
                            duplicates += writer.add(shard, record["id"], write.row(record, vectors))
                        left[shard] -= 1
                        if not left[shard]:
                            del left[shard]
                            writer.shard_done(shard)
                            done_items += unsent.pop(shard)
                    if not write.local:
                        writer.write()  # these rows are acknowledged: record the shards they finished
                    bar.update(done_items)
                    bar.set_postfix(written=writer.rows, dead=dead.count, refresh=False)
                items_per_node = _by_node_address(node_items)
            writer.write()
            client.flush(collection)
        except (WriteRefused, MilvusException) as exc:  # a writer actor's, or the driver's own (milvus-lite)
            reason = f"{exc.message} (code {exc.code})" if isinstance(exc, MilvusException) else str(exc)
            raise RuntimeError(
                f"Milvus at {write.uri} refused a write to {collection!r}: {reason}. The shards written "
                f"before it are recorded: once the cause is fixed the same command continues from them") from None
        run_progress.complete = True
        run_progress.save()
    finally:
        first_back.set()  # the note-taker stops
        if bar is not None:
            bar.close()
        if dead is not None:
            dead.close()
        if client is not None:
            client.close()
        if read.folder is not None:
            read.folder.close()
        if ray_started:
            import ray

            ray.shutdown()
    if write.local:
        stage_seconds["write"] = writer.seconds
    stage_items["read"] = sum(shard.emitted for shard in todo)
    stage_items["write"] = writer.rows_sent
    report = IndexReport(
        collection=collection, model=card.name, fingerprint=card.fingerprint, items_read=plan.items,
        rows_written=writer.rows, dead_letters=dead.count, seconds=time.perf_counter() - started,
        deadletter_path=dead.where if dead.count else None, duplicates=duplicates,
        paths_merged=writer.paths_merged, shards=shards,
        shards_skipped=len(finished_before), items_skipped=plan.items - items_todo,
        progress_path=books.progress_where, fresh_start=fresh_start, scan_seconds=round(read.scan_seconds, 6),
        **folder_counts,
        startup_seconds=round(first_batch_at - started, 6) if first_batch_at else 0.0, startup_items=first_batch_items,
        stage_seconds={k: round(v, 6) for k, v in stage_seconds.items()}, stage_items=stage_items,
        **_walk_skipped(plan), items_per_node=items_per_node,
    )
    return _finish(report, job.progress)


def _sync_folder(read: Reader, job: IndexJob, client, collection: str, say: Callable[[str], None]) -> dict[str, int]:
    """A folder's files compared with the collection's record of them: the report's counts;
    with `job.sync` the paths of the files gone are let go (rows left with none removed)."""
    if read.folder is None:
        return {}
    changes = read.changes
    gone = changes.gone
    if gone and job.sync:
        release_paths(client, collection, read.folder.root, gone.items())
        read.folder.forget(list(gone))
    elif gone:
        say(f"{len(gone)} files indexed before are gone from {read.folder.root}: --sync removes them")
    return {"files_added": len(changes.added), "files_changed": len(changes.changed),
            "files_unchanged": changes.unchanged, "files_removed": len(gone) if job.sync else 0}


def _finish(report: IndexReport, progress: bool) -> IndexReport:
    if progress:
        print(report, file=sys.stderr, flush=True)
    return report
