"""converters/fleet_extend.py against dense references: a new adapter's cores are the dense least squares
on the fleet's bases, each step's kept energy is that of the dense projection on the grown bases, the new
directions are those of the dense residual's SVD, and padded cores leave the old updates bit-identical."""

import pytest
import torch

import converters
from converters.fleet_extend import extension, pad_core, project
from tests.converters.test_fleet_math import LAYERS, random_fleet
from tests.converters_reference import F64


def dense_kept(dws, v, u=None):
    """sum_l ||U U^T dW_l V^T V||^2 from the dense updates (U = identity when None)."""
    return sum(float(((d if u is None else u @ (u.T @ d)) @ v.T @ v).square().sum()) for d in dws)


@pytest.mark.parametrize("method", converters.FLEET_FORMS)
def test_projection_and_every_step_match_the_dense_projection(method):
    As, Bts = random_fleet(21, ranks=[4, 3, 2, 3], common=0.3)
    fleet = converters.fleet_kind(method, As[:3], Bts[:3], 3, rank_out=3)
    new_as, new_bts = As[3], Bts[3]
    dws = [bt.to(F64) @ a.to(F64) for a, bt in zip(new_as, new_bts)]
    v = fleet.basis_v.to(F64)
    u = None if fleet.basis_u is None else fleet.basis_u.to(F64)
    fit = project(new_as, new_bts, fleet.basis_v, fleet.basis_u)
    energy = sum(float(d.square().sum()) for d in dws)
    assert fit.energy == pytest.approx(energy, rel=1e-9)
    assert fit.error == pytest.approx(energy - dense_kept(dws, v, u), rel=1e-5)
    for d, core in zip(dws, fit.cores):  # the least squares solve, dense: min_C ||dW - L C V|| for orthonormal L, V
        left = torch.eye(d.shape[0], dtype=F64) if u is None else u
        solved = torch.linalg.lstsq(v.T, torch.linalg.lstsq(left, d).solution.T).solution.T
        torch.testing.assert_close(core.to(F64), solved, atol=1e-5, rtol=1e-4)
    ext = extension(new_as, new_bts, fleet.basis_v, fleet.basis_u)
    assert ext.kept[0] == pytest.approx(dense_kept(dws, v, u), rel=1e-6)
    assert all(b >= a - 1e-9 * energy for a, b in zip(ext.kept, ext.kept[1:]))  # nested: never falls
    assert ext.kept[-1] == pytest.approx(energy, rel=1e-6)  # the whole residual spanned: nothing left
    grown_v = torch.cat([v, ext.rows_v])
    torch.testing.assert_close(
        grown_v @ grown_v.T, torch.eye(grown_v.shape[0], dtype=F64), atol=1e-6, rtol=0
    )  # V: float32
    # the first right step is the residual stack's top right singular vector (dense SVD), up to sign
    residual = torch.cat([d - d @ v.T @ v for d in dws])
    top = torch.linalg.svd(residual).Vh[0]
    top = top - (top @ v.T) @ v  # the stored V is orthonormal to float32 precision only
    top = top / top.norm()
    assert abs(float(top @ ext.rows_v[0])) == pytest.approx(1.0, abs=1e-6)
    for e in (1, 2, ext.steps):
        e1, e2 = ext.sizes(e)
        gu = None if u is None else torch.cat([u, ext.cols_u[:, :e1]], dim=1)
        assert ext.kept[e] == pytest.approx(dense_kept(dws, torch.cat([v, ext.rows_v[:e2]]), gu), rel=1e-6)


@pytest.mark.parametrize("method", converters.FLEET_FORMS)
def test_padded_cores_keep_the_old_updates_bit_identical(method):
    As, Bts = random_fleet(22, ranks=[4, 3, 2, 3], common=0.3)
    fleet = converters.fleet_kind(method, As[:3], Bts[:3], 3, rank_out=3)
    ext = extension(As[3], Bts[3], fleet.basis_v, fleet.basis_u)
    e1, e2 = ext.sizes(2)
    v = torch.cat([fleet.basis_v, ext.rows_v[:e2].to(fleet.basis_v.dtype)])
    u = None if fleet.basis_u is None else torch.cat([fleet.basis_u, ext.cols_u[:, :e1].to(fleet.basis_u.dtype)], 1)
    for i in range(3):
        for l in range(LAYERS):
            core = fleet.cores[i][l]
            before = (core if u is None else fleet.basis_u @ core) @ fleet.basis_v
            padded = pad_core(core, e1, e2) if u is not None else pad_core(core, 0, e2)
            after = (padded if u is None else u @ padded) @ v
            assert torch.equal(before, after)
