"""The Ray Data pipeline that fills Milvus: manifest -> read -> embed via Triton -> write,
resumable shard by shard. A run is described by an ``IndexJob``:
``IndexJob(manifest="manifest.jsonl", triton_url="127.0.0.1:8000").run()`` -> ``IndexReport``.

The names load on first use, so Ray workers importing ``xmodal.indexer.embed`` or
``xmodal.indexer.sources`` do not pay for pymilvus.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmodal.indexer.formats import Source
    from xmodal.indexer.job import IndexJob
    from xmodal.indexer.pipeline import IndexReport, deadletter_path, progress_path

# Items per shard: the unit of resumption (a killed run redoes at most the shards in flight).
DEFAULT_SHARD_SIZE = 1000
# Items per Ray batch and per embedding request (capped by the model's max_batch_size): 64
# scaled better from 1 local worker to 2 than 32, the earlier default (docs/indexing.md,
# "Benchmark"; benchmarks/indexing.py --batch-size measures another).
DEFAULT_BATCH_SIZE = 64
# Rows per upsert: large enough that Milvus's per-call cost vanishes, small enough to hold.
DEFAULT_WRITE_BATCH = 5000

__all__ = ["IndexJob", "IndexReport", "Source", "deadletter_path", "progress_path"]


def __getattr__(name: str) -> Any:
    if name == "Source":
        from xmodal.indexer.formats import Source

        return Source
    if name == "IndexJob":
        from xmodal.indexer.job import IndexJob

        return IndexJob
    if name in __all__:
        from xmodal.indexer import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'xmodal.indexer' has no attribute {name!r}")
