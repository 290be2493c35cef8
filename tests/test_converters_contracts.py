"""Converter contracts that survivors of tests/benchmarks/mutation.sh converters pointed at (issue 20):
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
from converters.grouping import grouping_costs, ward_tree
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

BAD_CALLS = [
    # A 1-D A with a matching B: only the dimension check catches it
    (lambda: truncate.truncate_site(torch.ones(3), torch.ones(4, 3), 1),
     "need A (r, n_in) and B (n_out, r), got (3,) and (4, 3)"),
    # matrices whose inner sizes differ: only the shape check catches it
    (lambda: truncate.truncate_site(torch.ones(3, 5), torch.ones(4, 2), 1),
     "need A (r, n_in) and B (n_out, r), got (3, 5) and (4, 2)"),
    (lambda: truncate.truncate_site(torch.ones(2, 5), torch.ones(4, 2), -1), "rank must be non-negative, got -1"),
    (lambda: truncate.rank_for_energy(_SITE, 0.0), "energy fraction must be in (0, 1], got 0.0"),
    (lambda: truncate.rank_for_energy(_SITE, 1.5), "energy fraction must be in (0, 1], got 1.5"),
    (lambda: truncate.allocate_budget([_SITE], [3, 4], 9), "need one cost per site, got 2 costs for 1 sites"),
    (lambda: truncate.allocate_budget([_SITE], [0], 9), "every site's cost per rank must be positive"),
    (lambda: truncate.allocate_budget([_SITE], [3], -1), "budget must be non-negative, got -1"),
    (lambda: truncate.allocate_budget(*_over_the_exact_limit(), exact=True),
     f"the exact budget search exceeds {truncate.EXACT_CANDIDATE_LIMIT} candidates"),
    (lambda: converters.plan_truncation({"k": (_AS, _BTS)}, rank=1, energy=0.5),
     "give at most one of rank, energy and budget"),
    (lambda: converters.plan_truncation({"k": (_AS, _BTS)}, budget=0),
     "budget must be a positive fraction of the LoRA's parameters, got 0"),
    (lambda: grouping_costs(torch.ones(3, 2), "nearby"), "grouping must be one of ('any', 'adjacent'), got 'nearby'"),
    (lambda: converters.parameter_count("aslora", 4, 5, 3, 2), "aslora needs the number of groups"),
    (lambda: converters.parameter_count("dora", 4, 5, 3, 2),
     "method must be 'lora' or one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'"),
    (lambda: rank_cap("lora", KindFactors.from_lists(_AS, _BTS)),
     "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'lora'"),
    (lambda: plan("dora", {"k": (_AS, _BTS)}), "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'"),
    (lambda: plan("sharea", {"k": (_AS, _BTS)}, rank=1, budget=0.5), "give at most one of rank, energy and budget"),
    # the minimum is every kind's cheapest option together (10 + 20), not the later kinds' alone
    (lambda: spend_budget({"x": [Option(1, None, 10, 1.0)], "y": [Option(1, None, 20, 1.0)]}, 29),
     "budget of 29 parameters is below the minimum of 30 (rank 1, one group, in every kind)"),
    (lambda: converters.spectrum("aslora", _AS, _BTS), "spectrum is defined for sharea, shareb, shareab, got 'aslora'"),
    (lambda: orthonormal_complement(torch.eye(5, 3, dtype=F64), 3), "cannot add 3 orthonormal directions to 3 in dimension 5"),
    (lambda: shared_rows(torch.eye(5, 2, dtype=F64), torch.eye(2, dtype=F64), 0),
     "rank 0 must be between 1 and 5 (orthonormal rows of length 5)"),
    (lambda: converters.convert_kind("sharea", _AS, _BTS, rank=0), "rank must be positive, got 0"),
    (lambda: converters.convert_kind("aslora", _AS, _BTS, rank=1), "aslora needs groups (see converters.default_groups)"),
    (lambda: converters.convert_kind("dora", _AS, _BTS, rank=1),
     "method must be one of ('sharea', 'shareb', 'shareab', 'aslora'), got 'dora'"),
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
    assert result.method == method
    for got in (converters.spectrum(method, As, Bts), result.spectrum):
        got = got.double()
        n = min(len(got), len(want))
        torch.testing.assert_close(got[:n], want[:n], rtol=1e-9, atol=1e-9 * float(want[0]))
        assert float(got[n:].sum()) + float(want[n:].sum()) <= 1e-9 * float(want[0])  # the rest is zero
    other = converters.convert_kind("aslora", As, Bts, rank=2, groups=2)
    assert other.method == "aslora" and converters.truncate_kind(As, Bts, 1).method == "lora"


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
    kinds = {"a": _kind(63, n_sites=1, n_out=5, n_in=4), "b": _kind(64, n_sites=2, n_out=3, n_in=6),
             "c": _kind(65, n_sites=2, n_out=8, n_in=8)}
    widths = {"a": 9, "b": 9, "c": 16}
    lora = {name: 2 * len(As) * widths[name] for name, (As, _) in kinds.items()}
    spectra = {name: [torch.linalg.svdvals(d).square()[:2] for d in dense_updates(*k)] for name, k in kinds.items()}
    for mode in ({"rank": 1}, {"energy": 0.8}, {}, {"budget": 0.6}):
        p = converters.plan_truncation(kinds, **mode)
        assert p.lora_params == sum(lora.values()) and p.energy == pytest.approx(sum(energy(*k) for k in kinds.values()))
        assert p.error == pytest.approx(sum(kp.estimated_error for kp in p.kinds.values()))
        for name, kp in p.kinds.items():
            assert kp.lora_params == lora[name] and kp.energy == pytest.approx(energy(*kinds[name]))
            assert kp.estimated_error == pytest.approx(sum(float(s[k:].sum()) for s, k in zip(spectra[name], kp.ranks)),
                                                       abs=1e-9)
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


# ---------------------------------------------------------------- share-form planning


def test_options_stop_at_the_spectrum_and_the_front_falls_strictly():
    (a,), (bt,) = _kind(66, n_sites=1, ranks=1)  # one site of rank 1: a spectrum of length 1
    kind = KindFactors.from_lists([a], [bt])
    assert [o.rank for o in kind_options("sharea", kind)] == [1]
    options = [Option(1, None, 10, 5.0), Option(2, None, 20, 5.0), Option(3, None, 30, 1.0), Option(4, None, 40, 1.0)]
    assert pareto_front(options) == [options[0], options[2]]


def test_budget_ties_go_to_the_fewer_parameters():
    """Least total error 0.5 at 30 and at 40 parameters: the cheaper one is chosen (brute force)."""
    options = {"x": [Option(1, None, 10, 0.5), Option(2, None, 30, 0.0)],
               "y": [Option(1, None, 10, 0.5), Option(2, None, 20, 0.0)]}
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
    assert (plan("aslora", kinds, groups=2, grouping="adjacent", energy=0.9)["q"].estimated_error
            != plan("aslora", kinds, groups=2, grouping="any", energy=0.9)["q"].estimated_error)


def test_grouping_defaults_are_any():
    """The documented default grouping is Ward ("any"): its costs are the scatter of its partitions."""
    gen = torch.Generator().manual_seed(68)
    points = torch.randn(5, 3, generator=gen, dtype=F64)
    tree = ward_tree(points)

    def scatter(groups):
        return sum(float((points[g] - points[g].mean(0)).square().sum()) for g in groups)

    costs = grouping_costs(points)
    assert costs == pytest.approx([scatter(tree.partition(g)) for g in range(1, 6)], abs=1e-12)
    kind = KindFactors.from_lists(*_kind(45, n_sites=5, n_out=9, n_in=7, ranks=3))
    assert aslora_error_table(kind, [2]) == aslora_error_table(kind, [2], "any")
    assert aslora_error_table(kind, [2]) != aslora_error_table(kind, [2], "adjacent")


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
    from tests.test_converters_calibrated import damped_dense, tiny_case

    As, Bts, cs, q, S = tiny_case(71, n_sites=3, n_out=6, n_in=8, ranks=[3, 2, 3])
    lam = 0.05
    damped = damped_dense(cs, q, lam)
    want = [torch.linalg.eigvalsh(dw @ c @ dw.T).flip(0)[:r] for dw, c, r in zip(dense_updates(As, Bts), damped, [3, 2, 3])]
    got = converters.calibrated_site_spectra(As, Bts, S, lam)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g[:len(w)], w, rtol=1e-9, atol=1e-12 * float(w[0]))
    result = converters.convert_kind_calibrated("lora", As, Bts, S, [2, 0, 1], lam=lam)
    assert (result.result.method, result.result.rank, result.result.groups) == ("lora", 2, [[0], [1], [2]])
    assert [a.shape[0] for a in result.result.a_tensors] == [2, 0, 1]
    assert result.objective == pytest.approx(sum(float(w[k:].sum()) for w, k in zip(want, [2, 0, 1])), rel=1e-9)
    ck = CalibratedKind.build(As, Bts, S, lam)
    for bad in ([1, -1, 2], [1, 1, 1, 1]):
        with pytest.raises(ValueError, match=re.escape(f"need one non-negative rank per site (3), got {bad}")):
            convert_lora_calibrated(ck, bad)
    with pytest.raises(ValueError, match="^rank must be positive, got 0$"):
        convert_lora_calibrated(ck, 0)
    shareb = converters.convert_kind_calibrated("shareb", As, Bts, S, 2, lam=lam)
    assert shareb.result.method == "shareb"
