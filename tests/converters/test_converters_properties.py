"""Hypothesis properties on small random kinds (float64, so the checks can be tight)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
from tests.converters_reference import dense_error, energy

METHODS = ["sharea", "shareb", "shareab", "aslora"]


@st.composite
def kinds(draw):
    n_sites = draw(st.integers(1, 5))
    n_out, n_in = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ranks = draw(st.lists(st.integers(1, 3), min_size=n_sites, max_size=n_sites))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    As = [torch.randn(r, n_in, generator=gen, dtype=torch.float64) for r in ranks]
    Bts = [torch.randn(n_out, r, generator=gen, dtype=torch.float64) for r in ranks]
    return As, Bts


settings.register_profile("converters", max_examples=40, deadline=None)
settings.load_profile("converters")


def convert(method, As, Bts, rank, groups, grouping):
    groups = min(groups, len(As)) if method == "aslora" else None
    return converters.convert_kind(method, As, Bts, rank=rank, groups=groups, grouping=grouping)


@given(kinds(), st.sampled_from(METHODS), st.integers(1, 8), st.integers(1, 5), st.sampled_from(["any", "adjacent"]))
def test_reported_error_is_the_reconstruction_error(kind, method, rank, groups, grouping):
    As, Bts = kind
    result = convert(method, As, Bts, rank, groups, grouping)
    assert abs(dense_error(As, Bts, result) - result.error) <= 1e-9 * result.energy
    assert abs(result.energy - energy(As, Bts)) <= 1e-9 * result.energy
    assert 0.0 <= result.error <= result.energy * (1 + 1e-9)


@given(kinds(), st.sampled_from(METHODS), st.integers(1, 8), st.integers(1, 5))
def test_parameter_count_is_the_formula(kind, method, rank, groups):
    As, Bts = kind
    result = convert(method, As, Bts, rank, groups, "any")
    n_groups = len(result.b_tensors) if method == "aslora" else None
    n_out, n_in = Bts[0].shape[0], As[0].shape[1]
    assert result.parameter_count() == converters.parameter_count(method, n_out, n_in, len(As), result.rank, n_groups)


@given(kinds(), st.sampled_from(METHODS), st.integers(1, 8), st.integers(1, 5), st.sampled_from(["any", "adjacent"]))
def test_reconverting_an_expanded_result_at_its_own_rank_is_lossless(kind, method, rank, groups, grouping):
    As, Bts = kind
    first = convert(method, As, Bts, rank, groups, grouping)
    expanded = [first.site_factors(pos) for pos in range(first.n_sites)]
    As2, Bts2 = [a for _, a in expanded], [b for b, _ in expanded]
    again = convert(method, As2, Bts2, first.rank, len(first.b_tensors), grouping)
    assert again.error <= 1e-10 * max(again.energy, 1e-30)
    assert dense_error(As2, Bts2, again) <= 1e-10 * max(again.energy, 1e-30)
