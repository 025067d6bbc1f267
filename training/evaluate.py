"""Retrieval metrics: Recall@K both directions, rsum, median rank.

Ranks are computed a block of queries at a time, so the full query × gallery similarity
matrix never has to exist at once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 5, 10)


def first_relevant_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_keys: Sequence[str],
    gallery_keys: Sequence[str],
    *,
    block: int = 1024,
) -> np.ndarray:
    """0-based rank of the best-ranked gallery item sharing the query's key, per query.

    Similarity is the dot product (embeddings are L2-normalised). A query with no relevant
    gallery item is an error: it would silently count as a miss.
    """
    key_index = {key: i for i, key in enumerate(dict.fromkeys(gallery_keys))}
    gallery_key_ids = np.array([key_index[key] for key in gallery_keys])
    missing = [key for key in query_keys if key not in key_index]
    if missing:
        raise ValueError(f"{len(missing)} queries have no relevant gallery item, e.g. {missing[0]!r}")
    query_key_ids = np.array([key_index[key] for key in query_keys])
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        scores = queries[start:stop] @ gallery.T
        relevant = gallery_key_ids[None, :] == query_key_ids[start:stop, None]
        best_relevant = np.where(relevant, scores, -np.inf).max(axis=1)
        # Ties count against the query: an item scoring equal to the best relevant one outranks it.
        ranks[start:stop] = ((scores >= best_relevant[:, None]) & ~relevant).sum(axis=1)
    return ranks


def recall_summary(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    summary = {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
    summary["medr"] = float(np.median(ranks) + 1)
    summary["meanr"] = float(np.mean(ranks) + 1)
    return summary


def evaluate_retrieval(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    image_keys: Sequence[str],
    text_keys: Sequence[str],
) -> dict[str, dict[str, float] | float]:
    """Image→text and text→image recall where items with equal keys (concepts) are matches."""
    i2t = recall_summary(first_relevant_ranks(image_embeddings, text_embeddings, image_keys, text_keys))
    t2i = recall_summary(first_relevant_ranks(text_embeddings, image_embeddings, text_keys, image_keys))
    rsum = sum(i2t[f"R@{k}"] + t2i[f"R@{k}"] for k in KS)
    return {"image_to_text": i2t, "text_to_image": t2i, "rsum": float(rsum)}


def format_metrics(metrics: dict) -> str:
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        m = metrics[direction]
        rows.append(
            f"{direction:<14} R@1 {m['R@1']:6.2f}  R@5 {m['R@5']:6.2f}  R@10 {m['R@10']:6.2f}  medr {m['medr']:.0f}"
        )
    rows.append(f"rsum {metrics['rsum']:.2f}")
    return "\n".join(rows)
