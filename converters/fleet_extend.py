"""A new adapter on a fleet's existing bases, and the directions that extend them when it must.

One kind of a fleet (fleet.py) has V (k2, n_in) with orthonormal rows and, for "shareab", U
(n_out, k1) with orthonormal columns. A new adapter's layers ``dW_l = Bts[l] @ As[l]`` get the
exact least-squares cores on them (the bases are orthonormal):

    sharea   core_l = dW_l V^T          (n_out, k2)   kept ||core_l||^2
    shareab  core_l = U^T dW_l V^T      (k1, k2)      kept ||core_l||^2

and the error is ``||dW_l||^2 - kept``. Nothing forms a dW: ``dW_l V^T = Bt_l (A_l V^T)``.

Extension. The directions the bases miss are those of the adapter's residuals: W = the top right
singular vectors of the vertical stack of ``dW_l (I - V^T V)`` (new rows of V) and, for
"shareab", X = the top left singular vectors of the horizontal stack of ``(I - U U^T) dW_l`` (new
columns of U), both computed in the small bases of the residual factors (as fleet.py does).
Step e appends the first e of each (capped at what each side has); the directions are nested,
so the kept energy never falls with e, and ``kept[e]`` is computed exactly for every e, not
estimated. The old members keep their reconstruction exactly by padding their cores with zeros
(``pad_core``): ``[U X] [[C, 0], [0, 0]] [V; W] = U C V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .factored import row_basis, sign_fix_rows
from .fleet import top_eigvecs


@dataclass(frozen=True)
class Projection:
    """A new adapter's cores (layer order) on fixed bases, with its squared error and energy."""

    cores: list[Tensor]
    error: float
    energy: float


@dataclass(frozen=True)
class Extension:
    """Candidate new directions for one kind, and what each number of steps keeps.

    ``rows_v`` (m2, n_in): new rows for V, orthonormal and orthogonal to V; ``cols_u`` (n_out, m1):
    new columns for U (None for "sharea"); step e adds ``min(e, m2)`` rows and ``min(e, m1)``
    columns. ``kept[e]`` (e = 0..steps): the adapter's kept energy with e steps; ``energy``: its
    ``sum_l ||dW_l||^2``.
    """

    rows_v: Tensor
    cols_u: Tensor | None
    kept: list[float]
    energy: float

    @property
    def steps(self) -> int:
        return len(self.kept) - 1

    def sizes(self, steps: int) -> tuple[int, int]:
        """(columns added to U, rows added to V) by ``steps`` steps."""
        return (0 if self.cols_u is None else min(steps, self.cols_u.shape[1]), min(steps, self.rows_v.shape[0]))


def _kept(As: list[Tensor], Bts: list[Tensor], v: Tensor, u: Tensor | None) -> float:
    """sum_l ||U^T dW_l V^T||^2 (U = identity when None), from the factors, in float64."""
    total = 0.0
    for a, bt in zip(As, Bts):
        left = bt.double() if u is None else u.double().T @ bt.double()
        total += float((left @ (a.double() @ v.double().T)).square().sum())
    return total


def _energy(As: list[Tensor], Bts: list[Tensor]) -> float:
    """sum_l ||Bt_l A_l||^2 via the r x r Grams (no dense dW)."""
    return sum(float(((bt.double().T @ bt.double()) * (a.double() @ a.double().T)).sum()) for a, bt in zip(As, Bts))


def project(As: list[Tensor], Bts: list[Tensor], basis_v: Tensor, basis_u: Tensor | None = None) -> Projection:
    """The least-squares cores of one adapter's layers on the fleet kind's bases, cast to V's dtype."""
    v = basis_v.double()
    cores = []
    for a, bt in zip(As, Bts):
        left = bt.double() if basis_u is None else basis_u.double().T @ bt.double()
        cores.append(left @ (a.double() @ v.T))
    energy = _energy(As, Bts)
    kept = sum(float(c.square().sum()) for c in cores)
    return Projection([c.to(basis_v.dtype) for c in cores], max(energy - kept, 0.0), energy)


def _orthonormal_rows(rows: Tensor, against: Tensor) -> Tensor:
    """``rows`` made orthogonal to ``against``'s rows (twice: roundoff) and orthonormal, signs fixed."""
    for _ in range(2):
        rows = rows - (rows @ against.T) @ against
    q = torch.linalg.qr(rows.T, mode="reduced").Q.T
    return q * sign_fix_rows(q)[:, None]


def _right_directions(As: list[Tensor], Bts: list[Tensor], v: Tensor, cap: int) -> Tensor:
    """Up to ``cap`` rows (n_in): top right singular vectors of the stack of ``dW_l (I - V^T V)``."""
    residual = [a.double() - (a.double() @ v.T) @ v for a in As]
    q, coords = row_basis(residual)
    gram = sum((bt.double() @ c).T @ (bt.double() @ c) for bt, c in zip(Bts, coords))
    top = top_eigvecs(gram, min(cap, q.shape[1]))
    return _orthonormal_rows((q @ top).T, v)


def _left_directions(As: list[Tensor], Bts: list[Tensor], u: Tensor, cap: int) -> Tensor:
    """Up to ``cap`` columns (n_out): top left singular vectors of the stack of ``(I - U U^T) dW_l``."""
    residual = [(bt.double() - u @ (u.T @ bt.double())).T for bt in Bts]  # (r, n_out) each
    q, coords = row_basis(residual)  # Bt_l residual = q @ coords_l^T
    gram = sum((c.T @ a.double()) @ (c.T @ a.double()).T for a, c in zip(As, coords))
    top = top_eigvecs(gram, min(cap, q.shape[1]))
    return _orthonormal_rows((q @ top).T, u.T).T


def extension(
    As: list[Tensor], Bts: list[Tensor], basis_v: Tensor, basis_u: Tensor | None = None, max_steps: int | None = None
) -> Extension:
    """The directions that extend one kind's bases for a new adapter, and ``kept[e]`` for every e.

    Each side is capped at what it can still take (n_in - k2 rows, n_out - k1 columns) and at the
    rank of the adapter's residual factors; ``max_steps`` caps both."""
    v = basis_v.double()
    cap_v = basis_v.shape[1] - basis_v.shape[0]
    rows = _right_directions(As, Bts, v, min(cap_v, max_steps or cap_v))
    cols = None
    if basis_u is not None:
        u = basis_u.double()
        cap_u = basis_u.shape[0] - basis_u.shape[1]
        cols = _left_directions(As, Bts, u, min(cap_u, max_steps or cap_u))
    steps = max(rows.shape[0], 0 if cols is None else cols.shape[1])
    kept = []
    for e in range(steps + 1):
        grown_v = torch.cat([v, rows[:e]])
        grown_u = None if cols is None else torch.cat([basis_u.double(), cols[:, :e]], dim=1)
        kept.append(_kept(As, Bts, grown_v, grown_u))
    return Extension(rows, cols, kept, _energy(As, Bts))


def pad_core(core: Tensor, rows: int, cols: int) -> Tensor:
    """``core`` with ``rows`` zero rows below and ``cols`` zero columns to the right: its product
    with the extended bases is the same (the new directions get exactly zero weight)."""
    return torch.nn.functional.pad(core, (0, cols, 0, rows))
