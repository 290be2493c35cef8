"""Calibrated fleet math (converters/calibrated_fleet.py) against dense references: each site's
weighted error tr(E C E^T) with a dense n_in x n_in second moment, and dense weighted least squares
for the cores."""

import pytest
import torch

from converters.calibrated_fleet import fleet_basis, fleet_kind_calibrated, restrict_statistics
from converters.calibration import damp
from converters.fleet import fleet_kind
from tests.converters.test_fleet_math import N_IN, dense, random_fleet
from tests.converters_reference import F64

LAM = 1e-2


def random_statistics(As, seed: int, tokens: int = 40):
    """Per adapter and layer a dense input moment C = X^T X / N (inputs that differ per adapter:
    each adapter's data is its own) and S = Q^T C Q in the fleet basis."""
    gen = torch.Generator().manual_seed(seed)
    q = fleet_basis(As)
    moments, stats = [], []
    for i, a_list in enumerate(As):
        mix = torch.randn(N_IN, N_IN, generator=gen, dtype=F64) * (0.3 + i)  # adapter i's input directions
        row_m, row_s = [], []
        for _ in a_list:
            x = torch.randn(tokens, N_IN, generator=gen, dtype=F64) @ mix
            c = x.T @ x / tokens
            row_m.append(c)
            row_s.append(q.T @ c @ q)
        moments.append(row_m)
        stats.append(row_s)
    return q, moments, stats


def damped_dense(q, s):
    """The damped moment as the converters weigh it, as a dense (n_in, n_in) matrix."""
    return q @ damp(s, LAM) @ q.T


def weighted_error(e, c):
    return float(torch.trace(e @ c @ e.T))


def site_update(result, i, l):
    b, a = result.site_factors(i, l)
    return b.to(F64) @ a.to(F64)


def dense_objective(result, dws, q, stats):
    return [
        sum(weighted_error(d - site_update(result, i, l), damped_dense(q, stats[i][l])) for l, d in enumerate(row))
        for i, row in enumerate(dws)
    ]


def weighted_core(d, u, v, c):
    """Dense argmin_C tr((d - u C v) c (d - u C v)^T), u orthonormal columns: u^T d c v^T (v c v^T)^+."""
    return u.T @ d @ c @ v.T @ torch.linalg.pinv(v @ c @ v.T, hermitian=True)


@pytest.mark.parametrize(
    "method,ranks", [("sharea", (None, 3)), ("sharea", (None, 10)), ("shareab", (2, 3)), ("shareab", (4, 2))]
)
def test_errors_are_the_dense_weighted_errors_and_cores_the_weighted_least_squares(method, ranks):
    As, Bts = random_fleet(11)
    dws = dense(As, Bts)
    q, _, stats = random_statistics(As, seed=5)
    k1, k2 = ranks
    result = fleet_kind_calibrated(method, As, Bts, stats, k2, rank_out=k1, lam=LAM)
    assert result.errors == pytest.approx(dense_objective(result, dws, q, stats), rel=1e-4, abs=1e-6)
    assert result.energies == pytest.approx(
        [sum(weighted_error(d, damped_dense(q, stats[i][l])) for l, d in enumerate(row)) for i, row in enumerate(dws)],
        rel=1e-9,
    )
    assert result.frobenius_errors == pytest.approx(
        [
            sum(float((d - site_update(result, i, l)).square().sum()) for l, d in enumerate(row))
            for i, row in enumerate(dws)
        ],
        rel=1e-4,
        abs=1e-6,
    )
    v = result.basis_v.to(F64)
    u = torch.eye(dws[0][0].shape[0], dtype=F64) if result.basis_u is None else result.basis_u.to(F64)
    for i, row in enumerate(dws):
        for l, d in enumerate(row):
            expected = weighted_core(d, u, v, damped_dense(q, stats[i][l]))
            torch.testing.assert_close(result.cores[i][l].to(F64), expected, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "method,k1,k2", [("sharea", None, 2), ("sharea", None, 5), ("shareab", 2, 2), ("shareab", 3, 4)]
)
def test_never_worse_than_the_plain_fleet_in_the_weighted_error(method, k1, k2):
    As, Bts = random_fleet(12)
    dws = dense(As, Bts)
    q, _, stats = random_statistics(As, seed=6)
    calibrated = fleet_kind_calibrated(method, As, Bts, stats, k2, rank_out=k1, lam=LAM)
    plain = fleet_kind(method, As, Bts, k2, rank_out=k1)
    assert calibrated.ranks == plain.ranks
    ours, theirs = sum(dense_objective(calibrated, dws, q, stats)), sum(dense_objective(plain, dws, q, stats))
    assert ours <= theirs * (1 + 1e-9)
    assert ours < 0.99 * theirs  # inputs that differ per adapter: weighting them is worth something


def test_shareab_left_basis_beats_random_left_bases_for_its_right_basis():
    """For its V, U is the best left basis once every core is refit (dense weighted least squares)."""
    As, Bts = random_fleet(13)
    dws = dense(As, Bts)
    q, _, stats = random_statistics(As, seed=7)
    result = fleet_kind_calibrated("shareab", As, Bts, stats, 3, rank_out=2, lam=LAM)
    v = result.basis_v.to(F64)

    def refit_error(u):
        total = 0.0
        for i, row in enumerate(dws):
            for l, d in enumerate(row):
                c = damped_dense(q, stats[i][l])
                total += weighted_error(d - u @ weighted_core(d, u, v, c) @ v, c)
        return total

    best = refit_error(result.basis_u.to(F64))
    assert best == pytest.approx(sum(result.errors), rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.linalg.qr(torch.randn(dws[0][0].shape[0], 2, generator=gen, dtype=F64)).Q
        assert refit_error(u) >= best * (1 - 1e-9)


def test_identity_statistics_give_the_plain_fleet():
    As, Bts = random_fleet(14)
    q = fleet_basis(As)
    eye = [[torch.eye(q.shape[1], dtype=F64) for _ in row] for row in As]
    for method, k1 in (("sharea", None), ("shareab", 2)):
        calibrated = fleet_kind_calibrated(method, As, Bts, eye, 3, rank_out=k1, lam=0.0)
        plain = fleet_kind(method, As, Bts, 3, rank_out=k1)
        assert calibrated.errors == pytest.approx(plain.errors, rel=1e-5, abs=1e-7)
        assert calibrated.frobenius_errors == pytest.approx(plain.errors, rel=1e-5, abs=1e-7)


def test_bad_statistics_are_refused():
    As, Bts = random_fleet(15)
    _, _, stats = random_statistics(As, seed=8)
    with pytest.raises(ValueError, match="adapters x"):
        fleet_kind_calibrated("sharea", As, Bts, stats[:-1], 2)
    with pytest.raises(ValueError, match="fleet method"):
        fleet_kind_calibrated("aslora", As, Bts, stats, 2)


def test_statistics_restricted_to_a_clusters_basis_are_the_ones_taken_there():
    """A cluster's basis (its members' A's) lies in the fleet's: S re-expressed from the fleet's basis
    equals Q_c^T C Q_c formed from the dense moment."""
    As, _ = random_fleet(11)
    q, moments, stats = random_statistics(As, seed=3)
    q_cluster = fleet_basis(As[1:2])  # a cluster of one adapter: a basis of 6 of the fleet's 11 columns
    assert q_cluster.shape[1] < q.shape[1]
    for c, s in zip(moments[1], stats[1]):
        torch.testing.assert_close(
            restrict_statistics(s, q, q_cluster), q_cluster.T @ c @ q_cluster, rtol=1e-9, atol=1e-9
        )
