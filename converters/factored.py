"""Factored linear algebra on low-rank products ``X = Bt @ A`` (reference.md section 2).

Nothing here forms an (n_out, n_in) matrix. Every quantity comes from products of the thin
factors, so a kind with L sites of rank r costs O(n p^2 + L n r^2 + p^3) with p = sum r_l,
against O(L n^3) for a dense SVD of the stacked updates.

Notation: the stacked A's ``S = [A_1; ...; A_L]`` (p, n_in) have the thin QR ``S^T = Q R``,
so ``A_l = R_l^T Q^T`` with ``R_l`` the columns of R that belong to site l. We call
``coords_l = R_l^T`` (r_l, p'): the coordinates of A_l's rows in the orthonormal basis Q.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_basis(mats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Orthonormal basis of the row space of the stacked ``mats`` and each one's coordinates.

    Returns Q (n, p') with orthonormal columns and ``coords`` with ``mats[i] = coords[i] @ Q.T``.
    A Householder QR keeps Q orthonormal even when the stack is rank deficient (identical A's
    in a ShareLoRA checkpoint): Q then spans a superspace of the row space, and the extra
    directions simply receive zero energy in the spectrum, so no rank cut is needed.
    """
    stack = torch.cat(mats, dim=0)
    q, r = torch.linalg.qr(stack.T, mode="reduced")
    coords = list(torch.split(r.T, [m.shape[0] for m in mats], dim=0))
    return q, coords


def gram_factor(bt: Tensor) -> Tensor:
    """T with ``T^T T = Bt^T Bt`` (the R of a thin QR): ||Bt X||_F = ||T X||_F for every X."""
    return torch.linalg.qr(bt, mode="r").R


def stack_directions(bts: list[Tensor], coords: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Top right singular directions of the vertical stack ``[Bt_1 A_1; ...; Bt_m A_m]``.

    With ``A_i = coords_i Q^T`` the stack is ``blockdiag(Bt_i) K' Q^T``; replacing each Bt_i by
    its Gram factor T_i keeps every singular value, so they are those of the small
    ``K = [T_1 coords_1; ...; T_m coords_m]`` whose Gram ``K^T K = sum_i R_i (Bt_i^T Bt_i) R_i^T``
    is the G of reference.md. An SVD of K instead of an eigh of G keeps the small squared
    singular values accurate (no squaring of the condition number).

    Returns V (p', m), the right singular vectors in basis coordinates, and the spectrum
    (m,): the squared singular values, descending. Rank-k error = energy - spectrum[:k].sum().
    """
    k_mat = torch.cat([gram_factor(bt) @ c for bt, c in zip(bts, coords)], dim=0)
    _, s, vh = torch.linalg.svd(k_mat, full_matrices=False)
    return vh.T, s.square()


def orthonormal_complement(cols: Tensor, count: int) -> Tensor:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``cols`` (n, c).

    Deterministic: the candidates are the first unit vectors e_1, e_2, ... projected off
    ``cols``; their top left singular vectors span the new directions. The candidate block grows
    until those directions are well conditioned (it always is once it holds every unit vector).
    """
    n, c = cols.shape
    if c + count > n:
        raise ValueError(f"cannot add {count} orthonormal directions to {c} in dimension {n}")
    if count == 0:
        return cols.new_zeros(n, 0)
    width = min(n, c + count + 8)
    while True:
        cand = torch.eye(n, width, dtype=cols.dtype, device=cols.device)
        cand = cand - cols @ (cols.T @ cand)
        u, s, _ = torch.linalg.svd(cand, full_matrices=False)
        if s[count - 1] > 1e-3 or width == n:
            extra = u[:, :count]
            # one more projection removes the roundoff that leaked back into span(cols)
            extra = extra - cols @ (cols.T @ extra)
            return torch.linalg.qr(extra, mode="reduced").Q
        width = min(n, 2 * width)


def sign_fix_rows(rows: Tensor) -> Tensor:
    """Signs (+1/-1) that make each row's largest-magnitude entry positive (first one on ties).

    Singular vectors are defined up to sign; fixing it makes the output reproducible.
    """
    if rows.numel() == 0:
        return rows.new_ones(rows.shape[0])
    idx = rows.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(rows.gather(1, idx).squeeze(1))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def shared_rows(q: Tensor, directions: Tensor, k: int) -> Tensor:
    """The shared A (k, n) with orthonormal rows: top-k directions ``V_k^T Q^T``, sign fixed.

    When k exceeds the directions available, rows orthogonal to them are appended
    (zero-energy padding, so A stays orthonormal and the extra B columns come out zero).
    """
    n = q.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"rank {k} must be between 1 and {n} (orthonormal rows of length {n})")
    take = min(k, directions.shape[1])
    rows = (q @ directions[:, :take]).T
    if take < k:
        rows = torch.cat([rows, orthonormal_complement(rows.T, k - take).T], dim=0)
    return rows * sign_fix_rows(rows)[:, None]


def best_b(bt: Tensor, a: Tensor, shared_a: Tensor) -> Tensor:
    """Optimal B for site ``Bt @ A`` given orthonormal rows ``shared_a``: ``dW a^T = Bt (A a^T)``."""
    return bt @ (a @ shared_a.T)


def product_sq_norm(left: Tensor, right: Tensor) -> float:
    """``||left @ right||_F^2 = <left^T left, right right^T>`` without forming the product."""
    return float(((left.T @ left) * (right @ right.T)).sum())


def difference_sq_norm(bt: Tensor, a: Tensor, b2: Tensor, a2: Tensor) -> float:
    """``||bt @ a - b2 @ a2||_F^2``, as the norm of the product ``[bt, -b2] @ [a; a2]``."""
    value = product_sq_norm(torch.cat([bt, -b2], dim=1), torch.cat([a, a2], dim=0))
    return max(value, 0.0)


def kind_energy(bts: list[Tensor], as_: list[Tensor]) -> float:
    """``sum_l ||Bt_l A_l||_F^2``."""
    return sum(product_sq_norm(bt, a) for bt, a in zip(bts, as_))


def tail_energy(spectrum: Tensor, k: int) -> float:
    """Energy beyond the first k entries of a descending spectrum (the rank-k error)."""
    return float(spectrum[k:].sum())


def sites_error(kind_bts: list[Tensor], kind_as: list[Tensor], site_bs: list[Tensor], site_as: list[Tensor]) -> float:
    """``sum_l ||Bt_l A_l - B'_l A'_l||_F^2`` for the original and converted factors, factored."""
    return sum(difference_sq_norm(bt, a, b2, a2) for bt, a, b2, a2 in zip(kind_bts, kind_as, site_bs, site_as))
