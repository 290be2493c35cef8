"""Converter contracts that survivors of tests/mutation/mutation.sh converters pointed at (issue 20):
the one-line error messages, each result's method and spectrum, the public ``spectrum``, the zero
and all-negligible budget corners, plan fields in every mode, and ``orthonormal_complement``.

References are independent: dense SVDs of the multiplied-out updates, brute force over every
rank vector or option combination, and the documented formulas for counts and defaults.
"""

import itertools
import re

import pytest
import torch

import converters
from converters import truncate
from converters.aslora import aslora_error_table
from converters.budget import kind_options, pareto_front, plan, rank_cap, spend_budget
from converters.factored import orthonormal_complement, shared_rows
from converters.grouping import group_points, grouping_costs, ward_tree
from converters.types import KindFactors, Option
from tests.converters_reference import F64, dense_updates, energy, random_kind


def _kind(seed, n_sites=4, n_out=7, n_in=6, ranks=2, **kw):
    return random_kind(torch.Generator().manual_seed(seed), n_sites, n_out, n_in, ranks=ranks, dtype=F64, **kw)


def _over_the_exact_limit():
    """Five costs (gcd 1, radius 2*19-1 = 37): the search box is about 75^4 > EXACT_CANDIDATE_LIMIT."""
    costs = [7, 11, 13, 17, 19]
    spectra = [torch.linspace(10.0, 1.0, 150, dtype=F64) for _ in costs]
    return spectra, costs, sum(costs) * 75


_SITE = torch.tensor([4.0, 1.0], dtype=F64)
_AS, _BTS = _kind(60)
_S = [torch.eye(converters.calibration_basis(_AS).shape[1], dtype=F64)] * 4

BAD_CALLS = [
    # A 1-D A with a matching B: only the dimension check catches it
    (
        lambda: truncate.truncate_site(torch.ones(3), torch.ones(4, 3), 1),
        "need A (r, n_in) and B (n_out, r), got (3,) and (4, 3)",
    ),
    # matrices whose inner sizes differ: only the shape check catches it
    (
        lambda: truncate.truncate_site(torch.ones(3, 5), torch.ones(4, 2), 1),
        "need A (r, n_in) and B (n_out, r), got (3, 5) and (4, 2)",
    ),
    (lambda: truncate.truncate_site(torch.ones(2, 5), torch.ones(4, 2), -1), "rank must be non-negative, got -1"),
    (lambda: truncate.rank_for_energy(_SITE, 0.0), "energy fraction must be in (0, 1], got 0.0"),
    (lambda: truncate.rank_for_energy(_SITE, 1.5), "energy fraction must be in (0, 1], got 1.5"),
    (lambda: truncate.allocate_budget([_SITE], [3, 4], 9), "need one cost per site, got 2 costs for 1 sites"),
    (lambda: truncate.allocate_budget([_SITE], [0], 9), "every site's cost per rank must be positive"),
    (lambda: truncate.allocate_budget([_SITE], [3], -1), "budget must be non-negative, got -1"),
    (
        lambda: truncate.allocate_budget(*_over_the_exact_limit(), exact=True),
        f"the exact budget search exceeds {truncate.EXACT_CANDIDATE_LIMIT} candidates",
    ),
    (
        lambda: converters.plan_truncation({"k": (_AS, _BTS)}, rank=1, energy=0.5),
        "give at most one of rank, energy and budget",
    ),
    (
        lambda: converters.plan_truncation({"k": (_AS, _BTS)}, budget=0),
        "budget must be a positive fraction of the LoRA's parameters, got 0",
    ),
    (lambda: grouping_costs(torch.ones(3, 2), "nearby"), "grouping must be one of ('any', 'adjacent'), got 'nearby'"),
    (lambda: group_points(torch.ones(3, 2), 2, "nearby"), "grouping must be one of ('any', 'adjacent'), got 'nearby'"),
    (lambda: converters.parameter_count("aslora", 4, 5, 3, 2), "aslora needs the number of groups"),
    (
        lambda: converters.parameter_count("dora", 4, 5, 3, 2),
        "method must be 'lora' or one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'",
    ),
    (
        lambda: rank_cap("lora", KindFactors.from_lists(_AS, _BTS)),
        "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'lora'",
    ),
    (
        lambda: plan("dora", {"k": (_AS, _BTS)}),
        "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'",
    ),
    (lambda: plan("sharea", {"k": (_AS, _BTS)}, rank=1, budget=0.5), "give at most one of rank, energy and budget"),
    # the minimum is every kind's cheapest option together (10 + 20), not the later kinds' alone
    (
        lambda: spend_budget({"x": [Option(1, None, 10, 1.0)], "y": [Option(1, None, 20, 1.0)]}, 29),
        "budget of 29 parameters is below the minimum of 30 (rank 1, one group, in every kind)",
    ),
    (lambda: KindFactors.from_lists([], []), "need the same positive number of A's and B's, got 0 and 0"),
    (lambda: KindFactors.from_lists(_AS[:1] + [torch.ones(6)], _BTS[:2]), "site 1: A and B must be matrices"),
    (
        lambda: KindFactors.from_lists(_AS[:1] + [torch.ones(2, 5)], _BTS[:2]),
        "site 1: shape A (2, 5) / B (7, 2) differs from the kind's (n_out=7, n_in=6)",
    ),
    (
        lambda: KindFactors.from_lists(_AS[:1] + [torch.ones(2, 6)], _BTS[:1] + [torch.ones(7, 3)]),
        "site 1: B has 3 columns but A has 2 rows",
    ),
    (
        lambda: converters.convert_kind_calibrated("dora", _AS, _BTS, _S, 1),
        "method must be one of ('lora', 'sharea', 'shareb', 'shareab', 'aslora'), got 'dora'",
    ),
    (
        lambda: converters.convert_kind_calibrated("sharea", _AS, _BTS, _S, [1] * 4),
        "one rank per site is for method 'lora' only, got 'sharea'",
    ),
    (lambda: converters.convert_kind_calibrated("shareb", _AS, _BTS, _S, 0), "rank must be positive, got 0"),
    (
        lambda: converters.convert_kind_calibrated("aslora", _AS, _BTS, _S, 1),
        "aslora needs groups (a count, see converters.default_groups, or a partition)",
    ),
    (lambda: converters.spectrum("aslora", _AS, _BTS), "spectrum is defined for sharea, shareb, shareab, got 'aslora'"),
    (
        lambda: orthonormal_complement(torch.eye(5, 3, dtype=F64), 3),
        "cannot add 3 orthonormal directions to 3 in dimension 5",
    ),
    (
        lambda: shared_rows(torch.eye(5, 2, dtype=F64), torch.eye(2, dtype=F64), 0),
        "rank 0 must be between 1 and 5 (orthonormal rows of length 5)",
    ),
    (lambda: converters.convert_kind("sharea", _AS, _BTS, rank=0), "rank must be positive, got 0"),
    (
        lambda: converters.convert_kind("aslora", _AS, _BTS, rank=1),
        "aslora needs groups (see converters.default_groups)",
    ),
    (
        lambda: converters.convert_kind("aslora", _AS, _BTS, rank=1, groups=0),
        "rank and groups must be positive, got rank=1, groups=0",
    ),
    (
        lambda: converters.convert_kind("dora", _AS, _BTS, rank=1),
        "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'",
    ),
]


@pytest.mark.parametrize("call, message", BAD_CALLS)
def test_bad_calls_raise_their_one_line_message(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def _dense_spectrum(method, As, Bts):
    """The error drop of each added rank, from dense SVDs of the stacks (or of the mean update)."""
    dws = dense_updates(As, Bts)
    if method == "sharea":
        return torch.linalg.svdvals(torch.cat(dws, dim=0)).square()
    if method == "shareb":
        return torch.linalg.svdvals(torch.cat(dws, dim=1)).square()
    return len(dws) * torch.linalg.svdvals(torch.stack(dws).mean(0)).square()


@pytest.mark.parametrize("method", ["sharea", "shareb", "shareab"])
def test_spectrum_and_method_fields_match_dense_references(method):
    As, Bts = _kind(61, n_sites=3, n_out=7, n_in=5)
    want = _dense_spectrum(method, As, Bts)
    result = converters.convert_kind(method, As, Bts, rank=2)
    assert result.method == method and result.error_history == [result.error]
    assert result.groups == ([[0], [1], [2]] if method == "sharea" else [[0, 1, 2]])
    for got in (converters.spectrum(method, As, Bts), result.spectrum):
        got = got.double()
        n = min(len(got), len(want))
        torch.testing.assert_close(got[:n], want[:n], rtol=1e-9, atol=1e-9 * float(want[0]))
        assert float(got[n:].sum()) + float(want[n:].sum()) <= 1e-9 * float(want[0])  # the rest is zero
    other = converters.convert_kind("aslora", As, Bts, rank=2, groups=2)
    assert other.method == "aslora" and converters.truncate_kind(As, Bts, 1).method == "lora"


def test_shared_a_means_every_a_equals_the_first_within_a_relative_tolerance():
    def shared(As):
        return KindFactors.from_lists(As, [torch.ones(3, a.shape[0], dtype=F64) for a in As]).a_is_shared()

    a = torch.randn(2, 4, generator=torch.Generator().manual_seed(73), dtype=F64) * 1e3
    assert shared([a, a + 1e-5, a.clone()])  # 1e-8 of the largest entry: roundoff
    assert not shared([a, a.clone(), a + 1e-2])  # the last site differs too
    assert shared([torch.zeros(2, 4, dtype=F64)] * 3)  # all-zero A's are identical
    assert shared([torch.zeros(0, 4, dtype=F64)] * 2)  # rank-0 sites: nothing to differ
    one = torch.tensor([[2.0]], dtype=F64)
    assert shared([one, one.clone()]) and not shared([one, 1.5 * one])


def test_transposed_kind_keeps_the_output_dtype():
    As, Bts = _kind(62)
    kind = KindFactors.from_lists([a.half() for a in As], [b.half() for b in Bts])
    assert kind.out_dtype == kind.transposed().out_dtype == torch.float32


# ---------------------------------------------------------------- budget corners of truncation


def _brute_force(spectra, costs, budget):
    """Least total tail over every rank vector within the budget (rank >= 1 everywhere when affordable)."""
    floors = [min(1, len(s)) for s in spectra]
    if sum(f * c for f, c in zip(floors, costs)) > budget:
        floors = [0] * len(spectra)
    best = None
    for ranks in itertools.product(*(range(f, len(s) + 1) for f, s in zip(floors, spectra))):
        if sum(k * c for k, c in zip(ranks, costs)) <= budget:
            error = sum(float(s[k:].sum()) for s, k in zip(spectra, ranks))
            best = error if best is None else min(best, error)
    return best


def test_budget_without_items_and_with_negligible_values():
    # no site has a value to buy: nothing to allocate, every rank stays at its floor
    empty = truncate.allocate_budget([torch.zeros(0, dtype=F64)] * 2, [3, 4], 20)
    assert (empty.ranks, empty.params, empty.error, empty.method) == ([0, 0], 0, 0.0, "exact")
    # all-zero updates: a generous budget still gives no site rank beyond 1
    zero = truncate.allocate_budget([torch.zeros(3, dtype=F64)] * 2, [3, 4], 100)
    assert zero.ranks == [1, 1] and zero.error == 0.0
    # negligible is relative to the largest value (1e-20 of 1e6 is roundoff), whatever the scale
    for scale in (1.0, 1e6):
        site = torch.tensor([scale, 1e-26 * scale], dtype=F64)
        assert truncate.allocate_budget([site], [4], 100).ranks == [1]
    # a cost of 1 per rank is a valid cost
    assert truncate.allocate_budget([_SITE], [1], 2).ranks == [2]


def test_greedy_fills_an_exact_fit_and_its_bound_stays_below_the_optimum():
    # after rank 1 everywhere (cost 5) 4 parameters are left: site 0's 0.9 (cost 3) has the better
    # ratio, but site 1's two 0.5's (cost 2 each) are the optimum
    spectra = [torch.tensor([5.0, 0.9], dtype=F64), torch.tensor([5.0, 0.5, 0.5], dtype=F64)]
    greedy = truncate.allocate_budget(spectra, [3, 2], 9, exact=False)
    exact = truncate.allocate_budget(spectra, [3, 2], 9)
    optimum = _brute_force(spectra, [3, 2], 9)
    assert exact.error == pytest.approx(optimum, abs=1e-12) and exact.method == "exact"
    assert greedy.method == "greedy" and greedy.error > optimum + 0.05
    assert greedy.error_lower_bound <= optimum + 1e-12
    # 2 parameters left after the critical 0.9 does not fit: the greedy still takes a 0.5 (exact fit)
    fit = truncate.allocate_budget(spectra, [3, 2], 7, exact=False)
    assert fit.ranks == [1, 2] and fit.params == 7
    assert fit.error == pytest.approx(_brute_force(spectra, [3, 2], 7), abs=1e-12)


def test_truncation_plan_fields_in_every_mode():
    """Three kinds of 1, 2 and 2 sites: the budget's ranks go back to the right kind (brute force over
    all 5 sites), the totals are the kinds' sums and the lower bound is the error unless greedy."""
    kinds = {
        "a": _kind(63, n_sites=1, n_out=5, n_in=4),
        "b": _kind(64, n_sites=2, n_out=3, n_in=6),
        "c": _kind(65, n_sites=2, n_out=8, n_in=8),
    }
    widths = {"a": 9, "b": 9, "c": 16}
    lora = {name: 2 * len(As) * widths[name] for name, (As, _) in kinds.items()}
    spectra = {name: [torch.linalg.svdvals(d).square()[:2] for d in dense_updates(*k)] for name, k in kinds.items()}
    for mode in ({"rank": 1}, {"energy": 0.8}, {}, {"budget": 0.6}):
        p = converters.plan_truncation(kinds, **mode)
        assert p.lora_params == sum(lora.values()) and p.energy == pytest.approx(
            sum(energy(*k) for k in kinds.values())
        )
        assert p.error == pytest.approx(sum(kp.estimated_error for kp in p.kinds.values()))
        for name, kp in p.kinds.items():
            assert kp.lora_params == lora[name] and kp.energy == pytest.approx(energy(*kinds[name]))
            assert kp.estimated_error == pytest.approx(
                sum(float(s[k:].sum()) for s, k in zip(spectra[name], kp.ranks)), abs=1e-9
            )
        if "budget" not in mode:
            assert p.budget is None and p.error_lower_bound == p.error
    p = converters.plan_truncation(kinds, budget=0.6)
    flat = [s for name in kinds for s in spectra[name]]
    costs = [widths[name] for name in kinds for _ in spectra[name]]
    assert p.budget == int(0.6 * sum(lora.values())) and p.params <= p.budget
    assert p.error == pytest.approx(_brute_force(flat, costs, p.budget), abs=1e-9)
    assert p.error_lower_bound == p.error and p.allocation == "exact"
    greedy = converters.plan_truncation(kinds, budget=0.6, exact=False)
    assert greedy.allocation == "greedy" and greedy.error_lower_bound <= p.error + 1e-12
    alone = truncate.allocate_budget(flat, costs, p.budget, exact=False)  # the plan reports the greedy's own bound
    assert greedy.error_lower_bound == pytest.approx(alone.error_lower_bound, rel=1e-9)
    assert greedy.error_lower_bound < greedy.error - 1e-3  # this greedy is not exact: its bound is below it
    assert greedy.error == pytest.approx(alone.error, rel=1e-9)


# ---------------------------------------------------------------- share-form planning


def test_options_stop_at_the_spectrum_and_the_front_falls_strictly():
    (a,), (bt,) = _kind(66, n_sites=1, ranks=1)  # one site of rank 1: a spectrum of length 1
    kind = KindFactors.from_lists([a], [bt])
    assert [o.rank for o in kind_options("sharea", kind)] == [1]
    options = [Option(1, None, 10, 5.0), Option(2, None, 20, 5.0), Option(3, None, 30, 1.0), Option(4, None, 40, 1.0)]
    assert pareto_front(options) == [options[0], options[2]]


def test_budget_ties_go_to_the_fewer_parameters():
    """Least total error 0.5 at 30 and at 40 parameters: the cheaper one is chosen (brute force)."""
    options = {
        "x": [Option(1, None, 10, 0.5), Option(2, None, 30, 0.0)],
        "y": [Option(1, None, 10, 0.5), Option(2, None, 20, 0.0)],
    }
    combos = [c for c in itertools.product(options["x"], options["y"]) if sum(o.params for o in c) <= 45]
    best = min(combos, key=lambda c: (sum(o.error for o in c), sum(o.params for o in c)))
    chosen = spend_budget(options, 45)
    assert (chosen["x"], chosen["y"]) == best


def test_aslora_plan_keeps_fixed_groups_and_grouping_in_every_mode():
    kinds = {"q": _kind(45, n_sites=5, n_out=9, n_in=7, ranks=3), "v": _kind(67, n_sites=5, n_out=6, n_in=7, ranks=3)}
    lora = {name: 3 * 5 * (n + 7) for name, n in (("q", 9), ("v", 6))}
    per_kind = plan("aslora", kinds, rank=2, groups={"q": 3, "v": 1})
    assert {name: p.groups for name, p in per_kind.items()} == {"q": 3, "v": 1}
    for mode in ({"energy": 0.9}, {"budget": 0.4}):
        for grouping in ("any", "adjacent"):
            plans = plan("aslora", kinds, groups=2, grouping=grouping, **mode)
            for name, p in plans.items():
                assert p.groups == 2
                assert p.lora_params == lora[name] and p.energy == pytest.approx(energy(*kinds[name]))
                table = aslora_error_table(KindFactors.from_lists(*kinds[name]), [p.rank], grouping)
                assert p.estimated_error == pytest.approx(table[p.rank][1], rel=1e-12, abs=1e-12)
    # the estimates differ between the groupings on "q" (seed 45: its best pairs are not neighbours)
    assert (
        plan("aslora", kinds, groups=2, grouping="adjacent", energy=0.9)["q"].estimated_error
        != plan("aslora", kinds, groups=2, grouping="any", energy=0.9)["q"].estimated_error
    )


def test_grouping_defaults_are_any():
    """The documented default grouping is Ward ("any"): its costs are the scatter of its partitions."""
    gen = torch.Generator().manual_seed(68)
    points = torch.randn(5, 3, generator=gen, dtype=F64)
    tree = ward_tree(points)

    def scatter(groups):
        return sum(float((points[g] - points[g].mean(0)).square().sum()) for g in groups)

    costs = grouping_costs(points)
    assert costs == pytest.approx([scatter(tree.partition(g)) for g in range(1, 6)], abs=1e-12)
    assert group_points(points, 2) == tree.partition(2)
    kind = KindFactors.from_lists(*_kind(45, n_sites=5, n_out=9, n_in=7, ranks=3))
    assert aslora_error_table(kind, [2]) == aslora_error_table(kind, [2], "any")
    assert aslora_error_table(kind, [2]) != aslora_error_table(kind, [2], "adjacent")


@pytest.mark.parametrize("grouping", ["any", "adjacent"])
def test_weighted_grouping_is_the_weighted_brute_force_on_three_points(grouping):
    """Three points into two groups: one pair and a singleton, so Ward's single merge and the DP are
    both the weighted optimum. The heavy pair at 0 and 1 moves the pair from (0, 1) to (1, 2)."""
    points = torch.tensor([[0.0], [1.0], [2.2]], dtype=F64)
    weights = [100.3, 99.7, 1.1]  # a float list: kept in float64, not read as float32

    def weighted_scatter(groups):
        total = 0.0
        for g in groups:
            w = torch.tensor([weights[i] for i in g], dtype=F64)
            mean = (w[:, None] * points[g]).sum(0) / w.sum()
            total += float((w[:, None] * (points[g] - mean).square()).sum())
        return total

    candidates = [[[0], [1, 2]], [[0, 1], [2]], [[0, 2], [1]]]
    if grouping == "adjacent":
        candidates = candidates[:2]
    best = min(candidates, key=weighted_scatter)
    assert best == [[0], [1, 2]] and group_points(points, 2) == [[0, 1], [2]]
    assert group_points(points, 2, grouping, weights=weights) == best
    if grouping == "any":
        assert ward_tree(points, weights).cost(2) == pytest.approx(weighted_scatter(best), rel=1e-13)
    for bad in ([1.0, 2.0], [1.0, 0.0, 2.0]):
        with pytest.raises(ValueError, match="^weights must be positive, one per point$"):
            group_points(points, 2, grouping, weights=bad)
    with pytest.raises(ValueError, match="^number of groups 4 must be between 1 and 3$"):
        group_points(points, 4, grouping)


def test_float32_points_are_grouped_in_float64():
    points = torch.randn(6, 4, generator=torch.Generator().manual_seed(72)).float()
    want = grouping_costs(points.double())
    assert grouping_costs(points) == pytest.approx(want, rel=1e-13, abs=1e-13)


def test_aslora_alternation_ends_at_a_fixed_point_on_a_tiny_scale():
    """Seed 83 (energy ~1e-7) regroups once on the way: the history falls strictly and ends at the
    reported (dense) error; neither a regroup (Ward at the final A) nor a refit (dense SVD of the
    stack of sqrt|g| mean_g dW, whose squared singular values are the spectrum) lowers it further."""
    from converters.aslora import convert_aslora
    from tests.converters_reference import grouped_error_at

    As, Bts = _kind(83, n_sites=6, n_out=8, n_in=7, ranks=3)
    Bts = [bt * 1e-4 for bt in Bts]  # the roundoff tolerance must be relative to this energy
    result = converters.convert_kind("aslora", As, Bts, rank=2, groups=3)
    history, scale = result.error_history, 1e-9 * result.energy
    assert len(history) >= 4 and all(b < a for a, b in zip(history, history[1:]))
    (a,) = result.a_tensors
    assert result.error == pytest.approx(grouped_error_at(As, Bts, a, result.groups), abs=scale)
    assert history[-1] == pytest.approx(result.error, abs=scale)
    dws = dense_updates(As, Bts)
    regrouped = group_points(torch.stack([dw @ a.T for dw in dws]), 3)
    assert grouped_error_at(As, Bts, a, regrouped) >= result.error - scale
    stack = torch.cat([len(g) ** 0.5 * torch.stack([dws[l] for l in g]).mean(0) for g in result.groups])
    _, values, vh = torch.linalg.svd(stack, full_matrices=False)
    assert grouped_error_at(As, Bts, vh[:2], result.groups) >= result.error - scale
    torch.testing.assert_close(
        result.spectrum[: len(values)], values.square(), rtol=1e-9, atol=1e-12 * float(values[0]) ** 2
    )
    # convert_aslora's own default grouping is "any" as well
    kind = KindFactors.from_lists(As, Bts)
    assert convert_aslora(kind, 2, 3).groups == result.groups


# ---------------------------------------------------------------- fleets


def test_fleet_kind_forms_counts_and_messages():
    """fleet_kind against dense references: ShareA is Eckart-Young on the whole fleet's vertical
    stack, ShareAB's error is that of its multiplied-out factors; counts read off the tensors."""
    from converters.fleet import fleet_options, fleet_shareab

    gen = torch.Generator().manual_seed(74)
    fleet = [random_kind(gen, 2, 7, 6, ranks=r) for r in (2, 3)]  # float32, 2 adapters x 2 layers
    As, Bts = [a for a, _ in fleet], [b for _, b in fleet]
    dws = [bt.double() @ a.double() for a_list, b_list in zip(As, Bts) for a, bt in zip(a_list, b_list)]
    values = torch.linalg.svdvals(torch.cat(dws, dim=0)).square()

    def dense_error(result):
        total = 0.0
        for pos, dw in enumerate(dws):
            b, a = result.site_factors(pos // 2, pos % 2)
            total += float((dw - b.double() @ a.double()).square().sum())
        return total

    one = converters.fleet_kind("sharea", As, Bts, 1)
    assert (one.method, one.basis_v.dtype, one.cores[1][1].dtype) == ("sharea", torch.float32, torch.float32)
    assert one.error == pytest.approx(float(values[1:].sum()), rel=1e-9)
    assert one.error_history == [pytest.approx(one.error, rel=1e-9)] and dense_error(one) == pytest.approx(
        one.error, rel=1e-5
    )
    two = converters.fleet_kind("shareab", As, Bts, 2, rank_out=3, max_iterations=1)
    assert (two.method, two.ranks, two.basis_u.dtype, two.basis_v.dtype) == (
        "shareab",
        (3, 2),
        torch.float32,
        torch.float32,
    )
    assert len(two.error_history) <= 2 and dense_error(two) == pytest.approx(two.error, rel=1e-5)
    assert (
        two.shared_parameters() + sum(two.adapter_parameters(i) for i in range(2))
        == converters.fleet_parameter_count("shareab", 7, 6, 4, 3, 2)
        == 3 * 7 + 2 * 6 + 4 * 3 * 2
    )
    assert converters.fleet_kind("shareab", As, Bts, 2).ranks == (2, 2)  # rank_out defaults to rank
    assert len(fleet_options("sharea", As, Bts, max_rank=2)) == 2
    options = fleet_options("shareab", As, Bts)  # every pair up to the two bases' sizes (7 and 6)
    assert {(o.rank_out, o.rank_in) for o in options} == {(k1, k2) for k1 in range(1, 8) for k2 in range(1, 7)}
    for o in options:
        assert o.params == o.rank_out * 7 + o.rank_in * 6 + 4 * o.rank_out * o.rank_in
    (full,) = [o for o in options if (o.rank_out, o.rank_in) == (7, 6)]
    assert full.error <= 1e-9 * float(values.sum())
    for call, message in [
        (lambda: converters.fleet_kind("sharea", As, Bts, 0), "rank must be positive, got 0"),
        (
            lambda: converters.fleet_kind("sharea", As, Bts[:1], 1),
            "need the same positive number of adapters in As and Bts, got 2 and 1",
        ),
        (
            lambda: converters.fleet_kind("sharea", As, [Bts[0], Bts[1][:1]], 1),
            "adapter 1: 2 A's and 1 B's, expected 2 layers",
        ),
        (lambda: fleet_shareab(As, Bts, 0, 2), "ranks must be positive, got 0 and 2"),
        (
            lambda: converters.fleet_parameter_count("aslora", 7, 6, 4, 1, 1),
            "fleet method must be one of ('sharea', 'shareab'), got 'aslora'",
        ),
        (lambda: fleet_options("aslora", As, Bts), "fleet method must be one of ('sharea', 'shareab'), got 'aslora'"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()


# ---------------------------------------------------------------- orthonormal padding


@pytest.mark.parametrize("n, c, count", [(6, 2, 0), (6, 2, 1), (6, 0, 6), (12, 1, 10), (20, 5, 3), (9, 4, 5)])
def test_orthonormal_complement_is_orthonormal_orthogonal_and_deterministic(n, c, count):
    gen = torch.Generator().manual_seed(69)
    cols = torch.linalg.qr(torch.randn(n, c, generator=gen, dtype=F64), mode="reduced").Q
    extra = orthonormal_complement(cols, count)
    assert extra.shape == (n, count) and extra.dtype == F64
    torch.testing.assert_close(extra.T @ extra, torch.eye(count, dtype=F64), rtol=0, atol=1e-12)
    assert float(torch.linalg.norm(cols.T @ extra)) <= 1e-12
    assert torch.equal(extra, orthonormal_complement(cols.clone(), count))


@pytest.mark.parametrize("r", [0, 1])
def test_rank_zero_and_rank_one_sites_truncate_like_a_dense_svd(r):
    (a,), (bt,) = _kind(70, n_sites=1, n_out=5, n_in=4, ranks=max(r, 1))
    a, bt = a[:r], bt[:, :r]
    dw = bt @ a
    want = torch.linalg.svdvals(dw)[:r]
    site = truncate.truncate_site(a, bt, 2)
    assert (site.rank, site.a.shape, site.b.shape) == (r, (r, 4), (5, r))
    torch.testing.assert_close(site.singular_values, want, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(truncate.site_singular_values(a, bt), want, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(site.b @ site.a, dw, rtol=0.0, atol=1e-12)
    assert site.energy == pytest.approx(float(dw.square().sum()), rel=1e-12) and site.error == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_by_one_factors_come_back_with_a_positive_a(sign):
    """The sign rule (largest entry of each row of A positive) also holds for a 1x1 A."""
    a, bt = torch.tensor([[2.0 * sign]], dtype=F64), torch.tensor([[3.0], [-1.0]], dtype=F64)
    for result in (converters.truncate_kind([a], [bt], 1), converters.convert_kind("sharea", [a], [bt], rank=1)):
        assert torch.equal(result.a_tensors[0], torch.ones(1, 1, dtype=F64))
        torch.testing.assert_close(result.b_tensors[0], bt @ a, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------- calibrated truncation


def test_calibrated_site_spectra_and_per_site_ranks_match_dense_eigenvalues():
    """Site l's decreases are the eigenvalues of ``dW_l C~_l dW_l^T`` (C~ the damped second moment),
    and a per-site rank list leaves each site its dense tail (0 empties a site)."""
    from converters.calibrated_truncation import convert_lora_calibrated
    from converters.calibration import CalibratedKind
    from tests.converters.test_converters_calibrated import damped_dense, tiny_case

    As, Bts, cs, q, S = tiny_case(71, n_sites=3, n_out=6, n_in=8, ranks=[3, 2, 3])
    lam = 0.05
    damped = damped_dense(cs, q, lam)
    want = [
        torch.linalg.eigvalsh(dw @ c @ dw.T).flip(0)[:r] for dw, c, r in zip(dense_updates(As, Bts), damped, [3, 2, 3])
    ]
    got = converters.calibrated_site_spectra(As, Bts, S, lam)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g[: len(w)], w, rtol=1e-9, atol=1e-12 * float(w[0]))
    result = converters.convert_kind_calibrated("lora", As, Bts, S, [1, 0, 2], lam=lam)
    assert (result.result.method, result.result.rank, result.result.groups) == ("lora", 2, [[0], [1], [2]])
    assert [a.shape[0] for a in result.result.a_tensors] == [1, 0, 2]  # the rank is the largest, not the first
    assert result.objective == pytest.approx(sum(float(w[k:].sum()) for w, k in zip(want, [1, 0, 2])), rel=1e-9)
    ck = CalibratedKind.build(As, Bts, S, lam)
    for bad in ([1, -1, 2], [1, 1, 1, 1]):
        with pytest.raises(ValueError, match=re.escape(f"need one non-negative rank per site (3), got {bad}")):
            convert_lora_calibrated(ck, bad)
    with pytest.raises(ValueError, match="^rank must be positive, got 0$"):
        convert_lora_calibrated(ck, 0)
    shareb = converters.convert_kind_calibrated("shareb", As, Bts, S, 2, lam=lam)
    assert shareb.result.method == "shareb"


def test_calibrated_aslora_regroups_by_default():
    """Given a poor partition, the default moves sites (seed 77) and reaches a lower dense objective
    than regroup=False, which keeps the partition as given."""
    from tests.converters.test_converters_calibrated import result_objective, tiny_case

    As, Bts, cs, _, S = tiny_case(77, n_sites=4, n_out=6, n_in=8, ranks=2)
    given = [[0, 3], [1, 2]]
    moved = converters.convert_kind_calibrated("aslora", As, Bts, S, 2, groups=given, lam=0.0)
    kept = converters.convert_kind_calibrated("aslora", As, Bts, S, 2, groups=given, lam=0.0, regroup=False)
    assert kept.result.groups == given and moved.result.groups != given
    assert result_objective(As, Bts, cs, moved) < result_objective(As, Bts, cs, kept) * (1 - 1e-6)
