"""Fill the side store (:mod:`xmodal.sidestore`) of an image collection for the served re-ranker.

A second pass over what the first one indexed: the collection's rows (id and image path) are read
from Milvus in pages, the ids that already have a side are skipped, and the others' image files
go through Triton's ``embed_image_side`` ensemble (the same preprocessing as ``embed_image``,
then the re-ranker's image side) in batches. Keyed by the collection's ids, so it is idempotent
and resumes by construction: a killed run started again computes only what is missing, and a
collection that grew since computes only the new images. Images that cannot be read or that the
server refuses are counted and named in the report (the first pass has dead-lettered them
already if they were bad then). It runs in this process: the work is Triton's, and one client
sending batches keeps one server busy.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from xmodal import contract, settings, store
from xmodal import triton
from xmodal.files import read_location
from xmodal.sidestore import drop_side_store, open_side_store

PAGE_ROWS = 1000
MAX_REPORTED_FAILURES = 20


@dataclass
class SidesReport:
    collection: str
    path: str
    rows: int  # in the collection
    computed: int  # sides written by this run
    present: int  # rows that had a side already
    failed: int
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)  # the first few: id, image, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        text = (f"re-ranker sides of {self.collection!r} in {self.path}: {self.computed} computed, "
                f"{self.present} already there, {self.failed} failed, of {self.rows} rows; "
                f"{self.seconds:.1f} s ({rate:.1f} images/s)")
        for failure in self.failures[:5]:
            text += f"\n  failed: {failure['image']}: {failure['reason']}"
        return text


def index_sides(*, triton_url: str, milvus_uri: str | None = None, collection: str = settings.IMAGE_COLLECTION,
                batch_size: int = 32, restart: bool = False, progress: bool = True, timeout: float = 10.0,
                token: str | None = None) -> SidesReport:
    """Compute the served re-ranker's side of every image in ``collection`` that has none yet.

    ``restart`` removes the store first (for a new re-ranker: a store refuses sides of another).
    Raises ValueError when the served model has no re-ranker or did not fill the collection.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    client = triton.connect_any(triton_url, timeout=timeout, models=(contract.EMBED_IMAGE,))
    try:
        card = triton.fetch_card(client, contract.EMBED_IMAGE)
        if not card.reranker:
            raise ValueError(f"the served model {store.describe_model(card)} has no re-ranker "
                             f"(recipe {card.recipe!r}; the cran and mcsm recipes have one)")
        if not client.is_model_ready(contract.EMBED_IMAGE_SIDE):
            raise ConnectionError(f"Triton at {triton_url} serves a re-ranker card but model {contract.EMBED_IMAGE_SIDE!r} "
                                  f"is not ready")
    finally:
        client.close()
    names = list(card.reranker.side)
    shapes = card.reranker.shapes
    token = settings.milvus_token(token)
    milvus = store.connect(milvus_uri, token=token)
    if restart:
        drop_side_store(milvus, milvus_uri, collection)
    embedder = triton.Embedder(triton_url, contract.EMBED_IMAGE_SIDE, contract.IMAGE_INPUT, timeout=max(timeout, 60.0), outputs=names,
                               batch_limit=batch_size)
    sides = open_side_store(milvus_uri, collection, card.reranker, create=True, token=token)
    path = sides.path
    bar = None
    computed = present = failed = 0
    failures: list[dict[str, str]] = []
    try:
        if not milvus.has_collection(collection):
            raise ValueError(store.missing_collection_message(milvus, collection))
        store.check_collection_model(milvus, collection, card)
        store.ensure_loaded(milvus, collection)
        rows = int(milvus.get_collection_stats(collection).get("row_count", 0))
        from tqdm import tqdm

        bar = tqdm(total=rows, unit="image", desc=f"sides {collection}", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        # milvus-lite cannot give the iterator a server timestamp; pymilvus warns, then uses the client's.
        logging.getLogger("pymilvus").setLevel(logging.ERROR)
        iterator = milvus.query_iterator(collection, batch_size=PAGE_ROWS, output_fields=["id", "image"])
        try:
            while page := iterator.next():
                todo = set(sides.missing([row["id"] for row in page]))
                present += len(page) - len(todo)
                todo_rows = [row for row in page if row["id"] in todo]
                for start in range(0, len(todo_rows), batch_size):
                    chunk = todo_rows[start:start + batch_size]
                    kept, data = [], []
                    for row in chunk:
                        try:
                            data.append(read_location(row["image"]))
                            kept.append(row)
                        except OSError as exc:
                            failed += 1
                            _note(failures, row, f"cannot read file: {exc.strerror or exc}")
                    if not data:
                        continue
                    outputs, errors = embedder.embed_outputs(data, names)
                    good = [i for i, error in enumerate(errors) if error is None]
                    for row, error in zip(kept, errors):
                        if error is not None:
                            failed += 1
                            _note(failures, row, f"triton: {error}")
                    if good:
                        sides.put([kept[i]["id"] for i in good],
                                  {name: outputs[name][good].reshape(len(good), *shapes[name]) for name in names})
                        computed += len(good)
                bar.update(len(page))
        finally:
            iterator.close()
    finally:
        if bar is not None:
            bar.close()
        sides.close()
        embedder.close()
        milvus.close()
    report = SidesReport(collection=collection, path=str(path), rows=rows, computed=computed, present=present,
                         failed=failed, seconds=time.perf_counter() - started, failures=failures)
    if progress:
        print(report, file=sys.stderr, flush=True)
    return report


def _note(failures: list[dict[str, str]], row: dict[str, Any], reason: str) -> None:
    if len(failures) < MAX_REPORTED_FAILURES:
        failures.append({"id": str(row["id"]), "image": str(row["image"]), "reason": reason})

