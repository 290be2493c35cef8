"""ShareA / ShareB / ShareAB reach the Eckart-Young optimum of a dense SVD, factored."""

import pytest
import torch

import converters
from tests.converters_reference import (
    best_shareab,
    dense_error,
    eckart_young_sharea,
    eckart_young_shareb,
    energy,
    llama_like,
    random_kind,
)

DENSE_OPTIMUM = {"sharea": eckart_young_sharea, "shareb": eckart_young_shareb, "shareab": best_shareab}


def rel_diff(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-300)


@pytest.mark.parametrize("method", sorted(DENSE_OPTIMUM))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_error_is_the_dense_optimum_on_random_adapters(method, k):
    gen = torch.Generator().manual_seed(10 + k)
    As, Bts = random_kind(gen, n_sites=7, n_out=20, n_in=16, ranks=[4, 2, 4, 3, 4, 1, 4])
    result = converters.convert_kind(method, As, Bts, rank=k)
    optimum = DENSE_OPTIMUM[method](As, Bts, k)
    assert result.rank == k
    assert rel_diff(result.error, optimum) <= 1e-5
    assert rel_diff(result.energy, energy(As, Bts)) <= 1e-9
    # float32 factors: their error matches up to float32 rounding of the factors
    assert abs(dense_error(As, Bts, result) - optimum) <= 1e-5 * optimum + 1e-6 * result.energy


@pytest.mark.parametrize("method", sorted(DENSE_OPTIMUM))
def test_llama_like_kinds_reach_the_dense_optimum(method):
    gen = torch.Generator().manual_seed(3)
    for name, (As, Bts) in llama_like(gen).items():
        k = max(a.shape[0] for a in As)
        result = converters.convert_kind(method, As, Bts, rank=k)
        optimum = DENSE_OPTIMUM[method](As, Bts, k)
        assert rel_diff(result.error, optimum) <= 1e-5, name
        assert abs(dense_error(As, Bts, result) - optimum) <= 1e-5 * optimum + 1e-6 * result.energy, name


@pytest.mark.parametrize("method", sorted(DENSE_OPTIMUM))
def test_float64_factors_reconstruct_the_reported_error_tightly(method):
    gen = torch.Generator().manual_seed(4)
    As, Bts = random_kind(gen, 9, 12, 10, ranks=3, dtype=torch.float64, common=0.7)
    result = converters.convert_kind(method, As, Bts, rank=4)
    assert result.b_tensors[0].dtype == torch.float64
    assert rel_diff(dense_error(As, Bts, result), result.error) <= 1e-9
    assert rel_diff(converters.reconstruction_error(As, Bts, result), result.error) <= 1e-9


def test_sharea_layout_and_orthonormal_rows_even_above_the_lora_rank():
    gen = torch.Generator().manual_seed(5)
    As, Bts = random_kind(gen, 6, 10, 30, ranks=2)  # stack rank 12 < k = 20 <= n_in
    result = converters.convert_kind("sharea", As, Bts, rank=20)
    (a,) = result.a_tensors
    assert a.shape == (20, 30) and result.rank == 20
    assert torch.allclose(a.double() @ a.double().T, torch.eye(20, dtype=torch.float64), atol=1e-6)
    assert [b.shape for b in result.b_tensors] == [(10, 20)] * 6
    assert result.a_index == [0] * 6 and result.b_index == list(range(6))
    assert result.groups == [[l] for l in range(6)]
    # above the stack's rank the projection is exact, padding rows carry no energy
    assert result.error <= 1e-12 * result.energy
    assert dense_error(As, Bts, result) <= 1e-10 * result.energy
    # and the per-site B's are the optimal ones for that A: dW_l A^T
    for l, (a_l, bt) in enumerate(zip(As, Bts)):
        assert torch.allclose(result.b_tensors[l], (bt @ a_l) @ a.T, atol=1e-4)


def test_rank_is_capped_where_orthonormality_would_break():
    gen = torch.Generator().manual_seed(6)
    As, Bts = random_kind(gen, 3, 5, 7, ranks=4)
    assert converters.convert_kind("sharea", As, Bts, rank=50).rank == 7
    assert converters.convert_kind("shareb", As, Bts, rank=50).rank == 5
    assert converters.convert_kind("shareab", As, Bts, rank=50).rank == 5


def test_shareb_has_orthonormal_shared_columns():
    gen = torch.Generator().manual_seed(7)
    As, Bts = random_kind(gen, 5, 14, 9, ranks=3)
    result = converters.convert_kind("shareb", As, Bts, rank=6)
    (b,) = result.b_tensors
    assert b.shape == (14, 6) and len(result.a_tensors) == 5
    assert torch.allclose(b.double().T @ b.double(), torch.eye(6, dtype=torch.float64), atol=1e-6)


def test_sharelora_checkpoint_is_lossless_at_its_rank():
    gen = torch.Generator().manual_seed(8)
    As, Bts = random_kind(gen, 12, 32, 24, ranks=8, shared_a=True)
    result = converters.convert_kind("sharea", As, Bts, rank=8)
    assert result.already_shared
    assert result.relative_error < 1e-6
    assert dense_error(As, Bts, result) ** 0.5 < 1e-6 * energy(As, Bts) ** 0.5
    # distinct A's are neither reported as shared nor converted losslessly at that rank
    As2, Bts2 = random_kind(gen, 12, 32, 24, ranks=8)
    other = converters.convert_kind("sharea", As2, Bts2, rank=8)
    assert not other.already_shared and other.relative_error > 1e-2


def test_spectrum_gives_the_error_at_every_rank():
    gen = torch.Generator().manual_seed(9)
    As, Bts = random_kind(gen, 5, 11, 13, ranks=3)
    result = converters.convert_kind("sharea", As, Bts, rank=2)
    for k in range(1, 10):
        predicted = result.energy - float(result.spectrum[:k].sum())
        assert abs(predicted - eckart_young_sharea(As, Bts, k)) <= 1e-9 * result.energy
    assert torch.all(result.spectrum[:-1] >= result.spectrum[1:])


def test_output_is_deterministic_with_fixed_signs():
    gen = torch.Generator().manual_seed(11)
    As, Bts = random_kind(gen, 6, 9, 12, ranks=3)
    first = converters.convert_kind("sharea", As, Bts, rank=4)
    again = converters.convert_kind("sharea", [a.clone() for a in As], [b.clone() for b in Bts], rank=4)
    assert torch.equal(first.a_tensors[0], again.a_tensors[0])
    a = first.a_tensors[0]
    peak = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
    assert bool((peak > 0).all())


def test_bad_input_is_refused():
    gen = torch.Generator().manual_seed(12)
    As, Bts = random_kind(gen, 3, 5, 7, ranks=2)
    with pytest.raises(ValueError):
        converters.convert_kind("sharea", As, Bts[:2], rank=2)
    with pytest.raises(ValueError):
        converters.convert_kind("sharea", As, [Bts[0], Bts[1], torch.zeros(6, 2)], rank=2)
    with pytest.raises(ValueError):
        converters.convert_kind("nope", As, Bts, rank=2)
    with pytest.raises(ValueError):
        converters.convert_kind("sharea", As, Bts, rank=0)
