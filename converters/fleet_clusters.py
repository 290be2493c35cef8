"""Clusters of a fleet: the members split into groups, each group with its own bases per kind.

LoRAs trained from different seeds span nearly disjoint spaces, so one basis per kind must hold
all of them, and at a small budget it holds none well. Compress then Serve (ICML 2025) clusters the
LoRAs and gives each cluster a basis. Here a fleet of C clusters is C ordinary fleets (fleet.py):
``labels[i]`` (0..C-1) puts member i in one cluster for every kind (a member is one training run,
and whether its spaces are near another's is a property of the run, not of one kind), cluster c's
kind is a fleet kind over its members, the parameters are the sum of every cluster's bases and
cores, and a member's error is its error on its own cluster's bases.

Input, per kind: ``(As, Bts)`` with ``As[i][l]`` (r_i, n_in), ``Bts[i][l]`` (n_out, r_i) as in
fleet.py (member i, layer l, scale folded into B).

Budget (``cluster_plan``): one exact multiple-choice knapsack (``budget.spend_budget``) over every
(cluster, kind) pair's options (``fleet_options`` of the cluster's members), so the parameters go
where the error drops most, across clusters as across kinds; a rank instead gives every pair that
rank.

Assignment (``assign_clusters``), scored by the error of the products ``dW = Bt A``, never of the
factors alone. A start: each member's share of its update kept on another's input space (the
span of its A's, every layer) gives a similarity; the most central member seeds the first
cluster, each next seed is the member least like every seed so far, and the others join the seed
they are most like. Then k-subspaces: the budget is planned for the assignment, every cluster's
bases are fit (``fleet_kind``), every member is projected on every cluster's bases (the exact
least squares cores, ``fleet_extend.project``) and moves to the cluster where its error is least
(at least ``MIN_MEMBERS`` per cluster: the cheapest moves fill a short one). The fleet error of an
assignment is the sum of its clusters' exact errors; the least one seen wins, and the rounds stop
when an assignment repeats. Moving a member also moves parameters (its cores) and the plan, so the
error need not fall every round: hence the best one seen, not the last. Ties go to the lower
index; clusters are numbered by their first member, so the same input gives the same labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .budget import spend_budget
from .factored import row_basis
from .fleet import FleetKindResult, fleet_kind, fleet_options
from .fleet_extend import project
from .forms import FLEET_TWO_SIDED

# a cluster of one member is that LoRA converted alone: not a fleet (and the budget can't share it)
MIN_MEMBERS = 2
DEFAULT_ROUNDS = 20

KindsFactors = dict[str, tuple[list[list[Tensor]], list[list[Tensor]]]]  # kind -> (As[i][l], Bts[i][l])


@dataclass(frozen=True)
class ClusterFit:
    """An assignment with its planned ranks, fitted kinds and exact error."""

    labels: list[int]
    ranks: dict[tuple[int, str], tuple[int, int]]  # (cluster, kind) -> (rank_out, rank_in)
    kinds: dict[tuple[int, str], FleetKindResult]
    error: float  # sum over members of sum_l ||dW_il - dW'_il||_F^2 on their own cluster's bases
    rounds: int = 0


def groups(labels: list[int]) -> list[list[int]]:
    """The members of each cluster, in order."""
    return [[i for i, c in enumerate(labels) if c == cluster] for cluster in range(max(labels) + 1)]


def _subset(kinds: KindsFactors, members: list[int], kind: str) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    As, Bts = kinds[kind]
    return [As[i] for i in members], [Bts[i] for i in members]


def cluster_plan(
    method: str, kinds: KindsFactors, labels: list[int], *, budget: int | None = None, rank: int | None = None
) -> dict[tuple[int, str], tuple[int, int]]:
    """(rank_out, rank_in) per (cluster, kind): every pair at ``rank``, or ``budget`` parameters spent
    over all pairs for the least total error (ValueError when it is below the smallest setting)."""
    if (rank is None) == (budget is None):
        raise ValueError("give a rank or a budget")
    members = groups(labels)
    pairs = [(c, kind) for c in range(len(members)) for kind in sorted(kinds)]
    if rank is not None:
        return {pair: (rank if FLEET_TWO_SIDED[method] else 0, rank) for pair in pairs}
    options = {(c, kind): fleet_options(method, *_subset(kinds, members[c], kind)) for c, kind in pairs}
    return {pair: (o.rank_out, o.rank_in) for pair, o in spend_budget(options, budget).items()}


def fit_clusters(
    method: str, kinds: KindsFactors, labels: list[int], *, budget: int | None = None, rank: int | None = None
) -> ClusterFit:
    """The assignment's plan and every (cluster, kind)'s fleet kind."""
    ranks = cluster_plan(method, kinds, labels, budget=budget, rank=rank)
    members = groups(labels)
    fitted = {
        (c, kind): fleet_kind(method, *_subset(kinds, members[c], kind), rank_in, rank_out=rank_out or None)
        for (c, kind), (rank_out, rank_in) in ranks.items()
    }
    return ClusterFit(list(labels), ranks, fitted, sum(r.error for r in fitted.values()))


def _similarity(kinds: KindsFactors) -> list[list[float]]:
    """s[i][j]: the share of member i's update energy kept on member j's input spaces (per kind, the
    span of j's A's over every layer), ``sum_kl ||Bt_ikl A_ikl Q_jk||^2 / sum_kl ||dW_ikl||^2``."""
    n = len(next(iter(kinds.values()))[0])
    kept = [[0.0] * n for _ in range(n)]
    energy = [0.0] * n
    for As, Bts in kinds.values():
        spaces = [row_basis([a.double() for a in As[j]])[0] for j in range(n)]
        for i in range(n):
            for a, bt in zip(As[i], Bts[i]):
                bt64, a64 = bt.double(), a.double()
                energy[i] += float(((bt64.T @ bt64) * (a64 @ a64.T)).sum())
                for j, q in enumerate(spaces):
                    kept[i][j] += float((bt64 @ (a64 @ q)).square().sum())
    return [[kept[i][j] / energy[i] if energy[i] > 0 else 0.0 for j in range(n)] for i in range(n)]


def initial_labels(kinds: KindsFactors, n_clusters: int) -> list[int]:
    """Farthest-first seeds on the (symmetrised) similarity, every member with the seed most like it."""
    s = _similarity(kinds)
    n = len(s)
    sym = [[(s[i][j] + s[j][i]) / 2 for j in range(n)] for i in range(n)]
    seeds = [max(range(n), key=lambda i: (sum(sym[i]), -i))]
    while len(seeds) < n_clusters:
        seeds.append(min((i for i in range(n) if i not in seeds), key=lambda i: (max(sym[i][t] for t in seeds), i)))
    labels = [max(range(n_clusters), key=lambda c: (sym[i][seeds[c]], -c)) for i in range(n)]
    for c, seed in enumerate(seeds):
        labels[seed] = c
    return balanced([[-sym[i][seeds[c]] for c in range(n_clusters)] for i in range(n)], labels)


def balanced(cost: list[list[float]], labels: list[int]) -> list[int]:
    """``labels`` with every cluster given at least ``MIN_MEMBERS``: a short cluster takes, from a
    cluster with more than that, the member whose cost rises least by the move (then the lower index)."""
    labels = list(labels)
    n_clusters = len(cost[0])
    while True:
        sizes = [labels.count(c) for c in range(n_clusters)]
        short = next((c for c in range(n_clusters) if sizes[c] < MIN_MEMBERS), None)
        if short is None:
            return labels
        movable = [i for i in range(len(labels)) if sizes[labels[i]] > MIN_MEMBERS]
        mover = min(movable, key=lambda i: (cost[i][short] - cost[i][labels[i]], i))
        labels[mover] = short


def canonical(labels: list[int]) -> list[int]:
    """Clusters renumbered by their first member (member 0 is in cluster 0), empty ones dropped."""
    order: dict[int, int] = {}
    for c in labels:
        order.setdefault(c, len(order))
    return [order[c] for c in labels]


def member_costs(kinds: KindsFactors, fit: ClusterFit, n_clusters: int) -> list[list[float]]:
    """cost[i][c]: member i's squared error on cluster c's bases (exact least squares cores), all kinds."""
    n = len(fit.labels)
    cost = [[0.0] * n_clusters for _ in range(n)]
    for kind, (As, Bts) in kinds.items():
        for c in range(n_clusters):
            result = fit.kinds[(c, kind)]
            for i in range(n):
                cost[i][c] += project(As[i], Bts[i], result.basis_v, result.basis_u).error
    return cost


def assign_clusters(
    method: str,
    kinds: KindsFactors,
    n_clusters: int,
    *,
    budget: int | None = None,
    rank: int | None = None,
    max_rounds: int = DEFAULT_ROUNDS,
) -> ClusterFit:
    """The least-error assignment of the members to ``n_clusters`` clusters found by k-subspaces from
    the farthest-first start (see the module), fitted at ``budget`` parameters or ``rank``."""
    n = len(next(iter(kinds.values()))[0])
    if not 1 <= n_clusters <= max(1, n // MIN_MEMBERS):
        raise ValueError(
            f"{n_clusters} clusters of at least {MIN_MEMBERS} members need at least "
            f"{MIN_MEMBERS * n_clusters} members, got {n}"
        )
    labels = [0] * n if n_clusters == 1 else canonical(initial_labels(kinds, n_clusters))
    best, seen = None, set()
    for round_ in range(max_rounds):
        fit = fit_clusters(method, kinds, labels, budget=budget, rank=rank)
        if best is None or fit.error < best.error:
            best = ClusterFit(fit.labels, fit.ranks, fit.kinds, fit.error, round_)
        seen.add(tuple(labels))
        if n_clusters == 1:
            break
        cost = member_costs(kinds, fit, n_clusters)
        nearest = [min(range(n_clusters), key=lambda c: (cost[i][c], c)) for i in range(n)]
        labels = canonical(balanced(cost, nearest))
        if tuple(labels) in seen:
            break
    return best


def search_counts(counts: list[int], score: Callable[[int], float | None], tie: float = 0.0) -> dict[int, float | None]:
    """``score`` (the fleet error at a number of clusters; None: refused) at some of ``counts`` (ascending),
    searched for the least: every power of two among them and the largest first, then bisection of the
    gaps beside the best so far until its neighbours on both sides were scored. Returns every score
    taken. The best: the least error; within ``tie`` of it, the fewer clusters (as the caller picks).

    Why not every count: each one is a full k-subspaces run (``assign_clusters``: every round plans the
    budget over every (cluster, kind) pair, fits every cluster's bases and projects every member on
    each), so 1..N/2 is about N/2 runs per form, the dearest ones at many clusters; at N = 50 that did
    not finish in 25 minutes. The error against the count was unimodal on every fleet measured (on
    50 LoRAs from 50 seeds it fell all the way to N/2; on groups of LoRAs it is least at the number
    of groups), and a unimodal curve's least is found this way with about 2 log2(N/2) + 2 scores
    (10 of 25 at N = 50). A curve with a second dip away from the coarse grid's best can be missed;
    the report lists the counts tried. With at most 3 counts (N < 8) every count is scored, and at
    N = 8 every count unless one cluster beats both 2 and 4 (then 3 is not tried).
    """
    scores: dict[int, float | None] = {}

    def best() -> int | None:
        scored = {c: e for c, e in scores.items() if e is not None}
        if not scored:
            return None
        least = min(scored.values())
        return min(c for c, e in scored.items() if e <= least + tie)

    def take(position: int) -> None:
        if counts[position] not in scores:
            scores[counts[position]] = score(counts[position])

    for position in sorted(
        {2**i - 1 for i in range(len(counts).bit_length()) if 2**i <= len(counts)} | {len(counts) - 1}
    ):
        take(position)
    while (winner := best()) is not None:
        here = counts.index(winner)
        scored = [counts.index(c) for c in scores]
        below = max((p for p in scored if p < here), default=here)
        above = min((p for p in scored if p > here), default=here)
        middles = [(below + here) // 2, (here + above + 1) // 2]
        new = [p for p in middles if counts[p] not in scores]
        if not new:
            return scores
        for position in new:
            take(position)
    return scores
