"""What a conversion is asked for, checked once: the form, its size, ASLoRA's groups, calibration.

``ConvertOptions`` refuses a bad combination when it is made, with the one-line message the
command line prints, so the conversion below it never checks an option again.
"""

from __future__ import annotations

import dataclasses

import torch

import converters

from .adapter import Adapter, Site
from .conversion_report import size_hint
from .errors import ShareportError
from .forms import AUTO, FORMS, GROUPED_FORMS, GROUPINGS, TARGET_FORMS

# --calibration with a serving rule: the forms whose calibrated plan is an exact spectrum knapsack (and auto,
# whose other candidates are then refused)
CALIBRATED_SERVING_FORMS = tuple(
    name for name, row in converters.FORMS.items() if row.per_site or row.exact_calibrated_spectrum
)


@dataclasses.dataclass
class Calibration:
    """Input statistics for a calibrated conversion (``converters.convert_kind_calibrated``).

    ``statistics[site path]``: S_l (p, p), float64, in the basis ``converters.calibration_basis``
    of the site's kind's A's exactly as ``kind_factors`` returns them, normalised by the site's own
    token count. ``ridge``: the damping lam. ``info``: what to record (data, samples, tokens, ...).

    With it every form minimises the calibrated objective instead of the Frobenius error, and every
    error in the report (per kind ``error``, ``energy``, ``relative_error``, ``retained_energy``) is
    that objective, damped as the converter damps it. Each kind's ``calibration`` holds
    ``objective`` / ``energy`` (damped), ``plain_objective`` (the plain projection at the same plan,
    scored the same way), the ``raw_*`` values (lam = 0: the output error on the calibration data)
    and ``frobenius_error`` / ``frobenius_energy``.

    Planning: ``--to lora`` (rank, energy, budget) uses each site's calibrated spectrum and
    ShareB/ShareAB's budget and energy rules their calibrated spectra, all exact. ShareA and ASLoRA
    have no calibrated spectrum: ``--energy`` keeps the plain plan, and ``--budget`` scores a small
    candidate set per kind with the calibrated conversion itself, the plain planner's choice and
    ``measures.CANDIDATE_NEIGHBOURS`` settings either side of it on the kind's plain Pareto front, then
    spends the budget over those scored options (``converters.budget.spend_budget``).
    """

    statistics: dict[str, torch.Tensor]
    ridge: float = converters.DEFAULT_RIDGE
    info: dict = dataclasses.field(default_factory=dict)

    def kind_statistics(self, sites: list[Site]) -> list[torch.Tensor]:
        return [self.statistics[s.path] for s in sites]


def parse_buckets(text: str | None) -> tuple[int, ...] | None:
    """``--rank-buckets 4,8,16`` as ranks (ascending, each once); anything but positive integers is refused."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        bad = next(p for p in parts if not (p.isdigit() and int(p) > 0))
        raise ShareportError(f"--rank-buckets must be positive integers separated by commas, e.g. 4,8,16; got {bad!r}")
    return tuple(sorted({int(p) for p in parts}))


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """``to``: a form of ``forms.TARGET_FORMS`` ("auto": every form at ``budget``, the best kept).
    At most one of ``rank``, ``energy`` (kept fraction of each kind's energy) and ``budget`` (a
    fraction of the source LoRA's parameters); ``groups``/``grouping``: ASLoRA's B groups;
    ``calibration``: input statistics to weigh the error by (None: the Frobenius error).

    Serving rules (at most one; they shape a budget plan, so they need ``budget`` or a form's default
    budget): ``max_rank`` R (no site above R), ``uniform_rank`` (one rank for every site), ``rank_buckets``
    (every rank one of these). Per site for ``lora``; per kind (the rank every site gets when the
    result is expanded to a plain LoRA) for the shared forms. See ``converters.serving``."""

    to: str
    rank: int | None = None
    energy: float | None = None
    budget: float | None = None
    groups: int | None = None
    grouping: str = "any"
    calibration: Calibration | None = dataclasses.field(default=None, compare=False)  # tensors: not compared
    max_rank: int | None = None
    uniform_rank: bool = False
    rank_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.to not in TARGET_FORMS:
            raise ShareportError(f"unknown target form '{self.to}' (expected one of {', '.join(TARGET_FORMS)})")
        if self.grouping not in GROUPINGS:
            raise ShareportError(f"unknown grouping '{self.grouping}' (expected any or adjacent)")
        if sum(x is not None for x in (self.rank, self.energy, self.budget)) > 1:
            raise ShareportError("give at most one of --rank, --energy and --budget")
        if self.to == AUTO and self.budget is None:
            raise ShareportError("--to auto needs --budget (the size every form is converted to), e.g. --budget 0.25")
        if self.rank is not None and self.rank < 1:
            raise ShareportError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ShareportError(f"--energy must be in (0, 1], got {self.energy}")
        if self.budget is not None and not 0.0 < self.budget:
            raise ShareportError(f"--budget must be a positive fraction of the LoRA's parameters, got {self.budget}")
        if self.groups is not None and (self.to not in GROUPED_FORMS or self.groups < 1):
            raise ShareportError("--groups applies to --to aslora and must be at least 1")
        if self.grouping != "any" and self.to not in GROUPED_FORMS + (AUTO,):
            raise ShareportError("--grouping applies to --to aslora (and auto)")
        if self.calibration is not None and not self.calibration.ridge >= 0:
            raise ShareportError(f"--calibration-ridge must be >= 0, got {self.calibration.ridge}")
        if self.expands and self.calibration is not None:
            raise ShareportError(
                "--to lora with no --rank, --energy or --budget expands exactly: "
                "--calibration has nothing to weigh (give a size option)"
            )
        self._check_serving()

    def _check_serving(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--max-rank", self.max_rank),
                ("--uniform-rank", self.uniform_rank or None),
                ("--rank-buckets", self.rank_buckets),
            )
            if value is not None
        ]
        if not given:
            return
        if len(given) > 1:
            raise ShareportError(
                f"{given[0]} and {given[1]} conflict: give at most one of --max-rank, --uniform-rank and --rank-buckets"
            )
        flag = given[0]
        if self.max_rank is not None and self.max_rank < 1:
            raise ShareportError(f"--max-rank must be at least 1, got {self.max_rank}")
        if self.rank_buckets is not None and (
            not self.rank_buckets or any(not isinstance(b, int) or b < 1 for b in self.rank_buckets)
        ):
            raise ShareportError(f"--rank-buckets must be positive integers, got {list(self.rank_buckets)}")
        if self.rank is not None:
            raise ShareportError(
                f"{flag} cannot be given with --rank (--rank K already gives every site rank K); give --budget instead"
            )
        if self.energy is not None:
            raise ShareportError(f"{flag} shapes a --budget plan, not an --energy one: give --budget instead")
        default = FORMS[self.to].default_budget if self.to in FORMS else None
        if self.budget is None and default is None:
            raise ShareportError(f"{flag} needs --budget (the size it plans for, e.g. --budget 0.25)")
        if self.calibration is not None and self.to not in CALIBRATED_SERVING_FORMS + (AUTO,):
            raise ShareportError(
                f"{flag} with --calibration applies to --to {', '.join(CALIBRATED_SERVING_FORMS)} "
                f"(the forms with a calibrated spectrum), not {self.to}"
            )

    @property
    def serving(self) -> converters.ServingRule | None:
        """The serving rule asked for, or None."""
        if self.max_rank is None and not self.uniform_rank and self.rank_buckets is None:
            return None
        return converters.ServingRule(
            max_rank=self.max_rank, uniform=self.uniform_rank, buckets=tuple(self.rank_buckets or ())
        )

    @property
    def sized(self) -> bool:
        """Whether a size option was given (else the form's default: its rank, or its default budget)."""
        return not (self.rank is None and self.energy is None and self.budget is None)

    @property
    def expands(self) -> bool:
        """An unsized per-site form: every site kept whole, the adapter expanded to plain LoRA exactly."""
        return self.to in FORMS and FORMS[self.to].per_site and not self.sized

    def check_adapter(self, adapter: Adapter) -> None:
        """--groups above a kind's layer count is refused, not capped (a kind with G layers has at most G groups)."""
        if self.groups is None:
            return
        for kind, sites in sorted(adapter.kinds().items()):
            if self.groups > len(sites):
                raise ShareportError(
                    f"--groups {self.groups} is more than the {len(sites)} layers of {kind} "
                    f"(a kind has at most one B group per layer)"
                )

    def planned(self) -> ConvertOptions:
        """With the form's default budget where no size was given (ASLoRA: the planner picks rank and
        groups; issue 13: the old rule collapsed)."""
        default = FORMS[self.to].default_budget if self.to in FORMS else None
        if self.sized or default is None:
            return self
        return dataclasses.replace(self, budget=default)

    def candidate(self, form: str) -> ConvertOptions:
        """``--to auto``'s options for one form: the same budget (and grouping, where the form groups)."""
        return ConvertOptions(
            form,
            budget=self.budget,
            grouping=self.grouping if form in GROUPED_FORMS else "any",
            calibration=self.calibration,
            max_rank=self.max_rank,
            uniform_rank=self.uniform_rank,
            rank_buckets=self.rank_buckets,
        )

    def settings(self) -> dict:
        """What the provenance records of the options (those given, after ``planned``)."""
        given = dict(
            to=self.to,
            rank=self.rank,
            energy=self.energy,
            budget=self.budget,
            groups=self.groups,
            grouping=self.grouping,
            max_rank=self.max_rank,
            uniform_rank=self.uniform_rank or None,
            rank_buckets=list(self.rank_buckets) if self.rank_buckets else None,
        )
        return {k: v for k, v in given.items() if v is not None}

    def size_hint(self) -> str:
        """What to try for a larger result, named by the option that set the size (or the default that did)."""
        default = FORMS[self.to].default_budget if self.to in FORMS else None
        return size_hint(rank=self.rank, energy=self.energy, budget=self.budget, default_budget=default)
