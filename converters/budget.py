"""Choosing each kind's rank (and ASLoRA's number of groups).

Three modes, exclusive:

- explicit ``rank`` (per kind or for all; it may exceed the LoRA rank);
- ``energy=f``: per kind, the cheapest setting whose retained energy ``1 - error/energy`` reaches
  f (if none does, e.g. ShareAB whose error cannot fall below the sites' scatter around their
  mean, the setting with the least error);
- ``budget=f``: a parameter budget of f times the LoRA's parameter count over all kinds, spent
  for the least total error, exactly (a knapsack over the kinds' options, see ``spend_budget``).

Defaults (no mode given), cited by the CLI's help:
- every form: rank = the largest LoRA rank of the kind (``DEFAULT_RANK_RULE``);
- ASLoRA: groups = the most groups that keep the kind within ``DEFAULT_ASLORA_BUDGET`` of its
  LoRA parameters at that rank (the paper's "less than 25%": 5 groups for RoBERTa-base r=8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from torch import Tensor

from .aslora import aslora_error_table
from .counting import lora_parameter_count
from .factored import kind_energy
from .forms import shared_form
from .serving import ServingRule
from .types import ENERGY_SLACK, KindFactors, KindPlan, Option

DEFAULT_RANK_RULE = "largest LoRA rank of the kind"
DEFAULT_ASLORA_BUDGET = 0.25
# ASLoRA planning scores every (rank, groups) pair with one grouping run per rank, so the
# candidate ranks stop at this multiple of the LoRA rank (sharea/shareb/shareab use all ranks).
ASLORA_PLAN_RANK_FACTOR = 2


def rank_cap(method: str, kind: KindFactors) -> int:
    """Largest rank the form allows while its shared factor keeps orthonormal rows/columns."""
    return shared_form(method).rank_cap(kind)


def kind_parameter_count(method: str, kind: KindFactors, rank: int, groups: int | None = None) -> int:
    return shared_form(method).parameter_count(kind.n_out, kind.n_in, kind.n_sites, rank=rank, groups=groups)


def kind_lora_parameter_count(kind: KindFactors) -> int:
    return lora_parameter_count(kind.n_out, kind.n_in, [a.shape[0] for a in kind.as_])


def default_groups(kind: KindFactors, rank: int, fraction: float = DEFAULT_ASLORA_BUDGET) -> int:
    """Most ASLoRA groups within ``fraction`` of the kind's LoRA parameters at ``rank`` (>= 1)."""
    allowed = fraction * kind_lora_parameter_count(kind) - rank * kind.n_in
    return max(1, min(kind.n_sites, math.floor(allowed / (rank * kind.n_out))))


def kind_options(
    method: str, kind: KindFactors, max_rank: int | None = None, groups: int | None = None, grouping: str = "any"
) -> list[Option]:
    """Every candidate setting of a kind up to ``max_rank`` with its parameters and error.

    A form with a spectrum (sharea/shareb/shareab): ranks 1..max_rank with the exact error
    ``energy - spectrum[:k].sum()`` (default max_rank: the spectrum's length, beyond which the error
    no longer falls). A grouped form (aslora): pairs (k, G) (G fixed when ``groups`` is given) with the estimate of
    ``aslora_error_table`` (default max_rank: ``ASLORA_PLAN_RANK_FACTOR`` times the LoRA rank).
    """
    form = shared_form(method)
    cap = form.rank_cap(kind)
    if form.grouped:
        top = max_rank or ASLORA_PLAN_RANK_FACTOR * kind.max_rank
        ranks = list(range(1, min(top, cap) + 1))
        table = aslora_error_table(kind, ranks, grouping)
        group_counts = [min(groups, kind.n_sites)] if groups else range(1, kind.n_sites + 1)
        return [
            Option(k, g, kind_parameter_count(method, kind, k, g), table[k][g - 1]) for k in ranks for g in group_counts
        ]
    spectrum = form.spectrum(kind)
    energy = kind_energy(kind.bts, kind.as_)
    top = min(max_rank or max(len(spectrum), 1), cap)
    head = spectrum[:top].cumsum(0).tolist() + [float(spectrum[:top].sum())] * max(0, top - len(spectrum))
    return [
        Option(k, None, kind_parameter_count(method, kind, k), max(energy - head[k - 1], 0.0))
        for k in range(1, top + 1)
    ]


def choose_by_energy(options: list[Option], energy: float, fraction: float) -> Option:
    """Cheapest option keeping ``fraction`` of the energy (least error among equally cheap);
    the least-error option when none reaches it."""
    allowed = (1.0 - fraction) * energy + ENERGY_SLACK * energy
    reaching = [o for o in options if o.error <= allowed]
    if reaching:
        return min(reaching, key=lambda o: (o.params, o.error))
    return min(options, key=lambda o: (o.error, o.params))


def pareto_front(options: list[Option]) -> list[Option]:
    """Options not beaten by a cheaper-or-equal one: ascending params, strictly falling error."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.params, o.error)):
        if not front or o.error < front[-1].error:
            front.append(o)
    return front


# relative margin of the knapsack's pruning (``spend_budget``), far above float64 summation error
PRUNE_MARGIN = 1e-9


def _relaxed(fronts) -> tuple[np.ndarray, np.ndarray]:
    """The linear relaxation of choosing one option from each of ``fronts`` (Pareto fronts): the least
    total error as a piecewise linear function of the parameters, as (parameters, error) breakpoints:
    from every kind's cheapest option, along every kind's lower convex hull, steepest segments first.
    At any parameters it is at most the least error of a choice that costs no more (a lower bound)."""
    base_params, base_error, segments = 0, 0.0, []
    for front in fronts:
        hull = []
        for o in front:  # ascending parameters, falling error: the lower convex hull
            while len(hull) >= 2 and (hull[-1].error - hull[-2].error) * (o.params - hull[-1].params) >= (
                o.error - hull[-1].error
            ) * (hull[-1].params - hull[-2].params):
                hull.pop()
            hull.append(o)
        base_params, base_error = base_params + hull[0].params, base_error + hull[0].error
        segments += [(b.params - a.params, b.error - a.error) for a, b in zip(hull, hull[1:])]
    segments.sort(key=lambda s: s[1] / s[0])  # the most error removed per parameter first
    params = np.cumsum([base_params] + [p for p, _ in segments], dtype=np.float64)
    errors = np.cumsum([base_error] + [e for _, e in segments], dtype=np.float64)
    return params, errors


def _relaxed_feasible(params: np.ndarray, errors: np.ndarray, budget: int) -> float:
    """A total error some choice within ``budget`` reaches: the relaxation's last breakpoint that fits
    (a hull vertex of every kind)."""
    return float(errors[np.searchsorted(params, budget, side="right") - 1])


def spend_budget(options: Mapping[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per kind with total parameters <= ``budget`` and the least total error: exact.

    A multiple-choice knapsack solved by dynamic programming over the kinds (sorted by name): the
    states after each kind are the Pareto front of (parameters spent, error so far), each with a
    pointer to the option that made it; a state that cannot leave room for the remaining kinds'
    cheapest options is dropped. Only Pareto-optimal options of a kind can be in an optimum, and
    a dominated partial sum cannot lead to a better total, so the last front's least error is the
    optimum. Ties go to the fewer parameters. The states are at most the distinct parameter totals
    within the budget; on a LLaMA-7B-shaped ASLoRA (7 kinds, 32 layers, ranks 1-32 x groups 1-32)
    this takes about a second.
    """
    fronts = {name: pareto_front(opts) for name, opts in options.items()}
    names = sorted(fronts)
    rest = [0] * (len(names) + 1)  # cheapest total of the kinds from i on
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + fronts[names[i]][0].params
    if rest[0] > budget:
        raise ValueError(
            f"budget of {budget} parameters is below the minimum of {rest[0]} (rank 1, one group, in every kind)"
        )
    # the states as arrays, ascending parameters, strictly falling error; per kind, (state, option) of each
    params, errors = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64)
    steps = []
    bounds = [_relaxed(fronts[n] for n in names[i:]) for i in range(len(names) + 1)]
    best_known = _relaxed_feasible(*bounds[0], budget)
    for i, name in enumerate(names):
        room = budget - rest[i + 1]
        front = fronts[name]  # ascending parameters
        grown_params, grown_errors, grown_from, grown_option = [], [], [], []
        for j, option in enumerate(front):
            fits = np.flatnonzero(params + option.params <= room)
            if not len(fits):
                break  # the dearer options fit no state either
            grown_params.append(params[fits] + option.params)
            grown_errors.append(errors[fits] + option.error)
            grown_from.append(fits)
            grown_option.append(np.full(len(fits), j))
        grown = [np.concatenate(g) for g in (grown_params, grown_errors, grown_from, grown_option)]
        # least parameters, then least error; full ties in the order state by state, option by option
        order = np.lexsort((grown[3], grown[2], grown[1], grown[0]))
        grown = [g[order] for g in grown]
        # the Pareto front: a state whose error is below every earlier one's (float64 as Python's floats)
        earlier = np.minimum.accumulate(np.concatenate(([np.inf], grown[1][:-1])))
        keep = grown[1] < earlier
        # a state whose least possible total (its error plus the relaxed bound of the kinds after it, in
        # the room it leaves) is over a known solution's leads to no optimum: dropped. The margin covers
        # the float sums' order, so every state an optimum (or a tie of it) passes through stays.
        least = grown[1] + np.interp(budget - grown[0], *bounds[i + 1], left=np.inf)
        keep &= least <= best_known + PRUNE_MARGIN * abs(best_known) + PRUNE_MARGIN
        params, errors = grown[0][keep], grown[1][keep]
        steps.append((grown[2][keep], grown[3][keep]))
    state, chosen = len(params) - 1, {}  # the front's last state has the least error
    for name, (came_from, option) in zip(reversed(names), reversed(steps)):
        chosen[name] = fronts[name][option[state]]
        state = came_from[state]
    return {name: chosen[name] for name in names}


def _per_kind(value, name: str):
    return value[name] if isinstance(value, Mapping) else value


def spend_serving(options: Mapping[str, list[Option]], budget: int, rule: ServingRule) -> dict[str, Option]:
    """``spend_budget`` among the options ``rule`` allows (``serving.ServingRule``; ranks per kind): exact.

    ``max_rank``/``buckets``: each kind's options filtered by rank, then the same knapsack.
    ``uniform``: for every rank k that every kind offers, the knapsack over the kinds' options at
    rank k (ASLoRA still chooses its groups per kind); the k of least total error (ties: fewer
    parameters, then the smaller k). ValueError when nothing allowed fits.
    """
    if not rule.uniform:
        allowed = {name: [o for o in opts if rule.allows(o.rank)] for name, opts in options.items()}
        empty = sorted(name for name, opts in allowed.items() if not opts)
        if empty:
            ranks = sorted({o.rank for o in options[empty[0]]})
            raise ValueError(
                f"{rule.describe()} allows none of the ranks of {empty[0]} ({ranks[0]}-{ranks[-1]} for this form)"
            )
        return spend_budget(allowed, budget)
    best, best_key = None, None
    for k in sorted({o.rank for opts in options.values() for o in opts}):
        at_k = {name: [o for o in opts if o.rank == k] for name, opts in options.items()}
        if not all(at_k.values()):
            continue
        try:
            chosen = spend_budget(at_k, budget)
        except ValueError:  # the budget does not pay for rank k in every kind
            continue
        key = (sum(o.error for o in chosen.values()), sum(o.params for o in chosen.values()))
        if best_key is None or key < best_key:
            best, best_key = chosen, key
    if best is None:
        raise ValueError(f"a budget of {budget} parameters does not pay for one rank in every kind")
    return best


def plan(
    method: str,
    kinds: Mapping[str, tuple[list[Tensor], list[Tensor]]],
    *,
    rank: int | Mapping[str, int] | None = None,
    groups: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    budget: float | None = None,
    grouping: str = "any",
    serving: ServingRule | None = None,
) -> dict[str, KindPlan]:
    """Rank (and groups) per kind for ``method``: explicit, by energy, by budget, or the defaults.

    ``kinds`` maps a kind's name to its ``(As, Bts)`` with the scale folded into the Bts.
    ``serving`` (needs ``budget``): the budget is spent under that rule (``plan_serving``).
    """
    if serving is not None:
        return plan_serving(method, kinds, budget=budget, serving=serving, groups=groups, grouping=grouping)[0]
    shared_form(method)  # an unknown name is refused before the options are
    if sum(x is not None for x in (rank, energy, budget)) > 1:
        raise ValueError("give at most one of rank, energy and budget")
    factors = {name: KindFactors.from_lists(As, Bts) for name, (As, Bts) in kinds.items()}
    fixed_groups = {name: _per_kind(groups, name) if groups is not None else None for name in factors}

    def options(name: str) -> list[Option]:
        return kind_options(method, factors[name], groups=fixed_groups[name], grouping=grouping)

    if budget is not None:
        chosen = spend_budget({name: options(name) for name in factors}, _budget_params(factors, budget))
    elif energy is not None:
        chosen = {
            name: choose_by_energy(options(name), kind_energy(f.bts, f.as_), energy) for name, f in factors.items()
        }
    else:
        chosen = {
            name: _explicit_option(
                method, f, _per_kind(rank, name) if rank is not None else None, fixed_groups[name], grouping
            )
            for name, f in factors.items()
        }
    return _kind_plans(factors, chosen)


def plan_serving(
    method: str,
    kinds: Mapping[str, tuple[list[Tensor], list[Tensor]]],
    *,
    budget: float,
    serving: ServingRule,
    groups: int | Mapping[str, int] | None = None,
    grouping: str = "any",
) -> tuple[dict[str, KindPlan], dict[str, KindPlan]]:
    """(the plan under ``serving``, the unconstrained plan) at the same ``budget``, from one set of options.

    The options are ``kind_options``' (ranks past the default candidates only where a bucket asks
    for them; ``max_rank``/``uniform`` need none: the error no longer falls there)."""
    shared_form(method)
    if budget is None:
        raise ValueError("a serving rule shapes a budget plan: give budget")
    factors = {name: KindFactors.from_lists(As, Bts) for name, (As, Bts) in kinds.items()}
    params = _budget_params(factors, budget)
    free_options, options = {}, {}
    for name, f in factors.items():
        g = _per_kind(groups, name) if groups is not None else None
        free_options[name] = options[name] = kind_options(method, f, groups=g, grouping=grouping)
        top = max(o.rank for o in options[name])
        if serving.buckets and serving.buckets[-1] > top:
            extra = kind_options(method, f, max_rank=serving.buckets[-1], groups=g, grouping=grouping)
            options[name] = options[name] + [o for o in extra if o.rank > top]
    constrained = spend_serving(options, params, serving)
    return _kind_plans(factors, constrained), _kind_plans(factors, spend_budget(free_options, params))


def _budget_params(factors: Mapping[str, KindFactors], budget: float) -> int:
    return math.floor(budget * sum(kind_lora_parameter_count(k) for k in factors.values()))


def _kind_plans(factors: Mapping[str, KindFactors], chosen: Mapping[str, Option]) -> dict[str, KindPlan]:
    return {
        name: KindPlan(
            rank=o.rank,
            groups=o.groups,
            params=o.params,
            estimated_error=o.error,
            energy=kind_energy(factors[name].bts, factors[name].as_),
            lora_params=kind_lora_parameter_count(factors[name]),
        )
        for name, o in chosen.items()
    }


def _explicit_option(method: str, kind: KindFactors, rank: int | None, groups: int | None, grouping: str) -> Option:
    """The option for a given (or default) rank, capped like the converters cap it."""
    k = min(rank if rank is not None else kind.max_rank, rank_cap(method, kind))
    if shared_form(method).grouped:
        g = min(groups, kind.n_sites) if groups is not None else default_groups(kind, k)
        error = aslora_error_table(kind, [k], grouping)[k][g - 1]
        return Option(k, g, kind_parameter_count(method, kind, k, g), error)
    return next(o for o in kind_options(method, kind, max_rank=k) if o.rank == k)
