"""Adapter -> adapter conversion: hand each kind's factors to ``converters`` and rebuild the pool.

The converters work on one kind at a time with the scale folded into B; this module gathers
those factors from an :class:`Adapter`, asks for a plan (rank, groups) per kind, converts, and
names the resulting tensors so that a shared tensor has one name used by many sites:

    ShareA   "<kind>.lora_A" (shared)           "<site>.lora_B"
    ShareB   "<site>.lora_A"                    "<kind>.lora_B" (shared)
    ShareAB  "<kind>.lora_A"                    "<kind>.lora_B"
    ASLoRA   "<kind>.lora_A"                    "<kind>.group<g>.lora_B" (one per group of layers)

Kind names hold no layer index and site paths always do, so the two never collide.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import converters
from converters.types import KindFactors

from . import __version__
from .adapter import Adapter, Site
from .errors import ShareportError

TARGET_FORMS = ("sharea", "shareb", "shareab", "aslora", "lora")
GROUPINGS = ("any", "adjacent")


@dataclasses.dataclass
class KindReport:
    kind: str
    sites: int
    lora_rank: int
    rank: int
    groups: list[list[int]]  # layers that share a B
    relative_error: float
    retained_energy: float
    parameters_before: int
    parameters_after: int
    already_shared: bool


@dataclasses.dataclass
class ConversionReport:
    form: str
    parameters_before: int
    parameters_after: int
    kinds: list[KindReport]

    @property
    def ratio(self) -> float:
        return self.parameters_after / self.parameters_before

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["ratio"] = self.ratio
        return data


def kind_factors(adapter: Adapter, sites: list[Site]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kind's A's and scaled B's, in layer order (dW_l = Bts[l] @ As[l])."""
    As, Bts = [], []
    for site in sites:
        a, bt = adapter.factors(site.path, adapter.tensors[site.a].dtype)
        As.append(a)
        Bts.append(bt)
    return As, Bts


def _plan(to: str, kinds: dict, rank, groups, energy, budget, grouping) -> dict:
    """(rank, groups) per kind. An explicit or default rank needs no search, so the kind's
    spectrum is computed once, by the conversion itself, rather than also by the planner."""
    try:
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


def _names(to: str, kind: str, sites: list[Site], result) -> tuple[list[str], list[str]]:
    """Pool names of the result's unique A's and B's."""
    def site_names(tensors, which):
        return [f"{sites[i].path}.lora_{which}" for i in range(len(tensors))]

    a_names = [f"{kind}.lora_A"] if len(result.a_tensors) == 1 else site_names(result.a_tensors, "A")
    if len(result.b_tensors) == 1:
        b_names = [f"{kind}.lora_B"]
    elif to == "aslora":
        b_names = [f"{kind}.group{g}.lora_B" for g in range(len(result.b_tensors))]
    else:
        b_names = site_names(result.b_tensors, "B")
    return a_names, b_names


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
) -> tuple[Adapter, ConversionReport]:
    """Convert ``adapter`` to form ``to`` ("lora" expands any form to plain LoRA).

    ``progress`` is called with each kind's name once it is converted; ``source_digest``
    (the sha256 of the source weights) is recorded in the result's provenance.
    """
    if to not in TARGET_FORMS:
        raise ShareportError(f"unknown target form '{to}' (expected one of {', '.join(TARGET_FORMS)})")
    if grouping not in GROUPINGS:
        raise ShareportError(f"unknown grouping '{grouping}' (expected any or adjacent)")
    if sum(x is not None for x in (rank, energy, budget)) > 1:
        raise ShareportError("give at most one of --rank, --energy and --budget")
    if rank is not None and rank < 1:
        raise ShareportError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ShareportError(f"--energy must be in (0, 1], got {energy}")
    if budget is not None and not 0.0 < budget:
        raise ShareportError(f"--budget must be a positive fraction of the LoRA's parameters, got {budget}")
    if groups is not None and (to != "aslora" or groups < 1):
        raise ShareportError("--groups applies to --to aslora and must be at least 1")
    if grouping != "any" and to != "aslora":
        raise ShareportError("--grouping applies to --to aslora")
    before = adapter.num_parameters()
    if to == "lora":
        out = adapter.expand()
        report = ConversionReport("lora", before, out.num_parameters(), [])
        return _with_provenance(out, adapter, to, {}, source_digest), report

    kinds = adapter.kinds()
    # A budget is spent across kinds, so it needs every kind's factors at once; otherwise each
    # kind's scaled copies are made when it is converted and dropped after, to bound memory.
    factors = {name: kind_factors(adapter, sites) for name, sites in kinds.items()} if budget is not None else {}
    plans = _plan(to, factors, rank, groups, energy, budget, grouping) if budget is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    new_sites: dict[str, Site] = {}
    reports = []
    for name, sites in kinds.items():
        As, Bts = factors.pop(name) if name in factors else kind_factors(adapter, sites)
        k, g = plans[name] if name in plans else _plan(to, {name: (As, Bts)}, rank, groups, energy, None, grouping)[name]
        result = converters.convert_kind(to, As, Bts, k, groups=g, grouping=grouping)
        a_names, b_names = _names(to, name, sites, result)
        tensors.update(zip(a_names, result.a_tensors))
        tensors.update(zip(b_names, result.b_tensors))
        for pos, site in enumerate(sites):
            new_sites[site.path] = Site(
                site.path, site.kind, site.layer, a_names[result.a_index[pos]], b_names[result.b_index[pos]], 1.0
            )
        reports.append(
            KindReport(
                kind=name,
                sites=len(sites),
                lora_rank=max(a.shape[0] for a in As),
                rank=result.rank,
                groups=[[sites[i].layer for i in g] for g in result.groups],
                relative_error=result.relative_error,
                retained_energy=result.retained_energy,
                parameters_before=sum(adapter.tensors[n].numel() for n in {x for s in sites for x in (s.a, s.b)}),
                parameters_after=result.parameter_count(),
                already_shared=result.already_shared,
            )
        )
        del As, Bts, result  # free the kind's copies before the next one
        if progress:
            progress(name)
    out = adapter.with_sites(tensors, new_sites, to)
    settings = {"rank": rank, "energy": energy, "budget": budget, "groups": groups, "grouping": grouping}
    report = ConversionReport(to, before, out.num_parameters(), reports)
    return _with_provenance(out, adapter, to, settings, source_digest), report


def _with_provenance(out: Adapter, source: Adapter, to: str, settings: dict, digest: str | None) -> Adapter:
    provenance = {
        "tool": f"shareport {__version__}",
        "source_form": source.form,
        "source_sha256": digest,
        "source_parameters": source.num_parameters(),
        "conversion": {"to": to, **{k: v for k, v in settings.items() if v is not None}},
    }
    if source.provenance:
        provenance["source_provenance"] = source.provenance
    return dataclasses.replace(out, provenance=provenance)
