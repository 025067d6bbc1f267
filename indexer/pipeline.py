"""Assembly: manifest -> Ray Data (read, embed in an actor pool) -> one writer into Milvus.

The driver is the only writer: milvus-lite is an in-process database that one process
locks, and ``upsert`` on content-hash keys makes re-runs idempotent.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import numpy as np

from xmodal import settings, store
from xmodal.card import ModelCard
from xmodal.client import triton
from xmodal.indexer import sources
from xmodal.indexer.embed import TritonEmbedder
from xmodal.training.manifest import read_manifest


@dataclass
class IndexReport:
    collection: str
    model: str
    fingerprint: str
    items_read: int
    rows_written: int  # distinct rows (primary keys) upserted by this run
    dead_letters: int
    seconds: float
    deadletter_path: str | None = None
    duplicates: int = 0  # items whose content equals an earlier item's: they share its row

    @property
    def items_per_second(self) -> float:
        return self.items_read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_second": round(self.items_per_second, 2)}

    def __str__(self) -> str:
        text = (f"indexed into {self.collection!r} with {self.model} ({self.fingerprint}): "
                f"{self.items_read} read, {self.rows_written} written, {self.dead_letters} dead letters, "
                f"{self.duplicates} duplicates "
                f"in {self.seconds:.1f} s ({self.items_per_second:.1f} items/s)")
        if self.dead_letters:
            text += f"; see {self.deadletter_path}"
        return text


def deadletter_path(milvus_uri: str, collection: str) -> Path:
    """``<db>.<collection>.deadletter.jsonl`` beside a milvus-lite database, else in the data dir."""
    if store.is_local_uri(milvus_uri):
        db = Path(milvus_uri).expanduser()
        return db.with_name(f"{db.name}.{collection}.deadletter.jsonl")
    return settings.data_dir() / f"{collection}.deadletter.jsonl"


class DeadLetters:
    """The latest run's failures, one JSON object a line; the file exists only if there were any."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._handle = None
        path.unlink(missing_ok=True)  # a stale file would describe an earlier run

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", encoding="utf-8")
        record = {**record, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _start_ray(address: str | None) -> bool:
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


def _run(*, items: list[dict[str, Any]], items_read: int, prepare: Callable | None, model: str,
         input_name: str, kind: str, to_row: Callable[[dict[str, Any], np.ndarray], dict[str, Any]],
         to_deadletter: Callable[[dict[str, Any]], dict[str, Any]], triton_url: str,
         milvus_uri: str | None, collection: str, batch_size: int, embed_workers: int,
         ray_address: str | None, progress: bool, timeout: float) -> IndexReport:
    if batch_size < 1 or embed_workers < 1:
        raise ValueError("batch_size and embed_workers must be at least 1")
    started = time.perf_counter()
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    card = _fetch_card(triton_url, model, timeout)
    written: set[str] = set()
    duplicates = 0
    ray_started = False
    bar = client = dead = None
    try:
        if items:
            # Ray first: started while this process has no gRPC threads (pymilvus and
            # milvus-lite bring them), its forks make grpcio print no fork warnings.
            ray_started = _start_ray(ray_address)
        client = store.connect(milvus_uri)
        store.ensure_collection(client, collection, card, kind=kind)
        dead = DeadLetters(deadletter_path(milvus_uri, collection))
        if items:
            import ray.data
            from tqdm import tqdm

            ds = sources.dataset(items, batch_size=batch_size, parallelism=embed_workers)
            if prepare is not None:
                ds = ds.map_batches(prepare, batch_size=batch_size, batch_format="numpy")
            ds = ds.map_batches(
                TritonEmbedder, batch_size=batch_size, batch_format="numpy",
                fn_constructor_args=(triton_url, model, input_name, card.dim, max(timeout, 60.0)),
                compute=ray.data.ActorPoolStrategy(size=embed_workers),
                # The actors mostly wait on Triton: a fraction of a CPU each leaves the local
                # two-CPU Ray room for the reading tasks.
                num_cpus=min(0.5, 1.0 / embed_workers),
            )
            bar = tqdm(total=len(items), unit="item", desc=f"index {collection}", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True)
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                rows: dict[str, dict[str, Any]] = {}  # one row a key: an upsert may not repeat one
                for record, vector in _records(batch):
                    if record["error"]:
                        dead.write(to_deadletter(record))
                        continue
                    duplicates += record["id"] in written or record["id"] in rows
                    rows[record["id"]] = to_row(record, vector)
                if rows:
                    client.upsert(collection, list(rows.values()))
                    written.update(rows)
                bar.update(len(batch["error"]))
                bar.set_postfix(written=len(written), dead=dead.count, refresh=False)
            client.flush(collection)
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
    report = IndexReport(
        collection=collection, model=card.name, fingerprint=card.fingerprint, items_read=items_read,
        rows_written=len(written), dead_letters=dead.count, seconds=time.perf_counter() - started,
        deadletter_path=str(dead.path) if dead is not None and dead.count else None, duplicates=duplicates,
    )
    if progress:
        print(report, file=sys.stderr, flush=True)
    return report


def _records(batch: dict[str, np.ndarray]) -> Iterable[tuple[dict[str, Any], np.ndarray]]:
    vectors = batch["vector"]
    keys = [k for k in batch if k != "vector"]
    for i in range(len(vectors)):
        yield {k: _plain(batch[k][i]) for k in keys}, vectors[i]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def index_images(
    manifest: str | os.PathLike[str],
    *,
    triton_url: str,
    milvus_uri: str | None = None,
    collection: str = settings.IMAGE_COLLECTION,
    split: str | None = "test",
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    embed_workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> IndexReport:
    """Embed a manifest's images with Triton's ``embed_image`` and upsert them into Milvus.

    Keys are content hashes, so re-running writes the same rows again (no duplicates), and
    identical image files become one row. Unreadable files and images the server rejects go
    to the dead-letter file (see :func:`deadletter_path`) and the run goes on.
    """
    rows = read_manifest(manifest, split=split, styles=styles, limit=limit)
    items = sources.image_items(rows)

    def to_row(record: dict[str, Any], vector: np.ndarray) -> dict[str, Any]:
        return {"id": record["id"], "global": vector.tolist(), "image": record["path"],
                "captions": json.loads(record["captions"]), "concept": record["concept"],
                "style": record["style"]}

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return {"path": record["path"], "reason": record["error"], "collection": collection}

    return _run(items=items, items_read=len(items), prepare=sources.read_images, model=triton.IMAGE_MODEL,
                input_name=triton.IMAGE_INPUT, kind="image", to_row=to_row, to_deadletter=to_deadletter,
                triton_url=triton_url, milvus_uri=milvus_uri, collection=collection, batch_size=batch_size,
                embed_workers=embed_workers, ray_address=ray_address, progress=progress, timeout=timeout)


def index_captions(
    manifest: str | os.PathLike[str],
    *,
    triton_url: str,
    milvus_uri: str | None = None,
    collection: str = settings.CAPTION_COLLECTION,
    split: str | None = "test",
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    embed_workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> IndexReport:
    """Embed the manifest's captions with ``embed_text`` into the caption collection.

    One row per distinct caption text (its hash is the key); the row keeps the concept,
    style and image of the first manifest row that has it. ``items_read`` counts captions.
    """
    rows = read_manifest(manifest, split=split, styles=styles, limit=limit)
    items, read = sources.caption_items(rows)

    def to_row(record: dict[str, Any], vector: np.ndarray) -> dict[str, Any]:
        return {"id": record["id"], "global": vector.tolist(), "caption": record["caption"],
                "concept": record["concept"], "style": record["style"], "image": record["image"]}

    def to_deadletter(record: dict[str, Any]) -> dict[str, Any]:
        return {"caption": record["caption"], "image": record["image"], "reason": record["error"],
                "collection": collection}

    return _run(items=items, items_read=read, prepare=None, model=triton.TEXT_MODEL,
                input_name=triton.TEXT_INPUT, kind="caption", to_row=to_row, to_deadletter=to_deadletter,
                triton_url=triton_url, milvus_uri=milvus_uri, collection=collection, batch_size=batch_size,
                embed_workers=embed_workers, ray_address=ray_address, progress=progress, timeout=timeout)
