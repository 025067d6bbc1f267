"""k-means in torch, for the self-supervised clustering loss (cluster pairs' exterior-level features).

Deterministic for a given seed: k-means++ draws from its own seeded ``torch.Generator`` and never
touches the global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")


def _distances(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """``[N, k]``: squared euclidean distance, or ``1 - cos`` (``x`` and ``centroids`` unit-norm)."""
    if metric == "cosine":
        return 1.0 - x @ centroids.t()
    squared = (x * x).sum(1, keepdim=True) - 2.0 * x @ centroids.t() + (centroids * centroids).sum(1)
    return squared.clamp(min=0)


def _kmeans_plus_plus(x: torch.Tensor, k: int, metric: str, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its distance to the
    closest centre so far (squared euclidean; ``1 - cos``, i.e. half the squared chord, for cosine).
    When every remaining point coincides with a centre (fewer distinct points than k), the next
    centre is drawn uniformly among the points not yet chosen."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator).item())]
    closest = _distances(x, x[chosen[-1]].unsqueeze(0), metric).squeeze(1)
    for _ in range(1, k):
        weights = closest.clamp(min=0).detach().to("cpu", torch.float64)
        weights[chosen] = 0
        if weights.sum() <= 0:
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator).item()))
        closest = torch.minimum(closest, _distances(x, x[chosen[-1]].unsqueeze(0), metric).squeeze(1))
    return x[chosen].clone()


def _fill_empty_clusters(assignments: torch.Tensor, distances: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster a point: the points farthest from their assigned centroid are moved,
    in order of decreasing distance, skipping any that is the last member of its cluster (moving it
    would empty another). ``distances[p]`` is point p's distance to its assigned centroid. Needs
    ``k <= N``, which guarantees enough movable points."""
    counts = torch.bincount(assignments, minlength=k).tolist()
    empty = [cluster for cluster, count in enumerate(counts) if count == 0]
    if not empty:
        return assignments
    assignments = assignments.clone()
    candidates = iter(torch.argsort(distances, descending=True, stable=True).tolist())
    for cluster in empty:
        for point in candidates:
            donor = int(assignments[point])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[cluster] = 1
                assignments[point] = cluster
                break
    return assignments


def _means(x: torch.Tensor, assignments: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignments, x)
    counts = torch.bincount(assignments, minlength=k).to(x.dtype).unsqueeze(1)
    centroids = sums / counts
    return F.normalize(centroids, dim=1) if metric == "cosine" else centroids


def kmeans(
    features: torch.Tensor, k: int, iterations: int = 20, seed: int = 0, *, metric: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ initialisation.

    Args:
        features: ``[N, D]``; detached, computed in float32 (or float64 if given) on its device.
        k: number of clusters, ``1 <= k <= N`` (``ValueError`` otherwise).
        iterations: maximum number of assign/update rounds (>= 1); stops early once the
            assignments no longer change.
        seed: seeds k-means++ (a private generator: same seed, same result; global RNG untouched).
        metric: ``"euclidean"`` (default; squared euclidean distance, centroids are plain means) or
            ``"cosine"`` (spherical k-means: features are L2-normalised, points go to the centroid of
            highest cosine, centroids are re-normalised means, so they are unit vectors).

    Empty clusters are re-seeded after every assignment step with the points farthest from their
    assigned centroid, so every cluster has at least one member.

    Returns:
        ``(centroids [k, D], assignments [N])``, centroids in ``features``' dtype, assignments
        ``int64``. Centroids are the (normalised, for cosine) means of the returned assignments.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")

    x = features.detach()
    x = x if x.dtype == torch.float64 else x.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(x, k, metric, generator)

    assignments = None
    for _ in range(iterations):
        distances = _distances(x, centroids, metric)
        nearest = distances.argmin(dim=1)
        nearest = _fill_empty_clusters(nearest, distances.gather(1, nearest.unsqueeze(1)).squeeze(1), k)
        if assignments is not None and torch.equal(nearest, assignments):
            break
        assignments = nearest
        centroids = _means(x, assignments, k, metric)
    return centroids.to(features.dtype), assignments
