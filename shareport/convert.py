"""Adapter -> adapter conversion: hand each kind's factors to ``converters`` and rebuild the pool.

The converters work on one kind at a time with the scale folded into B; this module gathers
those factors from an :class:`Adapter`, asks the error measure (``measures``: plain or
calibrated) for a plan (rank, groups) per kind and for the converted kind, and names the
resulting tensors by the form's row (``forms.FormInfo.tensor_names``) so that a shared tensor has
one name used by many sites. What was asked is a ``ConvertOptions``, checked once when made;
what was done is a ``ConversionReport`` (``conversion_report``).

Sizes are counted against one denominator everywhere: the parameters of the *source LoRA*
(``adapter.source_parameters``); ``--budget`` is a fraction of it and ``ratio`` is measured by it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .adapter import Adapter, Site, kind_factors, source_parameters
from .conversion_report import ConversionReport, KindReport, energy_warnings, relative
from .convert_options import Calibration, ConvertOptions
from .errors import ShareportError
from .forms import AUTO, FORM_NAMES, FORMS
from .measures import ErrorMeasure, Measure, frobenius_error, measure_for

# what --to auto tries, in this order (on equal error the first wins)
AUTO_FORMS = FORM_NAMES
# --to auto: errors closer than this fraction of the energy are a tie (roundoff of lossless forms)
AUTO_TIE = 1e-9

# --to auto without data: what the report says (issue 26: on a real 16-class task the weights picked
# truncation, keeping 30% of the LoRA's accuracy, where calibrated truncation kept 82%)
WEIGHTS_ONLY_WARNING = (
    "--to auto ranked the forms by their weights only; on real tasks the form that keeps the "
    "most of the model's outputs is often another: give --calibration DATA --base BASE to "
    "rank them by the model's outputs"
)


def conversion_steps(adapter: Adapter, to: str) -> int:
    """How many times ``convert_adapter`` calls ``progress``."""
    return len(adapter.kinds()) * (len(AUTO_FORMS) if to == AUTO else 1)


def release_pool(adapter: Adapter) -> None:
    """Let a streamed pool (``shareport.files.tensorfile.StreamedTensors``) unmap what was read so far;
    with it a conversion holds one kind of the input at a time. A plain dict pool has nothing to do."""
    release = getattr(adapter.tensors, "release", None)
    if release is not None:
        release()


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
    max_rank: int | None = None,
    uniform_rank: bool = False,
    rank_buckets: tuple[int, ...] | None = None,
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
    ``max_rank`` / ``uniform_rank`` / ``rank_buckets`` (at most one, with a budget): a serving rule
    (``ConvertOptions``); the report's ``serving`` compares the plan with the unconstrained one.
    """
    options = ConvertOptions(
        to,
        rank=rank,
        energy=energy,
        budget=budget,
        groups=groups,
        grouping=grouping,
        calibration=calibration,
        max_rank=max_rank,
        uniform_rank=uniform_rank,
        rank_buckets=rank_buckets,
    )
    options.check_adapter(adapter)
    measure = measure_for(calibration, adapter.kinds())
    if options.to == AUTO:
        out, report = _convert_auto(
            adapter, options, progress=progress, measure=measure, error_measure=error_measure or measure.default_error
        )
    else:
        out, report = _convert(adapter, options, progress=progress, measure=measure)
    return _with_provenance(out, adapter, report.settings, source_digest), report


def _kind_results(adapter: Adapter, options: ConvertOptions, *, budget: float | None, measure: Measure, serving: dict):
    """(kind, its sites, its result, its calibration entry or None), one kind at a time.

    A budget is spent across kinds, so it needs every kind's factors at once; otherwise each
    kind's scaled copies are made when it is converted and dropped after, to bound memory.
    With a serving rule (always a budget plan) ``serving`` receives the plan's summary."""
    kinds = adapter.kinds()
    factors = {name: kind_factors(adapter, sites) for name, sites in kinds.items()} if budget is not None else {}
    plans = {}
    if options.serving is not None:
        plans, summary = measure.plan_serving(factors, options, budget)
        serving.update(summary)
    elif budget is not None:
        plans = measure.plan(factors, options, budget)
    for name, sites in kinds.items():
        As, Bts = factors.pop(name) if name in factors else kind_factors(adapter, sites)
        plan = plans[name] if name in plans else measure.plan({name: (As, Bts)}, options, None)[name]
        result, entry = measure.convert(name, (As, Bts), plan=plan, options=options)
        del As, Bts  # free the kind's copies before the next one
        release_pool(adapter)
        yield name, sites, result, entry


def _convert(adapter: Adapter, asked: ConvertOptions, *, progress, measure: Measure):
    hint = asked.size_hint()
    options = asked.planned()
    settings = options.settings()
    source = source_parameters(adapter)
    before = adapter.num_parameters()
    if options.expands:
        out = adapter.expand()
        return out, ConversionReport(options.to, before, out.num_parameters(), [], source, settings)
    naming = FORMS[options.to]
    tensors: dict[str, torch.Tensor] = {}
    new_sites: dict[str, Site] = {}
    reports = []
    budget = _input_budget(adapter, options.budget, source)
    serving: dict = {}
    for name, sites, result, entry in _kind_results(adapter, options, budget=budget, measure=measure, serving=serving):
        a_names, b_names = naming.tensor_names(
            name, [s.path for s in sites], a_count=len(result.a_tensors), b_count=len(result.b_tensors)
        )
        site_ranks = {}
        for pos, site in enumerate(sites):
            site_ranks[site.path] = int(result.site_factors(pos)[1].shape[0])
            if site_ranks[site.path] == 0:
                continue  # cut to rank 0 by a budget: the module is no longer adapted
            a, b = a_names[result.a_index[pos]], b_names[result.b_index[pos]]
            tensors[a], tensors[b] = result.a_tensors[result.a_index[pos]], result.b_tensors[result.b_index[pos]]
            new_sites[site.path] = Site(site.path, site.kind, site.layer, a, b, 1.0)
        reports.append(
            KindReport(
                kind=name,
                sites=len(sites),
                lora_rank=max(adapter.rank(s.path) for s in sites),
                rank=result.rank,
                groups=[[sites[i].layer for i in g] for g in result.groups],
                relative_error=result.relative_error,
                retained_energy=result.retained_energy,
                parameters_before=sum(adapter.tensors[n].numel() for n in {x for s in sites for x in (s.a, s.b)}),
                parameters_after=result.parameter_count(),
                already_shared=result.already_shared,
                site_ranks=site_ranks,
                error=result.error,
                energy=result.energy,
                calibration=entry,
            )
        )
        del result  # free the kind's factors before the next one
        if progress:
            progress(name)
    if not new_sites:
        raise ShareportError(
            f"a budget of {math.floor(options.budget * source)} parameters does not pay for rank 1 "
            "at any site: nothing would stay adapted"
        )
    measure.record(settings, reports)
    out = adapter.with_sites(tensors, new_sites, options.to)
    report = ConversionReport(
        options.to,
        before,
        out.num_parameters(),
        reports,
        source,
        settings,
        energy_warnings(reports, hint),
        serving=serving or None,
    )
    return out, report


def _input_budget(adapter: Adapter, budget: float | None, source: int) -> float | None:
    """``budget`` (a fraction of the source LoRA) as the planners count it: a fraction of a plain
    LoRA at the input's ranks (the same number unless the input was itself converted)."""
    lora = adapter.num_lora_parameters()
    if budget is None or lora == source:
        return budget
    return budget * source / lora


def _convert_auto(
    adapter: Adapter, options: ConvertOptions, *, progress, measure: Measure, error_measure: ErrorMeasure
):
    """Every form of ``AUTO_FORMS`` at ``budget``; the one with the least error wins. Errors within
    ``AUTO_TIE`` of the energy are equal (e.g. two lossless forms): then the fewest parameters win,
    then the order of ``AUTO_FORMS``."""
    converted = {}
    candidates = []
    for form in AUTO_FORMS:
        tick = (lambda name, form=form: progress(f"{form}: {name}")) if progress else None
        try:
            out, report = _convert(adapter, options.candidate(form), progress=tick, measure=measure)
        except ShareportError as exc:  # e.g. a budget below this form's minimum
            candidates.append({"form": form, "refused": str(exc)})
            continue
        error, energy = error_measure(adapter, out, report)
        candidates.append(
            {
                "form": form,
                "parameters": report.parameters_after,
                "ratio": report.ratio,
                "error": error,
                "relative_error": relative(error, energy),
                "retained_energy": 1.0 - error / energy if energy > 0 else 1.0,
            }
        )
        converted[form] = (out, report, error, energy)
    if not converted:
        raise ShareportError(
            f"--budget {options.budget:g} is too small for every form ({candidates[0]['form']}: "
            f"{candidates[0]['refused']})"
        )
    least = min(error for _, _, error, _ in converted.values())
    tie = least + AUTO_TIE * max(energy for _, _, _, energy in converted.values())
    out, report, _, _ = min((c for c in converted.values() if c[2] <= tie), key=lambda c: c[1].parameters_after)
    for candidate in candidates:
        candidate["winner"] = candidate["form"] == report.form
    ranked_by = getattr(error_measure, "describes", "a custom error measure")
    settings = {**report.settings, "chosen_by": AUTO, "ranked_by": ranked_by}
    warnings = list(report.warnings) + ([WEIGHTS_ONLY_WARNING] if error_measure is frobenius_error else [])
    return out, dataclasses.replace(
        report, settings=settings, candidates=candidates, winner=report.form, ranked_by=ranked_by, warnings=warnings
    )


def _with_provenance(out: Adapter, source: Adapter, settings: dict, digest: str | None) -> Adapter:
    """The source's history plus this conversion; ``source_parameters`` stays the original LoRA's."""
    entry = {"step": "convert", "source_form": source.form, "source_sha256": digest, **settings}
    carried = dataclasses.replace(out, provenance=dict(source.provenance))
    return carried.with_step(entry, source_parameters=source_parameters(source))
