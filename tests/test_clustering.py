import math

import pytest
import torch

from xmodal.training.clustering import _fill_empty_clusters, kmeans


def _blobs(centres, per_blob=10, spread=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor(centres)
    points = centres.repeat_interleave(per_blob, dim=0)
    points = points + spread * torch.randn(points.shape, generator=generator)
    truth = torch.arange(len(centres)).repeat_interleave(per_blob)
    return points, truth


def _same_partition(assignments, truth):
    """Equal up to a relabelling: each true group maps to one cluster id, distinct across groups."""
    mapping = {}
    for found, true in zip(assignments.tolist(), truth.tolist()):
        if mapping.setdefault(true, found) != found:
            return False
    return len(set(mapping.values())) == len(mapping)


def test_kmeans_finds_obvious_euclidean_clusters():
    centres = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    points, truth = _blobs(centres)
    centroids, assignments = kmeans(points, 3)
    assert centroids.shape == (3, 2) and assignments.shape == (30,) and assignments.dtype == torch.int64
    assert _same_partition(assignments, truth)
    for group, centre in enumerate(centres):
        # Every centroid is its cluster's mean, within the noise of the true centre.
        found = centroids[assignments[truth == group][0]]
        assert torch.allclose(found, points[truth == group].mean(0), atol=1e-5)
        assert torch.allclose(found, torch.tensor(centre), atol=0.2)


def test_kmeans_cosine_clusters_by_direction_not_length():
    # Three directions 120 degrees apart; the lengths vary (1 to 5), which cosine ignores.
    directions = [[math.cos(a), math.sin(a)] for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    points, truth = _blobs(directions, spread=0.05)
    points = points * torch.linspace(1.0, 5.0, len(points)).unsqueeze(1)
    centroids, assignments = kmeans(points, 3, metric="cosine")
    assert _same_partition(assignments, truth)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3), atol=1e-5)  # spherical: unit centroids
    for group, direction in enumerate(directions):
        assert torch.allclose(centroids[assignments[truth == group][0]], torch.tensor(direction), atol=0.05)


def test_kmeans_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    points = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = kmeans(points, 5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = kmeans(points, 5, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_kmeans_fills_empty_clusters_from_duplicates():
    # Four copies of one point and one other: k-means++ must reuse a duplicate as a centre, and the
    # tied duplicates all go to the first of two identical centroids, leaving the other empty.
    points = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 0.0]])
    centroids, assignments = kmeans(points, 3)
    assert sorted(torch.bincount(assignments, minlength=3).tolist()) == [1, 1, 3]
    assert torch.isfinite(centroids).all()
    # k = N: every point gets a cluster of its own, even identical ones.
    _, assignments = kmeans(points, 5)
    assert sorted(assignments.tolist()) == [0, 1, 2, 3, 4]


def test_fill_empty_clusters_moves_the_farthest_movable_points():
    # Cluster 0 holds points 0-3, cluster 1 holds point 4 alone; clusters 2 and 3 are empty.
    assignments = torch.tensor([0, 0, 0, 0, 1])
    distances = torch.tensor([0.1, 5.0, 0.2, 0.3, 9.0])  # distance of each point to its own centroid
    # Point 4 is the farthest but the last member of cluster 1: skipped. Then point 1 (5.0) and point 3 (0.3).
    filled = _fill_empty_clusters(assignments, distances, 4)
    assert filled.tolist() == [0, 2, 0, 3, 1]
    assert assignments.tolist() == [0, 0, 0, 0, 1]  # input not modified
    same = _fill_empty_clusters(filled, distances, 4)
    assert same is filled  # nothing empty: unchanged


def test_kmeans_rejects_bad_arguments():
    points = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(points, 4)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(points, 0)
    with pytest.raises(ValueError):
        kmeans(torch.zeros(3), 2)
    with pytest.raises(ValueError):
        kmeans(points, 2, metric="manhattan")
    with pytest.raises(ValueError):
        kmeans(points, 2, iterations=0)
