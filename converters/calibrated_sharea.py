"""Calibrated ShareA: one A per kind (in span(Q), orthonormal rows), one B per site; by alternation.

A shared right factor weighted per site has no closed form. With ``A' = Z Q^T`` (Z (k, p)) and
every B in span(U) (``B = U P``), the objective is, for a partition of the sites into groups that
share one B (ShareA: every site alone; ASLoRA: calibrated_aslora.py),

    f(Z, P) = sum_g sum_{l in g} tr((D_l - P_g Z) S_l (D_l - P_g Z)^T),    D_l = b_l a_l (p_B, p).

Both half-problems are least squares:

- B-step, Z fixed, exact: ``P_g = (sum_{l in g} D_l S_l Z^T) (Z S_g Z^T)^+`` with ``S_g = sum_{l in g} S_l``.
- A-step, P fixed: the normal equations ``sum_g (P_g^T P_g) Z S_g = sum_g P_g^T sum_{l in g} D_l S_l``,
  a (k p)-dimensional system ``(sum_g S_g (x) P_g^T P_g) vec Z = vec RHS``. It is solved by
  conjugate gradients on the matrix form (each product costs sum_g k p^2, no (kp)^2 matrix),
  preconditioned by the nearest Kronecker product ``(sum_g alpha_g P_g^T P_g) (x) S``
  (``S = sum_g S_g``, ``alpha_g = tr S_g / tr S``), which is exact when the S_g are proportional
  (then one step solves it). Started from the current Z, every CG iterate lowers the quadratic,
  so a capped solve never raises the objective; the cap is low (``CG_MAX_STEPS``) because a
  partial A-step is worth as much as an exact one here: on the 7B-shaped benchmark kind, 10 CG
  steps per round reached the same objective (to 1e-11) in the same 12 rounds as 100 steps, at
  half the CPU time.

After the A-step Z is re-orthonormalised (its row space is all that matters once B is refit), then
B is refit; the same move stretched further is tried as well (line search, see ``alternate``).
A step is kept only if the objective (recomputed exactly) falls, so the history never
increases; the rounds stop when a round lowers it by at most ``tol`` (relative), or after
``max_iterations``.

Starts: two exact solutions of nearby problems, the plain (unweighted) ShareA A and the A that is
optimal when every S_l is replaced by their mean S (whitened problem: top-k rows of the stack of
``D_l S^{1/2}``, mapped back by S^{-1/2}); with one C for all sites the second is already the
optimum, with C_l = I both are plain ShareA. Plus ``restarts`` random orthonormal starts (fixed
seed: the output stays deterministic). Each start is alternated to convergence; the lowest
objective is kept.

Local minima: with sites whose C_l differ strongly the objective has several local minima, and
no start is sure to find the best. Measured on tiny kinds (4 sites, n_in = 12, r = 3, k = 2, per-site
input mixings differing by 20%): the two structured starts missed the best of 32 starts in 5 of 20
kinds (by up to 57%), with 4 or 8 restarts still in 2 of 20 (by up to 36%). On the 7B-shaped
benchmark kind (32 sites, p = 512, k = 16) five ShareA starts (both structured, three random) all
reached the same objective to 1e-9, while the two ASLoRA starts ended 0.08% apart. Small kinds
are cheap, so raise ``restarts`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .calibration import (
    CalibratedKind,
    CalibratedResult,
    finish,
    orthonormal_rows,
    psd_eigh,
    psd_roots,
    site_difference,
)
from .factored import shared_rows, stack_directions

DEFAULT_MAX_ROUNDS = 100
DEFAULT_TOL = 1e-7
# A-step CG: stop at this residual relative to the right-hand side, or after this many products
CG_TOL = 1e-10
CG_MAX_STEPS = 10
DEFAULT_RESTARTS = 0
# random starts draw from their own generator with this seed: same input, same output
RESTART_SEED = 0
# eigenvalues of the preconditioner's factors below this fraction of the largest are floored there
_PRECONDITIONER_FLOOR = 1e-12


@dataclass
class AlternationState:
    """Rows Z (k, p) (orthonormal), the partition, its B's P_g (p_B, k) and the objective."""

    z: Tensor
    partition: list[list[int]]
    p: list[Tensor]
    objective: float


class SharedRowsProblem:
    """The calibrated shared-A problem of one kind: B-step, A-step and the exact objective."""

    def __init__(self, ck: CalibratedKind):
        self.ck = ck
        # a_l S_l (r_l, p): every D_l S_l is b_l times it, so no (p_B, p) matrix is stored per site
        self.as_ = [a @ s for a, s in zip(ck.a, ck.s)]
        total = torch.stack(ck.s).sum(0)
        self.total_trace = float(torch.diagonal(total).sum())
        values, vectors = psd_eigh(total)
        self.total_eig = (values.clamp_min(_PRECONDITIONER_FLOOR * float(values.max())), vectors)
        self._moments: dict[tuple[int, ...], Tensor] = {}

    def group_moments(self, partition: list[list[int]]) -> list[Tensor]:
        """``S_g = sum_{l in g} S_l`` per group (cached: the alternation asks for them every step)."""
        out = []
        for g in partition:
            key = tuple(g)
            if key not in self._moments:
                self._moments[key] = torch.stack([self.ck.s[l] for l in g]).sum(0)
            out.append(self._moments[key])
        return out

    def b_step(self, z: Tensor, partition: list[list[int]]) -> list[Tensor]:
        """Optimal P_g (p_B, k) for rows z: ``(sum_{l in g} b_l a_l S_l z^T) (z S_g z^T)^+``."""
        ps = []
        for g, s_g in zip(partition, self.group_moments(partition)):
            cross = sum(self.ck.b[l] @ (self.as_[l] @ z.T) for l in g)
            ps.append(cross @ torch.linalg.pinv(z @ s_g @ z.T, hermitian=True))
        return ps

    def objective(self, z: Tensor, partition: list[list[int]], ps: list[Tensor]) -> float:
        """Exact ``sum_g sum_{l in g} tr((D_l - P_g z) S_l (...)^T)`` (no expansion of the square)."""
        return sum(
            site_difference(self.ck.b[l], self.ck.a[l], p_g, z, self.ck.s[l])
            for g, p_g in zip(partition, ps)
            for l in g
        )

    def state(self, z: Tensor, partition: list[list[int]]) -> AlternationState:
        ps = self.b_step(z, partition)
        return AlternationState(z, partition, ps, self.objective(z, partition, ps))

    def a_step(self, st: AlternationState) -> Tensor:
        """Z lowering the objective for the B's of ``st``: at most ``CG_MAX_STEPS`` preconditioned CG
        steps from st.z on the normal equations (their minimiser when CG converges first)."""
        grams = [p_g.T @ p_g for p_g in st.p]
        moments = self.group_moments(st.partition)
        rhs = sum((p_g.T @ self.ck.b[l]) @ self.as_[l] for g, p_g in zip(st.partition, st.p) for l in g)

        def apply(x: Tensor) -> Tensor:
            return sum(gram @ x @ s_g for gram, s_g in zip(grams, moments))

        weights = [float(torch.diagonal(s_g).sum()) / max(self.total_trace, 1e-300) for s_g in moments]
        left_values, left_vectors = psd_eigh(sum(w * gram for w, gram in zip(weights, grams)))
        left_values = left_values.clamp_min(_PRECONDITIONER_FLOOR * max(float(left_values.max()), 1e-300))
        right_values, right_vectors = self.total_eig

        def precondition(r: Tensor) -> Tensor:
            core = (left_vectors.T @ r @ right_vectors) / torch.outer(left_values, right_values)
            return left_vectors @ core @ right_vectors.T

        z = st.z.clone()
        residual = rhs - apply(z)
        target = CG_TOL * float(rhs.norm())
        pre = precondition(residual)
        direction = pre
        rho = float((residual * pre).sum())
        for _ in range(CG_MAX_STEPS):
            if not float(residual.norm()) > target:
                break
            h_dir = apply(direction)
            curvature = float((direction * h_dir).sum())
            if not curvature > 0.0:  # a flat direction: nothing left to gain along it
                break
            alpha = rho / curvature
            z = z + alpha * direction
            residual = residual - alpha * h_dir
            pre = precondition(residual)
            rho_next = float((residual * pre).sum())
            direction = pre + (rho_next / rho) * direction if rho > 0 else pre
            rho = rho_next
        return z


def alternate(
    problem: SharedRowsProblem, start: AlternationState, max_iterations: int, tol: float, regroup=None
) -> tuple[AlternationState, list[float], int]:
    """Rounds of (A-step, B-step[, regroup]) from ``start``; returns the state, history, rounds run.

    Each round also tries the A-step's move stretched by a factor ``beta`` (ALS line search, as in
    CP decompositions): alternations crawl along narrow valleys, and a longer step along the
    same direction often lands further down. The stretched point is kept only if it beats the
    plain step; beta doubles on success and halves (down to 2) on failure.
    ``regroup(state) -> state | None`` proposes another partition (with its B's and objective);
    it is kept only if it lowers the objective. No kept step raises the objective.
    """
    st = start
    history = [st.objective]
    rounds = 0
    beta = 2.0
    for rounds in range(1, max_iterations + 1):
        before = st.objective
        moved = problem.a_step(st)
        refit = problem.state(orthonormal_rows(moved), st.partition)
        stretched = problem.state(orthonormal_rows(st.z + beta * (moved - st.z)), st.partition)
        if stretched.objective < refit.objective:
            refit, beta = stretched, min(2 * beta, 64.0)
        else:
            beta = max(beta / 2, 2.0)
        if refit.objective < st.objective:
            st = refit
            history.append(st.objective)
        if regroup is not None:
            proposal = regroup(st)
            if proposal is not None and proposal.objective < st.objective:
                st = proposal
                history.append(st.objective)
        if not before - st.objective > tol * before:
            break
    return st, history, rounds


def best_run(
    problem: SharedRowsProblem, starts: list[AlternationState], max_iterations: int, tol: float, regroup=None
) -> tuple[AlternationState, list[float], tuple[int, int]]:
    """Alternate from every start; keep the lowest objective (the first on ties).

    Returns its final state and history, and (rounds of the kept run, rounds over all starts).
    """
    best, best_history, kept, total = None, [], 0, 0
    for start in starts:
        st, history, rounds = alternate(problem, start, max_iterations, tol, regroup)
        total += rounds
        if best is None or st.objective < best.objective:
            best, best_history, kept = st, history, rounds
    return best, best_history, (kept, total)


def random_rows(problem: SharedRowsProblem, k: int, count: int) -> list[Tensor]:
    """``count`` random orthonormal (k, p) row blocks, from a generator with a fixed seed."""
    gen = torch.Generator().manual_seed(RESTART_SEED)
    return [orthonormal_rows(torch.randn(k, problem.ck.p, generator=gen, dtype=torch.float64)) for _ in range(count)]


def mean_whitening(ck: CalibratedKind) -> tuple[Tensor, Tensor]:
    """``(S^{1/2}, (S^{1/2})^+)`` of the mean of the (damped) statistics."""
    return psd_roots(torch.stack(ck.s).mean(0))


def rows_from_whitened(directions: Tensor, inv_root: Tensor, k: int) -> Tensor:
    """Orthonormal rows (k, p) spanning ``V_k^T S^{-1/2}``: whitened rows mapped back."""
    return orthonormal_rows(directions[:, :k].T @ inv_root)


def sharea_starts(problem: SharedRowsProblem, k: int, restarts: int) -> tuple[list[AlternationState], Tensor]:
    """Starts (plain ShareA rows, mean-whitened rows, random rows) and the whitened spectrum."""
    ck = problem.ck
    singletons = [[l] for l in range(ck.n_sites)]
    plain_dirs, _ = stack_directions(ck.b, ck.a)
    root, inv_root = mean_whitening(ck)
    white_dirs, white_spectrum = stack_directions(ck.b, [a @ root for a in ck.a])
    rows = [plain_dirs[:, :k].T, rows_from_whitened(white_dirs, inv_root, k), *random_rows(problem, k, restarts)]
    return [problem.state(z, singletons) for z in rows], white_spectrum


def shared_a_result(
    problem: SharedRowsProblem,
    st: AlternationState,
    method: str,
    rank: int,
    spectrum: Tensor,
    history: list[float],
    rounds: tuple[int, int],
) -> CalibratedResult:
    """The final factors: sign-fixed orthonormal rows (padded beyond p), B's refit for them."""
    ck = problem.ck
    a = shared_rows(ck.q, st.z.T, rank)
    z = a[: st.z.shape[0]] @ ck.q  # the sign-fixed rows in basis Q
    ps = problem.b_step(z, st.partition)
    pad = rank - z.shape[0]  # rows beyond p carry no energy: zero B columns
    b_groups = [torch.cat([ck.u @ p_g, p_g.new_zeros(ck.kind.n_out, pad)], dim=1) for p_g in ps]
    b_index = [0] * ck.n_sites
    for g, members in enumerate(st.partition):
        for l in members:
            b_index[l] = g
    return finish(
        ck,
        method,
        [a],
        b_groups,
        a_index=[0] * ck.n_sites,
        b_index=b_index,
        groups=st.partition,
        spectrum=spectrum,
        history=history,
        iterations=rounds[0],
        total_iterations=rounds[1],
    )


def convert_sharea_calibrated(
    ck: CalibratedKind,
    rank: int,
    max_iterations: int = DEFAULT_MAX_ROUNDS,
    tol: float = DEFAULT_TOL,
    restarts: int = DEFAULT_RESTARTS,
) -> CalibratedResult:
    """ShareA at ``rank`` (capped at n_in; rows beyond p are zero-energy padding)."""
    if rank < 1 or restarts < 0:
        raise ValueError(f"rank must be positive and restarts >= 0, got {rank}, {restarts}")
    rank = min(rank, ck.kind.n_in)
    problem = SharedRowsProblem(ck)
    starts, spectrum = sharea_starts(problem, min(rank, ck.p), restarts)
    st, history, rounds = best_run(problem, starts, max_iterations, tol)
    return shared_a_result(problem, st, "sharea", rank, spectrum, history, rounds)
