"""ASLoRA: one A per kind (orthonormal rows) and one B per group of sites.

With A orthonormal, ``sum_l ||dW_l - B_g(l) A||^2 = energy - sum_l ||dW_l A^T||^2 + scatter``,
where the scatter is ``sum_l ||dW_l A^T - B_g(l)||^2`` and is least when B_g is the mean of the
group's ``dW_l A^T``; equivalently the error is ``energy - sum_g |g| ||mean_g(dW) A^T||^2``.
That gives an alternation in which no step can raise the error:

1. A := ShareA projection at rank k; group the B's = dW_l A^T into G groups
   (Ward for "any", the exact contiguous DP for "adjacent"); B_g := group means.
2. Refit A for the grouping: top-k row subspace of the stack ``[sqrt|g| mean_g dW]_g``, where
   ``sqrt|g| mean_g dW = (1/sqrt|g|) [Bt_l ...]_l [A_l; ...]_l`` is itself a factored product.
3. Regroup at the new A. Steps are kept only when they lower the error strictly; stop when
   none does or after ``max_iterations`` refits.

B's are handled as coordinates in an orthonormal basis U of the stacked B's column space
(``dW_l A^T = U P_l``), so grouping works on (p_B, k) points instead of (n_out, k) ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .factored import kind_energy, row_basis, shared_rows, sites_error, stack_directions, tail_energy
from .grouping import group_means, group_points, grouping_costs, scatter
from .types import KindFactors, KindResult

DEFAULT_MAX_ITERATIONS = 10


class _Bases:
    """A kind in its two small bases: ``A_l = a_coords[l] Q^T`` and ``Bt_l = U b_coords[l]^T``."""

    def __init__(self, kind: KindFactors):
        self.kind = kind
        self.q, self.a_coords = row_basis(kind.as_)
        self.u, self.b_coords = row_basis([bt.T for bt in kind.bts])
        # Bt_l = U small_bts[l] with U orthonormal: the small (p_B, r_l) factors have the same
        # Gram matrices as the (n_out, r_l) ones, so every refit works at size p_B, not n_out.
        self.small_bts = [bc.T for bc in self.b_coords]
        self.energy = kind_energy(kind.bts, kind.as_)

    def sharea_directions(self) -> tuple[Tensor, Tensor]:
        return stack_directions(self.small_bts, self.a_coords)

    def grouped_directions(self, groups: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Directions and spectrum of the stack of ``sqrt|g| mean_g dW`` over the groups."""
        bts = [torch.cat([self.small_bts[l] for l in g], dim=1) / math.sqrt(len(g)) for g in groups]
        coords = [torch.cat([self.a_coords[l] for l in g], dim=0) for g in groups]
        return stack_directions(bts, coords)

    def b_points(self, a: Tensor) -> Tensor:
        """(L, p_B, k): ``dW_l a^T = U @ points[l]``, the optimal per-site B's in basis U."""
        a_in_q = self.q.T @ a.T
        return torch.stack([bc.T @ (ac @ a_in_q) for bc, ac in zip(self.b_coords, self.a_coords)])

    def error(self, points: Tensor, groups: list[list[int]]) -> float:
        """``energy - sum_l ||dW_l A^T||^2 + scatter``: the error of sharing group means."""
        return max(self.energy - float(points.square().sum()), 0.0) + scatter(points, groups)


def _check(kind: KindFactors, rank: int, groups: int) -> tuple[int, int]:
    if rank < 1 or groups < 1:
        raise ValueError(f"rank and groups must be positive, got rank={rank}, groups={groups}")
    return min(rank, kind.n_in), min(groups, kind.n_sites)


def convert_aslora(
    kind: KindFactors, rank: int, groups: int, grouping: str = "any", max_iterations: int = DEFAULT_MAX_ITERATIONS
) -> KindResult:
    """ASLoRA at ``rank`` (capped at n_in) with ``groups`` B's (capped at the number of sites)."""
    k, n_groups = _check(kind, rank, groups)
    bases = _Bases(kind)
    tol = 1e-12 * bases.energy  # a "fall" smaller than roundoff is no fall
    a = shared_rows(bases.q, bases.sharea_directions()[0], k)
    points = bases.b_points(a)
    partition = group_points(points, n_groups, grouping)
    error = bases.error(points, partition)
    history = [error]
    for _ in range(max_iterations):
        refit = shared_rows(bases.q, bases.grouped_directions(partition)[0], k)
        refit_points = bases.b_points(refit)
        refit_error = bases.error(refit_points, partition)
        if refit_error < error - tol:
            a, points, error = refit, refit_points, refit_error
            history.append(error)
        regrouped = group_points(points, n_groups, grouping)
        regrouped_error = bases.error(points, regrouped)
        if not regrouped_error < error - tol:
            break
        partition, error = regrouped, regrouped_error
        history.append(error)

    b_groups = [bases.u @ mean for mean in group_means(points, partition)]
    b_index = [0] * kind.n_sites
    for g, members in enumerate(partition):
        for pos in members:
            b_index[pos] = g
    # the reported error is recomputed from the final factors, independently of the formula above
    exact = sites_error(kind.bts, kind.as_, [b_groups[g] for g in b_index], [a] * kind.n_sites)
    return KindResult.from_float64(
        kind,
        "aslora",
        [a],
        b_groups,
        a_index=[0] * kind.n_sites,
        b_index=b_index,
        groups=partition,
        error=exact,
        energy=bases.energy,
        spectrum=bases.grouped_directions(partition)[1],
        error_history=history,
    )


def aslora_error_table(kind: KindFactors, ranks: list[int], grouping: str = "any") -> dict[int, list[float]]:
    """Estimated ASLoRA error for each rank k in ``ranks`` and G = 1..L (list index G-1).

    ShareA's error at k plus the grouping's scatter at ShareA's A: the error before any refit,
    an upper bound of what ``convert_aslora`` reports. The top-k directions are nested, so the
    rank-k points are the first k columns of the points at the largest rank.
    """
    bases = _Bases(kind)
    directions, spectrum = bases.sharea_directions()
    k_max = min(max(ranks), kind.n_in)
    points = bases.b_points(shared_rows(bases.q, directions, k_max))
    table = {}
    for k in ranks:
        k_eff = min(k, k_max)
        costs = grouping_costs(points[:, :, :k_eff], grouping)
        table[k] = [tail_energy(spectrum, k_eff) + c for c in costs]
    return table
