"""Parameter counts, energy-based ranks and budget spending."""

import math

import pytest
import torch

import converters
from converters.budget import default_groups, kind_options, spend_budget
from converters.types import KindFactors, Option
from tests.converters_reference import best_shareab, eckart_young_sharea, eckart_young_shareb, energy, random_kind

DENSE_OPTIMUM = {"sharea": eckart_young_sharea, "shareb": eckart_young_shareb, "shareab": best_shareab}


def roberta_kind():
    """RoBERTa-base q (or v): 12 layers, n = 768, r = 8 (values do not matter for counting)."""
    return [torch.zeros(8, 768)] * 12, [torch.zeros(768, 8)] * 12


def test_parameter_counts_reproduce_the_papers_roberta_figures():
    two_kinds = lambda method, **kw: 2 * converters.parameter_count(method, 768, 768, 12, 8, **kw)
    assert two_kinds("lora") == 294_912
    assert two_kinds("sharea") == 159_744
    assert two_kinds("shareab") == 24_576
    assert two_kinds("aslora", groups=12 - 7) == 73_728  # 7 merges per projection
    assert two_kinds("shareb") == 159_744  # square layers: ShareB costs what ShareA does


def test_default_aslora_groups_are_the_papers_25_percent():
    As, Bts = roberta_kind()
    kind = KindFactors.from_lists(As, Bts)
    groups = default_groups(kind, 8)
    assert groups == 5
    lora = converters.lora_parameter_count(768, 768, [8] * 12)
    assert converters.parameter_count("aslora", 768, 768, 12, 8, groups) <= 0.25 * lora
    assert converters.parameter_count("aslora", 768, 768, 12, 8, groups + 1) > 0.25 * lora
    plans = converters.plan("aslora", {"q": (As, Bts)})
    assert (plans["q"].rank, plans["q"].groups) == (8, 5)


def test_converted_results_count_what_the_formula_says():
    gen = torch.Generator().manual_seed(30)
    As, Bts = random_kind(gen, 6, 10, 7, ranks=3)
    for method, groups in [("sharea", None), ("shareb", None), ("shareab", None), ("aslora", 4)]:
        result = converters.convert_kind(method, As, Bts, rank=5, groups=groups)
        assert result.parameter_count() == converters.parameter_count(method, 10, 7, 6, 5, groups)


@pytest.mark.parametrize("method", sorted(DENSE_OPTIMUM))
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_energy_selection_picks_the_smallest_rank_reaching_it(method, target):
    gen = torch.Generator().manual_seed(31)
    As, Bts = random_kind(gen, 6, 12, 10, ranks=4, common=1.0)
    total = energy(As, Bts)
    chosen = converters.plan(method, {"k": (As, Bts)}, energy=target)["k"]
    retained = lambda k: 1 - DENSE_OPTIMUM[method](As, Bts, k) / total
    if retained(chosen.rank) >= target - 1e-9:
        assert chosen.rank == 1 or retained(chosen.rank - 1) < target
    else:  # unreachable (ShareAB cannot beat the layers' spread): the best it can do
        assert all(retained(k) <= retained(chosen.rank) + 1e-9 for k in range(1, 11))
    assert chosen.estimated_error == pytest.approx(
        DENSE_OPTIMUM[method](As, Bts, chosen.rank), rel=1e-6, abs=1e-9 * total
    )


def contrasting_kinds(gen):
    """One kind whose layers agree (low-rank stack) and one whose layers do not."""
    return {
        "agree": random_kind(gen, 8, 16, 16, ranks=4, common=3.0),
        "spread": random_kind(gen, 8, 16, 16, ranks=4, common=0.0),
    }


def test_budget_is_never_exceeded_and_beats_a_uniform_rank():
    gen = torch.Generator().manual_seed(32)
    kinds = contrasting_kinds(gen)
    lora = sum(converters.lora_parameter_count(16, 16, [4] * 8) for _ in kinds)
    for fraction in (0.2, 0.35, 0.6):
        budget = math.floor(fraction * lora)
        plans = converters.plan("sharea", kinds, budget=fraction)
        assert sum(p.params for p in plans.values()) <= budget
        spent_error = sum(eckart_young_sharea(*kinds[n], p.rank) for n, p in plans.items())
        per_rank = converters.parameter_count("sharea", 16, 16, 8, 1)
        uniform_rank = budget // (per_rank * len(kinds))
        uniform_error = sum(eckart_young_sharea(*kind, uniform_rank) for kind in kinds.values())
        assert spent_error <= uniform_error * (1 + 1e-9)
        # the plan's estimate is the error the conversion then reports
        for name, p in plans.items():
            result = converters.convert_kind("sharea", *kinds[name], rank=p.rank)
            assert result.error == pytest.approx(p.estimated_error, rel=1e-6)


def test_aslora_budget_spends_on_rank_and_groups_within_the_budget():
    gen = torch.Generator().manual_seed(33)
    kinds = contrasting_kinds(gen)
    lora = sum(converters.lora_parameter_count(16, 16, [4] * 8) for _ in kinds)
    plans = converters.plan("aslora", kinds, budget=0.3)
    assert sum(p.params for p in plans.values()) <= math.floor(0.3 * lora)
    for name, p in plans.items():
        assert p.params == converters.parameter_count("aslora", 16, 16, 8, p.rank, p.groups)
        result = converters.convert_kind("aslora", *kinds[name], rank=p.rank, groups=p.groups)
        assert result.error <= p.estimated_error * (1 + 1e-6)  # the estimate is before the refit


def test_spend_budget_takes_the_best_error_per_parameter():
    options = {
        "x": [Option(1, None, 10, 100.0), Option(2, None, 20, 50.0), Option(3, None, 30, 45.0)],
        "y": [Option(1, None, 10, 100.0), Option(2, None, 20, 90.0), Option(3, None, 30, 20.0)],
    }
    # from (10, 10): x's first step saves 5/param, y's jump to rank 3 saves 4/param, the rest less
    assert {n: o.rank for n, o in spend_budget(options, 30).items()} == {"x": 2, "y": 1}
    assert {n: o.rank for n, o in spend_budget(options, 50).items()} == {"x": 2, "y": 3}
    with pytest.raises(ValueError):
        spend_budget(options, 19)


def test_explicit_rank_may_exceed_the_lora_rank_and_modes_are_exclusive():
    gen = torch.Generator().manual_seed(34)
    As, Bts = random_kind(gen, 4, 9, 11, ranks=2)
    plans = converters.plan("sharea", {"k": (As, Bts)}, rank={"k": 6})
    assert plans["k"].rank == 6
    assert plans["k"].estimated_error == pytest.approx(eckart_young_sharea(As, Bts, 6), abs=1e-9 * energy(As, Bts))
    assert converters.plan("shareb", {"k": (As, Bts)})["k"].rank == 2  # default: the LoRA rank
    with pytest.raises(ValueError):
        converters.plan("sharea", {"k": (As, Bts)}, rank=2, energy=0.9)


def test_aslora_options_cover_rank_and_group_pairs():
    gen = torch.Generator().manual_seed(35)
    As, Bts = random_kind(gen, 5, 6, 6, ranks=2)
    options = kind_options("aslora", KindFactors.from_lists(As, Bts))
    assert {(o.rank, o.groups) for o in options} == {(k, g) for k in range(1, 5) for g in range(1, 6)}
    # more groups never estimate a larger error at the same rank
    by_rank = {}
    for o in options:
        by_rank.setdefault(o.rank, []).append(o.error)
    assert all(all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])) for errs in by_rank.values())


@pytest.mark.parametrize("seed", range(40))
def test_spend_budget_is_the_exhaustive_optimum(seed):
    """Against every combination on small random cases (non-convex fronts, ties, ASLoRA-like pairs)."""
    import itertools
    import random

    rng = random.Random(seed)
    options = {}
    for kind in range(rng.randint(1, 4)):
        opts = [
            Option(k, g, k * 3 + k * g * rng.randint(1, 3), float(rng.randint(0, 40)))
            for k in range(1, rng.randint(2, 4))
            for g in range(1, rng.randint(2, 4))
        ]
        options[f"kind{kind}"] = opts
    names = sorted(options)
    combos = list(itertools.product(*(options[n] for n in names)))
    least = min(sum(o.params for o in c) for c in combos)
    for budget in range(least, max(sum(o.params for o in c) for c in combos) + 1, 2):
        best = min(sum(o.error for o in c) for c in combos if sum(o.params for o in c) <= budget)
        chosen = spend_budget(options, budget)
        assert sorted(chosen) == names
        assert sum(o.params for o in chosen.values()) <= budget
        assert sum(o.error for o in chosen.values()) == best
    with pytest.raises(ValueError):
        spend_budget(options, least - 1)
