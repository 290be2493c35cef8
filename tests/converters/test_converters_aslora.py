"""ASLoRA: exact reported error, optimal adjacent grouping at fixed A, a monotone alternation."""

import pytest
import torch

import converters
from tests.converters_reference import as_sets, contiguous_splits, dense_error, grouped_error_at, random_kind


def test_reported_error_is_the_dense_error_and_alternation_never_increases_it():
    gen = torch.Generator().manual_seed(20)
    As, Bts = random_kind(gen, 10, 12, 14, ranks=[3, 4, 2, 4, 3, 4, 4, 2, 3, 4], common=0.8)
    for grouping in ("any", "adjacent"):
        result = converters.convert_kind("aslora", As, Bts, rank=4, groups=3, grouping=grouping)
        assert len(result.b_tensors) == 3 and len(result.a_tensors) == 1
        assert sorted(l for g in result.groups for l in g) == list(range(10))
        assert [result.b_index[l] for l in result.groups[1]] == [1] * len(result.groups[1])
        dense = dense_error(As, Bts, result)
        assert abs(result.error - dense) <= 1e-5 * dense + 1e-6 * result.energy
        history = result.error_history
        assert all(later <= earlier for earlier, later in zip(history, history[1:]))
        assert history[-1] == pytest.approx(result.error, rel=1e-6)
        # the start of the alternation: ShareA's A and its grouping, recomputed densely
        start = converters.convert_kind("aslora", As, Bts, rank=4, groups=3, grouping=grouping, max_iterations=0)
        start_dense = grouped_error_at(As, Bts, start.a_tensors[0], start.groups)
        assert start.error == pytest.approx(start_dense, rel=1e-5)
        assert result.error <= start_dense * (1 + 1e-6)


def test_alternation_improves_on_the_first_grouping_somewhere():
    # not a law, but on clustered layers the refit must be able to move A
    gen = torch.Generator().manual_seed(21)
    As, Bts = random_kind(gen, 8, 10, 10, ranks=3, common=1.0)
    result = converters.convert_kind("aslora", As, Bts, rank=2, groups=2)
    start = converters.convert_kind("aslora", As, Bts, rank=2, groups=2, max_iterations=0)
    assert result.error < start.error * (1 - 1e-6)
    assert len(result.error_history) > 1


def test_adjacent_grouping_at_shareas_a_is_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(22)
    As, Bts = random_kind(gen, 6, 8, 9, ranks=3, dtype=torch.float64)
    result = converters.convert_kind("aslora", As, Bts, rank=3, groups=3, grouping="adjacent", max_iterations=0)
    a = result.a_tensors[0]
    best = min(grouped_error_at(As, Bts, a, p) for p in contiguous_splits(6, 3))
    assert result.error == pytest.approx(best, rel=1e-9)
    assert grouped_error_at(As, Bts, a, result.groups) == pytest.approx(best, rel=1e-9)


def test_any_grouping_at_least_matches_the_best_adjacent_one_on_shuffled_layers():
    gen = torch.Generator().manual_seed(23)
    base, base_b = random_kind(gen, 2, 8, 9, ranks=3, dtype=torch.float64)
    noise = lambda t: t + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    order = [0, 1, 0, 1, 0, 1]  # alternating layers: "any" can pair them, "adjacent" cannot
    As = [noise(base[i]) for i in order]
    Bts = [noise(base_b[i]) for i in order]
    any_pair = converters.convert_kind("aslora", As, Bts, rank=3, groups=2, grouping="any")
    adjacent = converters.convert_kind("aslora", As, Bts, rank=3, groups=2, grouping="adjacent")
    assert as_sets(any_pair.groups) == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
    assert any_pair.error < 0.1 * adjacent.error


def test_one_group_per_site_is_sharea_and_one_group_is_at_best_sharea():
    gen = torch.Generator().manual_seed(24)
    As, Bts = random_kind(gen, 5, 7, 9, ranks=2)
    sharea = converters.convert_kind("sharea", As, Bts, rank=3)
    per_site = converters.convert_kind("aslora", As, Bts, rank=3, groups=5)
    assert per_site.error == pytest.approx(sharea.error, rel=1e-6)
    one = converters.convert_kind("aslora", As, Bts, rank=3, groups=1)
    shareab = converters.convert_kind("shareab", As, Bts, rank=3)
    assert one.error == pytest.approx(shareab.error, rel=1e-6)  # one group, one A: ShareAB


def test_aslora_needs_groups():
    gen = torch.Generator().manual_seed(25)
    As, Bts = random_kind(gen, 3, 4, 4, ranks=1)
    with pytest.raises(ValueError):
        converters.convert_kind("aslora", As, Bts, rank=2)
