"""ShareAB: one A and one B per kind; every site gets the same update B A.

``sum_l ||dW_l - M'||^2 = sum_l ||dW_l - M||^2 + L ||M - M'||^2`` with M the mean update, so the
optimum over rank-k M' = B A is the rank-k truncation of M, and

    error(k) = sum_l ||dW_l - M||^2 + L * (energy of M beyond rank k).

M is handled in the two small bases: ``Bt_l = U Tb_l`` (column space of the stacked B's) and
``A_l = Ta_l Q^T`` (row space of the stacked A's), so ``dW_l = U (Tb_l Ta_l) Q^T`` and every
update is a small (p_B, p_A) core.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factored import row_basis, shared_rows
from .types import KindFactors, KindResult


def _cores(kind: KindFactors) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(U, Q, cores) with ``dW_l = U @ cores[l] @ Q^T`` and U, Q orthonormal columns."""
    q, a_coords = row_basis(kind.as_)
    u, b_coords = row_basis([bt.T for bt in kind.bts])
    return u, q, [bc.T @ ac for bc, ac in zip(b_coords, a_coords)]


def _mean_and_scatter(cores: list[Tensor]) -> tuple[Tensor, float]:
    mean = torch.stack(cores).mean(dim=0)
    # summed directly rather than as energy - L ||M||^2: identical sites then give exactly 0
    scatter = sum(float((c - mean).square().sum()) for c in cores)
    return mean, scatter


def shareab_spectrum(kind: KindFactors) -> Tensor:
    """``L * sigma_i(M)^2``, descending: ``error(k) = energy - spectrum[:k].sum()``."""
    _, _, cores = _cores(kind)
    mean, _ = _mean_and_scatter(cores)
    return kind.n_sites * torch.linalg.svdvals(mean).square()


def convert_shareab(kind: KindFactors, rank: int) -> KindResult:
    """ShareAB at ``rank`` (capped at min(n_in, n_out)); A has orthonormal rows, B = M A^T."""
    u, q, cores = _cores(kind)
    mean, scatter = _mean_and_scatter(cores)
    _, s, vh = torch.linalg.svd(mean, full_matrices=False)
    k = min(rank, kind.n_in, kind.n_out)
    a = shared_rows(q, vh.T, k)
    b = u @ (mean @ (q.T @ a.T))
    spectrum = kind.n_sites * s.square()
    return KindResult.from_float64(
        kind,
        "shareab",
        [a],
        [b],
        a_index=[0] * kind.n_sites,
        b_index=[0] * kind.n_sites,
        groups=[list(range(kind.n_sites))],
        error=scatter + float(spectrum[k:].sum()),
        energy=scatter + float(spectrum.sum()),
        spectrum=spectrum,
    )
