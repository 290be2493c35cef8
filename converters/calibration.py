"""Calibrated (activation-weighted) projection: the statistics, the objective, the result.

For the sites l of one kind, ``dW_l = Bt_l @ A_l`` (scale folded into Bt), and ``C_l = X_l X_l^T / N``
the second moment of the inputs that reach site l (measured with the LoRA attached), the
calibrated forms minimise (reference.md section 5)

    sum_l ||(dW_l - dW'_l) C_l^{1/2}||_F^2 = sum_l tr((dW_l - dW'_l) C_l (dW_l - dW'_l)^T),

the squared error of the update's *outputs* on the calibration inputs, instead of the plain
Frobenius error (which is the case C_l = I).

Statistics basis
----------------
No (n_in, n_in) matrix is kept per site. ``calibration_basis(As)`` returns Q (n_in, p), the
orthonormal basis of the row space of the stacked A's that the plain converters use
(``factored.row_basis``; p = min(n_in, sum_l r_l)), and the statistics are ``S_l = Q^T C_l Q``
(p, p). A collector builds them as

    S_l = (1 / N) sum_n (Q^T x_n)(Q^T x_n)^T        (``input_statistics``)

where x_n (n_in,) runs over the N input rows (tokens) that reach site l, and Q comes from
``calibration_basis`` of exactly the A's, in the same order, later handed to the converter: any
other basis of the same space puts S in other coordinates. A common factor on every S_l does not
move the optimum; the relative scale between sites does (a site whose inputs are larger weighs
more), so divide every site by its own token count (in a decoder all sites see the same N).

Why span(Q) is enough
---------------------
Every update produced here has its rows in span(Q): truncation and ShareB keep ``U^T dW_l``,
whose rows combine those of A_l, and ShareA, ShareAB and ASLoRA search their shared A as
``A' = Z Q^T``. For such updates ``dW_l - dW'_l = E_l Q^T`` and the objective is exactly
``sum_l tr(E_l S_l E_l^T)``: S_l is all that is needed, no approximation.

- One C for every site: whitening (``Y_l = dW_l C^{1/2}``, ``A~ = A C^{1/2}``) turns each form into
  its plain problem on the Y_l. The plain optimum keeps rows in the row space of the Y_l, that is
  in ``C^{1/2} span(Q)``, and every such row is ``q^T C^{1/2}`` for some q in span(Q): an A with rows
  in span(Q) reaches it. A weighted projection keeps the rows in the row space, and restricting
  A to span(Q) loses nothing.
- Different C_l: a row outside span(Q) can lower the objective (it reads input directions that
  are correlated with those A_l reads, and the correlation differs per site). ShareA, ShareAB and
  ASLoRA then return the optimum *restricted to span(Q)*: the best update the p x p statistics can
  evaluate; going further would need each site's full n_in x n_in second moment. Truncation and
  ShareB are unaffected: weighting on the right leaves a left projection unchanged, so their
  ``U U^T dW_l`` is the optimum over all updates of that form.

Ridge
-----
The converters damp each site as ``S_l + lam * (tr(S_l) / p) * I`` (``damp``). With fewer tokens
than p, S_l is singular: directions never seen get zero weight, the optimum is not unique and the
small solves are ill-posed. The damping adds ``lam * tr(S_l)/p * ||E_l||_F^2`` to site l's
objective: a floor of lam times the site's mean input energy in every direction. The default
lam = 1e-2 is GPTQ's ``damp_percent`` (1% of the mean diagonal of the same kind of matrix,
X X^T of a layer's inputs), chosen there for the same reason: it makes every solve well posed
(condition number at most about p / lam) and leaves the directions that carry real energy
essentially untouched, the more so the more anisotropic the inputs are. As lam
grows the objective tends to ``lam * sum_l (tr(S_l)/p) ||dW_l - dW'_l||_F^2``: the plain Frobenius
objective with each site weighted by its mean input energy, which is exactly the plain one when
the sites' traces are equal (and for per-site truncation always).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .factored import gram_factor, product_sq_norm, row_basis, sites_error
from .types import KindFactors, KindResult

F64 = torch.float64

DEFAULT_RIDGE = 1e-2
# A result row outside span(Q) with a non-zero B cannot be scored from S: refuse when that part of
# the update carries more than this fraction of its squared norm (float32 factors leave ~1e-14).
_OUTSIDE_SPAN_RTOL = 1e-8


def calibration_basis(As: list[Tensor]) -> Tensor:
    """Q (n_in, p), float64, orthonormal columns: the basis in which statistics must be given.

    The same Q (bit for bit) that the calibrated converters compute from the same A's.
    """
    return row_basis([a.detach().to(F64) for a in As])[0]


def input_statistics(inputs: Tensor, q: Tensor) -> Tensor:
    """``S = (1/N) sum_n (Q^T x_n)(Q^T x_n)^T`` (p, p), float64, for the N rows of ``inputs`` (N, n_in).

    A collector that sees several batches sums ``N_b * input_statistics(batch_b, q)`` and divides
    by the total N.
    """
    if inputs.dim() != 2 or inputs.shape[1] != q.shape[0]:
        raise ValueError(f"inputs must be (N, {q.shape[0]}), got {tuple(inputs.shape)}")
    projected = inputs.detach().to(F64) @ q
    return projected.T @ projected / max(inputs.shape[0], 1)


def damp(s: Tensor, lam: float) -> Tensor:
    """``S + lam * (tr(S)/p) * I``, symmetrised: the ridge every converter applies (see module doc)."""
    p = s.shape[0]
    sym = (s + s.T) / 2
    if lam == 0.0 or p == 0:
        return sym
    return sym + (lam * float(torch.diagonal(sym).sum()) / p) * torch.eye(p, dtype=s.dtype, device=s.device)


def psd_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, negatives from roundoff clamped to 0) and eigenvectors of a PSD matrix."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.clamp_min(0.0), vectors


def psd_factor(m: Tensor) -> Tensor:
    """F with ``F F^T = m`` for a PSD m (eigenvector columns scaled by sqrt of the eigenvalues)."""
    values, vectors = psd_eigh(m)
    return vectors * values.sqrt()


def psd_roots(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(m^{1/2}, (m^{1/2})^+)``: the PSD square root and its pseudo-inverse.

    Eigenvalues below ``p * eps`` of the largest count as zero: their inverse roots would only
    amplify roundoff, and those directions carry no weight in the objective anyway.
    """
    values, vectors = psd_eigh(m)
    roots = values.sqrt()
    cutoff = values.max().clamp_min(0.0) * m.shape[0] * torch.finfo(m.dtype).eps if values.numel() else 0.0
    inv_roots = torch.where(values > cutoff, 1.0 / roots.clamp_min(1e-300), torch.zeros_like(roots))
    return (vectors * roots) @ vectors.T, (vectors * inv_roots) @ vectors.T


def orthonormal_rows(z: Tensor) -> Tensor:
    """Rows spanning (at least) the row space of z (k, p), orthonormal: Householder Q of z^T.

    A rank-deficient z still yields k orthonormal rows whose span contains z's rows.
    """
    return torch.linalg.qr(z.T, mode="reduced").Q.T


def weighted_sq_norm(left: Tensor, right: Tensor, s: Tensor) -> float:
    """``tr(left right S right^T left^T)`` for left (m, c), right (c, p), S (p, p) PSD.

    ``left = O T`` (thin QR, O orthonormal columns) leaves the value unchanged, so only the small
    (c, p) product ``T right`` is formed; its entries are the error itself (no cancellation of
    large terms, unlike an expansion of the square).
    """
    x = gram_factor(left) @ right
    return max(float(((x @ s) * x).sum()), 0.0)


def site_difference(bt: Tensor, a_coords: Tensor, b2: Tensor, a2_coords: Tensor, s: Tensor) -> float:
    """``tr(E S E^T)`` for ``E = bt @ a_coords - b2 @ a2_coords`` (coordinates in basis Q)."""
    return weighted_sq_norm(torch.cat([bt, -b2], dim=1), torch.cat([a_coords, a2_coords], dim=0), s)


@dataclass(frozen=True)
class CalibratedKind:
    """One kind and its statistics in the small bases, float64.

    ``A_l = a[l] @ Q^T`` with a[l] (r_l, p); ``Bt_l = U @ b[l]`` with U (n_out, p_B) orthonormal
    columns (basis of the stacked B's) and b[l] (p_B, r_l). ``s[l]`` is the damped S_l (p, p),
    ``s_raw[l]`` the one given. Every form's B lies in span(U), so the alternations work at size
    p_B instead of n_out.
    """

    kind: KindFactors
    q: Tensor
    a: list[Tensor]
    u: Tensor
    b: list[Tensor]
    s: list[Tensor]
    s_raw: list[Tensor]
    lam: float

    @classmethod
    def build(cls, As: list[Tensor], Bts: list[Tensor], S: list[Tensor], lam: float) -> "CalibratedKind":
        kind = KindFactors.from_lists(As, Bts)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        q, a = row_basis(kind.as_)
        s_raw = check_statistics(S, kind.n_sites, q.shape[1])
        u, b_coords = row_basis([bt.T for bt in kind.bts])
        return cls(kind, q, list(a), u, [c.T for c in b_coords], [damp(s, lam) for s in s_raw], s_raw, lam)

    @property
    def n_sites(self) -> int:
        return self.kind.n_sites

    @property
    def p(self) -> int:
        return self.q.shape[1]

    def site_energy(self, l: int, raw: bool = False) -> float:
        """``tr(dW_l C_l dW_l^T)``: the objective of the zero update at site l."""
        return weighted_sq_norm(self.b[l], self.a[l], (self.s_raw if raw else self.s)[l])

    def energy(self, raw: bool = False) -> float:
        return sum(self.site_energy(l, raw) for l in range(self.n_sites))


def check_statistics(S: list[Tensor], n_sites: int, p: int) -> list[Tensor]:
    """The statistics as symmetric float64 (p, p) matrices, one per site, or a ValueError."""
    if len(S) != n_sites:
        raise ValueError(f"need one statistics matrix per site: {n_sites} sites, {len(S)} matrices")
    out = []
    for pos, s in enumerate(S):
        if s.shape != (p, p):
            raise ValueError(
                f"site {pos}: statistics must be ({p}, {p}) in the basis of calibration_basis(As), got {tuple(s.shape)}"
            )
        s64 = s.detach().to(F64)
        if not bool(torch.isfinite(s64).all()):
            raise ValueError(f"site {pos}: statistics contain non-finite values")
        out.append((s64 + s64.T) / 2)
    return out


def factors_objective(
    kind: KindFactors, q: Tensor, s: list[Tensor], site_bs: list[Tensor], site_as: list[Tensor]
) -> float:
    """``sum_l tr((dW_l - B'_l A'_l) C_l (...)^T)`` from full-size factors, with ``S_l = Q^T C_l Q``.

    Only the part of each A'_l inside span(Q) can be scored; a part outside with a non-zero
    contribution ``B'_l A'_l (I - Q Q^T)`` is refused.
    """
    total = 0.0
    for pos, (bt, a, b2, a2) in enumerate(zip(kind.bts, kind.as_, site_bs, site_as)):
        a_coords, a2_coords = a @ q, a2 @ q
        outside = product_sq_norm(b2, a2 - a2_coords @ q.T)
        if outside > _OUTSIDE_SPAN_RTOL * (product_sq_norm(b2, a2) + product_sq_norm(bt, a)):
            raise ValueError(
                f"site {pos}: the update has rows outside the statistics basis (was Q computed from these A's?)"
            )
        total += site_difference(bt, a_coords, b2, a2_coords, s[pos])
    return total


@dataclass(frozen=True)
class CalibratedResult:
    """A calibrated conversion of one kind.

    ``result`` has the layout of the plain converters' KindResult, but every error-like field is
    in the calibrated objective with the *damped* statistics: ``result.error`` (= ``objective``) is
    ``sum_l tr((dW_l - dW'_l) S~_l (...)^T)``, ``result.energy`` the same for dW' = 0, and
    ``result.error_history`` the objective after each accepted step (non-increasing).
    ``result.spectrum``: for truncation, ShareB and ShareAB the exact per-rank decrease,
    ``objective(k) = energy - spectrum[:k].sum()``; for ShareA and ASLoRA (no closed form) the
    spectrum of the start problem (every S_l replaced by their mean), exact only when all S_l are
    equal, an estimate for planning otherwise.

    ``raw_objective`` / ``raw_energy``: the same with the statistics as given (lam = 0), the
    output error on the calibration data. ``frobenius_error``: ``sum_l ||dW_l - dW'_l||_F^2``.
    ``iterations``: alternation rounds of the kept run, ``total_iterations`` over all starts
    (both 0 for the closed forms).
    """

    result: KindResult
    objective: float
    raw_objective: float
    raw_energy: float
    frobenius_error: float
    iterations: int
    total_iterations: int
    lam: float

    @property
    def objective_history(self) -> list[float]:
        return self.result.error_history


def finish(
    ck: CalibratedKind,
    method: str,
    a_tensors: list[Tensor],
    b_tensors: list[Tensor],
    a_index: list[int],
    b_index: list[int],
    groups: list[list[int]],
    spectrum: Tensor,
    history: list[float] | None = None,
    iterations: int = 0,
    total_iterations: int = 0,
    rank: int | None = None,
) -> CalibratedResult:
    """Score float64 factors (damped, raw, Frobenius) and wrap them as a CalibratedResult.

    The objective is recomputed from the factors themselves, the way ``calibrated_objective``
    does it, so the two agree to roundoff. ``rank`` overrides the rank read off a_tensors[0]
    (truncation keeps a different rank per site).
    """
    site_bs = [b_tensors[i] for i in b_index]
    site_as = [a_tensors[i] for i in a_index]
    objective = factors_objective(ck.kind, ck.q, ck.s, site_bs, site_as)
    raw = factors_objective(ck.kind, ck.q, ck.s_raw, site_bs, site_as)
    # the alternations' history is their own (small-basis) bookkeeping; closed forms have one entry
    history = list(history) if history else [objective]
    result = KindResult(
        method=method,
        a_tensors=[a.to(ck.kind.out_dtype) for a in a_tensors],
        b_tensors=[b.to(ck.kind.out_dtype) for b in b_tensors],
        a_index=a_index,
        b_index=b_index,
        rank=a_tensors[0].shape[0] if rank is None else rank,
        groups=groups,
        error=objective,
        energy=ck.energy(),
        spectrum=spectrum,
        already_shared=ck.kind.a_is_shared(),
        error_history=history,
    )
    return CalibratedResult(
        result=result,
        objective=objective,
        raw_objective=raw,
        raw_energy=ck.energy(raw=True),
        frobenius_error=sites_error(ck.kind.bts, ck.kind.as_, site_bs, site_as),
        iterations=iterations,
        total_iterations=total_iterations,
        lam=ck.lam,
    )


def calibrated_objective(
    As: list[Tensor],
    Bts: list[Tensor],
    S: list[Tensor],
    Q: Tensor,
    result: KindResult | CalibratedResult,
    lam: float = 0.0,
) -> float:
    """The calibrated objective of a result's stored factors, recomputed (float64, factored).

    ``S[l]`` (p, p) are the statistics in basis ``Q`` (n_in, p) (from ``calibration_basis``),
    damped by ``lam`` as the converters do: ``lam=0`` scores the output error on the calibration
    data (a CalibratedResult's ``raw_objective``); the conversion's ``lam`` reproduces its
    ``objective``. Works for any KindResult whose A's lie in span(Q), plain ones included.
    """
    kind = KindFactors.from_lists(As, Bts)
    q = Q.detach().to(F64)
    if q.shape[0] != kind.n_in:
        raise ValueError(f"Q must have {kind.n_in} rows, got {tuple(q.shape)}")
    for pos, a in enumerate(kind.as_):
        if float((a - (a @ q) @ q.T).square().sum()) > _OUTSIDE_SPAN_RTOL * float(a.square().sum()):
            raise ValueError(f"site {pos}: A has rows outside span(Q); use calibration_basis(As)")
    s = [damp(m, lam) for m in check_statistics(S, kind.n_sites, q.shape[1])]
    res = result.result if isinstance(result, CalibratedResult) else result
    site_bs, site_as = zip(*(res.site_factors(pos) for pos in range(res.n_sites)))
    return factors_objective(kind, q, s, [b.to(F64) for b in site_bs], [a.to(F64) for a in site_as])
