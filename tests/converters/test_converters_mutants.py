"""Converter corners that survivors of tests/mutation/mutation.sh converters pointed at: explicit
ASLoRA plans, default groups, the energy rule's slack, truncation's rank checks and result fields.

References are independent: the counting formula for parameters (brute force over G), a dense SVD
for singular values and errors, the conversion itself for the estimate's upper bound.
"""

import pytest
import torch

import converters
from converters.budget import choose_by_energy, default_groups, kind_options
from converters.truncate import ranks_for_rank, truncate_factors
from converters.types import KindFactors, Option
from tests.converters_reference import dense_updates, eckart_young_sharea, random_kind


def _kind(seed=40, n_sites=5, n_out=9, n_in=7, ranks=3, **kw):
    return random_kind(torch.Generator().manual_seed(seed), n_sites, n_out, n_in, ranks=ranks, **kw)


@pytest.mark.parametrize("n_sites, n_out, n_in, r", [(12, 768, 768, 8), (6, 40, 8, 4), (6, 8, 40, 4), (3, 5, 5, 2)])
@pytest.mark.parametrize("rank_factor", [1, 2])
def test_default_groups_is_the_most_within_a_quarter(n_sites, n_out, n_in, r, rank_factor):
    """Brute force over G with the counting formula: the largest G whose ASLoRA fits 25% of the LoRA,
    at least 1."""
    As, Bts = [torch.zeros(r, n_in)] * n_sites, [torch.zeros(n_out, r)] * n_sites
    kind = KindFactors.from_lists(As, Bts)
    rank = r * rank_factor
    allowed = 0.25 * converters.lora_parameter_count(n_out, n_in, [r] * n_sites)
    fitting = [
        g
        for g in range(1, n_sites + 1)
        if converters.parameter_count("aslora", n_out, n_in, n_sites, rank, g) <= allowed
    ]
    assert default_groups(kind, rank) == max(fitting, default=1)


def test_explicit_aslora_plan_is_its_enumerated_option_and_bounds_the_conversion():
    As, Bts = _kind()
    kind = KindFactors.from_lists(As, Bts)
    for rank, groups in [(2, 3), (4, 2), (3, 1), (2, 5)]:
        plan = converters.plan("aslora", {"k": (As, Bts)}, rank=rank, groups=groups)["k"]
        (option,) = [o for o in kind_options("aslora", kind, max_rank=rank, groups=groups) if o.rank == rank]
        assert (plan.rank, plan.groups, plan.params, plan.estimated_error) == (
            rank,
            groups,
            option.params,
            option.error,
        )
        assert plan.params == converters.parameter_count("aslora", 9, 7, 5, rank, groups)
        converted = converters.convert_kind("aslora", As, Bts, rank=rank, groups=groups)
        # the estimate is ShareA's error plus the grouping's cost: between the ShareA optimum and the
        # (refit) conversion's error from above
        assert eckart_young_sharea(As, Bts, rank) - 1e-9 <= converted.error <= plan.estimated_error + 1e-9
    more = converters.plan("aslora", {"k": (As, Bts)}, rank=2, groups=99)["k"]  # capped at the sites
    assert more.groups == 5 and more.estimated_error == pytest.approx(eckart_young_sharea(As, Bts, 2), abs=1e-9)
    default = converters.plan("aslora", {"k": (As, Bts)}, rank=2)["k"]
    assert default.groups == default_groups(kind, 2)
    # the grouping rule reaches the estimate: neighbours only is another (here worse) grouping
    As, Bts = _kind(45)  # a kind whose layers 0..4 are not best grouped as neighbours
    kind = KindFactors.from_lists(As, Bts)
    estimates = {}
    for grouping in ("any", "adjacent"):
        plan = converters.plan("aslora", {"k": (As, Bts)}, rank=2, groups=2, grouping=grouping)["k"]
        (option,) = kind_options("aslora", kind, max_rank=2, groups=2, grouping=grouping)[1:2]
        assert (option.rank, plan.estimated_error) == (2, option.error)
        estimates[grouping] = plan.estimated_error
    assert estimates["adjacent"] > estimates["any"] + 1e-9


@pytest.mark.parametrize("method", ["sharea", "shareb", "shareab"])
def test_explicit_plan_with_one_int_for_every_kind(method):
    kinds = {"q": _kind(41), "v": _kind(42, n_out=6)}
    plans = converters.plan(method, kinds, rank=2)
    assert {name: p.rank for name, p in plans.items()} == {"q": 2, "v": 2}
    for name, (As, Bts) in kinds.items():
        (option,) = [o for o in kind_options(method, KindFactors.from_lists(As, Bts), max_rank=2) if o.rank == 2]
        assert (plans[name].params, plans[name].estimated_error) == (option.params, option.error)
    assert converters.plan("aslora", kinds, rank=2, groups=2)["v"].groups == 2
    # a rank beyond the kind's spectrum (2 sites of rank 1: at most 2 directions) is still planned
    As, Bts = _kind(46, n_sites=2, ranks=1)
    beyond = converters.plan(method, {"k": (As, Bts)}, rank=5)["k"]
    at_two = converters.plan(method, {"k": (As, Bts)}, rank=2)["k"]  # past the spectrum the error stays put
    assert beyond.rank == 5 and beyond.estimated_error == pytest.approx(at_two.estimated_error, abs=1e-9)


def test_energy_rule_slack_is_relative_and_lets_equal_cost_reach():
    """A target of 1.0 is reached by an option within 1e-12 of the energy (roundoff), whatever the energy's
    scale; one clearly short of it is not."""
    for scale in (1.0, 4.0, 1e6):
        near = Option(1, None, 10, 0.25e-12 * scale)  # roundoff-sized error: counts as keeping everything
        exact = Option(2, None, 20, 0.0)
        assert choose_by_energy([near, exact], scale, 1.0) is near
        short = Option(1, None, 10, 1e-9 * scale)
        assert choose_by_energy([short, exact], scale, 1.0) is exact


def test_truncation_rank_checks():
    As, Bts = _kind(43)
    one = converters.truncate_kind(As, Bts, 1)
    assert one.ranks == [1] * 5
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"^rank must be positive, got {bad}$"):
            converters.truncate_kind(As, Bts, bad)
        with pytest.raises(ValueError, match=rf"^rank must be positive, got {bad}$"):
            ranks_for_rank([torch.ones(3)], bad)
    assert ranks_for_rank([torch.ones(3), torch.ones(1)], 1) == [1, 1]
    with pytest.raises(ValueError, match=r"^need one rank per site, got 2 for 5 sites$"):
        truncate_factors(KindFactors.from_lists(As, Bts), [1, 2])


@pytest.mark.parametrize("shared_a", [False, True])
def test_truncation_result_fields_match_a_dense_svd(shared_a):
    As, Bts = _kind(44, shared_a=shared_a)
    result = converters.truncate_kind(As, Bts, [1, 2, 3, 2, 1])
    dense = dense_updates(As, Bts)
    values = [torch.linalg.svdvals(d)[:3] for d in dense]
    assert result.groups == [[pos] for pos in range(5)]
    assert len(result.site_singular_values) == len(result.ranks) == 5
    assert result.already_shared is shared_a
    assert result.error_history == [result.error]
    assert result.error == pytest.approx(
        sum(float(v[k:].square().sum()) for v, k in zip(values, [1, 2, 3, 2, 1])), abs=1e-9
    )
    for got, want in zip(result.site_singular_values, values):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        result.spectrum.double(), torch.sort(torch.cat(values).square(), descending=True).values, rtol=1e-6, atol=1e-9
    )
