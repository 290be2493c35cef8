"""Calibrated ASLoRA: one A per kind (span(Q), orthonormal rows), one B per group; by alternation.

The alternation of calibrated_sharea.py with a partition: the B-step gives each group the weighted
least-squares B ``B_g = (sum_{l in g} dW_l C_l A'^T)(sum_{l in g} A' C_l A'^T)^+``, the A-step
solves the normal equations with those B's, and (optionally) the sites are regrouped.

Regrouping at fixed A. Site l alone would take ``P*_l = D_l S_l Z^T M_l^+`` with
``M_l = Z S_l Z^T`` (k, k), and sharing B costs ``||(B - P*_l) M_l^{1/2}||_F^2`` more: a scatter with a
matrix weight per site, for which Ward's greedy and the contiguous DP (grouping.py) are exact
only when every M_l is a multiple w_l M of one matrix. The proposal therefore groups the points
``P*_l M^{1/2}`` with weights ``w_l = tr M_l`` (M = sum M_l / sum w_l), by the same rule as the plain
converter ("any": Ward, "adjacent": contiguous DP), and the new partition is kept only when its
exact objective (B's refit) is lower. Exact under the proportional condition (C_l = I in
particular), a heuristic proposal otherwise; either way no kept step raises the objective.

Starts: a partition and A from the plain ASLoRA converter run on the kind in its small bases,
once as is and once whitened by the mean statistics (``a_l S^{1/2}``), B's refit; a partition
given by the caller is used as is, with A the optimal rows for it in each of the two problems
(top-k of the stack of ``sqrt|g| mean_g D_l``). Plus ``restarts`` random rows (fixed seed), with
the proposal's partition for a count of groups. Each start is alternated to convergence and
the lowest objective kept (local minima: see calibrated_sharea.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .aslora import DEFAULT_MAX_ITERATIONS as PLAIN_MAX_ITERATIONS
from .aslora import convert_aslora
from .calibrated_sharea import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_RESTARTS,
    DEFAULT_TOL,
    AlternationState,
    SharedRowsProblem,
    best_run,
    mean_whitening,
    random_rows,
    shared_a_result,
)
from .calibration import CalibratedKind, CalibratedResult, orthonormal_rows, psd_roots
from .factored import stack_directions
from .grouping import GROUPINGS, group_points
from .types import KindFactors


def grouped_directions(bts: list[Tensor], coords: list[Tensor], partition: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Top row directions and spectrum of the stack of ``sqrt|g| mean_g (bt_l coords_l)`` (factored)."""
    group_bts = [torch.cat([bts[l] for l in g], dim=1) / math.sqrt(len(g)) for g in partition]
    return stack_directions(group_bts, [torch.cat([coords[l] for l in g], dim=0) for g in partition])


def propose_partition(problem: SharedRowsProblem, z: Tensor, n_groups: int, grouping: str) -> list[list[int]]:
    """Group the per-site optimal B's at rows z, whitened by the mean weight (see module doc)."""
    ck = problem.ck
    points, weights, moments = [], [], []
    for l in range(ck.n_sites):
        m_l = z @ ck.s[l] @ z.T
        points.append((ck.b[l] @ (problem.as_[l] @ z.T)) @ torch.linalg.pinv(m_l, hermitian=True))
        weights.append(float(torch.diagonal(m_l).sum()))
        moments.append(m_l)
    floor = 1e-12 * max(max(weights), 1e-300)  # group_points wants positive weights
    w = torch.tensor([max(v, floor) for v in weights], dtype=z.dtype)
    root, _ = psd_roots(sum(moments) / float(w.sum()))
    return group_points(torch.stack([p @ root for p in points]), n_groups, grouping, w)


def aslora_starts(
    problem: SharedRowsProblem, k: int, groups: int | list[list[int]], grouping: str, restarts: int
) -> list[AlternationState]:
    """Starts: plain ASLoRA, mean-whitened ASLoRA, then random rows."""
    ck = problem.ck
    root, inv_root = mean_whitening(ck)
    candidates = []
    for coords, back in ((ck.a, None), ([a @ root for a in ck.a], inv_root)):
        if isinstance(groups, int):
            small = KindFactors(list(coords), list(ck.b), torch.float64)
            plain = convert_aslora(small, k, groups, grouping, PLAIN_MAX_ITERATIONS)
            rows, partition = plain.a_tensors[0], plain.groups
        else:
            partition = groups
            rows = grouped_directions(ck.b, coords, partition)[0][:, :k].T
        z = rows if back is None else orthonormal_rows(rows @ back)
        candidates.append(problem.state(z, partition))
    for z in random_rows(problem, k, restarts):
        partition = propose_partition(problem, z, groups, grouping) if isinstance(groups, int) else groups
        candidates.append(problem.state(z, partition))
    return candidates


def check_partition(partition: list[list[int]], n_sites: int) -> list[list[int]]:
    """A partition of 0..n_sites-1 into non-empty groups, each sorted, ordered by first member."""
    members = sorted(l for g in partition for l in g)
    if members != list(range(n_sites)) or any(len(g) == 0 for g in partition):
        raise ValueError(f"groups must partition the sites 0..{n_sites - 1}, got {partition}")
    return sorted((sorted(g) for g in partition), key=lambda g: g[0])


def convert_aslora_calibrated(
    ck: CalibratedKind,
    rank: int,
    groups: int | list[list[int]],
    grouping: str = "any",
    regroup: bool = True,
    max_iterations: int = DEFAULT_MAX_ROUNDS,
    tol: float = DEFAULT_TOL,
    restarts: int = DEFAULT_RESTARTS,
) -> CalibratedResult:
    """ASLoRA at ``rank`` (capped at n_in) with ``groups`` B's: a count (capped at the number of
    sites; the partition is found) or a partition (a list of lists of site positions).

    ``regroup`` lets the alternation move sites between groups (same count); with a partition and
    ``regroup=False`` only A and the B's move.
    """
    if rank < 1 or restarts < 0:
        raise ValueError(f"rank must be positive and restarts >= 0, got {rank}, {restarts}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups must be positive, got {groups}")
        groups = min(groups, ck.n_sites)
    else:
        groups = check_partition(groups, ck.n_sites)
    rank = min(rank, ck.kind.n_in)
    problem = SharedRowsProblem(ck)
    starts = aslora_starts(problem, min(rank, ck.p), groups, grouping, restarts)
    n_groups = len(starts[0].partition)

    def propose(st: AlternationState) -> AlternationState | None:
        partition = propose_partition(problem, st.z, n_groups, grouping)
        if sorted(partition) == sorted(st.partition):
            return None
        return problem.state(st.z, partition)

    st, history, rounds = best_run(problem, starts, max_iterations, tol, propose if regroup else None)
    white = [a @ mean_whitening(ck)[0] for a in ck.a]
    spectrum = grouped_directions(ck.b, white, st.partition)[1]
    return shared_a_result(problem, st, "aslora", rank, spectrum, history, rounds)
