"""Partition sites into groups that share one B (the group mean), minimising the scatter.

Points are the sites' B's, flattened. Replacing a group's points by their (weighted) mean costs
the group's scatter ``sum_{l in g} w_l ||x_l - mean_g||^2``; with an orthonormal shared A this is
exactly the reconstruction error added by the grouping (reference.md section 2).

- ``ward_tree``: any-pair grouping by Ward's exact greedy. Merging clusters X and Y raises the
  scatter by ``w_X w_Y / (w_X + w_Y) * ||mean_X - mean_Y||^2``; each step merges the pair with the
  smallest increment (ties: the pair whose smallest members come first).
- ``contiguous_partitions``: the best partition into G runs of adjacent sites, exactly, by the
  O(L^2 G) dynamic programme over run costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GROUPINGS = ("any", "adjacent")


def _as_points(points: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    # the greedy and the DP are scalar loops: run them on the CPU whatever the points' device
    pts = points.detach().reshape(points.shape[0], -1).to("cpu", torch.float64)
    if weights is None:
        w = torch.ones(pts.shape[0], dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape[0] != pts.shape[0] or bool((w <= 0).any()):
            raise ValueError("weights must be positive, one per point")
    return pts, w


def _check_groups(n_points: int, n_groups: int) -> None:
    if not 1 <= n_groups <= n_points:
        raise ValueError(f"number of groups {n_groups} must be between 1 and {n_points}")


@dataclass(frozen=True)
class WardTree:
    """Ward's merge sequence: ``merges[i] = (members_x, members_y, increment)``."""

    n_points: int
    merges: list[tuple[tuple[int, ...], tuple[int, ...], float]]

    def partition(self, n_groups: int) -> list[list[int]]:
        """Groups after the first ``n_points - n_groups`` merges, each sorted, ordered by first member."""
        _check_groups(self.n_points, n_groups)
        cluster_of = list(range(self.n_points))
        for x, y, _ in self.merges[: self.n_points - n_groups]:
            target = cluster_of[x[0]]
            for member in y:
                cluster_of[member] = target
        groups: dict[int, list[int]] = {}
        for pos, cluster in enumerate(cluster_of):
            groups.setdefault(cluster, []).append(pos)
        return sorted(groups.values(), key=lambda g: g[0])

    def cost(self, n_groups: int) -> float:
        """Scatter of ``partition(n_groups)``: the sum of the increments of the merges made."""
        _check_groups(self.n_points, n_groups)
        return float(sum(inc for _, _, inc in self.merges[: self.n_points - n_groups]))


def ward_tree(points: Tensor, weights: Tensor | None = None) -> WardTree:
    """Ward agglomerative clustering of the rows of ``points`` (any shape (L, ...)), exact greedy.

    Cluster slot i holds the cluster whose smallest member is i; increments are recomputed from
    the cluster means (not Lance-Williams), so each equals the scatter it adds up to roundoff.
    """
    pts, w = _as_points(points, weights)
    n = pts.shape[0]
    means = pts.clone()
    sizes = w.clone()
    members: list[tuple[int, ...]] = [(i,) for i in range(n)]
    inc = np.full((n, n), np.inf)

    def row_increments(i: int, others: list[int]) -> None:
        if not others:
            return
        d2 = (means[others] - means[i]).square().sum(dim=1)
        vals = (sizes[i] * sizes[others] / (sizes[i] + sizes[others]) * d2).numpy()
        for j, v in zip(others, vals):
            inc[min(i, j), max(i, j)] = v

    for i in range(n):
        row_increments(i, list(range(i + 1, n)))
    active = list(range(n))
    merges = []
    for _ in range(n - 1):
        flat = int(np.argmin(inc))  # first minimum in row-major order = the tie-break above
        i, j = divmod(flat, n)
        merges.append((members[i], members[j], float(inc[i, j])))
        total = sizes[i] + sizes[j]
        means[i] = (sizes[i] * means[i] + sizes[j] * means[j]) / total
        sizes[i] = total
        members[i] = tuple(sorted(members[i] + members[j]))
        active.remove(j)
        inc[j, :] = np.inf
        inc[:, j] = np.inf
        row_increments(i, [o for o in active if o != i])
    return WardTree(n, merges)


def run_costs(points: Tensor, weights: Tensor | None = None) -> np.ndarray:
    """``cost[i, j]``: scatter of the run of points i..j-1 (0 <= i < j <= L), inf elsewhere.

    Built by adding one point at a time to a running mean (Welford), which avoids the
    cancellation of the sum-of-squares formula.
    """
    pts, w = _as_points(points, weights)
    n = pts.shape[0]
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        mean = pts[i].clone()
        weight = w[i].clone()
        scatter = 0.0
        cost[i, i + 1] = 0.0
        for j in range(i + 1, n):
            total = weight + w[j]
            diff = pts[j] - mean
            scatter += float(weight * w[j] / total * diff.square().sum())
            mean = mean + (w[j] / total) * diff
            weight = total
            cost[i, j + 1] = scatter
    return cost


def contiguous_partitions(
    points: Tensor, max_groups: int, weights: Tensor | None = None
) -> list[tuple[list[list[int]], float]]:
    """Best partition into G runs of adjacent points, for every G = 1..max_groups: (groups, cost).

    ``best[g, j]`` = least cost of splitting the first j points into g runs
    = ``min_i best[g-1, i] + cost[i, j]``; ties take the earliest split point.
    """
    n = points.shape[0]
    _check_groups(n, max_groups)
    cost = run_costs(points, weights)
    best = np.full((max_groups + 1, n + 1), np.inf)
    split = np.zeros((max_groups + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(g, n + 1):
            cand = best[g - 1, :j] + cost[:j, j]
            split[g, j] = int(np.argmin(cand))
            best[g, j] = cand[split[g, j]]
    results = []
    for g in range(1, max_groups + 1):
        bounds, j = [n], n
        for level in range(g, 0, -1):
            j = int(split[level, j])
            bounds.append(j)
        bounds.reverse()
        groups = [list(range(bounds[t], bounds[t + 1])) for t in range(g)]
        results.append((groups, float(best[g, n])))
    return results


def group_points(
    points: Tensor, n_groups: int, grouping: str = "any", weights: Tensor | None = None
) -> list[list[int]]:
    """Partition into ``n_groups``: Ward ("any") or the exact contiguous optimum ("adjacent")."""
    if grouping == "any":
        return ward_tree(points, weights).partition(n_groups)
    if grouping == "adjacent":
        return contiguous_partitions(points, n_groups, weights)[-1][0]
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def grouping_costs(points: Tensor, grouping: str = "any") -> list[float]:
    """Scatter for G = 1..L groups (index G-1), by the same rule as ``group_points``."""
    n = points.shape[0]
    if grouping == "any":
        tree = ward_tree(points)
        return [tree.cost(g) for g in range(1, n + 1)]
    if grouping == "adjacent":
        return [c for _, c in contiguous_partitions(points, n)]
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def group_means(points: Tensor, groups: list[list[int]]) -> Tensor:
    """Mean of each group's points, stacked in group order."""
    return torch.stack([points[g].mean(dim=0) for g in groups])


def scatter(points: Tensor, groups: list[list[int]]) -> float:
    """``sum_g sum_{l in g} ||x_l - mean_g||^2``: the cost of sharing each group's mean."""
    return sum(float((points[g] - points[g].mean(dim=0)).square().sum()) for g in groups)
