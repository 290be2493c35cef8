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

from . import __version__
from .adapter import Adapter, Site
from .errors import ShareportError

TARGET_FORMS = ("sharea", "shareb", "shareab", "aslora", "lora", "auto")
# what --to auto tries, in this order (on equal error the first wins)
AUTO_FORMS = ("lora", "sharea", "shareb", "shareab", "aslora")
# --to auto: errors closer than this fraction of the energy are a tie (roundoff of lossless forms)
AUTO_TIE = 1e-9
GROUPINGS = ("any", "adjacent")
# with no --rank, --energy or --budget, ASLoRA is planned at this budget (the paper's "25% of the LoRA")
DEFAULT_ASLORA_BUDGET = converters.DEFAULT_ASLORA_BUDGET
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
    error: float  # sum_l ||dW_l - dW'_l||_F^2 over the kind's sites
    energy: float  # sum_l ||dW_l||_F^2


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


def energy_warnings(kinds: list[KindReport], budget: float | None) -> list[str]:
    """One line per kind keeping under ``LOW_ENERGY`` of its energy (the CLI prints them)."""
    hint = f"a larger --budget than {budget:g}" if budget is not None else "a larger --budget"
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


def _kind_results(adapter: Adapter, to: str, rank, energy, budget, groups, grouping):
    """(kind, its sites, its result), one kind at a time.

    A budget is spent across kinds, so it needs every kind's factors at once; otherwise each
    kind's scaled copies are made when it is converted and dropped after, to bound memory."""
    kinds = adapter.kinds()
    factors = {name: kind_factors(adapter, sites) for name, sites in kinds.items()} if budget is not None else {}
    plans = _plan(to, factors, rank, groups, energy, budget, grouping) if budget is not None else {}
    for name, sites in kinds.items():
        As, Bts = factors.pop(name) if name in factors else kind_factors(adapter, sites)
        plan = plans[name] if name in plans else _plan(to, {name: (As, Bts)}, rank, groups, energy, None, grouping)[name]
        result = _convert_kind(to, As, Bts, plan, grouping)
        del As, Bts  # free the kind's copies before the next one
        yield name, sites, result


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
    error_measure: ErrorMeasure = frobenius_error,
) -> tuple[Adapter, ConversionReport]:
    """Convert ``adapter`` to form ``to``.

    "lora" truncates every site to its best rank under ``rank``/``energy``/``budget`` (sites a
    budget cuts to rank 0 are dropped: no longer adapted), or with none of them expands any form
    to plain LoRA exactly. "auto" converts to every form of ``AUTO_FORMS`` at ``budget`` and keeps
    the one ``error_measure`` rates lowest. ``budget`` is a fraction of the source LoRA's
    parameters. ``progress`` is called with each kind's name once it is converted;
    ``source_digest`` (the sha256 of the source weights) is recorded in the provenance.
    """
    _check_options(to, rank, energy, budget, groups, grouping)
    _check_groups(adapter, groups)
    if to == "auto":
        out, report = _convert_auto(adapter, budget, grouping, progress, error_measure)
    else:
        out, report = _convert(adapter, to, rank, energy, budget, groups, grouping, progress)
    return _with_provenance(out, adapter, report.settings, source_digest), report


def _convert(adapter: Adapter, to: str, rank, energy, budget, groups, grouping, progress):
    if to == "aslora" and rank is None and energy is None and budget is None:
        budget = DEFAULT_ASLORA_BUDGET  # the planner picks rank and groups (issue 13: the old rule collapsed)
    settings = {k: v for k, v in dict(to=to, rank=rank, energy=energy, budget=budget, groups=groups,
                                      grouping=grouping).items() if v is not None}
    source = source_parameters(adapter)
    before = adapter.num_parameters()
    if to == "lora" and rank is None and energy is None and budget is None:
        out = adapter.expand()
        return out, ConversionReport("lora", before, out.num_parameters(), [], source, settings)
    tensors: dict[str, torch.Tensor] = {}
    new_sites: dict[str, Site] = {}
    reports = []
    for name, sites, result in _kind_results(adapter, to, rank, energy, _input_budget(adapter, budget, source),
                                             groups, grouping):
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
            site_ranks=site_ranks, error=result.error, energy=result.energy))
        del result  # free the kind's factors before the next one
        if progress:
            progress(name)
    if not new_sites:
        raise ShareportError(f"a budget of {math.floor(budget * source)} parameters does not pay for rank 1 at any "
                             "site: nothing would stay adapted")
    out = adapter.with_sites(tensors, new_sites, to)
    report = ConversionReport(to, before, out.num_parameters(), reports, source, settings,
                              energy_warnings(reports, budget))
    return out, report


def _input_budget(adapter: Adapter, budget: float | None, source: int) -> float | None:
    """``budget`` (a fraction of the source LoRA) as the planners count it: a fraction of a plain
    LoRA at the input's ranks (the same number unless the input was itself converted)."""
    lora = adapter.num_lora_parameters()
    if budget is None or lora == source:
        return budget
    return budget * source / lora


def _convert_auto(adapter: Adapter, budget: float, grouping: str, progress, error_measure: ErrorMeasure):
    """Every form of ``AUTO_FORMS`` at ``budget``; the one with the least error wins. Errors within
    ``AUTO_TIE`` of the energy are equal (e.g. two lossless forms): then the fewest parameters win,
    then the order of ``AUTO_FORMS``."""
    converted = {}
    candidates = []
    for form in AUTO_FORMS:
        tick = (lambda name, form=form: progress(f"{form}: {name}")) if progress else None
        try:
            out, report = _convert(adapter, form, None, None, budget, None,
                                   grouping if form == "aslora" else "any", tick)
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
    settings = {**report.settings, "chosen_by": "auto"}
    return out, dataclasses.replace(report, settings=settings, candidates=candidates, winner=report.form)


def _with_provenance(out: Adapter, source: Adapter, settings: dict, digest: str | None) -> Adapter:
    provenance = {
        "tool": f"shareport {__version__}",
        "source_form": source.form,
        "source_sha256": digest,
        "source_parameters": source_parameters(source),  # the original LoRA's, not an intermediate's
        "conversion": settings,
    }
    if source.provenance:
        provenance["source_provenance"] = source.provenance
    return dataclasses.replace(out, provenance=provenance)
