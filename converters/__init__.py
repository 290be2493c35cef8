"""Pure tensor math for converting LoRA adapters to shared forms (no file or model I/O).

Input for one kind (sites of the same shape): ``As[l]`` (r_l, n_in) and ``Bts[l]`` (n_out, r_l)
with the LoRA scale already folded into B, so ``dW_l = Bts[l] @ As[l]``. Everything is computed
in float64 without forming any dW; results come back in float32 (or float64 for float64 input)
with scale 1.0.

Public API:
    convert_kind(method, As, Bts, rank, groups=None, grouping="any", max_iterations=10) -> KindResult
    plan(method, kinds, *, rank=None, groups=None, energy=None, budget=None, grouping="any")
        -> dict[str, KindPlan]
    parameter_count(method, n_out, n_in, n_sites, rank, groups=None) -> int
    lora_parameter_count(n_out, n_in, ranks) -> int
    reconstruction_error(As, Bts, result) -> float
    spectrum(method, As, Bts) -> Tensor   (error drop of each added rank, largest first)

Plain LoRA truncation (each site keeps its own A and B at a lower rank, see truncate.py):
    plan_truncation(kinds, *, rank=None, energy=None, budget=None, exact=None) -> TruncationPlan
    plan_from_spectra(spectra, shapes, lora_ranks, *, rank=None, energy=None, budget=None, exact=None)
        -> TruncationPlan   (the same on given per-site spectra, e.g. calibrated ones)
    truncate_kind(As, Bts, ranks) -> TruncationResult   (a KindResult with method "lora")

Calibrated (activation-weighted) projection, see calibration.py for the objective and statistics:
    calibration_basis(As) -> Q (n_in, p)
    input_statistics(inputs, Q) -> S_l (p, p)
    convert_kind_calibrated(method, As, Bts, S, rank, groups=None, grouping="any", lam=DEFAULT_RIDGE,
                            regroup=True, max_iterations=DEFAULT_MAX_ROUNDS, tol=DEFAULT_TOL,
                            restarts=DEFAULT_RESTARTS) -> CalibratedResult
    calibrated_objective(As, Bts, S, Q, result, lam=0.0) -> float
    calibrated_site_spectra(As, Bts, S, lam=DEFAULT_RIDGE) -> list[Tensor]  (per-site truncation spectra)
("lora" also takes one rank per site, 0 emptying a site, as a budget plan gives them.)

Serving-aware budget plans (see serving.py): ``ServingRule(max_rank=R | uniform=True | buckets=(...))``
passed as ``serving=`` to plan_truncation / plan_from_spectra (the TruncationPlan's ``unconstrained`` is
the plan without it) and to plan; ``budget.plan_serving`` gives a shared form's pair.

Fleets (N adapters of one base share a basis per kind, see fleet.py):
    fleet_kind(method, As[i][l], Bts[i][l], rank, rank_out=None) -> FleetKindResult
    fleet_options(method, As, Bts) -> list[FleetOption]   (for spend_budget: (k1, k2), params, error)
    spend_budget({kind: options}, budget_params) -> {kind: Option}   (exact knapsack)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .aslora import DEFAULT_MAX_ITERATIONS
from .budget import (
    ASLORA_PLAN_RANK_FACTOR,
    DEFAULT_ASLORA_BUDGET,
    DEFAULT_RANK_RULE,
    default_groups,
    plan,
    spend_budget,
)
from .calibrated_sharea import DEFAULT_MAX_ROUNDS, DEFAULT_RESTARTS, DEFAULT_TOL
from .calibrated_truncation import site_spectra
from .calibration import (
    DEFAULT_RIDGE,
    CalibratedKind,
    CalibratedResult,
    calibrated_objective,
    calibration_basis,
    input_statistics,
)
from .counting import METHODS, lora_parameter_count, parameter_count
from .factored import sites_error
from .fleet import FLEET_FORMS, FleetKindResult, FleetOption, fleet_kind, fleet_options, fleet_parameter_count
from .forms import CALIBRATED_FORMS as CALIBRATED_METHODS
from .forms import FORMS, PER_SITE_NAMES, Form, Settings, shared_form
from .grouping import GROUPINGS
from .serving import ServingRule
from .truncate import (
    KindTruncationPlan,
    TruncationPlan,
    TruncationResult,
    plan_from_spectra,
    plan_truncation,
    truncate_factors,
)
from .types import KindFactors, KindPlan, KindResult, Option

__all__ = [
    "CALIBRATED_METHODS",
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_RESTARTS",
    "DEFAULT_RIDGE",
    "DEFAULT_TOL",
    "CalibratedResult",
    "calibrated_objective",
    "calibrated_site_spectra",
    "calibration_basis",
    "convert_kind_calibrated",
    "input_statistics",
    "ASLORA_PLAN_RANK_FACTOR",
    "DEFAULT_ASLORA_BUDGET",
    "DEFAULT_MAX_ITERATIONS",
    "DEFAULT_RANK_RULE",
    "GROUPINGS",
    "METHODS",
    "KindPlan",
    "KindResult",
    "KindTruncationPlan",
    "Option",
    "TruncationPlan",
    "TruncationResult",
    "convert_kind",
    "default_groups",
    "lora_parameter_count",
    "parameter_count",
    "plan",
    "plan_from_spectra",
    "plan_truncation",
    "reconstruction_error",
    "spectrum",
    "truncate_kind",
    "FLEET_FORMS",
    "FleetKindResult",
    "FleetOption",
    "fleet_kind",
    "fleet_options",
    "fleet_parameter_count",
    "spend_budget",
    "FORMS",
    "Form",
    "ServingRule",
]

# the forms whose error falls by a known amount with each added rank
_WITH_SPECTRUM = tuple(name for name, row in FORMS.items() if row.spectrum is not None)


def spectrum(method: str, As: list[Tensor], Bts: list[Tensor]) -> Tensor:
    """Eigenvalues of the form's projection problem, largest first: the error falls by the
    k-th value when the rank goes from k-1 to k (ShareA/ShareB/ShareAB)."""
    if method not in _WITH_SPECTRUM:
        raise ValueError(f"spectrum is defined for {', '.join(_WITH_SPECTRUM)}, got {method!r}")
    return FORMS[method].spectrum(KindFactors.from_lists(As, Bts))


def convert_kind(
    method: str,
    As: list[Tensor],
    Bts: list[Tensor],
    rank: int,
    groups: int | None = None,
    grouping: str = "any",
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> KindResult:
    """Convert one kind to ``method`` at ``rank`` (ASLoRA also needs ``groups``).

    ``rank`` may exceed the LoRA rank; it is capped where the shared factor could no longer
    have orthonormal rows/columns (n_in for sharea/aslora, n_out for shareb, both for shareab),
    and ``result.rank`` says what was used. ``grouping`` ("any" or "adjacent") and
    ``max_iterations`` only concern ASLoRA.
    """
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    kind = KindFactors.from_lists(As, Bts)
    return shared_form(method).convert(kind, rank, Settings(groups, grouping, max_iterations))


def truncate_kind(As: list[Tensor], Bts: list[Tensor], ranks: int | Sequence[int]) -> TruncationResult:
    """Each site's best rank-``ranks[l]`` approximation (one int: every site), as plain LoRA.

    A rank is capped at the site's own (truncation never expands); 0 empties a site (a budget
    plan may ask for it). Site l's update is ``b_tensors[l] @ a_tensors[l]``, scale 1, A with
    orthonormal rows and B = U_k S_k as PEFT's ``convert_to_lora`` writes them.
    """
    kind = KindFactors.from_lists(As, Bts)
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"rank must be positive, got {ranks}")
        ranks = [ranks] * kind.n_sites
    return truncate_factors(kind, list(ranks))


def reconstruction_error(As: list[Tensor], Bts: list[Tensor], result: KindResult) -> float:
    """``sum_l ||Bts[l] @ As[l] - B'_l A'_l||_F^2`` of a result's (stored) factors, factored, float64."""
    kind = KindFactors.from_lists(As, Bts)
    site_bs, site_as = zip(*(result.site_factors(pos) for pos in range(result.n_sites)))
    return sites_error(kind.bts, kind.as_, [b.double() for b in site_bs], [a.double() for a in site_as])


def calibrated_site_spectra(
    As: list[Tensor], Bts: list[Tensor], S: list[Tensor], lam: float = DEFAULT_RIDGE
) -> list[Tensor]:
    """Per site, the decreases of its calibrated objective (damped by ``lam``) rank by rank,
    descending: what ``plan_truncation``'s budget/energy rules need, in the calibrated measure."""
    return site_spectra(CalibratedKind.build(As, Bts, S, lam))


def convert_kind_calibrated(
    method: str,
    As: list[Tensor],
    Bts: list[Tensor],
    S: list[Tensor],
    rank: int | Sequence[int],
    groups: int | list[list[int]] | None = None,
    grouping: str = "any",
    lam: float = DEFAULT_RIDGE,
    regroup: bool = True,
    max_iterations: int = DEFAULT_MAX_ROUNDS,
    tol: float = DEFAULT_TOL,
    restarts: int = DEFAULT_RESTARTS,
) -> CalibratedResult:
    """Convert one kind to ``method`` minimising the calibrated objective (calibration.py).

    ``S[l]`` (p, p) is site l's input second moment in the basis ``calibration_basis(As)``; each is
    damped by ``lam`` (ridge, relative to its mean eigenvalue). ``method`` is one of
    ``CALIBRATED_METHODS``: "lora" truncates every site to ``rank`` (exact), "shareb" (exact),
    "shareab" (exact within span(Q)), "sharea" and "aslora" (alternation, ``max_iterations``
    rounds at most per start, stopping when a round gains less than ``tol`` relative; the
    alternation has local minima, ``restarts`` adds random starts). ASLoRA needs ``groups``:
    a count, or a partition of the sites (lists of positions); ``regroup`` lets it move sites.
    Ranks are capped as in ``convert_kind``.
    """
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"method must be one of {CALIBRATED_METHODS}, got {method!r}")
    form = FORMS[method]
    if not form.per_site and not isinstance(rank, int):
        raise ValueError(f"one rank per site is for method {PER_SITE_NAMES} only, got {method!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    ck = CalibratedKind.build(As, Bts, S, lam)
    return form.convert_calibrated(ck, rank, Settings(groups, grouping, max_iterations, tol, restarts, regroup))
