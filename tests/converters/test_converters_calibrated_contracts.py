"""Fast contracts of the calibrated converters (calibration.py, calibrated_shareab.py,
calibrated_sharea.py, calibrated_aslora.py) that survivors of tests/mutation/mutation.sh pointed at
(issue 20); test_converters_calibrated.py's brute-force optimisers take ~30 s, this file seconds.

References are independent of the factored code: the dense objective with n_in x n_in second
moments (test_converters_calibrated.py's helpers), dense eigen / least-squares solves of each
closed-form piece, the plain converters for identity statistics, and the documented messages.
"""

import re

import pytest
import torch

import converters
from converters import calibrated_sharea as csa
from converters.calibrated_aslora import (
    check_partition,
    convert_aslora_calibrated,
    grouped_directions,
    propose_partition,
)
from converters.calibrated_shareab import convert_shareab_calibrated
from converters.calibration import (
    CalibratedKind,
    check_statistics,
    damp,
    factors_objective,
    finish,
    orthonormal_rows,
    psd_eigh,
    psd_factor,
    psd_roots,
    site_difference,
    weighted_sq_norm,
)
from converters.grouping import group_points
from tests.converters.test_converters_calibrated import (
    convert,
    damped_dense,
    dense_objective,
    max_rel_diff,
    plain,
    products,
    result_objective,
    tiny_case,
)
from tests.converters_reference import F64, dense_updates, random_kind


def _sym_psd(gen, p, rank=None):
    x = torch.randn(p, rank or p, generator=gen, dtype=F64)
    return x @ x.T


def _identity_case(seed, n_sites=4, n_out=7, n_in=8, ranks=2):
    gen = torch.Generator().manual_seed(seed)
    As, Bts = random_kind(gen, n_sites, n_out, n_in, ranks, dtype=F64, common=0.6)
    p = converters.calibration_basis(As).shape[1]
    return As, Bts, [torch.eye(p, dtype=F64)] * n_sites


def _same_as_plain(method, As, Bts, S, k, rel):
    """The calibrated result with identity statistics against the plain converter: products,
    objective and spectrum agree; returns the calibrated result."""
    ours = convert(method, As, Bts, S, k)
    today = plain(method, As, Bts, k)
    assert max_rel_diff(products(ours), products(today)) <= rel
    assert ours.objective == pytest.approx(today.error, rel=rel)
    torch.testing.assert_close(ours.result.spectrum, today.spectrum, rtol=1e-9, atol=1e-9 * float(today.spectrum[0]))
    return ours


def _dense_c_tilde(cs, q, lam):
    """The damped statistics seen in the input space, restricted to span(Q): Q S~_l Q^T."""
    return [q @ q.T @ c @ q @ q.T for c in damped_dense(cs, q, lam)]


# ---------------------------------------------------------------- calibration.py: small pieces


def test_input_statistics_shapes_counts_and_refusals():
    gen = torch.Generator().manual_seed(1)
    As, _ = random_kind(gen, 2, 4, 7, ranks=2, dtype=F64)
    q = converters.calibration_basis(As)
    x = torch.randn(5, 7, generator=gen, dtype=F64)
    s = converters.input_statistics(x.float(), q)
    assert s.dtype == F64 and s.shape == (4, 4)
    torch.testing.assert_close(s, q.T @ (x.T @ x) @ q / 5, rtol=1e-6, atol=1e-6)
    assert converters.calibration_basis([a.float() for a in As]).dtype == F64
    # one row: its outer product (divided by N = 1); no rows: zeros, not a division by zero
    torch.testing.assert_close(converters.input_statistics(x[:1], q), q.T @ x[:1].T @ x[:1] @ q, rtol=1e-12, atol=1e-12)
    assert torch.equal(converters.input_statistics(torch.zeros(0, 7, dtype=F64), q), torch.zeros(4, 4, dtype=F64))
    for bad in (torch.ones(7), torch.ones(3, 6), torch.ones(2, 3, 7)):
        with pytest.raises(ValueError, match=re.escape(f"inputs must be (N, 7), got {tuple(bad.shape)}")):
            converters.input_statistics(bad, q)


def test_damp_is_the_documented_ridge():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 5, generator=gen, dtype=F64)  # not symmetric: damp symmetrises
    sym = (s + s.T) / 2
    assert torch.equal(damp(s, 0.0), sym)
    for lam in (0.3, 1.0):
        want = sym + lam * float(torch.trace(s)) / 5 * torch.eye(5, dtype=F64)
        torch.testing.assert_close(damp(s, lam), want, rtol=1e-14, atol=1e-14)
    assert damp(torch.zeros(0, 0, dtype=F64), lam).shape == (0, 0)


def test_psd_helpers_against_dense_eigen():
    gen = torch.Generator().manual_seed(3)
    m = _sym_psd(gen, 6, rank=3)  # singular: three zero eigenvalues (roundoff may make them negative)
    values, vectors = psd_eigh(m - 1e-9 * torch.eye(6, dtype=F64))
    assert bool((values >= 0).all()) and bool((values[1:] >= values[:-1]).all())
    assert int((values == 0).sum()) == 3
    f = psd_factor(m)
    torch.testing.assert_close(f @ f.T, m, rtol=1e-10, atol=1e-10)
    root, inv_root = psd_roots(m)
    torch.testing.assert_close(root @ root, m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inv_root, torch.linalg.pinv(root, hermitian=True, rtol=1e-8), rtol=1e-8, atol=1e-8)
    full = _sym_psd(gen, 4) + torch.eye(4, dtype=F64)
    root, inv_root = psd_roots(full)
    torch.testing.assert_close(inv_root, torch.linalg.inv(root), rtol=1e-10, atol=1e-10)
    # an eigenvalue below p * eps of the largest counts as zero
    tiny = torch.diag(torch.tensor([1.0, 1e-17, 0.25], dtype=F64))
    torch.testing.assert_close(psd_roots(tiny)[1], torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=F64)))
    # the cutoff is relative to the largest eigenvalue, however small: a tiny but well-conditioned m
    small = torch.diag(torch.tensor([1e-10, 4e-20], dtype=F64))
    torch.testing.assert_close(
        psd_roots(small)[1], torch.diag(torch.tensor([1e5, 5e9], dtype=F64)), rtol=1e-12, atol=0.0
    )
    # the zero matrix has no inverse root anywhere (0 is not above a cutoff of 0)
    assert torch.equal(psd_roots(torch.zeros(3, 3, dtype=F64))[1], torch.zeros(3, 3, dtype=F64))
    empty = psd_roots(torch.zeros(0, 0, dtype=F64))
    assert empty[0].shape == empty[1].shape == (0, 0)


def test_orthonormal_rows_and_weighted_norms_against_dense():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, generator=gen, dtype=F64)
    z = torch.cat([z, z[:1] * 2])  # rank-deficient: still 3 orthonormal rows, spanning z's rows
    rows = orthonormal_rows(z)
    assert rows.shape == (3, 5)
    torch.testing.assert_close(rows @ rows.T, torch.eye(3, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z @ rows.T @ rows, z, rtol=1e-12, atol=1e-12)
    left, right, s = (
        torch.randn(6, 3, generator=gen, dtype=F64),
        torch.randn(3, 5, generator=gen, dtype=F64),
        _sym_psd(gen, 5),
    )
    e = left @ right
    assert weighted_sq_norm(left, right, s) == pytest.approx(float(torch.trace(e @ s @ e.T)), rel=1e-12)
    assert weighted_sq_norm(left, right, -s) == 0.0  # clamped: never negative
    bt, a, b2, a2 = (torch.randn(*shape, generator=gen, dtype=F64) for shape in ((6, 2), (2, 5), (6, 3), (3, 5)))
    e = bt @ a - b2 @ a2
    assert site_difference(bt, a, b2, a2, s) == pytest.approx(float(torch.trace(e @ s @ e.T)), rel=1e-12)


def test_check_statistics_messages_and_symmetrisation():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 3, generator=gen).float()
    out = check_statistics([s, s.double()], 2, 3)
    assert all(o.dtype == F64 for o in out)
    torch.testing.assert_close(out[1], (s.double() + s.double().T) / 2)
    with pytest.raises(ValueError, match="^need one statistics matrix per site: 2 sites, 1 matrices$"):
        check_statistics([s], 2, 3)
    with pytest.raises(
        ValueError,
        match=re.escape("site 1: statistics must be (3, 3) in the basis of calibration_basis(As), got (3, 2)"),
    ):
        check_statistics([s, s[:, :2]], 2, 3)
    for bad in (float("nan"), float("inf")):
        broken = s.clone()
        broken[0, 1] = bad
        with pytest.raises(ValueError, match="^site 1: statistics contain non-finite values$"):
            check_statistics([s, broken], 2, 3)


def test_calibrated_kind_fields_and_energies():
    As, Bts, cs, q, S = tiny_case(6, n_sites=3, n_out=6, n_in=8, ranks=[2, 1, 2])
    lam = 0.2
    with pytest.raises(ValueError, match="^lam must be >= 0, got -0.1$"):
        CalibratedKind.build(As, Bts, S, -0.1)
    ck = CalibratedKind.build(As, Bts, S, lam)
    assert ck.p == q.shape[1] == 5 and ck.n_sites == 3 and ck.lam == lam
    torch.testing.assert_close(ck.q, q, rtol=0, atol=0)
    for l, (a, bt, s) in enumerate(zip(As, Bts, S)):
        torch.testing.assert_close(ck.a[l] @ ck.q.T, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ck.u @ ck.b[l], bt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ck.s_raw[l], s, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(ck.s[l], damp(s, lam), rtol=1e-14, atol=1e-14)
    dws = dense_updates(As, Bts)
    for raw, cc in ((True, cs), (False, damped_dense(cs, q, lam))):
        want = [float(torch.trace(dw @ c @ dw.T)) for dw, c in zip(dws, cc)]
        assert [ck.site_energy(l, raw) for l in range(3)] == pytest.approx(want, rel=1e-10)
        assert ck.energy(raw) == pytest.approx(sum(want), rel=1e-10)
    assert ck.site_energy(1) == ck.site_energy(1, raw=False) != ck.site_energy(1, raw=True)  # damped by default


def test_factors_objective_and_calibrated_objective_refuse_rows_outside_span():
    As, Bts, cs, q, S = tiny_case(7, n_sites=3, n_out=6, n_in=8, ranks=2)
    ck = CalibratedKind.build(As, Bts, S, 0.0)
    outside = torch.linalg.qr(torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))).Q
    outside = (outside - q @ (q.T @ outside))[:, :2].T  # (2, 8) rows orthogonal to span(Q)
    bs = [torch.ones(6, 2, dtype=F64)] * 3
    with pytest.raises(
        ValueError,
        match=re.escape("site 0: the update has rows outside the statistics basis (was Q computed from these A's?)"),
    ):
        factors_objective(ck.kind, ck.q, ck.s, bs, [outside] * 3)
    # a zero B makes the outside rows harmless; rows inside are scored densely
    zero = [torch.zeros(6, 2, dtype=F64)] * 3
    inside = [q[:, :2].T] * 3
    got = factors_objective(ck.kind, ck.q, ck.s, [zero[0], bs[1], bs[2]], [outside, inside[1], inside[2]])
    assert got == pytest.approx(
        float(dense_objective(As, Bts, cs, [zero[0], bs[1], bs[2]], [inside[0], inside[1], inside[2]])), rel=1e-10
    )
    res = converters.convert_kind_calibrated("shareb", As, Bts, S, 2, lam=0.0)
    with pytest.raises(ValueError, match=re.escape(f"Q must have 8 rows, got (7, {q.shape[1]})")):
        converters.calibrated_objective(As, Bts, S, q[:7], res)
    shifted = torch.linalg.qr(q + 0.1 * torch.randn(*q.shape, dtype=F64, generator=torch.Generator().manual_seed(1))).Q
    with pytest.raises(ValueError, match=re.escape("site 0: A has rows outside span(Q); use calibration_basis(As)")):
        converters.calibrated_objective(As, Bts, S, shifted, res)
    # a plain KindResult is scored too, damped by lam as the converters damp
    today = converters.convert_kind("shareb", As, Bts, 2)
    for lam in (0.0, 0.5):
        want = result_objective(As, Bts, damped_dense(cs, q, lam), today)
        assert converters.calibrated_objective(As, Bts, S, q, today, lam=lam) == pytest.approx(want, rel=1e-10)


def test_span_checks_are_relative_and_accept_what_they_document():
    """Both span checks compare a squared norm outside span(Q) with 1e-8 of the squared norms: a
    leak of 1e-10 (relative) passes at any scale, an exactly-zero site passes (0 is not above 0)."""
    As, Bts, cs, q, S = tiny_case(9, n_sites=3, n_out=6, n_in=8, ranks=2)
    As, Bts = [100 * a for a in As], [100 * bt for bt in Bts]  # squared norms ~1e8: an absolute test fails
    ck = CalibratedKind.build(As, Bts, S, 0.0)
    normal = (
        torch.linalg.qr(torch.cat([q, torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(5))], dim=1))
        .Q[:, -2:]
        .T
    )  # rows orthogonal to span(Q)
    inside = [q[:, :2].T * 10] * 3
    leaky = [a + 1e-4 * normal for a in inside]  # leak ~1e-10 relative
    bs = [bt.clone() for bt in Bts]
    got = factors_objective(ck.kind, ck.q, ck.s, bs, leaky)
    assert got == pytest.approx(float(dense_objective(As, Bts, cs, bs, inside)), rel=1e-6)
    # a site with nothing to fit and nothing fitted is scored 0, not refused
    zero_bts = [torch.zeros_like(Bts[0]), Bts[1], Bts[2]]
    zk = CalibratedKind.build(As, zero_bts, S, 0.0)
    got = factors_objective(zk.kind, zk.q, zk.s, [torch.zeros(6, 2, dtype=F64), bs[1], bs[2]], inside)
    assert got == pytest.approx(
        float(dense_objective(As, zero_bts, cs, [torch.zeros(6, 2, dtype=F64), bs[1], bs[2]], inside)), rel=1e-9
    )
    res = converters.convert_kind_calibrated("shareb", As, Bts, S, 2, lam=0.0)
    tilted = torch.linalg.qr(q + 1e-6 * normal.T[:, :1].expand(8, q.shape[1])).Q  # A's leak ~1e-12 relative
    assert converters.calibrated_objective(As, Bts, S, tilted, res) == pytest.approx(res.raw_objective, rel=1e-4)
    zero_as = [torch.zeros_like(As[0]), As[1], As[2]]
    zq = converters.calibration_basis(zero_as)
    zres = converters.convert_kind("shareb", zero_as, Bts, 2)
    zs = [torch.eye(zq.shape[1], dtype=F64)] * 3
    assert converters.calibrated_objective(zero_as, Bts, zs, zq, zres) == pytest.approx(zres.error, rel=1e-9)


def test_calibrated_objective_takes_results_of_any_dtype_and_defaults_to_raw():
    As, Bts, cs, q, S = tiny_case(10, n_sites=3, n_out=6, n_in=8, ranks=2)
    res32 = converters.convert_kind_calibrated(
        "sharea", [a.float() for a in As], [bt.float() for bt in Bts], S, 2, lam=0.2
    )
    want = result_objective(As, Bts, cs, res32)
    assert converters.calibrated_objective(As, Bts, S, q, res32) == pytest.approx(want, rel=1e-6)
    assert converters.calibrated_objective(As, Bts, S, q.float(), res32.result) == pytest.approx(want, rel=1e-5)
    damped = result_objective(As, Bts, damped_dense(cs, q, 0.2), res32)
    assert converters.calibrated_objective(As, Bts, S, q, res32, lam=0.2) == pytest.approx(damped, rel=1e-6)


def test_finish_fields():
    As, Bts, cs, q, S = tiny_case(8, n_sites=3, n_out=6, n_in=8, ranks=2)
    As32, Bts32 = [a.float() for a in As], [bt.float() for bt in Bts]  # S is in As' basis: 1e-7 apart
    ck = CalibratedKind.build(As32, Bts32, S, 0.1)
    a = [orthonormal_rows(torch.randn(2, ck.p, dtype=F64, generator=torch.Generator().manual_seed(2))) @ ck.q.T]
    b = [torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    out = finish(
        ck,
        "aslora",
        a,
        b,
        a_index=[0, 0, 0],
        b_index=[1, 0, 1],
        groups=[[1], [0, 2]],
        spectrum=torch.ones(2, dtype=F64),
        history=[9.0, 8.0],
        iterations=4,
        total_iterations=7,
        rank=5,
    )
    r = out.result
    assert (r.method, r.a_index, r.b_index, r.groups, r.rank, r.already_shared) == (
        "aslora",
        [0, 0, 0],
        [1, 0, 1],
        [[1], [0, 2]],
        5,
        False,
    )
    assert all(t.dtype == torch.float32 for t in r.a_tensors + r.b_tensors)
    assert (out.iterations, out.total_iterations, out.lam, out.objective_history) == (4, 7, 0.1, [9.0, 8.0])
    site_bs, site_as = [b[1], b[0], b[1]], a * 3
    assert (
        out.objective
        == r.error
        == pytest.approx(float(dense_objective(As, Bts, damped_dense(cs, q, 0.1), site_bs, site_as)), rel=1e-6)
    )
    assert out.raw_objective == pytest.approx(float(dense_objective(As, Bts, cs, site_bs, site_as)), rel=1e-6)
    dws = dense_updates(As32, Bts32)
    assert out.raw_energy == pytest.approx(sum(float(torch.trace(dw @ c @ dw.T)) for dw, c in zip(dws, cs)), rel=1e-6)
    assert r.energy == pytest.approx(ck.energy(), rel=1e-12) and r.energy > out.raw_energy
    assert out.frobenius_error == pytest.approx(
        sum(float((dw - bb @ aa).square().sum()) for dw, bb, aa in zip(dws, site_bs, site_as)), rel=1e-6
    )
    closed = finish(
        ck, "shareab", a, b[:1], a_index=[0] * 3, b_index=[0] * 3, groups=[[0, 1, 2]], spectrum=torch.ones(1, dtype=F64)
    )
    assert closed.objective_history == [closed.objective] and closed.result.rank == 2
    assert (closed.iterations, closed.total_iterations) == (0, 0)
    shared = converters.convert_kind_calibrated("shareab", [As[0]] * 3, Bts, [S[0]] * 3, 1)
    assert shared.result.already_shared


# ---------------------------------------------------------------- calibrated_shareab.py


def _dense_shareab(As, Bts, c_tilde, k):
    """Best rank-k M (rows in span(Q)) for sum_l tr((dW_l - M) C_l (...)^T), by a dense eigen solve:
    with W = sum_l C_l and R = sum_l dW_l C_l, the objective is const + ||(M - R W^+) W^{1/2}||^2,
    so M = trunc_k(R W^{+1/2}) W^{+1/2} and the decreases are the eigenvalues of R W^+ R^T."""
    dws = dense_updates(As, Bts)
    w = sum(c_tilde)
    r = sum(dw @ c for dw, c in zip(dws, c_tilde))
    values, vectors = torch.linalg.eigh(w)
    keep = values > 1e-10 * values.max()
    inv_root = (vectors[:, keep] / values[keep].sqrt()) @ vectors[:, keep].T
    u, sig, vh = torch.linalg.svd(r @ inv_root, full_matrices=False)
    m = (u[:, :k] * sig[:k]) @ vh[:k] @ inv_root
    return m, sig.square()


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_shareab_is_the_dense_closed_form(lam):
    As, Bts, cs, q, S = tiny_case(20, n_sites=3, n_out=7, n_in=9, ranks=[2, 3, 1])
    c_tilde = _dense_c_tilde(cs, q, lam)
    ck = CalibratedKind.build(As, Bts, S, lam)
    for k in (1, 2, 4):
        res = convert_shareab_calibrated(ck, k)
        m, decreases = _dense_shareab(As, Bts, c_tilde, k)
        assert max_rel_diff(products(res), [m] * 3) <= 1e-8
        torch.testing.assert_close(res.result.spectrum[:4], decreases[:4], rtol=1e-8, atol=1e-10 * float(decreases[0]))
        assert res.objective == pytest.approx(res.result.energy - float(decreases[:k].sum()), rel=1e-9)
        assert res.objective == pytest.approx(
            float(dense_objective(As, Bts, c_tilde, [m] * 3, [torch.eye(9, dtype=F64)] * 3)), rel=1e-9
        )
        (a,) = res.result.a_tensors
        (b,) = res.result.b_tensors
        assert a.shape == (k, 9) and b.shape == (7, k)
        torch.testing.assert_close(a @ a.T, torch.eye(k, dtype=F64), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, m @ a.T, rtol=1e-8, atol=1e-8 * float(b.norm()))
        r = res.result
        assert (r.method, r.rank, r.a_index, r.b_index, r.groups) == ("shareab", k, [0] * 3, [0] * 3, [[0, 1, 2]])


def test_shareab_identity_statistics_caps_and_refusal():
    As, Bts, identity = _identity_case(21, n_sites=4, n_out=5, n_in=8, ranks=2)
    for k in (1, 3):
        _same_as_plain("shareab", As, Bts, identity, k, 1e-9)
    ck = CalibratedKind.build(As, Bts, identity, 0.0)
    # capped at min(n_in, n_out) = 5, beyond p = 8: A keeps 5 orthonormal rows
    res = convert_shareab_calibrated(ck, 9)
    assert res.result.rank == 5 and res.result.a_tensors[0].shape == (5, 8)
    wide = _identity_case(22, n_sites=2, n_out=9, n_in=6, ranks=1)  # p = 2 < k = 4 <= n_in
    res = convert_shareab_calibrated(CalibratedKind.build(*wide, 0.0), 4)
    a = res.result.a_tensors[0]
    assert a.shape == (4, 6)
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=F64), rtol=1e-10, atol=1e-10)
    today = plain("shareab", wide[0], wide[1], 4)
    assert max_rel_diff(products(res), products(today)) <= 1e-9
    capped = convert_shareab_calibrated(CalibratedKind.build(*wide, 0.0), 8)  # capped at n_in = 6 < n_out
    assert capped.result.rank == 6 and capped.result.a_tensors[0].shape == (6, 6)
    with pytest.raises(ValueError, match="^rank must be positive, got 0$"):
        convert_shareab_calibrated(ck, 0)


# ---------------------------------------------------------------- calibrated_shareb.py


def test_shareb_is_the_dense_eigen_solve():
    """Module doc: U is the top-k eigenvectors of G = sum_l dW_l C~_l dW_l^T, A'_l = U^T dW_l, and
    objective(k) = energy - (top k eigenvalues of G)."""
    from converters.calibrated_shareb import convert_shareb_calibrated

    As, Bts, cs, q, S = tiny_case(23, n_sites=3, n_out=7, n_in=9, ranks=[2, 3, 1])
    lam = 0.05
    c_tilde = damped_dense(cs, q, lam)
    dws = dense_updates(As, Bts)
    values, vectors = torch.linalg.eigh(sum(dw @ c @ dw.T for dw, c in zip(dws, c_tilde)))
    values, vectors = values.flip(0), vectors.flip(1)
    ck = CalibratedKind.build(As, Bts, S, lam)
    for k in (1, 2, 4):
        res = convert_shareb_calibrated(ck, k)
        u = vectors[:, :k]
        assert max_rel_diff(products(res), [u @ u.T @ dw for dw in dws]) <= 1e-8
        torch.testing.assert_close(res.result.spectrum[:6], values[:6], rtol=1e-8, atol=1e-10 * float(values[0]))
        assert res.objective == pytest.approx(res.result.energy - float(values[:k].sum()), rel=1e-9)
        r = res.result
        assert (r.method, r.rank, r.a_index, r.b_index, r.groups) == ("shareb", k, [0, 1, 2], [0] * 3, [[0, 1, 2]])
    with pytest.raises(ValueError, match="^rank must be positive, got 0$"):
        convert_shareb_calibrated(ck, 0)


# ---------------------------------------------------------------- calibrated_sharea.py


def _problem(seed, lam=0.05, **kw):
    args = dict(n_sites=4, n_out=7, n_in=9, ranks=2) | kw
    As, Bts, cs, q, S = tiny_case(seed, **args)
    ck = CalibratedKind.build(As, Bts, S, lam)
    return As, Bts, _dense_c_tilde(cs, q, lam), q, ck, csa.SharedRowsProblem(ck)


def test_b_step_is_the_dense_weighted_least_squares_and_objective_is_dense():
    As, Bts, c_tilde, q, ck, problem = _problem(30, lam=0.05)
    z = orthonormal_rows(torch.randn(2, ck.p, dtype=F64, generator=torch.Generator().manual_seed(0)))
    a = z @ q.T
    dws = dense_updates(As, Bts)
    for partition in ([[0], [1], [2], [3]], [[0, 2], [1, 3]]):
        ps = problem.b_step(z, partition)
        site_bs = [None] * 4
        for g, p_g in zip(partition, ps):
            # a group's B: the normal equations of one weighted least-squares fit of its sites
            want = sum(dws[l] @ c_tilde[l] @ a.T for l in g) @ torch.linalg.inv(sum(a @ c_tilde[l] @ a.T for l in g))
            torch.testing.assert_close(ck.u @ p_g, want, rtol=1e-9, atol=1e-9 * float(want.norm()))
            for l in g:
                site_bs[l] = ck.u @ p_g
        got = problem.objective(z, partition, ps)
        assert got == pytest.approx(float(dense_objective(As, Bts, c_tilde, site_bs, [a] * 4)), rel=1e-10)
        st = problem.state(z, partition)
        assert st.objective == got and st.partition == partition and torch.equal(st.z, z)
    # the moments are cached per group: asking again gives the same tensors
    first = problem.group_moments([[0, 2], [1, 3]])
    assert all(x is y for x, y in zip(first, problem.group_moments([[0, 2], [1, 3]])))
    torch.testing.assert_close(first[0], ck.s[0] + ck.s[2])


def _dense_a_step(problem, st):
    """The normal equations' solution by one dense solve of the (k p) Kronecker system."""
    ck = problem.ck
    k, p = st.z.shape
    system = torch.zeros(k * p, k * p, dtype=F64)
    rhs = torch.zeros(k, p, dtype=F64)
    for g, p_g in zip(st.partition, st.p):
        s_g = sum(ck.s[l] for l in g)
        system += torch.kron(p_g.T @ p_g, s_g)  # row-major vec(Z): (G (x) S_g) vec Z = vec(G Z S_g)
        rhs += sum(p_g.T @ ck.b[l] @ ck.a[l] @ ck.s[l] for l in g)
    return torch.linalg.solve(system, rhs.reshape(-1)).reshape(k, p)


@pytest.mark.parametrize("partition", [[[0], [1], [2], [3]], [[0, 1, 3], [2]]])
def test_a_step_solves_the_normal_equations(partition):
    _, _, _, _, ck, problem = _problem(31, lam=0.05, n_in=7, ranks=1)  # p = 4, k = 2: 8 unknowns
    z = orthonormal_rows(torch.randn(2, ck.p, dtype=F64, generator=torch.Generator().manual_seed(1)))
    st = problem.state(z, partition)
    want = _dense_a_step(problem, st)
    torch.testing.assert_close(problem.a_step(st), want, rtol=1e-8, atol=1e-8 * float(want.norm()))
    # within CG_TOL of the right-hand side (relative): CG stops at once and returns Z as given
    rhs_norm = float(sum((p_g.T @ ck.b[l] @ ck.a[l] @ ck.s[l] for g, p_g in zip(partition, st.p) for l in g)).norm())
    assert rhs_norm > 10  # so that a target of CG_TOL / |rhs| would be a different one
    near = want + 1e-12 * torch.randn(want.shape, dtype=F64, generator=torch.Generator().manual_seed(2)) * float(
        want.norm()
    )
    solved = csa.AlternationState(near, partition, st.p, st.objective)
    assert torch.equal(problem.a_step(solved), near)


def test_a_step_preconditioner_is_exact_for_proportional_statistics(monkeypatch):
    """Module doc: with proportional S_g the Kronecker preconditioner is exact, one CG step solves it."""
    gen = torch.Generator().manual_seed(32)
    As, Bts = random_kind(gen, 3, 7, 10, 2, dtype=F64)
    p = converters.calibration_basis(As).shape[1]
    base = _sym_psd(gen, p) + torch.eye(p, dtype=F64)
    ck = CalibratedKind.build(As, Bts, [base, 2 * base, 0.5 * base], 0.0)
    problem = csa.SharedRowsProblem(ck)
    monkeypatch.setattr(csa, "CG_MAX_STEPS", 1)
    for partition in ([[0], [1], [2]], [[0, 2], [1]]):
        z = orthonormal_rows(torch.randn(3, p, dtype=F64, generator=gen))
        st = problem.state(z, partition)
        want = _dense_a_step(problem, st)
        torch.testing.assert_close(problem.a_step(st), want, rtol=1e-8, atol=1e-8 * float(want.norm()))


def test_a_step_never_raises_the_objective_with_a_capped_solve(monkeypatch):
    _, _, _, _, ck, problem = _problem(33, lam=0.01, n_sites=5, n_in=12, ranks=3)
    monkeypatch.setattr(csa, "CG_MAX_STEPS", 2)
    z = orthonormal_rows(torch.randn(3, ck.p, dtype=F64, generator=torch.Generator().manual_seed(2)))
    partition = [[l] for l in range(5)]
    st = problem.state(z, partition)
    moved = problem.a_step(st)
    # the quadratic in Z at fixed B's: lower at the moved Z, and above the exact minimiser
    at = lambda zz: problem.objective(zz, partition, st.p)  # noqa: E731
    assert at(moved) < at(st.z)
    assert at(_dense_a_step(problem, st)) <= at(moved)


def test_sharea_identity_statistics_give_plain_sharea_and_fields():
    As, Bts, identity = _identity_case(34, n_sites=4, n_out=7, n_in=8, ranks=2)
    for k in (1, 3):
        r = _same_as_plain("sharea", As, Bts, identity, k, 1e-8).result
        assert (r.method, r.rank, r.a_index, r.b_index, r.groups) == (
            "sharea",
            k,
            [0] * 4,
            [0, 1, 2, 3],
            [[0], [1], [2], [3]],
        )
        assert len(r.b_tensors) == 4 and r.a_tensors[0].shape == (k, 8)


def test_sharea_objective_history_and_b_optimality():
    As, Bts, cs, q, S = tiny_case(35, n_sites=4, n_out=7, n_in=9, ranks=2, deviation=0.8)
    lam = 0.02
    res = convert("sharea", As, Bts, S, 2, lam=lam, tol=1e-10, restarts=1)
    c_tilde = damped_dense(cs, q, lam)
    assert res.objective == pytest.approx(result_objective(As, Bts, c_tilde, res), rel=1e-10)
    assert res.raw_objective == pytest.approx(result_objective(As, Bts, cs, res), rel=1e-10)
    history = res.objective_history
    assert len(history) > 2 and all(b < a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(res.objective, rel=1e-9)
    assert 1 <= res.iterations < res.total_iterations  # three starts: the kept run's rounds and all rounds
    (a,) = res.result.a_tensors
    torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=F64), rtol=1e-10, atol=1e-10)
    for dw, c, bb in zip(dense_updates(As, Bts), c_tilde, res.result.b_tensors):
        want = dw @ c @ a.T @ torch.linalg.inv(a @ c @ a.T)
        torch.testing.assert_close(bb, want, rtol=1e-9, atol=1e-9 * float(want.norm()))
    # the start problem's spectrum: every S_l replaced by the mean, whitened stack of dW_l C^{1/2}
    mean = sum(c_tilde) / 4
    values, vectors = torch.linalg.eigh(mean)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    want = torch.linalg.svdvals(torch.cat([dw @ root for dw in dense_updates(As, Bts)])).square()
    torch.testing.assert_close(res.result.spectrum[:4], want[:4], rtol=1e-8, atol=1e-10 * float(want[0]))


def test_sharea_stationary_point():
    """At the kept A the objective has no first-order descent along A' = Z Q^T: the gradient of the
    dense objective with respect to Z (B's at their optimum) vanishes."""
    As, Bts, cs, q, S = tiny_case(36, n_sites=3, n_out=6, n_in=8, ranks=2)
    res = convert("sharea", As, Bts, S, 2, lam=0.01, tol=1e-13, max_iterations=400)
    c_tilde = damped_dense(cs, q, 0.01)
    z = (res.result.a_tensors[0] @ q).clone().requires_grad_()
    bs = [b.detach() for b in res.result.b_tensors]
    value = dense_objective(As, Bts, c_tilde, bs, [z @ q.T] * 3)
    (grad,) = torch.autograd.grad(value, z)
    assert float(grad.norm()) <= 1e-5 * float(value.detach()) ** 0.5 * float(res.result.energy) ** 0.5


def test_sharea_ranks_beyond_p_and_refusals():
    As, Bts, cs, q, S = tiny_case(37, n_sites=2, n_out=6, n_in=9, ranks=1)  # p = 2
    ck = CalibratedKind.build(As, Bts, S, 0.01)
    res = csa.convert_sharea_calibrated(ck, 12)  # capped at n_in = 9
    a = res.result.a_tensors[0]
    assert res.result.rank == 9 and a.shape == (9, 9)
    torch.testing.assert_close(a @ a.T, torch.eye(9, dtype=F64), rtol=1e-10, atol=1e-10)
    for b in res.result.b_tensors:
        assert b.shape == (6, 9) and not bool(b[:, 2:].any())  # padding rows get zero B columns
    assert res.objective <= 1e-20 * res.result.energy
    for rank, restarts in ((0, 0), (1, -1)):
        with pytest.raises(
            ValueError, match=re.escape(f"rank must be positive and restarts >= 0, got {rank}, {restarts}")
        ):
            csa.convert_sharea_calibrated(ck, rank, restarts=restarts)


def test_sharea_starts_and_random_rows():
    _, _, c_tilde, q, ck, problem = _problem(38, lam=0.05)
    rows = csa.random_rows(problem, 2, 3)
    again = csa.random_rows(problem, 2, 3)
    assert len(rows) == 3 and all(torch.equal(x, y) for x, y in zip(rows, again))
    assert not torch.allclose(rows[0], rows[1])
    for z in rows:
        assert z.shape == (2, ck.p)
        torch.testing.assert_close(z @ z.T, torch.eye(2, dtype=F64), rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(csa.RESTART_SEED)
    torch.testing.assert_close(rows[0], orthonormal_rows(torch.randn(2, ck.p, generator=gen, dtype=F64)))
    starts, spectrum = csa.sharea_starts(problem, 2, 2)
    assert len(starts) == 4 and all(s.partition == [[0], [1], [2], [3]] for s in starts)
    torch.testing.assert_close(starts[2].z, rows[0])
    torch.testing.assert_close(starts[3].z, rows[1])
    # start 0: plain ShareA's rows (top-k of the unweighted stack); start 1: the mean-whitened optimum
    dws = [ck.u @ b @ a for a, b in zip(ck.a, ck.b)]  # D_l in basis Q (rows), full height
    _, _, vh = torch.linalg.svd(torch.cat(dws), full_matrices=False)
    plain_rows = vh[:2]
    assert float((starts[0].z.T @ starts[0].z - plain_rows.T @ plain_rows).norm()) <= 1e-9
    root, inv_root = csa.mean_whitening(ck)
    torch.testing.assert_close(root @ root, sum(ck.s) / 4, rtol=1e-10, atol=1e-10)
    _, _, vh = torch.linalg.svd(torch.cat([dw @ root for dw in dws]), full_matrices=False)
    white = orthonormal_rows(vh[:2] @ inv_root)
    assert float((starts[1].z.T @ starts[1].z - white.T @ white).norm()) <= 1e-9
    torch.testing.assert_close(csa.rows_from_whitened(vh.T, inv_root, 2), orthonormal_rows(vh[:2] @ inv_root))
    want = torch.linalg.svdvals(torch.cat([dw @ root for dw in dws])).square()
    torch.testing.assert_close(spectrum[:4], want[:4], rtol=1e-9, atol=1e-12 * float(want[0]))


def test_alternate_and_best_run_bookkeeping(monkeypatch):
    _, _, _, _, ck, problem = _problem(39, lam=0.01, n_sites=5, n_in=11, ranks=3, deviation=0.8)
    partition = [[l] for l in range(5)]
    z0 = csa.random_rows(problem, 2, 1)[0]
    start = problem.state(z0, partition)
    st, history, rounds = csa.alternate(problem, start, 200, 1e-9)
    assert history[0] == start.objective and history[-1] == st.objective
    assert all(b < a for a, b in zip(history, history[1:])) and len(history) > 3
    assert 1 <= rounds < 200 and len(history) <= rounds + 1
    # stops on a round that gains less than tol, and after max_iterations at most
    _, short, n = csa.alternate(problem, start, 2, 1e-9)
    assert n == 2 and short == history[: len(short)] and len(short) <= 3
    _, _, n = csa.alternate(problem, start, 200, 1.0)  # no round gains all of the objective
    assert n == 1
    # the stretched step is taken when it is lower (and never leaves Z non-orthonormal)
    torch.testing.assert_close(st.z @ st.z.T, torch.eye(2, dtype=F64), rtol=1e-10, atol=1e-10)
    # a regroup proposal is kept only when lower
    worse = lambda s: csa.AlternationState(s.z, s.partition, s.p, s.objective * 2)  # noqa: E731
    kept, h2, _ = csa.alternate(problem, start, 200, 1e-9, regroup=worse)
    assert h2 == history and kept.objective == st.objective
    calls = []

    def better(s):
        calls.append(1)
        return csa.AlternationState(s.z, s.partition, s.p, s.objective * 0.5) if len(calls) == 1 else None

    kept, h3, _ = csa.alternate(problem, start, 1, 1e-9, regroup=better)
    assert h3[-1] == h3[-2] * 0.5 and kept.objective == h3[-1]
    same = lambda s: csa.AlternationState(s.z, s.partition, s.p, s.objective)  # noqa: E731
    assert csa.alternate(problem, start, 200, 1e-9, regroup=same)[1] == history  # an equal proposal is not a step
    # no rounds: the start as it is
    none, h0, n0 = csa.alternate(problem, start, 0, 1e-9)
    assert (none, h0, n0) == (start, [start.objective], 0)
    # best_run keeps the lowest end, the first on ties; counts rounds of the kept run and of all
    starts = [start, problem.state(csa.random_rows(problem, 2, 2)[1], partition), start]
    runs = [csa.alternate(problem, s, 50, 1e-9) for s in starts]
    best, best_history, (kept_rounds, total) = csa.best_run(problem, starts, 50, 1e-9)
    lowest = min(range(3), key=lambda i: runs[i][0].objective)
    assert best.objective == runs[lowest][0].objective and best_history == runs[lowest][1]
    assert kept_rounds == runs[lowest][2] and total == sum(r[2] for r in runs)
    tie, _, (_, total) = csa.best_run(problem, [start, start], 50, 1e-9)
    assert total == 2 * runs[0][2] and tie.objective == runs[0][0].objective
    # with no rounds every start ends as it is: of two equal ones the first is kept
    twin = problem.state(z0.clone(), partition)
    kept, _, rounds = csa.best_run(problem, [start, twin], 0, 1e-9)
    assert kept is start and rounds == (0, 0)
    flipped = problem.state(-z0, partition)
    # the regroup hook reaches every alternation
    seen = []
    csa.best_run(problem, [start, flipped], 3, 1e-9, regroup=lambda s: seen.append(1))
    assert len(seen) >= 2


class _Recording(csa.SharedRowsProblem):
    """Records every A-step's output and every point the alternation scores."""

    def __init__(self, ck):
        super().__init__(ck)
        self.moved, self.scored = [], []

    def a_step(self, st):
        self.moved.append(super().a_step(st))
        return self.moved[-1]

    def state(self, z, partition):
        out = super().state(z, partition)
        self.scored.append(out)
        return out


def test_alternate_line_search_follows_the_documented_schedule():
    """Each round scores the A-step's rows and the move stretched by beta; beta starts at 2, doubles
    (to 64 at most) when the stretched point is lower, halves (to 2 at least) when not."""
    _, _, _, _, ck, _ = _problem(46, lam=0.0, n_sites=6, n_out=9, n_in=14, ranks=3, deviation=1.0)
    problem = _Recording(ck)
    start = problem.state(csa.random_rows(problem, 3, 1)[0], [[l] for l in range(6)])
    problem.scored.clear()
    st, history, rounds = csa.alternate(problem, start, 60, 1e-14)
    assert len(problem.moved) == rounds and len(problem.scored) == 2 * rounds
    exponent, current, exponents = 1, start, []  # beta = 2 ** exponent, exponent in 1..6
    for moved, refit, stretched in zip(problem.moved, problem.scored[::2], problem.scored[1::2]):
        torch.testing.assert_close(refit.z, orthonormal_rows(moved), rtol=0, atol=0)
        beta = 2.0**exponent
        torch.testing.assert_close(
            stretched.z, orthonormal_rows(current.z + beta * (moved - current.z)), rtol=0, atol=0
        )
        exponents.append(exponent)
        lower = stretched if stretched.objective < refit.objective else refit
        exponent = min(exponent + 1, 6) if lower is stretched else max(exponent - 1, 1)
        current = lower if lower.objective < current.objective else current
    assert current.objective == st.objective and history[-1] == st.objective
    assert max(exponents) >= 3 and min(exponents[1:]) <= 2  # both branches taken


class _OnCircle:
    """A stand-in problem for ``alternate`` (it needs only ``a_step`` and ``state``): one row z in the
    plane, objective ``1 - (z . t)^2``, the A-step a small move towards +-t. Far from t, stretching
    the move always lands lower; with ``flat`` every point scores the same."""

    def __init__(self, step=1e-4, flat=False, values=None):
        self.t = torch.tensor([0.1736, 0.9848], dtype=F64)  # 80 degrees from the start
        self.step, self.flat, self.scored = step, flat, []
        self.values = values  # scripted objectives, one per scored point, instead of the formula

    def state(self, z, partition):
        if self.values is not None:
            value = self.values[len(self.scored)]
        else:
            value = 0.5 if self.flat else float(1 - (z[0] @ self.t) ** 2)
        self.scored.append(z)
        return csa.AlternationState(z, partition, [], value)

    def a_step(self, st):
        toward = torch.sign(st.z[0] @ self.t) * self.t
        return st.z + self.step * (toward - st.z)


def test_alternate_beta_doubles_up_to_64_and_equal_points_are_no_step():
    problem = _OnCircle()
    start = problem.state(torch.tensor([[1.0, 0.0]], dtype=F64), [[0]])
    problem.scored.clear()
    st, history, rounds = csa.alternate(problem, start, 8, 0.0)
    assert rounds == 8 and len(history) == 9 and all(b < a for a, b in zip(history, history[1:]))
    z = start.z
    for beta, stretched in zip([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0], problem.scored[1::2]):
        moved = problem.a_step(csa.AlternationState(z, [[0]], [], 0.0))
        torch.testing.assert_close(stretched, orthonormal_rows(z + beta * (moved - z)), rtol=0, atol=0)
        z = stretched
    # every point as good as the start: nothing is a step, one round and the history has the start only
    flat = _OnCircle(flat=True)
    start = flat.state(torch.tensor([[1.0, 0.0]], dtype=F64), [[0]])
    st, history, rounds = csa.alternate(flat, start, 8, 1e-9)
    assert (st, history, rounds) == (start, [0.5], 1)
    # a stretched point that only ties the plain step does not beat it: the plain step is kept, beta halves
    scripted = _OnCircle(values=[1.0, 0.5, 0.5, 0.4, 0.45])
    start = scripted.state(torch.tensor([[1.0, 0.0]], dtype=F64), [[0]])
    st, history, rounds = csa.alternate(scripted, start, 2, 0.0)
    assert history == [1.0, 0.5, 0.4] and rounds == 2
    kept = scripted.scored[1]
    moved = scripted.a_step(csa.AlternationState(kept, [[0]], [], 0.0))
    torch.testing.assert_close(scripted.scored[4], orthonormal_rows(kept + 2.0 * (moved - kept)), rtol=0, atol=0)


# ---------------------------------------------------------------- calibrated_aslora.py


def test_grouped_directions_against_dense():
    gen = torch.Generator().manual_seed(40)
    bts = [torch.randn(5, 2, generator=gen, dtype=F64) for _ in range(4)]
    coords = [torch.randn(2, 6, generator=gen, dtype=F64) for _ in range(4)]
    partition = [[0, 3], [1], [2]]
    dirs, spectrum = grouped_directions(bts, coords, partition)
    stack = torch.cat([(len(g) ** 0.5) * sum(bts[l] @ coords[l] for l in g) / len(g) for g in partition])
    _, sig, vh = torch.linalg.svd(stack, full_matrices=False)
    torch.testing.assert_close(spectrum[:5], sig.square()[:5], rtol=1e-10, atol=1e-12)
    top = dirs[:, :3]
    assert float((top @ top.T - vh[:3].T @ vh[:3]).norm()) <= 1e-9


def test_check_partition_normalises_and_refuses():
    assert check_partition([[3, 1], [2, 0]], 4) == [[0, 2], [1, 3]]
    assert check_partition([[2], [1, 0]], 3) == [[0, 1], [2]]
    for bad in ([[0, 1]], [[0, 1, 2], []], [[0, 0, 1, 2]], [[0, 1, 2, 3]]):
        with pytest.raises(ValueError, match=re.escape(f"groups must partition the sites 0..2, got {bad}")):
            check_partition(bad, 3)


def test_aslora_validation_messages():
    As, Bts, identity = _identity_case(41, n_sites=3)
    ck = CalibratedKind.build(As, Bts, identity, 0.0)
    for rank, restarts in ((0, 0), (1, -2)):
        with pytest.raises(
            ValueError, match=re.escape(f"rank must be positive and restarts >= 0, got {rank}, {restarts}")
        ):
            convert_aslora_calibrated(ck, rank, 2, restarts=restarts)
    with pytest.raises(ValueError, match=re.escape("grouping must be one of ('any', 'adjacent'), got 'near'")):
        convert_aslora_calibrated(ck, 1, 2, grouping="near")
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"^groups must be positive, got {bad}$"):
            convert_aslora_calibrated(ck, 1, bad)
    many = convert_aslora_calibrated(ck, 1, 7)  # capped at the number of sites
    assert many.result.groups == [[0], [1], [2]] and len(many.result.b_tensors) == 3
    given = convert_aslora_calibrated(ck, 1, [[2, 0], [1]], regroup=False)
    assert given.result.groups == [[0, 2], [1]] and given.result.b_index == [0, 1, 0]


@pytest.mark.parametrize("grouping", ["any", "adjacent"])
def test_aslora_identity_statistics_give_plain_aslora(grouping):
    As, Bts, identity = _identity_case(42, n_sites=5, n_out=7, n_in=9, ranks=2)
    for k, groups in ((1, 2), (3, 3)):
        ours = convert("aslora", As, Bts, identity, k, groups=groups, grouping=grouping)
        today = converters.convert_kind("aslora", As, Bts, k, groups=groups, grouping=grouping)
        assert ours.result.groups == today.groups
        assert ours.objective == pytest.approx(today.error, rel=1e-8)
        assert max_rel_diff(products(ours), products(today)) <= 1e-8
        r = ours.result
        assert (r.method, r.rank, len(r.b_tensors)) == ("aslora", k, groups)
        # the spectrum of the kept partition's stack (mean-whitened, here unweighted)
        torch.testing.assert_close(
            r.spectrum, grouped_directions(Bts, As, r.groups)[1], rtol=1e-9, atol=1e-12 * float(r.spectrum[0])
        )


def test_aslora_given_partition_objective_and_b_optimality():
    As, Bts, cs, q, S = tiny_case(43, n_sites=4, n_out=7, n_in=9, ranks=2, deviation=0.8)
    lam = 0.03
    res = convert("aslora", As, Bts, S, 2, groups=[[3, 0], [1, 2]], regroup=False, lam=lam, tol=1e-10)
    c_tilde = damped_dense(cs, q, lam)
    assert res.result.groups == [[0, 3], [1, 2]] and res.result.b_index == [0, 1, 1, 0]
    assert res.objective == pytest.approx(result_objective(As, Bts, c_tilde, res), rel=1e-10)
    history = res.objective_history
    assert len(history) > 1 and all(b < a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(res.objective, rel=1e-9)
    (a,) = res.result.a_tensors
    dws = dense_updates(As, Bts)
    for g, bb in zip(res.result.groups, res.result.b_tensors):
        want = sum(dws[l] @ c_tilde[l] @ a.T for l in g) @ torch.linalg.inv(sum(a @ c_tilde[l] @ a.T for l in g))
        torch.testing.assert_close(bb, want, rtol=1e-9, atol=1e-9 * float(want.norm()))
    # the spectrum: grouped stack of the mean-whitened updates, for the kept partition
    mean = sum(c_tilde) / 4
    values, vectors = torch.linalg.eigh(mean)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    stack = torch.cat([sum(dws[l] @ root for l in g) / len(g) ** 0.5 for g in res.result.groups])
    want = torch.linalg.svdvals(stack).square()
    torch.testing.assert_close(res.result.spectrum[:4], want[:4], rtol=1e-8, atol=1e-10 * float(want[0]))


def _dense_proposal(ck, z, n_groups, grouping):
    """The documented proposal, densely: points P*_l M^{1/2} weighted by tr M_l (M_l = Z S_l Z^T)."""
    points, weights, moments = [], [], []
    for l in range(ck.n_sites):
        d = ck.b[l] @ ck.a[l]
        m_l = z @ ck.s[l] @ z.T
        points.append(d @ ck.s[l] @ z.T @ torch.linalg.inv(m_l))
        weights.append(float(torch.trace(m_l)))
        moments.append(m_l)
    w = torch.tensor(weights, dtype=F64)
    values, vectors = torch.linalg.eigh(sum(moments) / float(w.sum()))
    root = (vectors * values.sqrt()) @ vectors.T
    return group_points(torch.stack([p @ root for p in points]), n_groups, grouping, w)


@pytest.mark.parametrize("grouping", ["any", "adjacent"])
def test_propose_partition_is_the_documented_weighted_grouping(grouping):
    gen = torch.Generator().manual_seed(44)
    As, Bts = random_kind(gen, 6, 7, 9, 2, dtype=F64, common=0.3)
    p = converters.calibration_basis(As).shape[1]
    # per-site scales differing strongly: the weights matter
    S = [(_sym_psd(gen, p) + torch.eye(p, dtype=F64)) * scale for scale in (1, 5, 0.2, 3, 1, 0.5)]
    for overall in (1.0, 1e-14):  # the zero-weight floor is relative: tiny statistics group the same
        ck = CalibratedKind.build(As, Bts, [s * overall for s in S], 0.0)
        problem = csa.SharedRowsProblem(ck)
        for z in csa.random_rows(problem, 2, 3):
            for n in (2, 3):
                assert propose_partition(problem, z, n, grouping) == _dense_proposal(ck, z, n, grouping)


def test_aslora_regroups_and_never_loses_to_its_kept_partition():
    As, Bts, cs, q, S = tiny_case(45, n_sites=5, n_out=7, n_in=9, ranks=2, deviation=0.8)
    lam = 0.01
    free = convert("aslora", As, Bts, S, 2, groups=2, lam=lam, restarts=1)
    fixed = convert("aslora", As, Bts, S, 2, groups=free.result.groups, lam=lam, regroup=False, restarts=1)
    assert free.objective <= fixed.objective * (1 + 1e-6)
    assert free.objective == pytest.approx(result_objective(As, Bts, damped_dense(cs, q, lam), free), rel=1e-10)
    assert 1 <= free.iterations <= free.total_iterations
    history = free.objective_history
    assert all(b < a for a, b in zip(history, history[1:]))


def test_aslora_starts_are_the_plain_and_mean_whitened_optima_for_a_given_partition():
    from converters.calibrated_aslora import aslora_starts

    _, _, _, _, ck, problem = _problem(47, lam=0.05, n_sites=4, n_out=7, n_in=9, ranks=2, deviation=0.8)
    partition = [[0, 3], [1, 2]]
    starts = aslora_starts(problem, 2, partition, "any", 1)
    assert len(starts) == 3 and all(st.partition == partition for st in starts)
    dws = [ck.u @ b @ a for a, b in zip(ck.a, ck.b)]  # D_l in basis Q (rows)
    root, inv_root = csa.mean_whitening(ck)

    def top_rows(mats):
        stack = torch.cat([sum(mats[l] for l in g) / len(g) ** 0.5 for g in partition])
        return torch.linalg.svd(stack, full_matrices=False)[2][:2]

    def same_span(x, y):
        return float((x.T @ x - y.T @ y).norm()) <= 1e-9

    assert same_span(starts[0].z, top_rows(dws))
    white = orthonormal_rows(top_rows([d @ root for d in dws]) @ inv_root)
    assert same_span(starts[1].z, white)
    torch.testing.assert_close(starts[2].z, csa.random_rows(problem, 2, 1)[0])


def test_aslora_direct_call_defaults_and_one_group():
    """convert_aslora_calibrated regroups by default (a poor partition is left, seed 77 as in
    test_converters_contracts.py); one group is ShareAB's form, whose closed form it reaches."""
    As, Bts, cs, _, S = tiny_case(77, n_sites=4, n_out=6, n_in=8, ranks=2)
    ck = CalibratedKind.build(As, Bts, S, 0.0)
    given = [[0, 3], [1, 2]]
    moved = convert_aslora_calibrated(ck, 2, given)
    kept = convert_aslora_calibrated(ck, 2, given, regroup=False)
    assert kept.result.groups == given and moved.result.groups != given
    assert moved.objective < kept.objective * (1 - 1e-6)
    one = convert_aslora_calibrated(ck, 2, 1, tol=1e-12)
    assert one.result.groups == [[0, 1, 2, 3]] and len(one.result.b_tensors) == 1
    assert one.objective == pytest.approx(convert_shareab_calibrated(ck, 2).objective, rel=1e-6)
