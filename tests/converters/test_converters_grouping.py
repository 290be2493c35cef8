"""Ward greedy and the contiguous DP against independent references (scipy, brute force)."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from converters.grouping import contiguous_partitions, group_points, ward_tree
from tests.converters_reference import as_sets, contiguous_splits


def scatter_np(points: np.ndarray, groups, weights=None) -> float:
    w = np.ones(len(points)) if weights is None else np.asarray(weights)
    total = 0.0
    for g in groups:
        mean = (w[g, None] * points[g]).sum(0) / w[g].sum()
        total += float((w[g] * ((points[g] - mean) ** 2).sum(1)).sum())
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_contiguous_dp_equals_brute_force(seed, weighted):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(6, 5))
    weights = rng.uniform(0.5, 3.0, size=6) if weighted else None
    results = contiguous_partitions(torch.from_numpy(points), 6, None if weights is None else torch.from_numpy(weights))
    for g, (groups, cost) in enumerate(results, start=1):
        best = min(scatter_np(points, p, weights) for p in contiguous_splits(6, g))
        assert cost == pytest.approx(best, rel=1e-10, abs=1e-12)
        assert scatter_np(points, groups, weights) == pytest.approx(best, rel=1e-10, abs=1e-12)
        assert [l for grp in groups for l in grp] == list(range(6))


@pytest.mark.parametrize("seed", range(3))
def test_ward_increments_are_the_error_each_merge_adds(seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(9, 4))
    tree = ward_tree(torch.from_numpy(points))
    assert len(tree.merges) == 8
    for step, (_, _, increment) in enumerate(tree.merges, start=1):
        before = scatter_np(points, tree.partition(9 - step + 1))
        after = scatter_np(points, tree.partition(9 - step))
        assert increment == pytest.approx(after - before, rel=1e-9, abs=1e-12)
        assert tree.cost(9 - step) == pytest.approx(after, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ward_matches_scipy_ward_linkage(seed):
    rng = np.random.default_rng(100 + seed)
    points = rng.normal(size=(12, 6))
    tree = ward_tree(torch.from_numpy(points))
    z = linkage(points, method="ward")
    # scipy's merge height is sqrt(2 * increment) for unit weights
    ours = sorted(inc for _, _, inc in tree.merges)
    assert np.allclose(ours, np.sort(z[:, 2] ** 2 / 2), rtol=1e-9)
    for g in range(1, 13):
        labels = fcluster(z, g, criterion="maxclust")
        theirs = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        assert as_sets(tree.partition(g)) == as_sets(theirs)


def test_ward_partition_is_ordered_and_ties_are_deterministic():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # every adjacent pair ties
    tree = ward_tree(points)
    assert tree.merges[0][:2] == ((0,), (1,))
    assert tree.partition(3) == [[0, 1], [2], [3]]
    assert ward_tree(points).merges == tree.merges


def test_group_points_refuses_bad_requests():
    points = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        group_points(points, 4)
    with pytest.raises(ValueError):
        group_points(points, 2, grouping="nearest")
