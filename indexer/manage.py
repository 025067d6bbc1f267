"""What ``xmodal index stats``, ``letters`` and ``delete`` do: look at a collection with the
records kept of it, and remove all of them."""
from __future__ import annotations

import shutil
from typing import Any

from xmodal import contract, settings, store
from xmodal.indexer import state
from xmodal.sidestore import drop_side_store


def collection_stats(milvus_uri: str, collection: str, *, token: str | None = None) -> dict[str, Any]:
    """Rows, the model recorded with the collection, its vector index, dead letters and the
    progress record's state. ValueError when the collection does not exist. `token` (else
    $XMODAL_MILVUS_TOKEN) for a Milvus server."""
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    client = store.connect(milvus_uri, token=settings.milvus_token(token))
    try:
        model = store.collection_model(client, collection)  # raises, listing what exists, when missing
        store.ensure_loaded(client, collection)
        rows = client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
        vectors = store.collection_vector_fields(client, collection)
        try:
            index = client.describe_index(collection, contract.GLOBAL) or {}
        except Exception:  # noqa: BLE001 - a collection without an index describes none
            index = {}
        books = state.run_records(milvus_uri, collection, client)
        try:
            progress = books.read_progress()
        except ValueError as exc:
            progress = {"error": str(exc)}
        letters = books.count_letters()
    finally:
        client.close()
    index_params = {k: v for k, v in index.items()
                    if k not in ("index_type", "metric_type", "field_name", "index_name", "total_rows",
                                 "indexed_rows", "pending_index_rows", "state")}
    return {
        "collection": collection, "milvus_uri": milvus_uri, "rows": rows, "model": model, "vector_fields": vectors,
        "index": {"type": index.get("index_type"), "metric": index.get("metric_type"), "params": index_params},
        "dead_letters": letters, "deadletter_path": books.letters_where,
        "progress_path": books.progress_where, "progress": progress,
    }


def dead_letters(milvus_uri: str, collection: str, *, token: str | None = None) -> list[dict[str, Any]]:
    """The dead letters of `collection`'s last run, wherever the store keeps them."""
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    client = store.connect(milvus_uri, token=settings.milvus_token(token))
    try:
        return state.run_records(milvus_uri, collection, client).letters()
    finally:
        client.close()


def format_stats(stats: dict[str, Any]) -> str:
    model = stats["model"]
    index = stats["index"]
    lines = [
        f"collection {stats['collection']!r} in {stats['milvus_uri']}",
        f"  rows:         {stats['rows']}",
        f"  model:        {store.describe_model(model)}, version {model.get('version', '?')}, "
        f"dim {model.get('dim', '?')}, metric {model.get('metric', '?')}",
        "  vectors:      " + ", ".join(f"{field} ({dim})" for field, dim in stats["vector_fields"].items()),
        f"  index:        {index['type'] or 'none'} {index['params'] or ''}".rstrip() + " on each vector field",
        f"  dead letters: {stats['dead_letters']}" + (f" ({stats['deadletter_path']})" if stats["dead_letters"] else ""),
        f"  progress:     {describe_progress(stats['progress'])}",
    ]
    return "\n".join(lines)


def describe_progress(progress: dict[str, Any] | None) -> str:
    if progress is None:
        return "no progress record (not indexed by this version, or deleted)"
    if "error" in progress:
        return progress["error"]
    shards = progress.get("shards", 0)
    finished = len(progress.get("finished", []))
    state_word = "complete" if progress.get("complete") else "unfinished (the same command resumes it)"
    return (f"{state_word}: {finished} of {shards} shards of {progress.get('shard_size')} items; "
            f"{progress.get('kind')}s of {progress.get('manifest')} (split {progress.get('split')}, "
            f"{progress.get('items')} items), model {progress.get('model')!r}; updated {progress.get('updated')}")


def delete_collection(milvus_uri: str, collection: str, *, token: str | None = None) -> list[str]:
    """Drop the collection (with its model record) and remove its progress, dead-letter and
    side-store files and the images it stored from a source's bytes; what was removed.

    Files without a collection are removed too (what a run left before its collection went).
    ValueError when there is nothing at all by that name.
    """
    milvus_uri = str(milvus_uri or settings.default_milvus_uri())
    removed = []
    client = store.connect(milvus_uri, token=settings.milvus_token(token))
    try:
        exists = client.has_collection(collection) and not store.is_metadata_collection(collection)
        message = None if exists else store.missing_collection_message(client, collection)
        if exists:
            store.drop_collection(client, collection)  # and its model record (milvus-lite keeps it apart)
            removed.append(f"collection {collection!r}")
        removed += state.run_records(milvus_uri, collection, client).remove()
        removed += drop_side_store(client, milvus_uri, collection)
    finally:
        client.close()
    from xmodal.indexer.folder_files import files_path

    folder_record = files_path(milvus_uri, collection)
    if folder_record.exists():
        folder_record.unlink()
        removed.append(str(folder_record))
    images = state.image_store_path(milvus_uri, collection)
    if images.is_dir():
        shutil.rmtree(images)
        removed.append(str(images))
    if not removed:
        raise ValueError(f"nothing to delete: {message}")
    return removed
