"""Retrieval metrics: Recall@K both directions, rsum, median rank.

Ranks are computed a block of queries at a time, so the full query × gallery similarity
matrix never has to exist at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

KS = (1, 5, 10)
# How many first-stage candidates the scorer re-ranks in evaluation (and, by default, in search).
RERANK_TOP_N = 20


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
        relevant = gallery_key_ids[None, :] == query_key_ids[start:stop, None]
        ranks[start:stop] = ranks_in_scores(queries[start:stop] @ gallery.T, relevant)
    return ranks


def ranks_in_scores(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best-scoring relevant column (``relevant``: a boolean mask like ``scores``)."""
    best_relevant = np.where(relevant, scores, -np.inf).max(axis=1)
    # Ties count against the query: an item scoring equal to the best relevant one outranks it.
    return ((scores >= best_relevant[:, None]) & ~relevant).sum(axis=1)


def reranked_scores(first_stage: np.ndarray, top_n: int, rescore) -> np.ndarray:
    """The first stage's scores with each row's top N re-ordered by ``rescore(rows, columns) -> scores``
    (both ``[Q, N]``): those N move above everything else, in the second stage's order, as when a
    search re-ranks the candidates it retrieved."""
    top = np.argsort(-first_stage, axis=1, kind="stable")[:, :top_n]
    rows = np.repeat(np.arange(first_stage.shape[0])[:, None], top.shape[1], axis=1)
    second = np.asarray(rescore(rows, top), dtype=np.float64)
    result = first_stage.astype(np.float64).copy()
    result[rows, top] = first_stage.max() + 1.0 + (second - second.min())
    return result


def recall_summary(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    summary = {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
    summary["medr"] = float(np.median(ranks) + 1)
    summary["meanr"] = float(np.mean(ranks) + 1)
    return summary


def format_metrics(metrics: dict) -> str:
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        m = metrics[direction]
        rows.append(
            f"{direction:<14} R@1 {m['R@1']:6.2f}  R@5 {m['R@5']:6.2f}  R@10 {m['R@10']:6.2f}  medr {m['medr']:.0f}"
        )
    rows.append(f"rsum {metrics['rsum']:.2f}")
    return "\n".join(rows)


def mean_average_precision(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_categories: Sequence[str | None],
    gallery_categories: Sequence[str | None],
    *,
    block: int = 256,
) -> float | None:
    """MAP@all: every gallery item of the query's category is relevant. None when no category exists.

    Queries without a category (or whose category has no gallery item) are left out.
    """
    gallery_cats = np.array([c if c is not None else "\0none" for c in gallery_categories], dtype=object)
    usable = [i for i, c in enumerate(query_categories) if c is not None and np.any(gallery_cats == c)]
    if not usable:
        return None
    precisions = []
    for start in range(0, len(usable), block):
        index = usable[start:start + block]
        order = np.argsort(-(queries[index] @ gallery.T), axis=1, kind="stable")
        relevant = gallery_cats[order] == np.array([query_categories[i] for i in index], dtype=object)[:, None]
        hits = np.cumsum(relevant, axis=1)
        positions = np.arange(1, gallery.shape[0] + 1)
        precisions.append((relevant * hits / positions).sum(axis=1) / relevant.sum(axis=1))
    return float(100.0 * np.mean(np.concatenate(precisions)))


def recall_curve(ranks: np.ndarray, max_k: int = 100) -> list[float]:
    return [float(100.0 * np.mean(ranks < k)) for k in range(1, max_k + 1)]


def evaluate_report(
    image_embeddings: dict[str, np.ndarray],
    text_embeddings: dict[str, np.ndarray],
    image_keys: Sequence[str],
    text_keys: Sequence[str],
    *,
    image_categories: Sequence[str | None] | None = None,
    text_categories: Sequence[str | None] | None = None,
    plot_path: Path | None = None,
) -> dict:
    """Metrics for every served output (`global`, and each level of a hierarchical model).

    Per output: R@1/5/10 and ranks both ways, rsum, MAP@all by category where categories
    exist, and the Recall@K curve; optionally a PNG of the curves.
    """
    report: dict = {}
    for name in image_embeddings:
        image, text = image_embeddings[name], text_embeddings[name]
        i2t_ranks = first_relevant_ranks(image, text, image_keys, text_keys)
        t2i_ranks = first_relevant_ranks(text, image, text_keys, image_keys)
        i2t, t2i = recall_summary(i2t_ranks), recall_summary(t2i_ranks)
        metrics = {"image_to_text": i2t, "text_to_image": t2i,
                   "rsum": float(sum(i2t[f"R@{k}"] + t2i[f"R@{k}"] for k in KS)),
                   "curve": {"image_to_text": recall_curve(i2t_ranks), "text_to_image": recall_curve(t2i_ranks)}}
        if image_categories is not None and text_categories is not None:
            i2t["MAP"] = mean_average_precision(image, text, image_categories, text_categories)
            t2i["MAP"] = mean_average_precision(text, image, text_categories, image_categories)
        report[name] = metrics
    if plot_path is not None:
        plot_recall_curves(report, plot_path)
    return report


def plot_recall_curves(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, direction in zip(axes, ("image_to_text", "text_to_image")):
        for name, metrics in report.items():
            curve = metrics["curve"][direction]
            axis.plot(range(1, len(curve) + 1), curve, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("K")
        axis.set_title({"image_to_text": "image → text", "text_to_image": "text → image"}[direction])
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("Recall@K (%)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
