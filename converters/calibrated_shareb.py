"""Calibrated ShareB (exact): one B per kind (orthonormal columns), one A per site.

Weighting on the right leaves a left projection unchanged: for a shared orthonormal U (n_out, k)
the best site factor is ``A'_l = U^T dW_l`` whatever C_l, and the objective is
``sum_l tr(dW_l C_l dW_l^T) - tr(U^T G U)`` with

    G = sum_l Bt_l (A_l C_l A_l^T) Bt_l^T = sum_l U_B b_l (a_l S_l a_l^T) b_l^T U_B^T,

so U is the top-k eigenvectors of G. With ``a_l S_l a_l^T = F_l F_l^T`` (r_l, r_l), G is the Gram of
the horizontal stack ``[b_1 F_1, ..., b_L F_L]`` (p_B, sum r_l): the plain ShareB machinery
(``stack_directions`` on the transposes) applies with A_l A_l^T replaced by A_l C_l A_l^T.
objective(k) = energy - spectrum[:k].sum(), exact over all updates of the form.
"""

from __future__ import annotations

from .calibration import CalibratedKind, CalibratedResult, finish, psd_factor
from .factored import best_b, shared_rows, stack_directions


def convert_shareb_calibrated(ck: CalibratedKind, rank: int) -> CalibratedResult:
    """ShareB at ``rank`` (capped at n_out so B keeps orthonormal columns)."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    factors = [psd_factor(a @ s @ a.T) for a, s in zip(ck.a, ck.s)]
    directions, spectrum = stack_directions([f.T for f in factors], [b.T for b in ck.b])
    b_rows = shared_rows(ck.u, directions, min(rank, ck.kind.n_out))
    # A'_l = U^T Bt_l A_l: the plain ShareB site factor, transposed
    as_ = [best_b(a.T, bt.T, b_rows).T for a, bt in zip(ck.kind.as_, ck.kind.bts)]
    sites = list(range(ck.n_sites))
    return finish(
        ck, "shareb", as_, [b_rows.T], a_index=sites, b_index=[0] * ck.n_sites, groups=[sites], spectrum=spectrum
    )
