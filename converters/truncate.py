"""Plain LoRA truncation: each site keeps its own (A, B), cut to a lower rank (reference.md section 5).

A site's update ``dW = Bt @ A`` (A (r, n_in), Bt (n_out, r), scale folded into Bt) has at most
r non-zero singular values; its best rank-k approximation (Eckart-Young) keeps the top k and
leaves ``error(k) = sum_{i>k} sigma_i^2``. They come from the factors alone: with the thin QRs
``A^T = Qa Ra`` and ``Bt = Qb Rb``, ``dW = Qb (Rb Ra^T) Qa^T`` and the small core
``Rb Ra^T = U S V^T`` gives ``dW = (Qb U) S (Qa V)^T``. Cost O((n_in + n_out) r^2 + r^3) per site,
against O(n_out n_in min(n_out, n_in)) for the dense SVD that PEFT's ``convert_to_lora`` runs.

The truncated factors split the singular values like PEFT 0.21 does (``lora_B = U_k S_k``,
``lora_A = V_k^T``): A has orthonormal rows, the scale is 1, and the factors compare directly
with PEFT's up to the sign of each rank-1 component, which is fixed here (largest entry of each
row of A positive, as ``factored.sign_fix_rows`` does for the shared forms).

Rank choice for many sites (possibly of different shapes), in three modes:

- ``rank=k``: every site at ``min(k, its rank)``; truncation never expands.
- ``energy=E`` (PEFT's float ``rank``): per site the smallest k >= 1 whose top k squared singular
  values hold at least E of the site's energy.
- a parameter budget (a site at rank k costs ``k (n_in + n_out)``): the ranks that minimise the
  total error, see ``allocate_budget``.

Every mode keeps rank >= 1 at a site with rank >= 1 (PEFT never writes a rank-0 module either);
only a budget too small for rank 1 everywhere lets sites drop to 0, which the caller then writes
as "module not adapted".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .factored import sign_fix_rows
from .serving import ServingRule, choose_per_item
from .types import ENERGY_SLACK, KindFactors, KindResult

# A budget never pays for singular values this small relative to the largest of all sites
# (sigma_i <= 1e-12 sigma_max): roundoff of a rank-deficient site, no error to remove.
NEGLIGIBLE_SQUARED = 1e-24
# The exact budget search enumerates at most this many candidates; above it, greedy is used.
EXACT_CANDIDATE_LIMIT = 1_000_000


@dataclass(frozen=True)
class SiteTruncation:
    """One site cut to rank k: ``b @ a`` (scale 1) is the best rank-k approximation of dW.

    ``a`` (k, n_in) has orthonormal rows, ``b`` (n_out, k) = U_k S_k. ``singular_values`` are all
    of dW's (float64, descending, length min(r, n_in, n_out)), so ``error_at(j)`` is known for
    every j; ``error`` is ``error_at(k)``. Errors and energy are squared Frobenius norms of dW.
    """

    a: Tensor
    b: Tensor
    singular_values: Tensor
    rank: int
    error: float
    energy: float

    def error_at(self, k: int) -> float:
        return float(self.singular_values[k:].square().sum())


def _core_svd(a: Tensor, bt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(W_left, s, W_right) with ``bt @ a = W_left diag(s) W_right^T``, orthonormal columns, float64.

    QR both factors, SVD the small core. Householder QR keeps Qa, Qb orthonormal even when a
    factor is rank deficient, so the trailing singular values simply come out (near) zero.
    """
    qa, ra = torch.linalg.qr(a.T, mode="reduced")
    qb, rb = torch.linalg.qr(bt, mode="reduced")
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, qa @ vh.T


def site_singular_values(a: Tensor, bt: Tensor) -> Tensor:
    """Singular values of ``bt @ a`` (float64, descending), from the factors only."""
    a, bt = a.detach().double(), bt.detach().double()
    if a.shape[0] == 0:
        return a.new_zeros(0)
    ra = torch.linalg.qr(a.T, mode="r").R
    rb = torch.linalg.qr(bt, mode="r").R
    return torch.linalg.svdvals(rb @ ra.T)


def truncate_site(a: Tensor, bt: Tensor, rank: int, out_dtype: torch.dtype | None = None) -> SiteTruncation:
    """Best rank-``rank`` approximation of ``bt @ a`` (rank capped at the site's, never expanded).

    ``a`` (r, n_in), ``bt`` (n_out, r) with the scale folded in. The factors come back in
    ``out_dtype`` (default: float32 for half inputs, else the input's dtype).
    """
    if a.dim() != 2 or bt.dim() != 2 or bt.shape[1] != a.shape[0]:
        raise ValueError(f"need A (r, n_in) and B (n_out, r), got {tuple(a.shape)} and {tuple(bt.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    out_dtype = out_dtype or torch.promote_types(a.dtype, torch.float32)
    a64, bt64 = a.detach().double(), bt.detach().double()
    n_out, n_in = bt.shape[0], a.shape[1]
    if a.shape[0] == 0:
        s = a64.new_zeros(0)
        left, right = a64.new_zeros(n_out, 0), a64.new_zeros(n_in, 0)
    else:
        left, s, right = _core_svd(a64, bt64)
    k = min(rank, s.shape[0])
    a_k = right[:, :k].T
    signs = sign_fix_rows(a_k)
    a_k = a_k * signs[:, None]
    b_k = left[:, :k] * (s[:k] * signs)
    energy = float(s.square().sum())
    return SiteTruncation(
        a=a_k.to(out_dtype).contiguous(),
        b=b_k.to(out_dtype).contiguous(),
        singular_values=s,
        rank=k,
        error=float(s[k:].square().sum()),
        energy=energy,
    )


# ---------------------------------------------------------------- rank choice


def ranks_for_rank(spectra: Sequence[Tensor], rank: int) -> list[int]:
    """Every site at ``min(rank, its number of singular values)``; ``spectra[l]`` is sigma^2 of site l."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    return [min(rank, len(s)) for s in spectra]


def rank_for_energy(spectrum: Tensor, fraction: float) -> int:
    """Smallest k >= 1 whose top-k squared singular values hold ``fraction`` of the energy.

    PEFT 0.21's float ``rank`` (``_find_cutoff_index``): the smallest k with
    ``cumsum(sigma^2)[k-1] >= fraction * total``, so a zero update still gets k = 1. Here the
    target has the planners' slack (``ENERGY_SLACK`` of the energy: fraction 1.0 gives the
    numerical rank rather than whatever roundoff says), and k never exceeds the site's rank
    (PEFT's float32 dense SVD may return a k beyond it at 1.0, padding with roundoff directions).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    if len(spectrum) == 0:
        return 0
    head = spectrum.cumsum(0)
    total = float(head[-1])
    target = fraction * total - ENERGY_SLACK * total
    reaching = (head >= target).nonzero()
    return max(1, int(reaching[0]) + 1)


@dataclass(frozen=True)
class Allocation:
    """Per-site ranks chosen for a budget, and what they leave.

    ``error`` = sum over sites of their tail energy (squared Frobenius norm, exact);
    ``method`` is "exact" or "greedy"; ``error_lower_bound`` is a lower bound on the best error
    any allocation within the budget can reach (equal to ``error`` when the method is exact).
    """

    ranks: list[int]
    params: int
    error: float
    method: str
    error_lower_bound: float


@dataclass
class _Class:
    """The optional singular values (items) of all sites that share one cost per rank."""

    weight: int
    values: Tensor  # descending (stable: site order, then index within site)
    sites: Tensor  # the site each value belongs to
    prefix: Tensor = field(init=False)  # prefix[n] = sum of the top n values

    def __post_init__(self):
        self.prefix = torch.cat([self.values.new_zeros(1), self.values.cumsum(0)])

    @property
    def count(self) -> int:
        return len(self.values)


def _classes(spectra: Sequence[Tensor], costs: Sequence[int], floors: list[int]) -> list[_Class]:
    peak = max((float(s[0]) for s in spectra if len(s)), default=0.0)
    by_weight: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    for site, (s, cost, floor) in enumerate(zip(spectra, costs, floors)):
        free = s[floor:]
        free = free[free > NEGLIGIBLE_SQUARED * peak]
        values, sites = by_weight.setdefault(int(cost), ([], []))
        values.append(free)
        sites.append(torch.full((len(free),), site, dtype=torch.long))
    classes = []
    for weight in sorted(by_weight):
        values, sites = (torch.cat(x) for x in by_weight[weight])
        if len(values):
            order = torch.sort(values, descending=True, stable=True).indices
            classes.append(_Class(weight, values[order], sites[order]))
    return classes


def _ratio_order(classes: list[_Class]) -> tuple[Tensor, Tensor, Tensor]:
    """Every item's (class, value, weight) by value per parameter, descending (ties: class order)."""
    cls = torch.cat([torch.full((c.count,), j, dtype=torch.long) for j, c in enumerate(classes)])
    values = torch.cat([c.values for c in classes])
    weights = torch.cat([torch.full((c.count,), c.weight, dtype=torch.long) for c in classes])
    order = torch.sort(values / weights, descending=True, stable=True).indices
    return cls[order], values[order], weights[order]


def _greedy_counts(classes: list[_Class], spare: int) -> tuple[list[int], list[int], float]:
    """Greedy by error drop per parameter, and the LP bound of the 0/1 relaxation.

    Returns (prefix counts, greedy counts, lp_gain): the prefix is the items taken in ratio order
    up to the first that does not fit (the "critical" item); the greedy goes on past it, taking
    any later item that still fits (one of the same cost never does: the site's next value
    cannot jump a skipped one). ``lp_gain`` = prefix gain + the fitting fraction of the critical
    item: no allocation gains more.
    """
    cls, values, weights = _ratio_order(classes)
    n_prefix = int((weights.cumsum(0) <= spare).sum())  # cumulative costs rise: a prefix fits
    prefix = torch.bincount(cls[:n_prefix], minlength=len(classes)).tolist()
    used = int(weights[:n_prefix].sum())
    lp_gain = float(values[:n_prefix].sum())
    counts = list(prefix)
    if n_prefix < len(values):
        lp_gain += float(values[n_prefix]) * (spare - used) / int(weights[n_prefix])
        for j, w in zip(cls[n_prefix:].tolist(), weights[n_prefix:].tolist()):
            if used + w <= spare:
                counts[j] += 1
                used += w
    return prefix, counts, lp_gain


def _exact_counts(classes: list[_Class], spare: int, prefix: list[int]) -> list[int] | None:
    """The optimal number of items per class, or None when the search exceeds the limit.

    Proximity (why a small search is exact). Call the greedy prefix X, its critical item c and
    lambda = value/weight of c: items in X have ratio >= lambda, items outside <= lambda. Take an
    optimal set Z that is maximal (items have value >= 0, so adding any that fits keeps it
    optimal). Then cost(Z) > spare - w_max and cost(X) > spare - w_c >= spare - w_max, so
    T = cost(Z) - cost(X) lies in (-w_max, w_max). Write the items of Z not in X with their
    weight and those of X not in Z with minus their weight; ordering them "add a positive while
    the running sum is <= 0, else a negative" keeps every partial sum in (-w_max, w_max], a set of
    2 w_max / g multiples of g = gcd(weights). If there are 2 w_max / g or more such items, two
    partial sums coincide: the items between them weigh zero in total, contain both signs, and
    swapping them (drop those of Z - X, take those of X - Z) keeps the cost and changes the gain
    by at least lambda * 0 = 0. So some optimum differs from X in at most D = 2 w_max / g - 1
    items, and its count per class is within L1 distance D of X's.

    Within a class every item costs the same, so an optimum takes its n_j largest values; the
    search enumerates the counts of all classes but the widest one within that L1 ball
    and gives the last one all it can afford (values are >= 0, so more never hurts).

    Cost: at most ``EXACT_CANDIDATE_LIMIT`` candidates, each costing O(J); the ball is a box of
    side min(2D + 1, N_j + 1) per enumerated class, cut down to L1 radius D.
    """
    weights = [c.weight for c in classes]
    radius = 2 * max(weights) // math.gcd(*weights) - 1
    ranges = [
        torch.arange(max(0, prefix[j] - radius), min(c.count, prefix[j] + radius) + 1) for j, c in enumerate(classes)
    ]
    last = max(range(len(classes)), key=lambda j: (len(ranges[j]), -j))  # the widest is not enumerated
    others = [j for j in range(len(classes)) if j != last]
    ranges = [ranges[j] for j in others]
    if math.prod(len(r) for r in ranges) > EXACT_CANDIDATE_LIMIT:
        return None
    if others:
        grid = torch.cartesian_prod(*ranges).reshape(-1, len(others))
        distance = (grid - torch.tensor([prefix[j] for j in others])).abs().sum(1)
        cost = grid @ torch.tensor([weights[j] for j in others])
        keep = (distance <= radius) & (cost <= spare)
        grid, cost = grid[keep], cost[keep]
    else:
        grid, cost = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    n_last = torch.clamp((spare - cost) // weights[last], max=classes[last].count)
    gain = classes[last].prefix[n_last]
    for col, j in enumerate(others):
        gain = gain + classes[j].prefix[grid[:, col]]
    best = int(torch.argmax(gain))  # first maximum: deterministic
    counts = [0] * len(classes)
    counts[last] = int(n_last[best])
    for col, j in enumerate(others):
        counts[j] = int(grid[best, col])
    return counts


def allocate_budget(
    spectra: Sequence[Tensor], costs: Sequence[int], budget: int, exact: bool | None = None
) -> Allocation:
    """Per-site ranks with ``sum_l k_l costs[l] <= budget`` minimising ``sum_l tail_l(k_l)``.

    ``spectra[l]``: site l's squared singular values, descending; ``costs[l]``: its parameters per
    rank (n_in + n_out). Each site keeps rank >= 1 (if it has any) when the budget pays for that,
    else every site may drop to 0. Ranks are never raised onto negligible singular values
    (``NEGLIGIBLE_SQUARED``), so a generous budget gives each site its numerical rank.

    It is a multiple-choice knapsack, but a special one: going from rank k to k+1 costs the
    site's fixed ``costs[l]`` and removes sigma_{k+1}^2, which never grows with k. So it is a 0/1
    knapsack over single singular values ("items", weight = the site's cost) in which any
    chosen set can be replaced by one taking each site's largest values first at no loss.

    - All sites of one cost (e.g. every q/v site of a model without GQA): the greedy is exact.
      Any feasible set holds at most floor(budget / cost) items, and the greedy takes the
      largest that many; the fractional "last partial item" of the LP relaxation only exists in
      the relaxation, no integer allocation can take it.
    - Different costs: greedy by value per parameter can miss, by less than the value of the
      first item that did not fit (the LP relaxation is the greedy plus a fraction of that item).
      ``exact=None`` (default) and ``exact=True`` run the exact search of ``_exact_counts``
      instead: with J distinct costs it enumerates at most (2D+1)^(J-1) count vectors,
      D = 2 max(cost) / gcd(costs) - 1 (Llama-3-8B all-linear: J = 3, D = 35, 5,041 candidates).
      Above ``EXACT_CANDIDATE_LIMIT`` candidates, ``exact=None`` falls back to the greedy and
      reports its LP lower bound; ``exact=True`` raises; ``exact=False`` always runs the greedy.
    """
    if len(spectra) != len(costs):
        raise ValueError(f"need one cost per site, got {len(costs)} costs for {len(spectra)} sites")
    if any(int(c) < 1 for c in costs):
        raise ValueError("every site's cost per rank must be positive")
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    floors = [min(1, len(s)) for s in spectra]
    if sum(f * c for f, c in zip(floors, costs)) > budget:
        floors = [0] * len(spectra)
    spare = budget - sum(f * c for f, c in zip(floors, costs))
    classes = _classes(spectra, costs, floors)
    method, lower = "exact", None
    counts: list[int] | None = []
    if classes:
        prefix, greedy, lp_gain = _greedy_counts(classes, spare)
        counts = None if exact is False else _exact_counts(classes, spare, prefix)
        if counts is None:
            if exact:
                raise ValueError(f"the exact budget search exceeds {EXACT_CANDIDATE_LIMIT} candidates")
            # negligible values left out of the items could only lower the optimum by their sum,
            # so the bound counts the non-negligible values the LP relaxation leaves
            counts, method = greedy, "greedy"
            lower = max(sum(float(c.prefix[-1]) for c in classes) - lp_gain, 0.0)
    ranks = list(floors)
    for c, n in zip(classes, counts):
        for site, extra in enumerate(torch.bincount(c.sites[:n], minlength=len(spectra)).tolist()):
            ranks[site] += extra
    error = sum(float(s[k:].sum()) for s, k in zip(spectra, ranks))
    params = sum(k * int(c) for k, c in zip(ranks, costs))
    return Allocation(ranks, params, error, method, error if lower is None else min(lower, error))


def allocate_serving(
    spectra: Sequence[Tensor], costs: Sequence[int], budget: int, rule: ServingRule, *, exact: bool | None = None
) -> Allocation:
    """``allocate_budget`` under a serving rule (``serving.ServingRule``): the least total error
    within ``budget`` among the allocations the rule allows, exact.

    - ``max_rank=R``: the same knapsack with each site's items past its R-th singular value
      removed (a site's items are taken largest first, so "rank <= R" is exactly "none of those");
      ``allocate_budget``'s exact search and its bound apply, the removed tail adds to both.
    - ``uniform``: rank k at every site (``min(k, its rank)``: truncation never expands), for every k
      from 1 to the largest numerical rank of a site; the affordable k of least error (ties: fewer
      parameters). No site is dropped: a budget below rank 1 everywhere is refused (ValueError).
    - ``buckets``: each site's rank is ``min(b, its rank)`` for a bucket b, by the exact multiple-choice
      knapsack ``serving.choose_per_item``; a site drops to 0 only when the budget does not pay for
      the smallest bucket at every site (the unconstrained planner's rule).
    """
    tails = [torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)]) for s in spectra]  # tails[l][k] = error(k)

    def allocation(ranks: list[int], method: str = "exact", bound: float | None = None) -> Allocation:
        error = sum(float(t[k]) for t, k in zip(tails, ranks))
        params = sum(k * int(c) for k, c in zip(ranks, costs))
        return Allocation(list(ranks), params, error, method, error if bound is None else min(bound, error))

    if rule.max_rank is not None:
        capped = allocate_budget([s[: rule.max_rank] for s in spectra], costs, budget, exact)
        beyond = sum(float(t[min(rule.max_rank, len(t) - 1)]) for t in tails)
        return allocation(capped.ranks, capped.method, capped.error_lower_bound + beyond)
    if rule.uniform:
        peak = max((float(s[0]) for s in spectra if len(s)), default=0.0)
        top = max([int((s > NEGLIGIBLE_SQUARED * peak).sum()) for s in spectra] + [1])
        plans = [allocation([min(k, len(s)) for s in spectra]) for k in range(1, top + 1)]
        affordable = [p for p in plans if p.params <= budget]
        if not affordable:
            raise ValueError(
                f"a budget of {budget} parameters does not pay for rank 1 at every site "
                f"(one rank for every site needs at least {plans[0].params})"
            )
        return min(affordable, key=lambda p: (p.error, p.params))
    choices = [sorted({min(b, len(s)) for b in rule.buckets}) for s in spectra]
    if sum(c[0] * int(w) for c, w in zip(choices, costs)) > budget:
        choices = [[0] + c if c[0] else c for c in choices]
    # the knapsack sees negligible values as 0, so that a larger bucket is not bought for roundoff
    peak = max((float(s[0]) for s in spectra if len(s)), default=0.0)
    kept = [torch.where(s > NEGLIGIBLE_SQUARED * peak, s, 0.0) for s in spectra]
    seen = [torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)]) for s in kept]
    picked = choose_per_item([[(k * int(w), float(t[k])) for k in c] for c, w, t in zip(choices, costs, seen)], budget)
    return allocation([c[j] for c, j in zip(choices, picked)])


# ---------------------------------------------------------------- one kind


@dataclass(frozen=True)
class TruncationResult(KindResult):
    """A kind truncated per site (method "lora"): site l is ``b_tensors[l] @ a_tensors[l]``.

    ``ranks[l]`` is site l's rank (``rank`` is the largest), ``site_singular_values[l]`` all of its
    singular values (float64), so the error of any other rank is known. ``spectrum`` merges every
    site's sigma^2, descending: since all sites of a kind cost the same per rank,
    ``energy - spectrum[:t].sum()`` is the least error with t ranks in total over the kind.
    """

    ranks: list[int] = field(default_factory=list)
    site_singular_values: list[Tensor] = field(default_factory=list)


def truncate_factors(kind: KindFactors, ranks: Sequence[int]) -> TruncationResult:
    """Each site of ``kind`` truncated to ``ranks[l]`` (capped at its own rank)."""
    if len(ranks) != kind.n_sites:
        raise ValueError(f"need one rank per site, got {len(ranks)} for {kind.n_sites} sites")
    sites = [truncate_site(a, bt, k, kind.out_dtype) for a, bt, k in zip(kind.as_, kind.bts, ranks)]
    positions = list(range(kind.n_sites))
    error = sum(s.error for s in sites)
    spectrum = torch.sort(torch.cat([s.singular_values.square() for s in sites]), descending=True).values
    return TruncationResult(
        method="lora",
        a_tensors=[s.a for s in sites],
        b_tensors=[s.b for s in sites],
        a_index=positions,
        b_index=positions,
        rank=max(s.rank for s in sites),
        groups=[[pos] for pos in positions],
        error=error,
        energy=sum(s.energy for s in sites),
        spectrum=spectrum,
        already_shared=kind.a_is_shared(),
        error_history=[error],
        ranks=[s.rank for s in sites],
        site_singular_values=[s.singular_values for s in sites],
    )


# ---------------------------------------------------------------- a whole adapter


@dataclass(frozen=True)
class KindTruncationPlan:
    """The ranks chosen for one kind's sites (in its order) and what they cost and leave.

    ``estimated_error`` is exact: the kind's sum of sigma^2 beyond each site's rank.
    """

    ranks: list[int]
    params: int
    estimated_error: float
    energy: float
    lora_params: int


@dataclass(frozen=True)
class TruncationPlan:
    """Per-site ranks for every kind, how they were chosen, and the totals over all kinds.

    ``allocation``: "rank" (explicit, or the default: every site kept whole), "energy", or for a
    budget "exact" / "greedy" (see ``allocate_budget``). ``budget`` is the parameter budget (None
    outside budget mode). ``error_lower_bound`` bounds the least error any allocation within the
    budget reaches (it equals ``error`` unless the allocation is "greedy").
    """

    kinds: dict[str, KindTruncationPlan]
    allocation: str
    budget: int | None
    params: int
    error: float
    energy: float
    lora_params: int
    error_lower_bound: float
    unconstrained: TruncationPlan | None = None  # with a serving rule: the plan without it, same budget


def plan_from_spectra(
    spectra: dict[str, list[Tensor]],
    shapes: dict[str, tuple[int, int]],
    lora_ranks: dict[str, list[int]],
    *,
    rank=None,
    energy: float | None = None,
    budget: float | None = None,
    exact: bool | None = None,
    serving: ServingRule | None = None,
) -> TruncationPlan:
    """``plan_truncation`` on given per-site spectra: ``spectra[name][l]`` is site l's error drop rank by
    rank, descending (its squared singular values, or a calibrated spectrum); ``shapes[name]`` is
    (n_out, n_in) and ``lora_ranks[name]`` the sites' ranks. ``serving`` (needs ``budget``): the plan
    of ``allocate_serving``, with the unconstrained plan at the same budget in ``unconstrained``."""
    if sum(x is not None for x in (rank, energy, budget)) > 1:
        raise ValueError("give at most one of rank, energy and budget")
    if serving is not None and budget is None:
        raise ValueError("a serving rule shapes a budget plan: give budget")
    names = list(spectra)
    width = {name: sum(shapes[name]) for name in names}
    lora = {name: sum(lora_ranks[name]) * width[name] for name in names}
    bound = None
    budget_params = None
    if budget is not None:
        if not budget > 0:
            raise ValueError(f"budget must be a positive fraction of the LoRA's parameters, got {budget}")
        budget_params = math.floor(budget * sum(lora.values()))
        flat = [s for name in names for s in spectra[name]]
        costs = [width[name] for name in names for _ in spectra[name]]
        chosen = (
            allocate_budget(flat, costs, budget_params, exact)
            if serving is None
            else allocate_serving(flat, costs, budget_params, serving, exact=exact)
        )
        ranks, start = {}, 0
        for name in names:
            ranks[name] = chosen.ranks[start : start + len(spectra[name])]
            start += len(spectra[name])
        allocation, bound = chosen.method, chosen.error_lower_bound
    elif energy is not None:
        ranks = {name: [rank_for_energy(s, energy) for s in spectra[name]] for name in names}
        allocation = "energy"
    else:

        def explicit(name):
            k = rank[name] if isinstance(rank, Mapping) else rank
            return ranks_for_rank(spectra[name], k) if k is not None else [len(s) for s in spectra[name]]

        ranks = {name: explicit(name) for name in names}
        allocation = "rank"
    kinds = {
        name: KindTruncationPlan(
            ranks=ranks[name],
            params=sum(ranks[name]) * width[name],
            estimated_error=sum(float(s[k:].sum()) for s, k in zip(spectra[name], ranks[name])),
            energy=sum(float(s.sum()) for s in spectra[name]),
            lora_params=lora[name],
        )
        for name in names
    }
    error = sum(p.estimated_error for p in kinds.values())
    free = None if serving is None else plan_from_spectra(spectra, shapes, lora_ranks, budget=budget, exact=exact)
    return TruncationPlan(
        kinds,
        allocation,
        budget_params,
        params=sum(p.params for p in kinds.values()),
        error=error,
        energy=sum(p.energy for p in kinds.values()),
        lora_params=sum(lora.values()),
        error_lower_bound=error if bound is None else bound,
        unconstrained=free,
    )


def plan_truncation(
    kinds: Mapping[str, tuple[list[Tensor], list[Tensor]]],
    *,
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    budget: float | None = None,
    exact: bool | None = None,
    serving: ServingRule | None = None,
) -> TruncationPlan:
    """Per-site ranks for plain LoRA truncation of every kind: explicit, by energy or by budget
    (under a ``serving`` rule: see ``plan_from_spectra``).

    ``kinds`` maps a kind's name to its ``(As, Bts)`` (scale folded into the Bts). Only the
    sites' singular values are computed (one kind's float64 copies at a time).
    """
    spectra, shapes, lora_ranks = {}, {}, {}
    for name, (As, Bts) in kinds.items():
        kind = KindFactors.from_lists(As, Bts)
        spectra[name] = [site_singular_values(a, bt).square() for a, bt in zip(kind.as_, kind.bts)]
        shapes[name] = (kind.n_out, kind.n_in)
        lora_ranks[name] = [a.shape[0] for a in kind.as_]
    return plan_from_spectra(
        spectra, shapes, lora_ranks, rank=rank, energy=energy, budget=budget, exact=exact, serving=serving
    )
