"""Fleet compression: N LoRAs of one base share one basis per kind, each keeps small cores.

Input for one kind: ``As[i][l]`` (r_i, n_in) and ``Bts[i][l]`` (n_out, r_i), adapter i = 1..N,
layer l = 1..L, scale folded into B, so ``dW_il = Bts[i][l] @ As[i][l]`` (n_out, n_in). Nothing
here forms a dW; all results are float64 math cast back like the single-adapter converters.

Two forms:

``sharea`` (shared right basis, per kind across the whole fleet and all layers)
    ``dW_il ~= B'_il V`` with V (k, n_in), orthonormal rows, shared by every adapter and layer,
    and ``B'_il = dW_il V^T`` (n_out, k). This is ShareA over the N*L sites of the kind, so the
    optimum is the same Eckart-Young solution: V = top-k right singular vectors of the vertical
    stack ``[dW_11; ...; dW_NL]`` (QR of the stacked A's, then a small SVD; see sharea.py). Exact.

``shareab`` (two-sided, Compress-then-Serve's form)
    ``dW_il ~= U C_il V`` with U (n_out, k1) orthonormal columns, V (k2, n_in) orthonormal rows,
    shared per kind, and a core C_il (k1, k2) per adapter and layer. For fixed U, V the best core
    is ``C_il = U^T dW_il V^T`` (exact least squares, as U, V are orthonormal) and the error is
    ``sum ||dW_il||^2 - sum ||U^T dW_il V^T||^2``. The joint optimum over U and V has no closed
    form in general (a Tucker-2 / GLRAM problem): the start, U = top-k1 left singular vectors of
    the horizontal stack ``[dW_11, ..., dW_NL]`` and V = top-k2 right singular vectors of the
    vertical stack, is each side's optimum *alone*, not the joint optimum. Alternating refinement
    follows: with V fixed the best U is the top-k1 eigenvectors of ``sum_il (dW V^T)(dW V^T)^T``
    and vice versa; each half-step maximises the kept energy given the other factor, so the
    error never increases (``error_history`` records it). It is exact (the joint optimum) when
    k1 and k2 reach the ranks of the stacks.

All of this runs in the two small bases of the fleet's kind: ``Bt_il = Qb Tb_il`` and
``A_il = Ta_il Qa^T`` (Householder QR of the stacked B's and A's), so ``dW_il = Qb M_il Qa^T``
with a (pb, pa) core M_il, pb, pa <= sum of ranks. U = Qb u, V^T = Qa v.

Budget: ``fleet_options`` lists each kind's candidate settings (parameters, exact error for
sharea; the error of the un-refined start for shareab, an upper bound of what refinement reaches)
for ``budget.spend_budget``, the exact multiple-choice knapsack over the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .budget import kind_options
from .factored import kind_energy, row_basis, sign_fix_rows, tail_energy
from .forms import FLEET_TWO_SIDED
from .sharea import sharea_factors
from .types import KindFactors

FLEET_FORMS = tuple(FLEET_TWO_SIDED)  # "sharea" (one-sided), "shareab" (two-sided)


def two_sided(method: str) -> bool:
    """Whether a fleet form shares U as well as V (its row in ``converters.forms``); unknown: refused."""
    if method not in FLEET_TWO_SIDED:
        raise ValueError(f"fleet method must be one of {FLEET_FORMS}, got {method!r}")
    return FLEET_TWO_SIDED[method]


DEFAULT_MAX_ITERATIONS = 50
DEFAULT_TOL = 1e-10
# two-sided options are scored for ranks up to this many per side (the grid is top^2 pairs)
MAX_OPTION_RANK = 128


@dataclass(frozen=True)
class FleetOption:
    """One candidate setting of a fleet kind for ``budget.spend_budget`` (which reads ``params`` and
    ``error``): the left (U) and right (V) shared ranks, ``rank_out`` = 0 for "sharea"."""

    rank_out: int
    rank_in: int
    params: int
    error: float


@dataclass(frozen=True)
class FleetKindResult:
    """One kind of a fleet, compressed.

    ``basis_v`` (k2, n_in): the shared right basis (orthonormal rows). ``basis_u`` (n_out, k1): the
    shared left basis (orthonormal columns), None for "sharea". ``cores[i][l]``: adapter i's
    layer-l core, (n_out, k2) for "sharea" (the update is ``core @ V``), (k1, k2) for "shareab"
    (the update is ``U @ core @ V``). ``errors[i]``/``energies[i]``: adapter i's
    ``sum_l ||dW_il - dW'_il||_F^2`` and ``sum_l ||dW_il||_F^2``; ``error``/``energy`` their sums.
    """

    method: str
    basis_v: Tensor
    basis_u: Tensor | None
    cores: list[list[Tensor]]
    errors: list[float]
    energies: list[float]
    error_history: list[float] = field(default_factory=list)
    # calibrated fleets only (calibrated_fleet.py): errors/energies are then the calibrated objective,
    # and these are each adapter's plain sum_l ||dW_il - dW'_il||_F^2
    frobenius_errors: list[float] | None = None

    @property
    def error(self) -> float:
        return sum(self.errors)

    @property
    def energy(self) -> float:
        return sum(self.energies)

    @property
    def ranks(self) -> tuple[int, int]:
        """(k1, k2): left and right shared ranks (k1 = 0 for "sharea")."""
        return (0 if self.basis_u is None else self.basis_u.shape[1], self.basis_v.shape[0])

    def site_factors(self, i: int, l: int) -> tuple[Tensor, Tensor]:
        """(B, A) of adapter i, layer l with ``dW' = B @ A``: A = V, B = core (sharea) or U @ core."""
        core = self.cores[i][l]
        b = core if self.basis_u is None else self.basis_u @ core
        return b, self.basis_v

    def shared_parameters(self) -> int:
        return self.basis_v.numel() + (0 if self.basis_u is None else self.basis_u.numel())

    def adapter_parameters(self, i: int) -> int:
        return sum(c.numel() for c in self.cores[i])


def check_fleet_factors(As: list[list[Tensor]], Bts: list[list[Tensor]]) -> tuple[KindFactors, int, int]:
    """The fleet's sites flattened adapter-major (site i*L + l) and (N, L)."""
    if not As or len(As) != len(Bts):
        raise ValueError(f"need the same positive number of adapters in As and Bts, got {len(As)} and {len(Bts)}")
    n_layers = len(As[0])
    for i, (a_list, b_list) in enumerate(zip(As, Bts)):
        if len(a_list) != n_layers or len(b_list) != n_layers:
            raise ValueError(f"adapter {i}: {len(a_list)} A's and {len(b_list)} B's, expected {n_layers} layers")
    flat = KindFactors.from_lists([a for a_list in As for a in a_list], [b for b_list in Bts for b in b_list])
    return flat, len(As), n_layers


def per_adapter(values: list[float], n_layers: int) -> list[float]:
    return [sum(values[i : i + n_layers]) for i in range(0, len(values), n_layers)]


def _site_energies(kind: KindFactors) -> list[float]:
    return [kind_energy([bt], [a]) for bt, a in zip(kind.bts, kind.as_)]


def _small_cores(kind: KindFactors) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(Qb, Qa, M) with ``dW_s = Qb @ M[s] @ Qa^T``; Qb (n_out, pb), Qa (n_in, pa) orthonormal columns."""
    qa, a_coords = row_basis(kind.as_)
    qb, b_coords = row_basis([bt.T for bt in kind.bts])
    return qb, qa, [bc.T @ ac for bc, ac in zip(b_coords, a_coords)]


def top_eigvecs(gram: Tensor, k: int) -> Tensor:
    """Top-k eigenvectors (columns) of a symmetric PSD matrix, largest first, signs fixed."""
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -k:].flip(1) if k else vecs[:, :0]
    return top * sign_fix_rows(top.T)[None, :]


def _left_given_right(cores: list[Tensor], v: Tensor, k1: int) -> Tensor:
    """Best u (pb, k1) for fixed v (pa, k2): top eigenvectors of ``sum_s (M_s v)(M_s v)^T``."""
    return top_eigvecs(sum((m @ v) @ (m @ v).T for m in cores), k1)


def _right_given_left(cores: list[Tensor], u: Tensor, k2: int) -> Tensor:
    """Best v (pa, k2) for fixed u (pb, k1): top eigenvectors of ``sum_s (u^T M_s)^T (u^T M_s)``."""
    return top_eigvecs(sum((u.T @ m).T @ (u.T @ m) for m in cores), k2)


def _two_sided_errors(cores: list[Tensor], u: Tensor, v: Tensor) -> list[float]:
    """Per site ``||M - u u^T M v v^T||_F^2``, computed directly (no energy - kept cancellation)."""
    return [float((m - u @ ((u.T @ m @ v) @ v.T)).square().sum()) for m in cores]


def fleet_sharea(As: list[list[Tensor]], Bts: list[list[Tensor]], rank: int) -> FleetKindResult:
    """Shared right basis V (rank capped at n_in) over every adapter and layer; exact optimum."""
    kind, _, n_layers = check_fleet_factors(As, Bts)
    v, bs, spectrum = sharea_factors(kind, rank)
    energies = _site_energies(kind)
    # per site ||dW - dW V^T V||^2 = ||dW||^2 - ||dW V^T||^2 (V orthonormal rows); clipped at roundoff
    errors = [max(e - float(b.square().sum()), 0.0) for e, b in zip(energies, bs)]
    dtype = kind.out_dtype
    cores = [[b.to(dtype) for b in bs[i : i + n_layers]] for i in range(0, len(bs), n_layers)]
    total = tail_energy(spectrum, v.shape[0])
    return FleetKindResult(
        "sharea", v.to(dtype), None, cores, per_adapter(errors, n_layers), per_adapter(energies, n_layers), [total]
    )


def fleet_shareab(
    As: list[list[Tensor]],
    Bts: list[list[Tensor]],
    rank_out: int,
    rank_in: int,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    tol: float = DEFAULT_TOL,
) -> FleetKindResult:
    """Two-sided: shared U (n_out, k1), V (k2, n_in), cores (k1, k2); k1 <= pb, k2 <= pa (capped).

    Starts from each side's own optimum, then alternates the two exact half-steps until a round
    lowers the error by less than ``tol`` of the energy (or ``max_iterations`` rounds).
    """
    if rank_out < 1 or rank_in < 1:
        raise ValueError(f"ranks must be positive, got {rank_out} and {rank_in}")
    kind, _, n_layers = check_fleet_factors(As, Bts)
    qb, qa, cores = _small_cores(kind)
    u, v, history = two_sided_bases(cores, rank_out, rank_in, max_iterations, tol)
    site_errors = _two_sided_errors(cores, u, v)
    dtype = kind.out_dtype
    small = [u.T @ m @ v for m in cores]
    core_lists = [[c.to(dtype) for c in small[i : i + n_layers]] for i in range(0, len(small), n_layers)]
    basis_u = qb @ u
    basis_v = (qa @ v).T
    return FleetKindResult(
        "shareab",
        basis_v.to(dtype),
        basis_u.to(dtype),
        core_lists,
        per_adapter(site_errors, n_layers),
        per_adapter(_site_energies(kind), n_layers),
        history,
    )


def two_sided_bases(
    cores: list[Tensor],
    rank_out: int,
    rank_in: int,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    tol: float = DEFAULT_TOL,
) -> tuple[Tensor, Tensor, list[float]]:
    """(u (pb, k1), v (pa, k2), error history): the two-sided bases of the small cores ``M_s``, each
    side's own optimum refined by alternation; k1 <= pb and k2 <= pa (capped)."""
    k1, k2 = min(rank_out, cores[0].shape[0]), min(rank_in, cores[0].shape[1])
    u = top_eigvecs(sum(m @ m.T for m in cores), k1)
    v = top_eigvecs(sum(m.T @ m for m in cores), k2)
    energy = sum(float(m.square().sum()) for m in cores)
    history = [sum(_two_sided_errors(cores, u, v))]
    for _ in range(max_iterations):
        u_new = _left_given_right(cores, v, k1)
        v_new = _right_given_left(cores, u_new, k2)
        error = sum(_two_sided_errors(cores, u_new, v_new))
        if error > history[-1]:  # roundoff only: each half-step is an exact maximisation
            break
        u, v = u_new, v_new
        history.append(error)
        if history[-2] - error <= tol * energy:
            break
    return u, v, history


def fleet_parameter_count(method: str, n_out: int, n_in: int, n_sites: int, rank_out: int, rank_in: int) -> int:
    """Parameters of one fleet kind with ``n_sites`` = N*L cores (sharea: ``rank_out`` unused)."""
    if two_sided(method):
        return rank_out * n_out + rank_in * n_in + n_sites * rank_out * rank_in
    return rank_in * n_in + n_sites * rank_in * n_out


def fleet_options(
    method: str, As: list[list[Tensor]], Bts: list[list[Tensor]], max_rank: int | None = None
) -> list[FleetOption]:
    """Candidate settings of one fleet kind for ``budget.spend_budget``.

    sharea: right ranks 1..min(n_in, sum of ranks), the exact error (ShareA's options over the
    fleet's sites). shareab: every pair (k1, k2) up to ``max_rank`` per side (default
    ``MAX_OPTION_RANK``), with the error of the start bases truncated to (k1, k2): the starting
    eigenvectors are nested, so one table of ``E[a, b] = sum_s (u^T M_s v)[a, b]^2`` gives every
    pair's kept energy. Refinement can only lower that error, so it is an upper bound.
    """
    kind, _, _ = check_fleet_factors(As, Bts)
    if not two_sided(method):  # one-sided: ShareA's options over the fleet's sites
        return [FleetOption(0, o.rank, o.params, o.error) for o in kind_options("sharea", kind, max_rank=max_rank)]
    _, _, cores = _small_cores(kind)
    top = max_rank or MAX_OPTION_RANK
    k1, k2 = min(top, cores[0].shape[0]), min(top, cores[0].shape[1])
    u = top_eigvecs(sum(m @ m.T for m in cores), k1)
    v = top_eigvecs(sum(m.T @ m for m in cores), k2)
    kept = sum((u.T @ m @ v).square() for m in cores).cumsum(0).cumsum(1)
    energy = sum(float(m.square().sum()) for m in cores)
    return [
        FleetOption(
            a + 1,
            b + 1,
            fleet_parameter_count("shareab", kind.n_out, kind.n_in, kind.n_sites, a + 1, b + 1),
            max(energy - float(kept[a, b]), 0.0),
        )
        for a in range(k1)
        for b in range(k2)
    ]


def fleet_kind(
    method: str,
    As: list[list[Tensor]],
    Bts: list[list[Tensor]],
    rank: int,
    rank_out: int | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> FleetKindResult:
    """Compress one kind of a fleet: ``rank`` is the right (V) rank; shareab's left rank
    ``rank_out`` defaults to ``rank``."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    if two_sided(method):
        return fleet_shareab(As, Bts, rank_out or rank, rank, max_iterations)
    return fleet_sharea(As, Bts, rank)
