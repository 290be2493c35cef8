"""Calibrated (activation-weighted) projection against independent references.

References: the dense objective ``sum_l tr((dW_l - B'_l A'_l) C_l (...)^T)`` with n_in x n_in C_l built
from sampled inputs, an autograd optimiser of that dense objective (Adam, then L-BFGS, several
random starts) over each form's parametrisation, and the plain converters.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
from converters.factored import row_basis
from tests.converters_reference import dense_updates, random_kind

F64 = torch.float64
SHARED = ["sharea", "shareb", "shareab", "aslora"]


def sample_inputs(gen, n_in, n_sites, n_samples=40, deviation=0.5, shared=False):
    """Correlated, anisotropic inputs per site: a common mixing plus a per-site one, decaying scales."""
    common = torch.randn(n_in, n_in, generator=gen, dtype=F64)
    decay = torch.logspace(0, -1.5, n_in, dtype=F64)
    xs = []
    for _ in range(n_sites):
        mix = common if shared else common + deviation * torch.randn(n_in, n_in, generator=gen, dtype=F64)
        xs.append(((mix * decay) @ torch.randn(n_in, n_samples, generator=gen, dtype=F64)).T)
    return [xs[0]] * n_sites if shared else xs


def tiny_case(seed, n_sites=3, n_out=8, n_in=10, ranks=2, **inputs):
    """(As, Bts, dense C's, Q, S's) of a small kind in float64."""
    gen = torch.Generator().manual_seed(seed)
    As, Bts = random_kind(gen, n_sites, n_out, n_in, ranks, dtype=F64, common=0.5)
    q = converters.calibration_basis(As)
    xs = sample_inputs(gen, n_in, n_sites, **inputs)
    cs = [x.T @ x / x.shape[0] for x in xs]
    return As, Bts, cs, q, [converters.input_statistics(x, q) for x in xs]


def dense_objective(As, Bts, cs, site_bs, site_as):
    """The objective, multiplied out densely; differentiable in the site factors, which may be
    lists or stacked (L, ...) tensors (a shared factor broadcasts)."""
    dw = torch.stack(dense_updates(As, Bts))
    if torch.is_tensor(site_bs) and torch.is_tensor(site_as):
        fitted = site_bs @ site_as
    else:  # lists: per-site ranks may differ
        fitted = torch.stack([b.to(F64) @ a.to(F64) for b, a in zip(site_bs, site_as)])
    e = dw - fitted
    return ((e @ torch.stack(cs)) * e).sum()


def result_objective(As, Bts, cs, result):
    res = result.result if isinstance(result, converters.CalibratedResult) else result
    bs, as_ = zip(*(res.site_factors(l) for l in range(res.n_sites)))
    return float(dense_objective(As, Bts, cs, bs, as_))


def damped_dense(cs, q, lam):
    """``C_l + lam tr(Q^T C_l Q)/p Q Q^T``: the converters' ridge, seen in the full input space."""
    p = q.shape[1]
    return [c + lam * float(torch.trace(q.T @ c @ q)) / p * (q @ q.T) for c in cs]


def optimise(loss, shapes, seed, starts=3, adam_steps=300, lbfgs_steps=300):
    """Least value of ``loss(*params)`` over ``starts`` random starts: Adam, then L-BFGS (float64)."""
    gen = torch.Generator().manual_seed(seed)
    best = float("inf")
    for _ in range(starts):
        params = [(0.5 * torch.randn(*shape, generator=gen, dtype=F64)).requires_grad_() for shape in shapes]
        adam = torch.optim.Adam(params, lr=0.03)
        for _ in range(adam_steps):
            adam.zero_grad()
            loss(*params).backward()
            adam.step()
        lbfgs = torch.optim.LBFGS(
            params,
            lr=1,
            max_iter=lbfgs_steps,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            lbfgs.zero_grad()
            value = loss(*params)
            value.backward()
            return value

        lbfgs.step(closure)
        with torch.no_grad():
            best = min(best, float(loss(*params)))
    return best


def convert(method, As, Bts, S, rank, lam=0.0, **kw):
    if method == "aslora":
        kw.setdefault("groups", 2)
    return converters.convert_kind_calibrated(method, As, Bts, S, rank, lam=lam, **kw)


def plain(method, As, Bts, rank, groups=2):
    return converters.convert_kind(method, As, Bts, rank, groups=groups if method == "aslora" else None)


def plain_truncation(As, Bts, rank):
    """PEFT's truncation: every dense dW_l cut to its top-k SVD, as (B, A) per site."""
    out = []
    for dw in dense_updates(As, Bts):
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        out.append((u[:, :rank] * s[:rank], vh[:rank]))
    return out


def products(result):
    res = result.result if isinstance(result, converters.CalibratedResult) else result
    return [b.to(F64) @ a.to(F64) for b, a in (res.site_factors(l) for l in range(res.n_sites))]


def max_rel_diff(xs, ys):
    scale = max(float(y.norm()) for y in ys)
    return max(float((x - y).norm()) for x, y in zip(xs, ys)) / scale


# ---------------------------------------------------------------- the objective itself


@pytest.mark.parametrize("method", ["lora", *SHARED])
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_factored_objective_is_the_dense_objective(method, lam):
    As, Bts, cs, q, S = tiny_case(1, n_sites=4, n_out=9, n_in=11, ranks=[2, 3, 1, 3])
    res = convert(method, As, Bts, S, 2, lam=lam)
    dense = result_objective(As, Bts, damped_dense(cs, q, lam), res)
    assert res.objective == pytest.approx(dense, rel=1e-10)
    assert res.result.error == res.objective
    assert res.raw_objective == pytest.approx(result_objective(As, Bts, cs, res), rel=1e-10)
    energy = sum(float(torch.trace(dw @ c @ dw.T)) for dw, c in zip(dense_updates(As, Bts), damped_dense(cs, q, lam)))
    assert res.result.energy == pytest.approx(energy, rel=1e-10)
    assert res.frobenius_error == pytest.approx(converters.reconstruction_error(As, Bts, res.result), rel=1e-10)
    # recomputed from the stored factors, as a reader of the written adapter would
    assert converters.calibrated_objective(As, Bts, S, q, res, lam=lam) == pytest.approx(res.objective, rel=1e-12)
    assert converters.calibrated_objective(As, Bts, S, q, res) == pytest.approx(res.raw_objective, rel=1e-12)


def test_input_statistics_are_the_projected_second_moment():
    gen = torch.Generator().manual_seed(2)
    As, _ = random_kind(gen, 3, 5, 9, ranks=2, dtype=torch.float32)
    q = converters.calibration_basis(As)
    assert torch.equal(q, row_basis([a.double() for a in As])[0])  # the plain converters' basis
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=F64), atol=1e-12)
    x = torch.randn(50, 9, generator=gen, dtype=F64)
    s = converters.input_statistics(x, q)
    assert torch.allclose(s, q.T @ (x.T @ x / 50) @ q, atol=1e-12)
    # batches combine by their counts
    combined = (20 * converters.input_statistics(x[:20], q) + 30 * converters.input_statistics(x[20:], q)) / 50
    assert torch.allclose(combined, s, atol=1e-12)


# ---------------------------------------------------------------- against a brute-force optimiser


def test_exact_forms_reach_the_brute_force_optimum():
    As, Bts, cs, q, S = tiny_case(3)
    L, n_out, n_in, p, k = 3, 8, 10, q.shape[1], 2
    forms = {
        # per-site truncation and ShareB are exact over all updates: the optimiser is unrestricted
        "lora": (lambda b, a: dense_objective(As, Bts, cs, b, a), [(L, n_out, 1), (L, 1, n_in)]),
        "shareb": (lambda b, a: dense_objective(As, Bts, cs, b, a), [(n_out, k), (L, k, n_in)]),
        # ShareAB is exact among shared A's in span(Q): A = Z Q^T
        "shareab": (lambda b, z: dense_objective(As, Bts, cs, b, z @ q.T), [(n_out, k), (k, p)]),
    }
    for seed, (method, (loss, shapes)) in enumerate(forms.items()):
        ours = convert(method, As, Bts, S, shapes[0][-1]).objective
        best = optimise(loss, shapes, seed, starts=2)
        assert ours <= best * (1 + 1e-6), method
        assert best <= ours * (1 + 1e-4), method  # the optimiser got there too: the check has teeth


@pytest.mark.parametrize("seed", [4, 5])
def test_alternating_forms_reach_the_brute_force_optimum(seed):
    As, Bts, cs, q, S = tiny_case(seed, n_sites=4, n_out=8, n_in=10, ranks=2)
    L, n_out, p, k = 4, 8, q.shape[1], 2
    sharea = convert("sharea", As, Bts, S, k, restarts=8)
    best = optimise(lambda z, b: dense_objective(As, Bts, cs, b, z @ q.T), [(k, p), (L, n_out, k)], seed)
    assert sharea.objective <= best * (1 + 1e-3)
    groups = [[0, 1], [2, 3]]
    aslora = convert("aslora", As, Bts, S, k, groups=groups, regroup=False, restarts=8)
    assert aslora.result.groups == groups
    best = optimise(lambda z, b: dense_objective(As, Bts, cs, b[[0, 0, 1, 1]], z @ q.T), [(k, p), (2, n_out, k)], seed)
    assert aslora.objective <= best * (1 + 1e-3)


def test_one_shared_c_makes_the_span_q_restriction_lossless():
    # module doc of calibration.py: with C_l = C, no shared A outside span(Q) does better
    As, Bts, cs, q, S = tiny_case(6, n_sites=3, n_out=8, n_in=10, ranks=2, shared=True)
    L, n_out, n_in, k = 3, 8, 10, 2
    sharea = convert("sharea", As, Bts, S, k)
    assert sharea.iterations <= 2  # the mean-whitened start is already the optimum
    best = optimise(lambda a, b: dense_objective(As, Bts, cs, b, a), [(k, n_in), (L, n_out, k)], 0, starts=2)
    assert sharea.objective <= best * (1 + 1e-6)
    shareab = convert("shareab", As, Bts, S, k)
    best = optimise(lambda b, a: dense_objective(As, Bts, cs, b, a), [(n_out, k), (k, n_in)], 1, starts=2)
    assert shareab.objective <= best * (1 + 1e-6)


# ---------------------------------------------------------------- identity statistics, ridge, plain


@pytest.mark.parametrize("method", SHARED)
def test_identity_statistics_give_todays_projection(method):
    gen = torch.Generator().manual_seed(7)
    As, Bts = random_kind(gen, 7, 12, 10, ranks=[3, 2, 3, 3, 1, 3, 2], dtype=F64, common=0.6)
    p = converters.calibration_basis(As).shape[1]
    identity = [torch.eye(p, dtype=F64)] * 7
    for k in (1, 3, 6):
        ours = convert(method, As, Bts, identity, k, groups=3)
        today = plain(method, As, Bts, k, groups=3)
        assert ours.objective == pytest.approx(today.error, rel=1e-8)
        assert ours.result.energy == pytest.approx(today.energy, rel=1e-10)
        assert ours.result.rank == today.rank and ours.result.groups == today.groups
        assert max_rel_diff(products(ours), products(today)) <= 1e-8


def test_identity_statistics_give_peft_truncation():
    gen = torch.Generator().manual_seed(8)
    As, Bts = random_kind(gen, 4, 9, 11, ranks=[3, 4, 2, 4], dtype=F64)
    identity = [torch.eye(converters.calibration_basis(As).shape[1], dtype=F64)] * 4
    for k in (1, 2, 3):
        ours = convert("lora", As, Bts, identity, k)
        truncated = [b @ a for b, a in plain_truncation(As, Bts, k)]
        assert max_rel_diff(products(ours), truncated) <= 1e-10
        assert ours.objective == pytest.approx(ours.frobenius_error, rel=1e-10)


@pytest.mark.parametrize("method", SHARED)
def test_huge_ridge_gives_the_plain_products_when_sites_weigh_alike(method):
    As, Bts, _, q, S = tiny_case(9, n_sites=4, n_out=9, n_in=10, ranks=2)
    p = q.shape[1]
    S = [s * (p / float(torch.trace(s))) for s in S]  # equal traces: equal site weights in the limit
    ours = convert(method, As, Bts, S, 2, lam=1e9)
    today = plain(method, As, Bts, 2)
    assert max_rel_diff(products(ours), products(today)) <= 1e-6
    assert ours.objective / 1e9 == pytest.approx(today.error, rel=1e-6)


def test_huge_ridge_weighs_sites_by_their_mean_input_energy():
    As, Bts, _, q, S = tiny_case(10, n_sites=4, n_out=9, n_in=10, ranks=2)
    p = q.shape[1]
    weights = [float(torch.trace(s)) / p for s in S]
    ours = convert("shareb", As, Bts, S, 2, lam=1e9)
    scaled = converters.convert_kind("shareb", As, [bt * w**0.5 for bt, w in zip(Bts, weights)], 2)
    expected = [m / w**0.5 for m, w in zip(products(scaled), weights)]
    assert max_rel_diff(products(ours), expected) <= 1e-6
    # the per-site truncation has no cross-site weights: any ridge gives PEFT's truncation in the limit
    truncation = convert("lora", As, Bts, S, 1, lam=1e9)
    assert max_rel_diff(products(truncation), [b @ a for b, a in plain_truncation(As, Bts, 1)]) <= 1e-6


@pytest.mark.parametrize("method", ["lora", *SHARED])
@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_calibrated_never_loses_to_plain_on_its_own_objective(method, lam):
    As, Bts, _, q, S = tiny_case(11, n_sites=5, n_out=10, n_in=12, ranks=[3, 2, 3, 3, 2])
    for k in (1, 3):
        ours = convert(method, As, Bts, S, k, lam=lam)
        if method == "lora":
            identity = [torch.eye(q.shape[1], dtype=F64)] * 5
            today = convert("lora", As, Bts, identity, k).result
        else:
            today = plain(method, As, Bts, k)
        plain_value = converters.calibrated_objective(As, Bts, S, q, today, lam=lam)
        assert ours.objective <= plain_value * (1 + 1e-12) + 1e-12 * ours.result.energy
        assert ours.frobenius_error >= today.error * (1 - 1e-9) or method == "lora"


# ---------------------------------------------------------------- the alternation and the closed forms


@pytest.mark.parametrize("seed", [12, 13, 14])
def test_alternation_history_never_increases(seed):
    As, Bts, _, _, S = tiny_case(seed, n_sites=6, n_out=10, n_in=12, ranks=3, deviation=0.8)
    runs = [
        convert("sharea", As, Bts, S, 3, restarts=2, tol=1e-10),
        convert("aslora", As, Bts, S, 3, groups=3, grouping="any", restarts=2),
        convert("aslora", As, Bts, S, 3, groups=3, grouping="adjacent"),
    ]
    for res in runs:
        history = res.objective_history
        assert all(later <= earlier for earlier, later in zip(history, history[1:]))
        assert history[-1] == pytest.approx(res.objective, rel=1e-9)
        assert 1 <= res.iterations <= res.total_iterations
    assert len(runs[0].objective_history) > 2  # it did alternate on this kind


def test_closed_form_spectra_give_the_objective_at_every_rank():
    As, Bts, _, _, S = tiny_case(15, n_sites=4, n_out=9, n_in=11, ranks=[3, 2, 3, 1])
    for method in ("lora", "shareb", "shareab"):
        top = convert(method, As, Bts, S, 1)
        spectrum = top.result.spectrum
        assert bool((spectrum[:-1] >= spectrum[1:] - 1e-12 * spectrum[0]).all())
        for k in range(1, 5):
            res = convert(method, As, Bts, S, k)
            predicted = res.result.energy - float(spectrum[:k].sum())
            assert res.objective == pytest.approx(predicted, rel=1e-9, abs=1e-10 * res.result.energy), (method, k)


def test_ranks_beyond_the_statistics_basis_are_exact():
    As, Bts, _, q, S = tiny_case(16, n_sites=3, n_out=8, n_in=12, ranks=2)  # p = 6 < n_in
    res = convert("sharea", As, Bts, S, 9)
    (a,) = res.result.a_tensors
    assert a.shape == (9, 12) and torch.allclose(a @ a.T, torch.eye(9, dtype=F64), atol=1e-10)
    assert res.objective <= 1e-20 * res.result.energy
    assert converters.calibrated_objective(As, Bts, S, q, res) <= 1e-20 * res.result.energy
    truncation = convert("lora", As, Bts, S, 5)
    assert truncation.result.rank == 2 and truncation.objective <= 1e-20 * truncation.result.energy


def test_same_input_gives_identical_output():
    As, Bts, _, _, S = tiny_case(17, n_sites=5, n_out=9, n_in=10, ranks=2)
    for method in ["lora", *SHARED]:
        first = convert(method, As, Bts, S, 2, lam=1e-2, restarts=2)
        again = convert(
            method, [a.clone() for a in As], [b.clone() for b in Bts], [s.clone() for s in S], 2, lam=1e-2, restarts=2
        )
        assert all(torch.equal(x, y) for x, y in zip(first.result.a_tensors, again.result.a_tensors))
        assert all(torch.equal(x, y) for x, y in zip(first.result.b_tensors, again.result.b_tensors))
        assert first.objective_history == again.objective_history and first.result.groups == again.result.groups


def test_float32_factors_come_back_float32_and_score_as_reported():
    As, Bts, _, q, S = tiny_case(18, n_sites=4, n_out=9, n_in=10, ranks=2)
    As32, Bts32 = [a.float() for a in As], [b.float() for b in Bts]
    for method in ["lora", *SHARED]:
        res = convert(method, As32, Bts32, [s.float() for s in S], 2, lam=1e-2)
        assert all(t.dtype == torch.float32 for t in res.result.a_tensors + res.result.b_tensors)
        stored = converters.calibrated_objective(As32, Bts32, S, q, res, lam=1e-2)
        assert stored == pytest.approx(res.objective, rel=1e-5, abs=1e-7 * res.result.energy)


def test_bad_input_is_refused():
    As, Bts, _, q, S = tiny_case(19)
    with pytest.raises(ValueError, match="one statistics matrix per site"):
        convert("sharea", As, Bts, S[:2], 2)
    with pytest.raises(ValueError, match="calibration_basis"):
        convert("sharea", As, Bts, [torch.eye(10, dtype=F64)] * 3, 2)
    with pytest.raises(ValueError):
        convert("nope", As, Bts, S, 2)
    with pytest.raises(ValueError, match="groups"):
        converters.convert_kind_calibrated("aslora", As, Bts, S, 2)
    with pytest.raises(ValueError, match="partition"):
        convert("aslora", As, Bts, S, 2, groups=[[0, 1]])
    with pytest.raises(ValueError):
        convert("sharea", As, Bts, S, 2, lam=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        convert("shareb", As, Bts, [S[0], S[1], S[2] * float("nan")], 2)
    res = convert("sharea", As, Bts, S, 2)
    other_q = torch.linalg.qr(torch.randn(10, 6, dtype=F64)).Q  # not the A's row space
    with pytest.raises(ValueError, match="outside span"):
        converters.calibrated_objective(As, Bts, S, other_q, res)


# ---------------------------------------------------------------- a few random kinds (hypothesis, sparingly)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["lora", *SHARED]),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(2, 4),
    st.integers(1, 3),
)
def test_random_kinds_score_densely_and_never_lose_to_plain(seed, method, k, n_sites, r, groups):
    As, Bts, cs, q, S = tiny_case(seed, n_sites=n_sites, n_out=7, n_in=8, ranks=r, n_samples=6)  # singular C's
    groups = min(groups, n_sites)
    res = convert(method, As, Bts, S, k, lam=1e-2, groups=groups, tol=1e-9)
    assert res.objective == pytest.approx(
        result_objective(As, Bts, damped_dense(cs, q, 1e-2), res), rel=1e-8, abs=1e-12 * res.result.energy
    )
    if method != "lora":
        today = plain(method, As, Bts, k, groups=groups)
        plain_value = converters.calibrated_objective(As, Bts, S, q, today, lam=1e-2)
        assert res.objective <= plain_value * (1 + 1e-9) + 1e-12 * res.result.energy
