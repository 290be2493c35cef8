"""Calibrated ShareAB (exact within span(Q)): one A and one B per kind, the same update M everywhere.

With every update in the small bases (``dW_l = U D_l Q^T``, ``D_l = b_l a_l`` (p_B, p)) and
``M = U M_s Q^T``, the objective is a quadratic in M_s with one weight, the summed statistics:

    sum_l tr((D_l - M_s) S_l (D_l - M_s)^T)
      = sum_l tr(D_l S_l D_l^T) - ||N||_F^2 + ||M_s S^{1/2} - N||_F^2,
    S = sum_l S_l,   N = (sum_l D_l S_l) S^{-1/2}

(the rows of ``sum_l D_l S_l`` lie in range(S), so the pseudo-inverse root is enough). The best
rank-k M_s is therefore ``trunc_k(N) S^{-1/2}`` (Eckart-Young on N), and

    objective(k) = energy - spectrum[:k].sum(),   spectrum = sigma(N)^2.

With S_l = I this is the plain form: N = sqrt(L) * mean D. The shared A gets orthonormal rows
spanning M's row space and B = M A^T, as in plain ShareAB.
"""

from __future__ import annotations

import torch

from .calibration import CalibratedKind, CalibratedResult, finish, orthonormal_rows, psd_roots
from .factored import shared_rows


def convert_shareab_calibrated(ck: CalibratedKind, rank: int) -> CalibratedResult:
    """ShareAB at ``rank`` (capped at min(n_in, n_out)); A has orthonormal rows, B = M A^T."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    total = torch.stack(ck.s).sum(0)
    weighted = sum(b @ (a @ s) for b, a, s in zip(ck.b, ck.a, ck.s))  # sum_l D_l S_l, (p_B, p)
    _, inv_root = psd_roots(total)
    left, sigma, right_h = torch.linalg.svd(weighted @ inv_root, full_matrices=False)
    k = min(rank, ck.kind.n_in, ck.kind.n_out)
    take = min(k, sigma.shape[0])
    m_small = (left[:, :take] * sigma[:take]) @ right_h[:take] @ inv_root  # (p_B, p)
    # orthonormal rows spanning M's row space (span of S^{-1/2} V_k); shared_rows pads beyond p
    z = orthonormal_rows(right_h[:take] @ inv_root)
    a = shared_rows(ck.q, z.T, k)
    b = ck.u @ (m_small @ (a @ ck.q).T)
    sites = list(range(ck.n_sites))
    return finish(
        ck,
        "shareab",
        [a],
        [b],
        a_index=[0] * ck.n_sites,
        b_index=[0] * ck.n_sites,
        groups=[sites],
        spectrum=sigma.square(),
    )
