"""The two error measures a conversion can minimise, behind one interface: plan, convert, record.

``FrobeniusMeasure`` (the default) minimises each site's weight error ||dW - dW'||_F^2;
``CalibratedMeasure`` the error of the update's outputs on calibration inputs (see
``convert_options.Calibration``). ``shareport.convert`` asks a measure for each kind's plan and
result and never branches on which measure it holds. Plans are per kind: the site ranks of a
per-site form (plain LoRA), else (rank, groups).

``frobenius_error`` / ``calibrated_error`` are what ``--to auto`` ranks candidates by, by default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import torch

import converters
from converters import budget as planning
from converters.serving import padded_parameters
from converters.types import KindFactors, KindResult, Option

from .adapter import Adapter, Site
from .conversion_report import ConversionReport, KindReport, relative
from .convert_options import Calibration, ConvertOptions
from .errors import ShareportError

# (source, converted, report) -> (error, energy): what --to auto minimises, and its reference
ErrorMeasure = Callable[[Adapter, Adapter, ConversionReport], "tuple[float, float]"]
# a kind's factors as the converters take them: (As, scaled Bts), in layer order
Factors = tuple[list[torch.Tensor], list[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A kind's planned setting as ``_per_kind_summary`` reads it (a calibrated spectrum's option)."""

    rank: int
    params: int
    estimated_error: float
    energy: float


# calibrated --budget for forms without a calibrated spectrum: plain-front settings scored either side
# of the plain choice
CANDIDATE_NEIGHBOURS = 2


def frobenius_error(source: Adapter, converted: Adapter, report: ConversionReport) -> tuple[float, float]:
    """(sum_l ||dW_l - dW'_l||_F^2, sum_l ||dW_l||_F^2) over every site: the error each projection
    minimises, exact (float64, from the factors, never a dense dW). ``--to auto`` ranks candidates
    by it; a calibrated measure (e.g. weighted by activations) can replace it with this signature."""
    return report.error, report.energy


frobenius_error.describes = "weights: each site's Frobenius error ||dW - dW'||^2"


def calibrated_error(source: Adapter, converted: Adapter, report: ConversionReport) -> tuple[float, float]:
    """(calibrated objective, its value for dW' = 0) summed over kinds: ``sum_l tr((dW_l - dW'_l) S~_l
    (dW_l - dW'_l)^T)`` with each site's damped input statistics. ``--to auto`` with ``--calibration``
    ranks candidates by it."""
    return (sum(k.calibration["objective"] for k in report.kinds), sum(k.calibration["energy"] for k in report.kinds))


calibrated_error.describes = "each site's output error on the calibration data"


class Measure(Protocol):
    default_error: ErrorMeasure  # what --to auto ranks by unless told otherwise

    def plan(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float | None) -> dict:
        """Per kind of ``kinds``: its plan; ``budget`` (a fraction of a plain LoRA at the input's
        ranks, or None) replaces ``options.budget``."""

    def plan_serving(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float) -> tuple[dict, dict]:
        """``plan`` under ``options.serving``, and the report's ``serving`` entry (``serving_summary``):
        the planned error against the unconstrained plan at the same budget."""

    def convert(self, name: str, factors: Factors, *, plan, options: ConvertOptions) -> tuple[KindResult, dict | None]:
        """One kind converted by its plan, and its ``KindReport.calibration`` entry (None if none)."""

    def record(self, settings: dict, reports: list[KindReport]) -> None:
        """Add to the provenance's ``settings`` what the measure needs recorded."""


def measure_for(calibration: Calibration | None, kinds: dict[str, list[Site]]) -> Measure:
    return FrobeniusMeasure() if calibration is None else CalibratedMeasure(calibration, kinds)


def plain_plan(kinds: dict[str, Factors], options: ConvertOptions, budget: float | None) -> dict:
    """Per kind: the site ranks (per-site form) or (rank, groups). An explicit or default rank needs no
    search, so the kind's spectrum is computed once, by the conversion itself."""
    to, rank, energy = options.to, options.rank, options.energy
    form = converters.FORMS[to]
    try:
        if form.per_site:
            plan = converters.plan_truncation(kinds, rank=rank, energy=energy, budget=budget)
            return {name: p.ranks for name, p in plan.kinds.items()}
        if budget is not None or energy is not None:
            # a budget is spent across every kind given; energy is chosen per kind
            plans = converters.plan(
                to, kinds, budget=budget, energy=energy, groups=options.groups, grouping=options.grouping
            )
            return {name: (p.rank, p.groups) for name, p in plans.items()}
        out = {}
        for name, (As, Bts) in kinds.items():
            k = rank if rank is not None else max(a.shape[0] for a in As)
            g = options.groups
            if form.grouped and g is None:
                g = converters.default_groups(KindFactors.from_lists(As, Bts), k)
            out[name] = (k, g)
        return out
    except ValueError as exc:
        raise ShareportError(str(exc)) from None


def serving_summary(
    rule: converters.ServingRule,
    *,
    error: float,
    free_error: float,
    energy: float,
    params: int,
    free_params: int,
    ranks: list[int],
    free_ranks: list[int],
    widths: list[int],
) -> dict:
    """What a serving rule costs, against the unconstrained plan at the same budget: both planned errors
    (squared, summed over sites, and relative: sqrt(error / energy)), their differences, the parameters, and
    what a server pays when it pads every site (``widths[l] = n_in + n_out``, one per site, ``ranks`` the
    sites' ranks; shared forms: the kind's rank at each of its sites, as ``--to lora`` expands them)."""
    free_max = max(free_ranks, default=0)
    pads_to = rule.pads_to(ranks)
    rel, free_rel = relative(error, energy), relative(free_error, energy)
    return {
        "rule": rule.describe(),
        "error": error,
        "unconstrained_error": free_error,
        "error_difference": error - free_error,
        "relative_error": rel,
        "unconstrained_relative_error": free_rel,
        "relative_error_difference": rel - free_rel,
        "energy": energy,
        "parameters": params,
        "unconstrained_parameters": free_params,
        "ranks_used": sorted(set(ranks)),
        "max_rank": max(ranks, default=0),
        "unconstrained_max_rank": free_max,
        "pads_to": pads_to,
        "padded_parameters": padded_parameters(widths, pads_to),
        "unconstrained_padded_parameters": padded_parameters(widths, free_max),
    }


def _widths(kinds: dict[str, Factors]) -> dict[str, int]:
    return {name: As[0].shape[1] + Bts[0].shape[0] for name, (As, Bts) in kinds.items()}


def _per_site_summary(rule, plan, widths: dict[str, int]) -> dict:
    """``serving_summary`` of a per-site ``TruncationPlan`` (with its ``unconstrained``)."""
    free = plan.unconstrained

    def ranks(p):
        return [k for kp in p.kinds.values() for k in kp.ranks]

    return serving_summary(
        rule,
        error=plan.error,
        free_error=free.error,
        energy=plan.energy,
        params=plan.params,
        free_params=free.params,
        ranks=ranks(plan),
        free_ranks=ranks(free),
        widths=[widths[name] for name, kp in plan.kinds.items() for _ in kp.ranks],
    )


def _per_kind_summary(rule, plans: dict, free: dict, kinds: dict[str, Factors]) -> dict:
    """``serving_summary`` of per-kind plans (``KindPlan``-like: rank, params, estimated_error, energy)."""
    widths = _widths(kinds)
    sites = {name: len(As) for name, (As, _) in kinds.items()}

    def ranks(p):
        return [p[name].rank for name in kinds for _ in range(sites[name])]

    return serving_summary(
        rule,
        error=sum(p.estimated_error for p in plans.values()),
        free_error=sum(p.estimated_error for p in free.values()),
        energy=sum(p.energy for p in plans.values()),
        params=sum(p.params for p in plans.values()),
        free_params=sum(p.params for p in free.values()),
        ranks=ranks(plans),
        free_ranks=ranks(free),
        widths=[widths[name] for name in kinds for _ in range(sites[name])],
    )


def plain_serving_plan(kinds: dict[str, Factors], options: ConvertOptions, budget: float) -> tuple[dict, dict]:
    """``plain_plan`` under ``options.serving`` (a budget plan), and its ``serving_summary``."""
    rule = options.serving
    try:
        if converters.FORMS[options.to].per_site:
            plan = converters.plan_truncation(kinds, budget=budget, serving=rule)
            return {name: p.ranks for name, p in plan.kinds.items()}, _per_site_summary(rule, plan, _widths(kinds))
        plans, free = planning.plan_serving(
            options.to, kinds, budget=budget, serving=rule, groups=options.groups, grouping=options.grouping
        )
        return {name: (p.rank, p.groups) for name, p in plans.items()}, _per_kind_summary(rule, plans, free, kinds)
    except ValueError as exc:
        raise ShareportError(_serving_message(options, exc)) from None


def _serving_message(options: ConvertOptions, exc: ValueError) -> str:
    return f"{options.serving.describe()} at --budget {options.budget:g}: {exc}"


def plain_convert(to: str, factors: Factors, plan, *, grouping: str) -> KindResult:
    As, Bts = factors
    if converters.FORMS[to].per_site:
        return converters.truncate_kind(As, Bts, plan)
    k, g = plan
    return converters.convert_kind(to, As, Bts, k, groups=g, grouping=grouping)


class FrobeniusMeasure:
    """Every form minimises the Frobenius error of the updates: the plain projections."""

    default_error = staticmethod(frobenius_error)

    def plan(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float | None) -> dict:
        return plain_plan(kinds, options, budget)

    def plan_serving(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float) -> tuple[dict, dict]:
        return plain_serving_plan(kinds, options, budget)

    def convert(self, name: str, factors: Factors, *, plan, options: ConvertOptions) -> tuple[KindResult, None]:
        return plain_convert(options.to, factors, plan, grouping=options.grouping), None

    def record(self, settings: dict, reports: list[KindReport]) -> None:
        pass  # a plain conversion records its options only


class CalibratedMeasure:
    """Every form minimises the calibrated objective (``Calibration`` says what is exact and what not);
    each kind's report entry also scores the plain projection at the same plan."""

    default_error = staticmethod(calibrated_error)

    def __init__(self, calibration: Calibration, kinds: dict[str, list[Site]]):
        self.calibration = calibration
        self.lam = calibration.ridge
        self.stats = {name: calibration.kind_statistics(sites) for name, sites in kinds.items()}

    def plan(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float | None) -> dict:
        to, energy = options.to, options.energy
        form = converters.FORMS[to]
        try:
            if form.per_site:
                return self._per_site_plan(kinds, options, budget)
            if budget is None and (energy is None or not form.exact_calibrated_spectrum):
                return plain_plan(kinds, options, budget)  # explicit rank, or the plain energy plan
            if form.exact_calibrated_spectrum:
                options_by_kind = {
                    name: self._spectrum_options(to, name, factors, energy=energy) for name, factors in kinds.items()
                }
            else:  # a budget without a calibrated spectrum: score the plain front around the plain choice
                plain = converters.plan(to, kinds, budget=budget, groups=options.groups, grouping=options.grouping)
                options_by_kind = {
                    name: self._scored_candidates(name, factors, plain[name], options=options)
                    for name, factors in kinds.items()
                }
            if energy is not None:
                return {name: (opts[0].rank, opts[0].groups) for name, opts in options_by_kind.items()}
            total = sum(planning.kind_lora_parameter_count(KindFactors.from_lists(*f)) for f in kinds.values())
            chosen = planning.spend_budget(options_by_kind, math.floor(budget * total))
            return {name: (o.rank, o.groups) for name, o in chosen.items()}
        except ValueError as exc:
            raise ShareportError(str(exc)) from None

    def plan_serving(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float) -> tuple[dict, dict]:
        """The calibrated plan under the serving rule: per site (lora) or from the exact calibrated spectra
        (shareb, shareab; ``ConvertOptions`` refuses the rest), with the unconstrained one in the summary."""
        rule = options.serving
        try:
            if converters.FORMS[options.to].per_site:
                plan = self._per_site_truncation_plan(kinds, options, budget, serving=rule)
                return {name: p.ranks for name, p in plan.kinds.items()}, _per_site_summary(rule, plan, _widths(kinds))
            probes = {name: self._spectrum_probe(options.to, name, factors) for name, factors in kinds.items()}
            options_by_kind = {name: opts for name, (opts, _) in probes.items()}
            energies = {name: total for name, (_, total) in probes.items()}
            total = sum(planning.kind_lora_parameter_count(KindFactors.from_lists(*f)) for f in kinds.values())
            params = math.floor(budget * total)
            chosen = planning.spend_serving(options_by_kind, params, rule)
            free = planning.spend_budget(options_by_kind, params)
            plans = {name: _Planned(o.rank, o.params, o.error, energies[name]) for name, o in chosen.items()}
            frees = {name: _Planned(o.rank, o.params, o.error, energies[name]) for name, o in free.items()}
            return (
                {name: (o.rank, o.groups) for name, o in chosen.items()},
                _per_kind_summary(rule, plans, frees, kinds),
            )
        except ValueError as exc:
            raise ShareportError(_serving_message(options, exc)) from None

    def _per_site_truncation_plan(
        self, kinds: dict[str, Factors], options: ConvertOptions, budget: float | None, serving=None
    ):
        """Each site's calibrated spectrum, planned as truncation plans squared singular values."""
        spectra, shapes, lora_ranks = {}, {}, {}
        for name, (As, Bts) in kinds.items():
            spectra[name] = converters.calibrated_site_spectra(As, Bts, self.stats[name], self.lam)
            shapes[name] = (Bts[0].shape[0], As[0].shape[1])
            lora_ranks[name] = [a.shape[0] for a in As]
        return converters.plan_from_spectra(
            spectra, shapes, lora_ranks, rank=options.rank, energy=options.energy, budget=budget, serving=serving
        )

    def _per_site_plan(self, kinds: dict[str, Factors], options: ConvertOptions, budget: float | None) -> dict:
        plan = self._per_site_truncation_plan(kinds, options, budget)
        return {name: p.ranks for name, p in plan.kinds.items()}

    def _spectrum_options(self, to: str, name: str, factors: Factors, *, energy: float | None) -> list[Option]:
        """Every rank with its exact calibrated objective, energy - spectrum[:k].sum() of one rank-1 probe
        (with ``energy``: just the option that rule picks)."""
        options, total = self._spectrum_probe(to, name, factors)
        if energy is not None:
            return [planning.choose_by_energy(options, total, energy)]
        return options

    def _spectrum_probe(self, to: str, name: str, factors: Factors) -> tuple[list[Option], float]:
        """(every rank with its exact calibrated objective, the kind's calibrated energy)."""
        As, Bts = factors
        kind = KindFactors.from_lists(As, Bts)
        probe = converters.convert_kind_calibrated(to, As, Bts, self.stats[name], 1, lam=self.lam).result
        top = min(len(probe.spectrum), planning.rank_cap(to, kind))
        drops = probe.spectrum[:top].cumsum(0).tolist()
        options = [
            Option(k, None, planning.kind_parameter_count(to, kind, k), max(probe.energy - drops[k - 1], 0.0))
            for k in range(1, top + 1)
        ] or [Option(1, None, planning.kind_parameter_count(to, kind, 1), probe.energy)]
        return options, probe.energy

    def _scored_candidates(self, name: str, factors: Factors, chosen, *, options: ConvertOptions) -> list[Option]:
        """The plain planner's setting ``chosen`` for this kind and ``CANDIDATE_NEIGHBOURS`` either side of
        it on the kind's plain Pareto front, each scored by the calibrated conversion (its damped objective)."""
        to = options.to
        As, Bts = factors
        kind = KindFactors.from_lists(As, Bts)
        front = planning.pareto_front(planning.kind_options(to, kind, groups=options.groups, grouping=options.grouping))
        here = next(
            (i for i, o in enumerate(front) if (o.rank, o.groups) == (chosen.rank, chosen.groups)),
            min(range(len(front)), key=lambda i: abs(front[i].params - chosen.params)),
        )
        picks = front[max(0, here - CANDIDATE_NEIGHBOURS) : here + CANDIDATE_NEIGHBOURS + 1]
        if (chosen.rank, chosen.groups) not in {(o.rank, o.groups) for o in picks}:
            picks.append(Option(chosen.rank, chosen.groups, chosen.params, chosen.estimated_error))
        scored = []
        for o in picks:
            res = converters.convert_kind_calibrated(
                to, As, Bts, self.stats[name], o.rank, groups=o.groups, grouping=options.grouping, lam=self.lam
            )
            scored.append(Option(o.rank, o.groups, o.params, res.objective))
        return scored

    def convert(self, name: str, factors: Factors, *, plan, options: ConvertOptions) -> tuple[KindResult, dict]:
        """The calibrated result and its report entry, with the plain projection at the same plan scored alike."""
        to, stats, lam = options.to, self.stats[name], self.lam
        As, Bts = factors
        if converters.FORMS[to].per_site:
            calibrated = converters.convert_kind_calibrated(to, As, Bts, stats, list(plan), lam=lam)
        else:
            k, g = plan
            calibrated = converters.convert_kind_calibrated(
                to, As, Bts, stats, k, groups=g, grouping=options.grouping, lam=lam
            )
        plain = plain_convert(to, factors, plan, grouping=options.grouping)
        q = converters.calibration_basis(As)
        entry = {
            "objective": calibrated.objective,
            "energy": calibrated.result.energy,
            "plain_objective": converters.calibrated_objective(As, Bts, stats, q, plain, lam=lam),
            "raw_objective": calibrated.raw_objective,
            "raw_energy": calibrated.raw_energy,
            "plain_raw_objective": converters.calibrated_objective(As, Bts, stats, q, plain, lam=0.0),
            "frobenius_error": calibrated.frobenius_error,
            "frobenius_energy": plain.energy,
            "plain_frobenius_error": plain.error,
            "iterations": calibrated.iterations,
        }
        return calibrated.result, entry

    def record(self, settings: dict, reports: list[KindReport]) -> None:
        settings["calibration"] = {
            **self.calibration.info,
            "ridge": self.lam,
            "kinds": {
                k.kind: {"plain_objective": k.calibration["plain_objective"], "objective": k.calibration["objective"]}
                for k in reports
            },
        }
