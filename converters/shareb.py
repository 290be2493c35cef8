"""ShareB: one B per kind (orthonormal columns), one A per site.

ShareA on the transposes ``dW_l^T = A_l^T Bt_l^T``: the shared B spans the top-k left singular
subspace of the horizontal stack ``[dW_1, ..., dW_L]`` and ``A_l = B^T dW_l``.
"""

from __future__ import annotations

from torch import Tensor

from .factored import kind_energy, tail_energy
from .sharea import sharea_factors, sharea_spectrum
from .types import KindFactors, KindResult


def shareb_spectrum(kind: KindFactors) -> Tensor:
    """Squared singular values of the horizontal stack: ``error(k) = spectrum[k:].sum()``."""
    return sharea_spectrum(kind.transposed())


def convert_shareb(kind: KindFactors, rank: int) -> KindResult:
    """ShareB at ``rank`` (capped at n_out so B keeps orthonormal columns)."""
    b_rows, a_cols, spectrum = sharea_factors(kind.transposed(), rank)
    sites = list(range(kind.n_sites))
    return KindResult.from_float64(
        kind,
        "shareb",
        [a.T for a in a_cols],
        [b_rows.T],
        a_index=sites,
        b_index=[0] * kind.n_sites,
        groups=[sites],
        error=tail_energy(spectrum, b_rows.shape[0]),
        energy=kind_energy(kind.bts, kind.as_),
        spectrum=spectrum,
    )
