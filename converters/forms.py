"""The registry of forms: one row per form holds everything the rest of the package asks of it.

A row names the form's converter, its calibrated converter, its parameter count, its rank cap
and its error spectrum, and says how it is planned (``per_site``: each site at its own rank,
chosen from the sites' spectra by ``truncate.py``; otherwise one rank per kind, chosen over the
form's options by ``budget.py``, with ``grouped`` forms choosing a number of B groups too).
The planners, ``convert_kind`` and the counts look a form up here and read its row; no other
module compares a form's name (tests/end_to_end/test_architecture.py holds them to it). The registry sits
below the planners so that they can look forms up by name without an import cycle.

Adding a form: its math as ``converters/<form>.py`` (a ``KindFactors`` in, a ``KindResult``
out) and ``calibrated_<form>.py``, then one row below; shareport's names and tensor naming for it
are one row of ``shareport/forms.py``.

Parameters of one kind converted to each form, for L sites of shape (n_out, n_in), rank k,
G groups (unique tensors count once):

    lora     sum_l r_l (n_in + n_out)
    sharea   k n_in + L k n_out
    shareb   k n_out + L k n_in
    shareab  k (n_in + n_out)
    aslora   k n_in + G k n_out
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .aslora import convert_aslora
from .calibrated_aslora import convert_aslora_calibrated
from .calibrated_sharea import convert_sharea_calibrated
from .calibrated_shareab import convert_shareab_calibrated
from .calibrated_shareb import convert_shareb_calibrated
from .calibrated_truncation import convert_lora_calibrated
from .calibration import CalibratedKind, CalibratedResult
from .sharea import convert_sharea, sharea_spectrum
from .shareab import convert_shareab, shareab_spectrum
from .shareb import convert_shareb, shareb_spectrum
from .types import KindFactors, KindResult


@dataclass(frozen=True)
class Settings:
    """What a converter may be given besides the factors and the rank: ASLoRA's groups (a count or
    a partition of the sites) and grouping, the calibrated alternations' rounds, tolerance,
    restarts and whether ASLoRA may move sites between groups. Each form takes what it uses."""

    groups: int | list[list[int]] | None = None
    grouping: str = "any"
    max_iterations: int | None = None
    tol: float | None = None
    restarts: int | None = None
    regroup: bool = True


@dataclass(frozen=True)
class Form:
    """One form. ``convert`` is None for the per-site form (plain LoRA truncation, ``truncate_kind``);
    ``rank_cap`` and ``spectrum`` are None where the form has none (``spectrum``: the exact error drop
    of each added rank, which ASLoRA does not have: its planning estimates with a grouping table)."""

    name: str
    parameter_count: Callable[..., int]  # (n_out, n_in, n_sites, *, rank, groups)
    convert_calibrated: Callable[[CalibratedKind, object, Settings], CalibratedResult]
    convert: Callable[[KindFactors, int, Settings], KindResult] | None = None
    rank_cap: Callable[[KindFactors], int] | None = None  # keeps the shared factor's rows/columns orthonormal
    spectrum: Callable[[KindFactors], Tensor] | None = None
    grouped: bool = False  # B shared per group of layers: planned and converted with a number of groups
    # the calibrated result's spectrum gives its objective at every rank: energy - spectrum[:k].sum()
    exact_calibrated_spectrum: bool = False
    per_site: bool = False  # every site keeps its own factors at its own rank


def _aslora_count(n_out: int, n_in: int, n_sites: int, *, rank: int, groups: int | None) -> int:
    if groups is None:
        raise ValueError("aslora needs the number of groups")
    return rank * n_in + groups * rank * n_out


def _convert_aslora(kind: KindFactors, rank: int, settings: Settings) -> KindResult:
    if settings.groups is None:
        raise ValueError("aslora needs groups (see converters.default_groups)")
    return convert_aslora(kind, rank, settings.groups, settings.grouping, settings.max_iterations)


def _convert_aslora_calibrated(ck: CalibratedKind, rank: int, settings: Settings) -> CalibratedResult:
    if settings.groups is None:
        raise ValueError("aslora needs groups (a count, see converters.default_groups, or a partition)")
    return convert_aslora_calibrated(
        ck,
        rank,
        settings.groups,
        settings.grouping,
        settings.regroup,
        settings.max_iterations,
        settings.tol,
        settings.restarts,
    )


ROWS = (
    Form(
        "sharea",
        parameter_count=lambda n_out, n_in, n_sites, *, rank, groups: rank * n_in + n_sites * rank * n_out,
        convert=lambda kind, rank, settings: convert_sharea(kind, rank),
        convert_calibrated=lambda ck, rank, settings: convert_sharea_calibrated(
            ck, rank, settings.max_iterations, settings.tol, settings.restarts
        ),
        rank_cap=lambda kind: kind.n_in,
        spectrum=sharea_spectrum,
    ),
    Form(
        "shareb",
        parameter_count=lambda n_out, n_in, n_sites, *, rank, groups: rank * n_out + n_sites * rank * n_in,
        convert=lambda kind, rank, settings: convert_shareb(kind, rank),
        convert_calibrated=lambda ck, rank, settings: convert_shareb_calibrated(ck, rank),
        rank_cap=lambda kind: kind.n_out,
        spectrum=shareb_spectrum,
        exact_calibrated_spectrum=True,
    ),
    Form(
        "shareab",
        parameter_count=lambda n_out, n_in, n_sites, *, rank, groups: rank * (n_in + n_out),
        convert=lambda kind, rank, settings: convert_shareab(kind, rank),
        convert_calibrated=lambda ck, rank, settings: convert_shareab_calibrated(ck, rank),
        rank_cap=lambda kind: min(kind.n_in, kind.n_out),
        spectrum=shareab_spectrum,
        exact_calibrated_spectrum=True,
    ),
    Form(
        "aslora",
        parameter_count=_aslora_count,
        convert=_convert_aslora,
        convert_calibrated=_convert_aslora_calibrated,
        rank_cap=lambda kind: kind.n_in,
        grouped=True,
    ),
    Form(
        "lora",
        parameter_count=lambda n_out, n_in, n_sites, *, rank, groups: rank * n_sites * (n_in + n_out),
        convert_calibrated=lambda ck, ranks, settings: convert_lora_calibrated(ck, ranks),
        per_site=True,
    ),
)
FORMS = {row.name: row for row in ROWS}
# the forms that share a factor across a kind's layers (one rank per kind), and the one that shares none
SHARED_FORMS = tuple(row.name for row in ROWS if not row.per_site)
PER_SITE_FORMS = tuple(row.name for row in ROWS if row.per_site)
PER_SITE_NAMES = " or ".join(repr(name) for name in PER_SITE_FORMS)  # as error messages name them
# every form the calibrated converters take, the per-site one first
CALIBRATED_FORMS = PER_SITE_FORMS + SHARED_FORMS


def shared_form(name: str) -> Form:
    """The row of a form that shares a factor; ValueError naming the shared forms for any other name."""
    row = FORMS.get(name)
    if row is None or row.per_site:
        raise ValueError(f"method must be one of {SHARED_FORMS}, got {name!r}")
    return row


def any_form(name: str) -> Form:
    """The row of any form, per-site included; ValueError naming them all otherwise."""
    if name not in FORMS:
        raise ValueError(f"method must be {PER_SITE_NAMES} or one of {SHARED_FORMS}, got {name!r}")
    return FORMS[name]


# fleets (converters/fleet.py): a one-sided fleet shares V per kind and keeps a B per member site
# (dW = B V); a two-sided one shares U and V and keeps a small core per member site (dW = U C V)
FLEET_TWO_SIDED = {"sharea": False, "shareab": True}
