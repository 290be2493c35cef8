"""Adapter -> adapter conversion: hand each kind's factors to ``converters`` and rebuild the pool.

The converters work on one kind at a time with the scale folded into B; this module gathers
those factors from an :class:`Adapter`, asks for a plan (rank, groups) per kind, converts, and
names the resulting tensors so that a shared tensor has one name used by many sites:

    ShareA   "<kind>.lora_A" (shared)           "<site>.lora_B"
    ShareB   "<site>.lora_A"                    "<kind>.lora_B" (shared)
    ShareAB  "<kind>.lora_A"                    "<kind>.lora_B"
    ASLoRA   "<kind>.lora_A"                    "<kind>.group<g>.lora_B" (one per group of layers)
    LoRA     "<site>.lora_A"                    "<site>.lora_B" (each site truncated on its own)

Kind names hold no layer index and site paths always do, so the two never collide.

Sizes are counted against one denominator everywhere: the parameters of the *source LoRA*, the
plain LoRA the adapter first came from (``provenance["source_parameters"]``, kept through
recovery and any re-conversion); ``--budget`` is a fraction of it and ``ratio`` is measured by it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import converters
from converters.types import KindFactors, KindResult

from .adapter import Adapter, Site
from .errors import ShareportError
from .forms import DEFAULT_ASLORA_BUDGET, GROUPINGS, TARGET_FORMS

# what --to auto tries, in this order (on equal error the first wins)
AUTO_FORMS = ("lora", "sharea", "shareb", "shareab", "aslora")
# --to auto: errors closer than this fraction of the energy are a tie (roundoff of lossless forms)
AUTO_TIE = 1e-9
# a kind keeping less than this fraction of its energy gets a warning
LOW_ENERGY = 0.5


@dataclasses.dataclass
class KindReport:
    kind: str
    sites: int
    lora_rank: int
    rank: int  # the largest site rank (shared forms: the shared rank)
    groups: list[list[int]]  # layers that share a B
    relative_error: float
    retained_energy: float
    parameters_before: int
    parameters_after: int
    already_shared: bool
    site_ranks: dict[str, int]  # per site path; 0: the site is no longer adapted (dropped)
    error: float  # sum_l ||dW_l - dW'_l||_F^2 over the kind's sites (calibrated: the calibrated objective)
    energy: float  # sum_l ||dW_l||_F^2 (calibrated: the same objective of dW' = 0)
    calibration: dict | None = None  # calibrated conversions only: see ``Calibration``


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did. ``ratio`` is measured against ``source_parameters``, the source
    LoRA's parameter count (the same denominator ``inspect`` and ``--budget`` use)."""

    form: str
    parameters_before: int  # the input adapter's
    parameters_after: int
    kinds: list[KindReport]
    source_parameters: int
    settings: dict = dataclasses.field(default_factory=dict)  # as recorded in the provenance
    warnings: list[str] = dataclasses.field(default_factory=list)
    candidates: list[dict] = dataclasses.field(default_factory=list)  # --to auto: every form tried
    winner: str | None = None  # --to auto: the form written
    ranked_by: str | None = None  # --to auto: what the candidates were ranked by (the error measure's ``describes``)

    @property
    def ratio(self) -> float:
        return self.parameters_after / self.source_parameters

    @property
    def error(self) -> float:
        return sum(k.error for k in self.kinds)

    @property
    def energy(self) -> float:
        return sum(k.energy for k in self.kinds)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for kind in data["kinds"]:
            if kind["calibration"] is None:
                del kind["calibration"]  # plain conversions report what they always did
        data["ratio"] = self.ratio
        data["relative_error"] = _relative(self.error, self.energy)
        return data


# (source, converted, report) -> (error, energy): what --to auto minimises, and its reference
ErrorMeasure = Callable[[Adapter, Adapter, ConversionReport], "tuple[float, float]"]


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
    return (sum(k.calibration["objective"] for k in report.kinds),
            sum(k.calibration["energy"] for k in report.kinds))


calibrated_error.describes = "each site's output error on the calibration data"

# --to auto without data: what the report says (issue 26: on a real 16-class task the weights picked
# truncation, keeping 30% of the LoRA's accuracy, where calibrated truncation kept 82%)
WEIGHTS_ONLY_WARNING = ("--to auto ranked the forms by their weights only; on real tasks the form that keeps the "
                        "most of the model's outputs is often another: give --calibration DATA --base BASE to "
                        "rank them by the model's outputs")


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
    ``CANDIDATE_NEIGHBOURS`` settings either side of it on the kind's plain Pareto front, then
    spends the budget over those scored options (``converters.budget.spend_budget``).
    """

    statistics: dict[str, torch.Tensor]
    ridge: float = converters.DEFAULT_RIDGE
    info: dict = dataclasses.field(default_factory=dict)

    def kind_statistics(self, sites: list[Site]) -> list[torch.Tensor]:
        return [self.statistics[s.path] for s in sites]


# calibrated --budget for sharea/aslora: plain-front settings scored either side of the plain choice
CANDIDATE_NEIGHBOURS = 2


def _relative(error: float, energy: float) -> float:
    return math.sqrt(error / energy) if energy > 0 else 0.0


def recorded_source_parameters(adapter: Adapter) -> int | None:
    """Parameters of the LoRA the adapter was converted from, if its provenance records them."""
    recorded = adapter.provenance.get("source_parameters")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return recorded
    return None


def source_parameters(adapter: Adapter) -> int:
    """The denominator of every size: the source LoRA's parameters, else the adapter's own."""
    return recorded_source_parameters(adapter) or adapter.num_parameters()


def conversion_steps(adapter: Adapter, to: str) -> int:
    """How many times ``convert_adapter`` calls ``progress``."""
    return len(adapter.kinds()) * (len(AUTO_FORMS) if to == "auto" else 1)


def size_hint(rank: int | None = None, energy: float | None = None, budget: float | None = None,
              default_budget: float | None = None) -> str:
    """What to try for a larger result, named by the option that set the size (or the default that did)."""
    if rank is not None:
        return f"a larger --rank than {rank}"
    if energy is not None:
        return f"a larger --energy than {energy:g}"
    if budget is not None:
        return f"a larger --budget than {budget:g}"
    if default_budget is not None:
        return f"a --budget above the default {default_budget:g}"
    return "a larger --rank or --budget"


def energy_warnings(kinds: list[KindReport], hint: str) -> list[str]:
    """One line per kind keeping under ``LOW_ENERGY`` of its energy (the CLI prints them); ``hint``: :func:`size_hint`."""
    return [f"{k.kind} keeps only {k.retained_energy:.1%} of its energy (under {LOW_ENERGY:.0%}); try {hint}"
            for k in kinds if k.retained_energy < LOW_ENERGY]


def kind_factors(adapter: Adapter, sites: list[Site]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kind's A's and scaled B's, in layer order (dW_l = Bts[l] @ As[l])."""
    As, Bts = [], []
    for site in sites:
        a, bt = adapter.factors(site.path, adapter.tensors[site.a].dtype)
        As.append(a)
        Bts.append(bt)
    return As, Bts


def release_pool(adapter: Adapter) -> None:
    """Let a streamed pool (``shareport.files.tensorfile.StreamedTensors``) unmap what was read so far;
    with it a conversion holds one kind of the input at a time. A plain dict pool has nothing to do."""
    release = getattr(adapter.tensors, "release", None)
    if release is not None:
        release()


def _plan(to: str, kinds: dict, rank, groups, energy, budget, grouping) -> dict:
    """Per kind: the site ranks (lora) or (rank, groups). An explicit or default rank needs no
    search, so the kind's spectrum is computed once, by the conversion itself."""
    try:
        if to == "lora":
            plan = converters.plan_truncation(kinds, rank=rank, energy=energy, budget=budget)
            return {name: p.ranks for name, p in plan.kinds.items()}
        if budget is not None or energy is not None:
            # a budget is spent across every kind given; energy is chosen per kind
            plans = converters.plan(to, kinds, budget=budget, energy=energy, groups=groups, grouping=grouping)
            return {name: (p.rank, p.groups) for name, p in plans.items()}
        out = {}
        for name, (As, Bts) in kinds.items():
            k = rank if rank is not None else max(a.shape[0] for a in As)
            g = groups
            if to == "aslora" and g is None:
                g = converters.default_groups(KindFactors.from_lists(As, Bts), k)
            out[name] = (k, g)
        return out
    except ValueError as exc:
        raise ShareportError(str(exc)) from None


def _convert_kind(to: str, As, Bts, plan, grouping: str) -> KindResult:
    if to == "lora":
        return converters.truncate_kind(As, Bts, plan)
    k, g = plan
    return converters.convert_kind(to, As, Bts, k, groups=g, grouping=grouping)


def _plan_calibrated(to: str, kinds: dict, stats: dict, rank, groups, energy, budget, grouping, lam) -> dict:
    """``_plan`` in the calibrated measure (see ``Calibration`` for what is exact and what is not).
    ``stats[name]``: the kind's statistics, in its sites' order."""
    from converters import budget as planning
    from converters.truncate import plan_from_spectra

    try:
        if to == "lora":
            spectra, shapes, lora_ranks = {}, {}, {}
            for name, (As, Bts) in kinds.items():
                spectra[name] = converters.calibrated_site_spectra(As, Bts, stats[name], lam)
                shapes[name] = (Bts[0].shape[0], As[0].shape[1])
                lora_ranks[name] = [a.shape[0] for a in As]
            plan = plan_from_spectra(spectra, shapes, lora_ranks, rank=rank, energy=energy, budget=budget)
            return {name: p.ranks for name, p in plan.kinds.items()}
        if budget is None and energy is None or to in ("sharea", "aslora") and budget is None:
            return _plan(to, kinds, rank, groups, energy, budget, grouping)  # explicit rank, or the plain energy plan
        options = {}
        plain = (converters.plan(to, kinds, budget=budget, groups=groups, grouping=grouping)
                 if to in ("sharea", "aslora") else {})
        for name, (As, Bts) in kinds.items():
            kind = KindFactors.from_lists(As, Bts)
            if to in ("shareb", "shareab"):  # exact: objective(k) = energy - spectrum[:k].sum()
                probe = converters.convert_kind_calibrated(to, As, Bts, stats[name], 1, lam=lam).result
                top = min(len(probe.spectrum), planning.rank_cap(to, kind))
                drops = probe.spectrum[:top].cumsum(0).tolist()
                options[name] = [converters.types.Option(k, None, planning.kind_parameter_count(to, kind, k),
                                                         max(probe.energy - drops[k - 1], 0.0))
                                 for k in range(1, top + 1)] or [converters.types.Option(
                                     1, None, planning.kind_parameter_count(to, kind, 1), probe.energy)]
                if energy is not None:
                    options[name] = [planning.choose_by_energy(options[name], probe.energy, energy)]
            else:  # sharea / aslora with a budget: score the plain front around the plain choice
                options[name] = _scored_candidates(to, As, Bts, stats[name], plain[name], groups, grouping, lam)
        if energy is not None:
            return {name: (opts[0].rank, opts[0].groups) for name, opts in options.items()}
        total = sum(planning.kind_lora_parameter_count(KindFactors.from_lists(*f)) for f in kinds.values())
        chosen = planning.spend_budget(options, math.floor(budget * total))
        return {name: (o.rank, o.groups) for name, o in chosen.items()}
    except ValueError as exc:
        raise ShareportError(str(exc)) from None


def _scored_candidates(to, As, Bts, stats, chosen, groups, grouping, lam) -> list:
    """The plain planner's setting ``chosen`` for this kind and ``CANDIDATE_NEIGHBOURS`` either side of
    it on the kind's plain Pareto front, each scored by the calibrated conversion (its damped objective)."""
    from converters import budget as planning

    kind = KindFactors.from_lists(As, Bts)
    front = planning.pareto_front(planning.kind_options(to, kind, groups=groups, grouping=grouping))
    here = next((i for i, o in enumerate(front) if (o.rank, o.groups) == (chosen.rank, chosen.groups)),
                min(range(len(front)), key=lambda i: abs(front[i].params - chosen.params)))
    picks = front[max(0, here - CANDIDATE_NEIGHBOURS):here + CANDIDATE_NEIGHBOURS + 1]
    if (chosen.rank, chosen.groups) not in {(o.rank, o.groups) for o in picks}:
        picks.append(converters.types.Option(chosen.rank, chosen.groups, chosen.params, chosen.estimated_error))
    scored = []
    for o in picks:
        res = converters.convert_kind_calibrated(to, As, Bts, stats, o.rank, groups=o.groups, grouping=grouping,
                                                 lam=lam)
        scored.append(converters.types.Option(o.rank, o.groups, o.params, res.objective))
    return scored


def _convert_calibrated(to: str, As, Bts, stats, plan, grouping: str, lam: float):
    """The calibrated result and its report entry, with the plain projection at the same plan scored alike."""
    if to == "lora":
        calibrated = converters.convert_kind_calibrated("lora", As, Bts, stats, list(plan), lam=lam)
    else:
        k, g = plan
        calibrated = converters.convert_kind_calibrated(to, As, Bts, stats, k, groups=g, grouping=grouping, lam=lam)
    plain = _convert_kind(to, As, Bts, plan, grouping)
    q = converters.calibration_basis(As)
    entry = {"objective": calibrated.objective, "energy": calibrated.result.energy,
             "plain_objective": converters.calibrated_objective(As, Bts, stats, q, plain, lam=lam),
             "raw_objective": calibrated.raw_objective, "raw_energy": calibrated.raw_energy,
             "plain_raw_objective": converters.calibrated_objective(As, Bts, stats, q, plain, lam=0.0),
             "frobenius_error": calibrated.frobenius_error, "frobenius_energy": plain.energy,
             "plain_frobenius_error": plain.error, "iterations": calibrated.iterations}
    return calibrated.result, entry


def _kind_results(adapter: Adapter, to: str, rank, energy, budget, groups, grouping,
                  calibration: Calibration | None = None):
    """(kind, its sites, its result, its calibration entry or None), one kind at a time.

    A budget is spent across kinds, so it needs every kind's factors at once; otherwise each
    kind's scaled copies are made when it is converted and dropped after, to bound memory."""
    kinds = adapter.kinds()
    stats = {name: calibration.kind_statistics(sites) for name, sites in kinds.items()} if calibration else {}
    lam = calibration.ridge if calibration else 0.0

    def plan_for(factors, budget):
        if calibration is None:
            return _plan(to, factors, rank, groups, energy, budget, grouping)
        return _plan_calibrated(to, factors, stats, rank, groups, energy, budget, grouping, lam)

    factors = {name: kind_factors(adapter, sites) for name, sites in kinds.items()} if budget is not None else {}
    plans = plan_for(factors, budget) if budget is not None else {}
    for name, sites in kinds.items():
        As, Bts = factors.pop(name) if name in factors else kind_factors(adapter, sites)
        plan = plans[name] if name in plans else plan_for({name: (As, Bts)}, None)[name]
        if calibration is None:
            result, entry = _convert_kind(to, As, Bts, plan, grouping), None
        else:
            result, entry = _convert_calibrated(to, As, Bts, stats[name], plan, grouping, lam)
        del As, Bts  # free the kind's copies before the next one
        release_pool(adapter)
        yield name, sites, result, entry


def _names(to: str, kind: str, sites: list[Site], result) -> tuple[list[str], list[str]]:
    """Pool names of the result's unique A's and B's."""
    def site_names(tensors, which):
        return [f"{sites[i].path}.lora_{which}" for i in range(len(tensors))]

    if to == "lora":
        return site_names(result.a_tensors, "A"), site_names(result.b_tensors, "B")
    a_names = [f"{kind}.lora_A"] if len(result.a_tensors) == 1 else site_names(result.a_tensors, "A")
    if len(result.b_tensors) == 1:
        b_names = [f"{kind}.lora_B"]
    elif to == "aslora":
        b_names = [f"{kind}.group{g}.lora_B" for g in range(len(result.b_tensors))]
    else:
        b_names = site_names(result.b_tensors, "B")
    return a_names, b_names


def _check_options(to, rank, energy, budget, groups, grouping) -> None:
    if to not in TARGET_FORMS:
        raise ShareportError(f"unknown target form '{to}' (expected one of {', '.join(TARGET_FORMS)})")
    if grouping not in GROUPINGS:
        raise ShareportError(f"unknown grouping '{grouping}' (expected any or adjacent)")
    if sum(x is not None for x in (rank, energy, budget)) > 1:
        raise ShareportError("give at most one of --rank, --energy and --budget")
    if to == "auto" and budget is None:
        raise ShareportError("--to auto needs --budget (the size every form is converted to), e.g. --budget 0.25")
    if rank is not None and rank < 1:
        raise ShareportError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ShareportError(f"--energy must be in (0, 1], got {energy}")
    if budget is not None and not 0.0 < budget:
        raise ShareportError(f"--budget must be a positive fraction of the LoRA's parameters, got {budget}")
    if groups is not None and (to != "aslora" or groups < 1):
        raise ShareportError("--groups applies to --to aslora and must be at least 1")
    if grouping != "any" and to not in ("aslora", "auto"):
        raise ShareportError("--grouping applies to --to aslora (and auto)")


def _check_groups(adapter: Adapter, groups: int | None) -> None:
    """--groups above a kind's layer count is refused, not capped (a kind with G layers has at most G groups)."""
    if groups is None:
        return
    for kind, sites in sorted(adapter.kinds().items()):
        if groups > len(sites):
            raise ShareportError(f"--groups {groups} is more than the {len(sites)} layers of {kind} "
                                 f"(a kind has at most one B group per layer)")


def convert_adapter(
    adapter: Adapter,
    to: str,
    rank: int | None = None,
    energy: float | None = None,
    budget: float | None = None,
    groups: int | None = None,
    grouping: str = "any",
    progress: Callable[[str], None] | None = None,
    source_digest: str | None = None,
    error_measure: ErrorMeasure | None = None,
    calibration: Calibration | None = None,
) -> tuple[Adapter, ConversionReport]:
    """Convert ``adapter`` to form ``to``.

    "lora" truncates every site to its best rank under ``rank``/``energy``/``budget`` (sites a
    budget cuts to rank 0 are dropped: no longer adapted), or with none of them expands any form
    to plain LoRA exactly. "auto" converts to every form of ``AUTO_FORMS`` at ``budget`` and keeps
    the one ``error_measure`` rates lowest (default: ``frobenius_error``, or ``calibrated_error``
    with ``calibration``). ``budget`` is a fraction of the source LoRA's
    parameters. ``progress`` is called with each kind's name once it is converted;
    ``source_digest`` (the sha256 of the source weights) is recorded in the provenance.
    ``calibration``: input statistics per site; every form then minimises the calibrated objective
    (see :class:`Calibration`), and the data, token counts, ridge and per kind the plain and calibrated
    objectives are recorded in the provenance, in the conversion step of ``history``.
    """
    _check_options(to, rank, energy, budget, groups, grouping)
    _check_groups(adapter, groups)
    if calibration is not None and not calibration.ridge >= 0:
        raise ShareportError(f"--calibration-ridge must be >= 0, got {calibration.ridge}")
    if error_measure is None:
        error_measure = calibrated_error if calibration is not None else frobenius_error
    if to == "auto":
        out, report = _convert_auto(adapter, budget, grouping, progress, error_measure, calibration)
    else:
        out, report = _convert(adapter, to, rank, energy, budget, groups, grouping, progress, calibration)
    return _with_provenance(out, adapter, report.settings, source_digest), report


def _convert(adapter: Adapter, to: str, rank, energy, budget, groups, grouping, progress,
             calibration: Calibration | None = None):
    hint = size_hint(rank, energy, budget, DEFAULT_ASLORA_BUDGET if to == "aslora" else None)
    if to == "aslora" and rank is None and energy is None and budget is None:
        budget = DEFAULT_ASLORA_BUDGET  # the planner picks rank and groups (issue 13: the old rule collapsed)
    settings = {k: v for k, v in dict(to=to, rank=rank, energy=energy, budget=budget, groups=groups,
                                      grouping=grouping).items() if v is not None}
    source = source_parameters(adapter)
    before = adapter.num_parameters()
    if to == "lora" and rank is None and energy is None and budget is None:
        if calibration is not None:
            raise ShareportError("--to lora with no --rank, --energy or --budget expands exactly: "
                                 "--calibration has nothing to weigh (give a size option)")
        out = adapter.expand()
        return out, ConversionReport("lora", before, out.num_parameters(), [], source, settings)
    tensors: dict[str, torch.Tensor] = {}
    new_sites: dict[str, Site] = {}
    reports = []
    for name, sites, result, entry in _kind_results(adapter, to, rank, energy,
                                                    _input_budget(adapter, budget, source), groups, grouping,
                                                    calibration):
        a_names, b_names = _names(to, name, sites, result)
        site_ranks = {}
        for pos, site in enumerate(sites):
            site_ranks[site.path] = int(result.site_factors(pos)[1].shape[0])
            if site_ranks[site.path] == 0:
                continue  # cut to rank 0 by a budget: the module is no longer adapted
            a, b = a_names[result.a_index[pos]], b_names[result.b_index[pos]]
            tensors[a], tensors[b] = result.a_tensors[result.a_index[pos]], result.b_tensors[result.b_index[pos]]
            new_sites[site.path] = Site(site.path, site.kind, site.layer, a, b, 1.0)
        reports.append(KindReport(
            kind=name, sites=len(sites), lora_rank=max(adapter.rank(s.path) for s in sites), rank=result.rank,
            groups=[[sites[i].layer for i in g] for g in result.groups],
            relative_error=result.relative_error, retained_energy=result.retained_energy,
            parameters_before=sum(adapter.tensors[n].numel() for n in {x for s in sites for x in (s.a, s.b)}),
            parameters_after=result.parameter_count(), already_shared=result.already_shared,
            site_ranks=site_ranks, error=result.error, energy=result.energy, calibration=entry))
        del result  # free the kind's factors before the next one
        if progress:
            progress(name)
    if not new_sites:
        raise ShareportError(f"a budget of {math.floor(budget * source)} parameters does not pay for rank 1 at any "
                             "site: nothing would stay adapted")
    if calibration is not None:
        settings["calibration"] = {**calibration.info, "ridge": calibration.ridge, "kinds": {
            k.kind: {"plain_objective": k.calibration["plain_objective"], "objective": k.calibration["objective"]}
            for k in reports}}
    out = adapter.with_sites(tensors, new_sites, to)
    report = ConversionReport(to, before, out.num_parameters(), reports, source, settings,
                              energy_warnings(reports, hint))
    return out, report


def _input_budget(adapter: Adapter, budget: float | None, source: int) -> float | None:
    """``budget`` (a fraction of the source LoRA) as the planners count it: a fraction of a plain
    LoRA at the input's ranks (the same number unless the input was itself converted)."""
    lora = adapter.num_lora_parameters()
    if budget is None or lora == source:
        return budget
    return budget * source / lora


def _convert_auto(adapter: Adapter, budget: float, grouping: str, progress, error_measure: ErrorMeasure,
                  calibration: Calibration | None = None):
    """Every form of ``AUTO_FORMS`` at ``budget``; the one with the least error wins. Errors within
    ``AUTO_TIE`` of the energy are equal (e.g. two lossless forms): then the fewest parameters win,
    then the order of ``AUTO_FORMS``."""
    converted = {}
    candidates = []
    for form in AUTO_FORMS:
        tick = (lambda name, form=form: progress(f"{form}: {name}")) if progress else None
        try:
            out, report = _convert(adapter, form, None, None, budget, None,
                                   grouping if form == "aslora" else "any", tick, calibration)
        except ShareportError as exc:  # e.g. a budget below this form's minimum
            candidates.append({"form": form, "refused": str(exc)})
            continue
        error, energy = error_measure(adapter, out, report)
        candidates.append({"form": form, "parameters": report.parameters_after, "ratio": report.ratio,
                           "error": error, "relative_error": _relative(error, energy),
                           "retained_energy": 1.0 - error / energy if energy > 0 else 1.0})
        converted[form] = (out, report, error, energy)
    if not converted:
        raise ShareportError(f"--budget {budget:g} is too small for every form ({candidates[0]['form']}: "
                             f"{candidates[0]['refused']})")
    least = min(error for _, _, error, _ in converted.values())
    tie = least + AUTO_TIE * max(energy for _, _, _, energy in converted.values())
    out, report, _, _ = min((c for c in converted.values() if c[2] <= tie), key=lambda c: c[1].parameters_after)
    for candidate in candidates:
        candidate["winner"] = candidate["form"] == report.form
    ranked_by = getattr(error_measure, "describes", "a custom error measure")
    settings = {**report.settings, "chosen_by": "auto", "ranked_by": ranked_by}
    warnings = list(report.warnings) + ([WEIGHTS_ONLY_WARNING] if error_measure is frobenius_error else [])
    return out, dataclasses.replace(report, settings=settings, candidates=candidates, winner=report.form,
                                    ranked_by=ranked_by, warnings=warnings)


def _with_provenance(out: Adapter, source: Adapter, settings: dict, digest: str | None) -> Adapter:
    """The source's history plus this conversion; ``source_parameters`` stays the original LoRA's."""
    entry = {"step": "convert", "source_form": source.form, "source_sha256": digest, **settings}
    carried = dataclasses.replace(out, provenance=dict(source.provenance))
    return carried.with_step(entry, source_parameters=source_parameters(source))
