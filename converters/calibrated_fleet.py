"""Calibrated fleets: each adapter's cores fit to its own inputs (a weighted least squares per site).

For one kind of a fleet (fleet.py), adapter i's layer l has ``dW_il = Bt_il A_il`` and input
statistics ``S_il = Q^T C_il Q`` (p, p) in the basis ``Q = fleet_basis(As)`` of every adapter's
A's of the kind (adapter-major, as ``fleet.py`` flattens them), measured with *that adapter*
attached on *its own* data. The calibrated objective is (calibration.py)

    sum_il tr((dW_il - dW'_il) C_il (dW_il - dW'_il)^T),

so each adapter is scored by the outputs its own inputs produce.

Cores, given the shared bases (exact): with V (k2, n_in) orthonormal rows (``z = V Q`` in
coordinates) and the left factor fixed to U (orthonormal columns; the identity for "sharea"),
the best core is the weighted least squares

    C_il = U^T D_il S_il z^T (z S_il z^T)^+,      D_il = Q_B^T dW_il Q (the small core, as fleet.py),

(the left factor is orthonormal, so the weight only acts on the right). Every core here is that
optimum for the bases returned.

Bases:

``sharea``: V is calibrated ShareA over the fleet's N*L sites (calibrated_sharea.py: alternation
    from the plain and the mean-whitened starts, each step lowering the objective); not
    guaranteed the global optimum when the C_il differ (see there).
``shareab``: V is the plain fleet's (fleet.py, Frobenius alternation); U is then the exact best
    left basis for that V: with the cores above the kept part of site il is ``||U^T W_il||^2``,
    ``W_il = D_il S_il z^T (z S_il z^T)^{+1/2}``, so U = top-k1 eigenvectors of ``sum W_il W_il^T``.
    V itself is not re-fit to the calibrated objective (a calibrated alternation over V is not
    done), so this is the best U and cores for the plain V, not the calibrated joint optimum.

Both are never worse in the calibrated objective than the plain fleet at the same ranks: the
plain bases are among those searched (sharea) or the U-step and cores only lower it (shareab).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .calibrated_sharea import DEFAULT_MAX_ROUNDS, DEFAULT_TOL, SharedRowsProblem, best_run, sharea_starts
from .calibration import DEFAULT_RIDGE, CalibratedKind, calibration_basis, psd_roots, site_difference
from .factored import shared_rows
from .fleet import FLEET_FORMS, FleetKindResult, check_fleet_factors, per_adapter, top_eigvecs, two_sided_bases
from .forms import FLEET_TWO_SIDED


def fleet_basis(As: list[list[Tensor]]) -> Tensor:
    """Q (n_in, p): the basis in which a calibrated fleet's statistics are given (every adapter's
    A's of the kind, adapter-major; the same Q bit for bit that ``fleet_kind_calibrated`` uses)."""
    return calibration_basis([a for a_list in As for a in a_list])


def restrict_statistics(S: Tensor, q_from: Tensor, q_to: Tensor) -> Tensor:
    """``S = Q^T C Q`` (p, p) in ``q_from`` re-expressed in ``q_to`` (n_in, p_c), whose columns lie in
    ``q_from``'s span (a cluster's basis: its members' A's are among the fleet's): ``Q_c = Q R`` with
    ``R = Q^T Q_c`` (p, p_c), so ``Q_c^T C Q_c = R^T S R`` exactly, without the data again."""
    r = q_from.T.to(S.dtype) @ q_to.to(S.dtype)  # (p, n_in) @ (n_in, p_c) -> (p, p_c)
    return r.T @ S @ r


def weighted_cores(ck: CalibratedKind, z: Tensor) -> list[Tensor]:
    """Per site the best ``P (p_B, k)`` for rows z (k, p): ``D S z^T (z S z^T)^+`` (weighted least squares)."""
    return [
        (ck.b[l] @ (ck.a[l] @ ck.s[l] @ z.T)) @ torch.linalg.pinv(z @ ck.s[l] @ z.T, hermitian=True)
        for l in range(ck.n_sites)
    ]


def calibrated_left_basis(ck: CalibratedKind, z: Tensor, k1: int) -> Tensor:
    """u (p_B, k1), orthonormal columns: the best left basis for rows z when every core is refit."""
    gram = 0.0
    for l in range(ck.n_sites):
        _, inv_root = psd_roots(z @ ck.s[l] @ z.T)
        w = ck.b[l] @ (ck.a[l] @ ck.s[l] @ z.T) @ inv_root
        gram = gram + w @ w.T
    return top_eigvecs(gram, k1)


def fleet_kind_calibrated(
    method: str,
    As: list[list[Tensor]],
    Bts: list[list[Tensor]],
    S: list[list[Tensor]],
    rank: int,
    rank_out: int | None = None,
    lam: float = DEFAULT_RIDGE,
    max_iterations: int = DEFAULT_MAX_ROUNDS,
    tol: float = DEFAULT_TOL,
) -> FleetKindResult:
    """One kind of a fleet minimising the calibrated objective; ``S[i][l]`` (p, p) in ``fleet_basis(As)``.

    Layout as ``fleet.fleet_kind`` (``rank``: V's rank; shareab's ``rank_out`` defaults to it);
    ``errors``/``energies`` are per adapter the calibrated objective damped by ``lam`` (of the
    result / of dW' = 0), ``frobenius_errors`` the plain squared errors, ``error_history`` the
    objective along V's alternation (sharea) or the plain alternation's history (shareab).
    """
    if method not in FLEET_FORMS:
        raise ValueError(f"fleet method must be one of {FLEET_FORMS}, got {method!r}")
    if rank < 1 or (rank_out is not None and rank_out < 1):
        raise ValueError(f"ranks must be positive, got {rank} and {rank_out}")
    kind, n_adapters, n_layers = check_fleet_factors(As, Bts)
    if len(S) != n_adapters or any(len(row) != n_layers for row in S):
        raise ValueError(f"need statistics for {n_adapters} adapters x {n_layers} layers")
    ck = CalibratedKind.build(kind.as_, kind.bts, [s for row in S for s in row], lam)
    if not FLEET_TWO_SIDED[method]:
        problem = SharedRowsProblem(ck)
        start, _ = sharea_starts(problem, min(rank, ck.p), restarts=0)
        state, history, _ = best_run(problem, start, max_iterations, tol)
        v = shared_rows(ck.q, state.z.T, min(rank, kind.n_in))  # sign fixed; rows beyond p: zero-energy padding
        z = v @ ck.q
        lefts = weighted_cores(ck, z)
        u, site_cores = None, [ck.u @ p for p in lefts]
    else:
        small = [b @ a for b, a in zip(ck.b, ck.a)]  # the fleet's small cores M_s (fleet.py's, same bases)
        _, v_small, history = two_sided_bases(small, rank_out or rank, rank, max_iterations)
        z = v_small.T
        u = calibrated_left_basis(ck, z, min(rank_out or rank, ck.u.shape[1]))
        site_cores = [u.T @ p for p in weighted_cores(ck, z)]
        lefts = [u @ c for c in site_cores]
        v = (ck.q @ v_small).T
    errors = [site_difference(ck.b[l], ck.a[l], lefts[l], z, ck.s[l]) for l in range(ck.n_sites)]
    frobenius = [float((ck.b[l] @ ck.a[l] - lefts[l] @ z).square().sum()) for l in range(ck.n_sites)]
    energies = [ck.site_energy(l) for l in range(ck.n_sites)]
    dtype = kind.out_dtype
    cores = [[c.to(dtype) for c in site_cores[i : i + n_layers]] for i in range(0, ck.n_sites, n_layers)]
    basis_u = None if u is None else (ck.u @ u).to(dtype)
    return FleetKindResult(
        method,
        v.to(dtype),
        basis_u,
        cores,
        per_adapter(errors, n_layers),
        per_adapter(energies, n_layers),
        history,
        per_adapter(frobenius, n_layers),
    )
