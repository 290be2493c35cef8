"""ShareA: one A per kind (orthonormal rows), one B per site.

``min_{A, B_l} sum_l ||dW_l - B_l A||_F^2`` over A (k, n_in) is solved by the top-k right singular
subspace of the vertical stack ``[dW_1; ...; dW_L]`` (Eckart-Young); each ``B_l = dW_l A^T``.
The error is the stack's energy beyond rank k. Everything is computed factored (see factored.py).
"""

from __future__ import annotations

from torch import Tensor

from .factored import best_b, kind_energy, row_basis, shared_rows, stack_directions, tail_energy
from .types import KindFactors, KindResult


def sharea_spectrum(kind: KindFactors) -> Tensor:
    """Squared singular values of the stacked updates: ``error(k) = spectrum[k:].sum()``."""
    _, coords = row_basis(kind.as_)
    return stack_directions(kind.bts, coords)[1]


def sharea_factors(kind: KindFactors, rank: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Float64 ShareA factors at ``rank`` (capped at n_in): shared A, per-site B's, spectrum."""
    q, coords = row_basis(kind.as_)
    directions, spectrum = stack_directions(kind.bts, coords)
    a = shared_rows(q, directions, min(rank, kind.n_in))
    return a, [best_b(bt, a_l, a) for bt, a_l in zip(kind.bts, kind.as_)], spectrum


def convert_sharea(kind: KindFactors, rank: int) -> KindResult:
    """ShareA at ``rank`` (it may exceed the LoRA rank; capped at n_in so A stays orthonormal)."""
    a, bs, spectrum = sharea_factors(kind, rank)
    sites = list(range(kind.n_sites))
    return KindResult.from_float64(
        kind,
        "sharea",
        [a],
        bs,
        a_index=[0] * kind.n_sites,
        b_index=sites,
        groups=[[pos] for pos in sites],
        error=tail_energy(spectrum, a.shape[0]),
        energy=kind_energy(kind.bts, kind.as_),
        spectrum=spectrum,
    )
