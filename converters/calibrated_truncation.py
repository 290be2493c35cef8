"""Calibrated per-site truncation of a plain LoRA (exact): the weighted analogue of PEFT's truncation.

For one site, every rank-k update is ``U X`` with U (n_out, k) orthonormal, and

    ||(dW - U X) C^{1/2}||^2 = ||(I - U U^T) dW C^{1/2}||^2 + ||(U^T dW - X) C^{1/2}||^2,

so X = U^T dW whatever C, and the best U spans the top-k left singular vectors of
``M = Bt A C^{1/2}``. Their Gram ``M M^T = Bt (A C A^T) Bt^T`` needs only the (r, r) matrix
``A C A^T = a S a^T``; with ``Bt = O T`` (thin QR) the left singular vectors are O times the
eigenvectors of the (r, r) ``T (a S a^T) T^T``, whose eigenvalues are the per-rank decreases:

    objective_l(k) = sum_{i > k} lambda_i,     dW'_l = U_k U_k^T dW_l,   B'_l = U_k,  A'_l = U_k^T Bt_l A_l.

Exact over all rank-k updates of the site (not only those in span(Q)); ranks above r_l keep
the site unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .calibration import CalibratedKind, CalibratedResult, finish, psd_eigh
from .factored import sign_fix_rows


def site_truncation(bt: Tensor, a: Tensor, a_coords: Tensor, s: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """One site: B' (n_out, k_l), A' (k_l, n_in) with k_l = min(rank, r, n_out), and the spectrum
    (min(r, n_out),), descending."""
    o, t = torch.linalg.qr(bt, mode="reduced")
    m = t @ (a_coords @ s @ a_coords.T) @ t.T
    values, vectors = psd_eigh(m)
    values, vectors = values.flip(0), vectors.flip(1)
    k = min(rank, o.shape[1])
    w = vectors[:, :k]
    u = o @ w
    signs = sign_fix_rows(u.T)  # singular vectors are defined up to sign: fix it for reproducibility
    u, w = u * signs, w * signs
    return u, (w.T @ t) @ a, values


def site_spectra(ck: CalibratedKind) -> list[Tensor]:
    """Each site's per-rank decreases of the calibrated objective, descending (a budget planner's
    input): site l at rank k leaves ``site_energy(l) - spectra[l][:k].sum()``."""
    return [site_truncation(ck.kind.bts[l], ck.kind.as_[l], ck.a[l], ck.s[l], 0)[2] for l in range(ck.n_sites)]


def convert_lora_calibrated(ck: CalibratedKind, rank: int | Sequence[int]) -> CalibratedResult:
    """Every site truncated to rank ``min(rank, r_l, n_out)`` in the calibrated objective.

    ``rank`` may be one rank per site (a budget plan; 0 empties a site).
    ``result.spectrum[i]`` is the sum over sites of their i-th eigenvalue, so with one rank
    ``objective(k) = energy - spectrum[:k].sum()`` for every k, and ``result.rank`` is the
    largest rank kept by any site.
    """
    ranks = [rank] * ck.n_sites if isinstance(rank, int) else list(rank)
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    if len(ranks) != ck.n_sites or any(k < 0 for k in ranks):
        raise ValueError(f"need one non-negative rank per site ({ck.n_sites}), got {ranks}")
    bs, as_, spectra = [], [], []
    for l in range(ck.n_sites):
        b, a, values = site_truncation(ck.kind.bts[l], ck.kind.as_[l], ck.a[l], ck.s[l], ranks[l])
        bs.append(b)
        as_.append(a)
        spectra.append(values)
    width = max(v.shape[0] for v in spectra)
    spectrum = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[0])) for v in spectra]).sum(0)
    sites = list(range(ck.n_sites))
    return finish(
        ck,
        "lora",
        as_,
        bs,
        a_index=sites,
        b_index=sites,
        groups=[[l] for l in sites],
        spectrum=spectrum,
        rank=max(a.shape[0] for a in as_),
    )
