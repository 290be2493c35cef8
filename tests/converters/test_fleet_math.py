"""Fleet math (converters/fleet.py) against dense references: SVDs of the stacked dense updates,
least-squares solves for the cores, and a dense alternation for the two-sided bases."""

import pytest
import torch

import converters
from converters.fleet import fleet_options, fleet_sharea, fleet_shareab
from tests.converters_reference import F64, random_kind

N_OUT, N_IN, LAYERS = 14, 11, 3
RANKS = [4, 2, 3]  # one rank per adapter, as a fleet's LoRAs may differ


def random_fleet(seed: int, ranks=RANKS, common: float = 0.6, dtype=torch.float32):
    """As[i][l], Bts[i][l]: adapters that share some directions (as LoRAs of one base do)."""
    gen = torch.Generator().manual_seed(seed)
    As, Bts = [], []
    for r in ranks:
        a, b = random_kind(gen, LAYERS, N_OUT, N_IN, r, dtype=dtype, common=common)
        As.append(a)
        Bts.append(b)
    return As, Bts


def dense(As, Bts):
    return [[bt.to(F64) @ a.to(F64) for a, bt in zip(a_list, b_list)] for a_list, b_list in zip(As, Bts)]


def flat(dws):
    return [d for row in dws for d in row]


def site_update(result, i, l):
    b, a = result.site_factors(i, l)
    return b.to(F64) @ a.to(F64)


def dense_errors(result, dws):
    return [
        sum(float((d - site_update(result, i, l)).square().sum()) for l, d in enumerate(row))
        for i, row in enumerate(dws)
    ]


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_sharea_is_the_dense_eckart_young_optimum_of_the_whole_fleet(k):
    As, Bts = random_fleet(1)
    dws = dense(As, Bts)
    result = fleet_sharea(As, Bts, k)
    s = torch.linalg.svdvals(torch.cat(flat(dws), dim=0))
    optimum = float(s[k:].square().sum())
    assert abs(result.error - optimum) <= 1e-5 * optimum + 1e-9
    errors = dense_errors(result, dws)
    assert sum(errors) == pytest.approx(optimum, rel=1e-4, abs=1e-6)
    assert result.errors == pytest.approx(errors, rel=1e-4, abs=1e-5)
    v = result.basis_v.to(F64)
    assert torch.allclose(v @ v.T, torch.eye(k, dtype=F64), atol=1e-5)
    for i, row in enumerate(dws):  # each core is the least-squares B for the shared V: dW V^T
        for l, d in enumerate(row):
            assert torch.allclose(result.cores[i][l].to(F64), d @ v.T, atol=1e-4)
    assert result.energies == pytest.approx([sum(float(d.square().sum()) for d in row) for row in dws], rel=1e-9)


def test_sharea_subspace_matches_the_dense_right_singular_vectors():
    As, Bts = random_fleet(2)
    result = fleet_sharea(As, Bts, 4)
    _, _, vh = torch.linalg.svd(torch.cat(flat(dense(As, Bts)), dim=0), full_matrices=False)
    ours, ref = result.basis_v.to(F64), vh[:4]
    assert torch.allclose(ours.T @ ours, ref.T @ ref, atol=1e-5)  # same projector


def brute_force_core(d, u, v):
    """argmin_C ||d - u C v||_F by a dense least-squares solve on vec(C): vec(u C v) = (v^T kron u) vec(C)."""
    design = torch.kron(v.T.contiguous(), u)  # column-major vec
    rhs = d.T.reshape(-1)
    sol = torch.linalg.lstsq(design, rhs.unsqueeze(1)).solution.squeeze(1)
    return sol.reshape(v.shape[0], u.shape[1]).T


@pytest.mark.parametrize("k1,k2", [(1, 1), (2, 3), (5, 4)])
def test_shareab_cores_are_the_least_squares_optimum_for_their_bases(k1, k2):
    As, Bts = random_fleet(3)
    dws = dense(As, Bts)
    result = fleet_shareab(As, Bts, k1, k2)
    u, v = result.basis_u.to(F64), result.basis_v.to(F64)
    assert result.ranks == (k1, k2)
    assert torch.allclose(u.T @ u, torch.eye(k1, dtype=F64), atol=1e-5)
    assert torch.allclose(v @ v.T, torch.eye(k2, dtype=F64), atol=1e-5)
    for i, row in enumerate(dws):
        for l, d in enumerate(row):
            assert torch.allclose(result.cores[i][l].to(F64), brute_force_core(d, u, v), atol=1e-4)
    assert result.errors == pytest.approx(dense_errors(result, dws), rel=1e-4, abs=1e-5)


def dense_start_error(dws, k1, k2):
    """Error of the start bases, from dense SVDs: U of the horizontal stack, V of the vertical one."""
    u = torch.linalg.svd(torch.cat(dws, dim=1), full_matrices=False)[0][:, :k1]
    v = torch.linalg.svd(torch.cat(dws, dim=0), full_matrices=False)[2][:k2]
    return sum(float((d - u @ (u.T @ d @ v.T) @ v).square().sum()) for d in dws)


def dense_alternation(dws, k1, k2, rounds=300):
    """Independent two-sided refinement on the dense updates (HOOI-style), from the same start."""
    u = torch.linalg.svd(torch.cat(dws, dim=1), full_matrices=False)[0][:, :k1]
    v = torch.linalg.svd(torch.cat(dws, dim=0), full_matrices=False)[2][:k2]
    for _ in range(rounds):
        u = torch.linalg.svd(torch.cat([d @ v.T for d in dws], dim=1), full_matrices=False)[0][:, :k1]
        v = torch.linalg.svd(torch.cat([u.T @ d for d in dws], dim=0), full_matrices=False)[2][:k2]
    return sum(float((d - u @ (u.T @ d @ v.T) @ v).square().sum()) for d in dws)


@pytest.mark.parametrize("k1,k2", [(2, 2), (3, 5), (6, 4)])
def test_shareab_start_matches_dense_svds_and_refinement_never_raises_the_error(k1, k2):
    As, Bts = random_fleet(4, common=0.3)
    dws = flat(dense(As, Bts))
    result = fleet_shareab(As, Bts, k1, k2, max_iterations=200, tol=0.0)
    history = result.error_history
    assert history[0] == pytest.approx(dense_start_error(dws, k1, k2), rel=1e-6)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:]))
    assert result.error == pytest.approx(history[-1], rel=1e-9)
    assert result.error == pytest.approx(dense_alternation(dws, k1, k2), rel=1e-4)


def test_shareab_at_full_ranks_is_exact_and_sharea_at_full_rank_too():
    As, Bts = random_fleet(5)
    p = sum(RANKS) * LAYERS
    two = fleet_shareab(As, Bts, N_OUT, N_IN)
    one = fleet_sharea(As, Bts, N_IN)
    assert two.error <= 1e-9 * two.energy and one.error <= 1e-9 * one.energy
    assert two.ranks == (min(N_OUT, p), min(N_IN, p))


def test_float64_input_gives_float64_factors_and_shapes():
    As, Bts = random_fleet(6, dtype=torch.float64)
    result = fleet_shareab(As, Bts, 3, 2)
    assert result.basis_v.dtype == torch.float64 and result.basis_v.shape == (2, N_IN)
    assert result.basis_u.shape == (N_OUT, 3)
    assert [[c.shape for c in row] for row in result.cores] == [[(3, 2)] * LAYERS] * len(RANKS)
    a = fleet_sharea(As, Bts, 5)
    assert [[c.shape for c in row] for row in a.cores] == [[(N_OUT, 5)] * LAYERS] * len(RANKS)
    assert a.shared_parameters() == 5 * N_IN and a.adapter_parameters(0) == LAYERS * N_OUT * 5
    assert result.shared_parameters() == 3 * N_OUT + 2 * N_IN and result.adapter_parameters(1) == LAYERS * 6


def test_options_errors_match_the_dense_references():
    As, Bts = random_fleet(7)
    dws = flat(dense(As, Bts))
    s = torch.linalg.svdvals(torch.cat(dws, dim=0))
    for o in fleet_options("sharea", As, Bts):
        assert o.error == pytest.approx(float(s[o.rank_in :].square().sum()), rel=1e-5, abs=1e-8)
        assert o.params == converters.fleet_parameter_count("sharea", N_OUT, N_IN, len(dws), 0, o.rank_in)
    options = fleet_options("shareab", As, Bts, max_rank=5)
    assert len(options) == 25
    for o in options[::4]:
        assert o.error == pytest.approx(dense_start_error(dws, o.rank_out, o.rank_in), rel=1e-5, abs=1e-8)
        refined = fleet_shareab(As, Bts, o.rank_out, o.rank_in)
        assert refined.error <= o.error * (1 + 1e-9)  # the option's error is an upper bound


def test_budget_spends_the_knapsack_exactly_over_kinds():
    fleets = {"q": random_fleet(8), "v": random_fleet(9, common=0.0)}
    for method in converters.FLEET_FORMS:
        options = {name: fleet_options(method, As, Bts) for name, (As, Bts) in fleets.items()}
        budget = 300
        chosen = converters.spend_budget(options, budget)
        assert sum(o.params for o in chosen.values()) <= budget
        best = min(
            oq.error + ov.error for oq in options["q"] for ov in options["v"] if oq.params + ov.params <= budget
        )  # exhaustive
        assert sum(o.error for o in chosen.values()) == pytest.approx(best, rel=1e-12)


def test_bad_fleet_shapes_are_refused():
    As, Bts = random_fleet(10)
    with pytest.raises(ValueError, match="layers"):
        fleet_sharea([As[0], As[1][:2]], [Bts[0], Bts[1][:2]], 2)
    with pytest.raises(ValueError, match="method"):
        converters.fleet_kind("aslora", As, Bts, 2)
