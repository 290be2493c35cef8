"""A fleet: N adapters of one base share one basis per kind, each keeps small cores.

``build_fleet`` gathers every kind's factors from each adapter (scale folded into B), hands them
to ``converters.fleet_kind`` and builds N member :class:`Adapter` s whose pools include the
shared tensors, so each member is an ordinary adapter whose ``update(path)`` is the fleet's
reconstruction of that adapter's site:

    form     shared per kind                    per member, per site           member's update
    sharea   "<kind>.fleet_A" = V (k, n_in)     "<site>.lora_B" (n_out, k)      B @ V
    shareab  "<kind>.fleet_A" = V (k2, n_in),   "<site>.lora_core" C (k1, k2)   (U @ C) @ V
             "<kind>.fleet_U" = U (n_out, k1)

A two-sided member also holds B = U @ C (``compose``) under "<site>.lora_B", so in memory it is
a ShareA adapter (A = V shared by its layers, one B per site) that every command can attach,
fold, expand or export; ``Adapter.config["fleet"]`` records which pool tensors are the fleet's
(``names``) and which B's are products (``products``: B name -> [U name, core name]), which is
what the fleet folder (``files/fleet.py``) stores once and what training keeps frozen.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import converters
from converters.calibrated_fleet import fleet_basis, fleet_kind_calibrated, restrict_statistics
from converters.factored import kind_energy
from converters.fleet_clusters import MIN_MEMBERS, ClusterFit, assign_clusters, search_counts
from converters.fleet_clusters import groups as cluster_members
from converters.forms import FLEET_TWO_SIDED

from .adapter import FLEET_KEY, Adapter, Site, compose, kind_factors, kind_key, source_parameters
from .conversion_report import size_hint
from .convert import AUTO_TIE, convert_adapter
from .convert_options import Calibration
from .errors import ShareportError
from .fleet_report import FleetReport, MemberReport, member_warnings
from .forms import AUTO_CLUSTERS, FLEET_FORMS
from .forms import DEFAULT_FLEET_BUDGET as DEFAULT_BUDGET
from .forms import DEFAULT_FLEET_CLUSTERS as DEFAULT_CLUSTERS


@dataclasses.dataclass
class Fleet:
    form: str
    names: list[str]
    shared: dict[str, torch.Tensor]  # stored once for the whole fleet
    members: list[Adapter]  # pools include the shared tensors
    report: FleetReport


def _base_name(adapter: Adapter) -> str:
    return repr(adapter.base_model) if adapter.base_model else "(none recorded: no base_model_name_or_path)"


def check_compatible(adapters: list[Adapter], names: list[str]) -> None:
    """Same base, same sites, same shapes, same layout; else one line naming the adapter."""
    if len(adapters) < 2:
        raise ShareportError("a fleet needs at least two adapters")
    first, name0 = adapters[0], names[0]
    for adapter, name in zip(adapters[1:], names[1:]):
        if adapter.base_model != first.base_model:
            raise ShareportError(
                f"{name}: base model {_base_name(adapter)} differs from {name0}'s "
                f"{_base_name(first)}; a fleet shares one base"
            )
        if set(adapter.sites) != set(first.sites):
            odd = sorted(set(adapter.sites) ^ set(first.sites))[0]
            raise ShareportError(
                f"{name}: adapts other modules than {name0} (e.g. '{odd}'); a fleet needs the same sites"
            )
        for path in sorted(first.sites):
            if adapter.shape(path) != first.shape(path):
                raise ShareportError(
                    f"{name}: '{path}' has update shape {adapter.shape(path)}, {name0}'s is {first.shape(path)}"
                )
        if adapter.fan_in_fan_out != first.fan_in_fan_out or adapter.task_type != first.task_type:
            raise ShareportError(f"{name}: task type / fan_in_fan_out differ from {name0}'s")


def _plan(form: str, factors: dict, rank: int | None, budget: float | None, lora_total: int) -> dict:
    """Per kind (k1, k2): the left (U, 0 for sharea) and right (V) shared ranks."""
    if rank is not None and budget is not None:
        raise ShareportError("give --rank or --budget, not both")
    if rank is not None:
        if rank < 1:
            raise ShareportError(f"--rank must be positive, got {rank}")
        return {kind: (rank if FLEET_TWO_SIDED[form] else 0, rank) for kind in factors}
    budget = DEFAULT_BUDGET if budget is None else budget
    if not budget > 0:
        raise ShareportError(f"--budget must be positive, got {budget}")
    options = {kind: converters.fleet_options(form, As, Bts) for kind, (As, Bts) in factors.items()}
    try:
        chosen = converters.spend_budget(options, math.floor(budget * lora_total))
    except ValueError as exc:
        raise ShareportError(f"--budget {budget:g}: {exc}") from None
    return {kind: (o.rank_out, o.rank_in) for kind, o in chosen.items()}


# what a fleet's candidates are ranked by when fleet picks the form (the report's ``ranked_by``)
RANKED_BY_WEIGHTS = "weights: the Frobenius error ||dW - dW'||^2 over every member's sites"
RANKED_BY_OUTPUTS = "outputs: each member's output error on its own calibration data, summed"


def fleet_bases(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Per kind, the basis Q (n_in, p) a calibrated fleet's statistics are given in: every adapter's
    A's of the kind, in input order (``converters.calibrated_fleet.fleet_basis``)."""
    return {kind: fleet_basis([kind_factors(a, a.kinds()[kind])[0] for a in adapters]) for kind in adapters[0].kinds()}


def build_fleet(
    adapters: list[Adapter],
    names: list[str],
    form: str | None = None,
    *,
    rank: int | None = None,
    budget: float | None = None,
    calibration: list[Calibration] | None = None,
    clusters: int | str = DEFAULT_CLUSTERS,
) -> Fleet:
    """Compress ``adapters`` (same base and sites; ranks may differ) into one fleet of ``form``.

    ``rank``: every kind's shared rank (both sides for shareab); ``budget``: a fraction of the
    N LoRAs' total parameters, spent over the kinds for the least total squared error (exact
    knapsack over each kind's options; for shareab the options' errors are those before the
    alternating refinement). Neither: ``DEFAULT_BUDGET``.

    ``form`` None: every form of ``FLEET_FORMS`` is built at the budget and the one with the least
    error wins (errors within ``AUTO_TIE`` of the energy tie: then the fewer parameters, then the
    order of ``FLEET_FORMS``); the report lists the candidates. A rank means another size per form,
    so it needs a ``form``.

    ``calibration`` (one per adapter, statistics in ``fleet_bases(adapters)``): every member's
    cores are fit to its own inputs (``converters.calibrated_fleet``) and every error is that
    output error; the budget is still spent by the plain (weight) errors.

    ``clusters``: a number of clusters, each with its own bases (``converters.fleet_clusters``), or
    "auto": numbers from 1 to N / 2 at the budget, searched for the least error (``_clustered``).
    """
    if form is not None and form not in FLEET_FORMS:
        raise ShareportError(f"unknown fleet form '{form}' (expected one of {', '.join(FLEET_FORMS)})")
    if form is None and rank is not None:
        raise ShareportError(
            "--rank is a different size for each form: give --form with it, or --budget "
            "(the same size for every form) to let fleet pick the form"
        )
    check_compatible(adapters, names)
    if calibration is not None and len(calibration) != len(adapters):
        raise ShareportError(f"calibration for {len(calibration)} members, the fleet has {len(adapters)}")
    kinds = adapters[0].kinds()
    sources = [
        MemberSource.read(adapter, name, None if calibration is None else calibration[i])
        for i, (adapter, name) in enumerate(zip(adapters, names))
    ]
    counts = cluster_counts(clusters, len(sources), rank=rank)
    if form is not None:
        return _clustered(sources, kinds, form, rank=rank, budget=budget, counts=counts)[0]
    return _choose(sources, kinds, budget, counts)


ALONE_WARNING = "each LoRA truncated alone"  # how the warning of ``against_alone`` starts


def floor_share(value: float) -> float:
    """``value`` rounded down to 4 digits: a share that a printed command reproduces and never exceeds."""
    return math.floor(value * 1e4) / 1e4


def fleet_share(fleet: Fleet) -> float:
    """The fleet's share of the LoRAs' parameters, rounded down (``floor_share``)."""
    return floor_share(fleet.report.parameters / fleet.report.lora_parameters)


def against_alone(
    fleet: Fleet, adapters: list[Adapter], *, quantize: str | None = None, group_size: int | None = None
) -> Fleet:
    """``fleet`` (a plain one, built from ``adapters``) with its report's ``alone``: each LoRA truncated on
    its own (``convert --to lora``) at the fleet's share of the LoRAs' parameters, by the weight error, and
    a warning where that keeps more. A fleet is worth its format only where it beats this (at 1/4 of 8
    unrelated LoRAs it may not). The share is rounded down to 4 digits so that the command the warning
    prints reproduces its numbers and never spends more than the fleet; ``quantize`` and ``group_size``
    (the fleet's) are added to that command, the errors compared are both in float. Unchanged where truncation cannot
    reach that size (below every site's rank 1)."""
    budget = fleet_share(fleet)
    alone, alone_error, fleet_error, energy, parameters = {}, 0.0, 0.0, 0.0, 0
    for adapter, member in zip(adapters, fleet.report.members):
        try:
            truncated, report = convert_adapter(adapter, "lora", budget=budget)
        except ShareportError:  # e.g. a size below every site's rank 1
            return fleet
        alone[member.name] = _relative(report.error, report.energy)
        alone_error += report.error
        fleet_error += member.relative_error**2 * report.energy
        energy += report.energy
        parameters += truncated.num_parameters()
    summary = {
        "form": "lora",
        "budget": budget,
        "parameters": parameters,
        "ratio": parameters / fleet.report.lora_parameters,
        "relative_error": _relative(alone_error, energy),
        "worst_member_relative_error": max(alone.values()),
        "members": alone,
    }
    warnings = list(fleet.report.warnings)
    if alone_error < fleet_error:
        worst = max(m.relative_error for m in fleet.report.members)
        command = f"shareport convert LORA --to lora --budget {budget:g}"
        command += f" --quantize {quantize}" if quantize else ""
        command += f" --group-size {group_size}" if quantize and group_size is not None else ""
        warnings.append(
            f"{ALONE_WARNING} at the fleet's size keeps more of its update: relative error "
            f"{summary['relative_error']:.3f} (worst member {summary['worst_member_relative_error']:.3f}) against "
            f"the fleet's {_relative(fleet_error, energy):.3f} (worst {worst:.3f}), in float weights; `{command}` "
            "for each gives these"
        )
    return dataclasses.replace(fleet, report=dataclasses.replace(fleet.report, alone=summary, warnings=warnings))


@dataclasses.dataclass
class MemberSource:
    """One input adapter of a fleet, as every form's build reads it."""

    name: str
    adapter: Adapter
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]  # per kind, layer order: (A's, scale * B's)
    lora_parameters: int  # its own LoRA's (the source LoRA's, if it was converted before)
    calibration: Calibration | None  # its own inputs' statistics (calibrated fleets only)

    @classmethod
    def read(cls, adapter: Adapter, name: str, calibration: Calibration | None = None) -> "MemberSource":
        return cls(
            name,
            adapter,
            {kind: kind_factors(adapter, sites) for kind, sites in adapter.kinds().items()},
            source_parameters(adapter),
            calibration,
        )

    def weight_energy(self) -> float:
        """sum_l ||dW_l||_F^2 over every kind, from the factors."""
        return sum(
            kind_energy([bt.double() for bt in Bts], [a.double() for a in As]) for As, Bts in self.factors.values()
        )


@dataclasses.dataclass
class MemberParts:
    """What one form's build makes of one source, filled in kind by kind."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # own, and a two-sided one's B = U C
    sites: dict[str, Site] = dataclasses.field(default_factory=dict)
    products: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # B name -> [U name, core name]
    squared_error: float = 0.0  # in the build's measure (calibrated: its output error)
    energy: float = 0.0  # the same measure of dW' = 0
    weight_squared_error: float = 0.0  # the plain sum ||dW - dW'||_F^2
    kind_errors: dict[str, float] = dataclasses.field(default_factory=dict)  # relative, in the build's measure

    def add_kind(
        self,
        kind: str,
        sites: list[Site],
        cores: list[torch.Tensor],
        shared: dict[str, torch.Tensor],
        cluster: int | None = None,
    ) -> None:
        """The kind's sites with their cores (layer order) over the kind's shared tensors in ``shared``
        (its ``cluster``'s, in a clustered fleet): B = core for sharea, core stored and B = U @ core
        formed for shareab."""
        a_name, u_name = basis_names(kind_key(kind, cluster))
        for site, core in zip(sites, cores):
            b_name = f"{site.path}.lora_B"
            if u_name not in shared:
                self.tensors[b_name] = core.contiguous()
            else:
                core_name = f"{site.path}.lora_core"
                self.tensors[core_name] = core.contiguous()
                self.tensors[b_name] = compose(shared[u_name], self.tensors[core_name])
                self.products[b_name] = [u_name, core_name]
            self.sites[site.path] = Site(site.path, site.kind, site.layer, a_name, b_name, 1.0)

    def stored_parameters(self) -> int:
        """What the member stores on its own: its B's or cores, not the products formed on reading."""
        return sum(t.numel() for n, t in self.tensors.items() if n not in self.products)


def basis_names(kind: str) -> tuple[str, str]:
    """(V's name, U's name) of a kind's shared basis in the pool and in ``shared.safetensors``;
    ``kind``: a ``kind_key`` (a clustered fleet has one basis per cluster and kind)."""
    return f"{kind}.fleet_A", f"{kind}.fleet_U"


def _choose(
    sources: list[MemberSource], kinds: dict[str, list[Site]], budget: float | None, counts: list[int]
) -> Fleet:
    """Every fleet form at ``budget`` (each with its best number of clusters among ``counts``); the
    least error (the members' measure) wins."""
    built, candidates = {}, []
    calibrated = sources[0].calibration is not None
    # recorded in the settings (report and every member's provenance)
    chosen = {"chosen_by": "least error", "ranked_by": RANKED_BY_OUTPUTS if calibrated else RANKED_BY_WEIGHTS}
    for form in FLEET_FORMS:
        try:
            fleet, error, energy = _clustered(
                sources, kinds, form, rank=None, budget=budget, chosen=chosen, counts=counts
            )
        except ShareportError as exc:  # e.g. a budget below this form's smallest setting
            candidates.append({"form": form, "refused": str(exc)})
            continue
        built[form] = (fleet, error, energy)
        candidates.append(
            {
                "form": form,
                "parameters": fleet.report.parameters,
                "ratio": fleet.report.parameters / fleet.report.lora_parameters,
                "error": error,
                "relative_error": _relative(error, energy),
                "retained_energy": 1.0 - error / energy if energy > 0 else 1.0,
            }
        )
    if not built:
        raise ShareportError(candidates[0]["refused"])
    tie = min(e for _, e, _ in built.values()) + AUTO_TIE * max(w for _, _, w in built.values())
    fleet = min((f for f, e, _ in built.values() if e <= tie), key=lambda f: f.report.parameters)
    for candidate in candidates:
        candidate["winner"] = candidate["form"] == fleet.form
    report = dataclasses.replace(fleet.report, candidates=candidates, ranked_by=chosen["ranked_by"])
    return dataclasses.replace(fleet, report=report)


def cluster_counts(clusters: int | str, n_members: int, *, rank: int | None) -> list[int]:
    """The numbers of clusters to try: the one asked, or for "auto" 1 to N / MIN_MEMBERS, searched among
    (``_clustered``; only 1 with --rank, where more clusters are more parameters, not the same budget)."""
    most = max(n_members // MIN_MEMBERS, 1)
    if clusters == AUTO_CLUSTERS:
        return [1] if rank is not None else list(range(1, most + 1))
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ShareportError(f"--clusters must be a positive number or '{AUTO_CLUSTERS}', got {clusters!r}")
    if clusters > most:
        raise ShareportError(
            f"--clusters {clusters}: {n_members} members make at most {most} clusters of at "
            f"least {MIN_MEMBERS} members (a cluster of one is that LoRA converted alone)"
        )
    return [clusters]


def _clustered(
    sources: list[MemberSource],
    kinds: dict[str, list[Site]],
    form: str,
    *,
    rank: int | None,
    budget: float | None,
    counts: list[int],
    chosen: dict | None = None,
) -> tuple[Fleet, float, float]:
    """``_build`` with the members in clusters: each count in ``counts`` with its assignment
    (``converters.fleet_clusters.assign_clusters``, by the error of the products at the budget); the
    least error wins (within ``AUTO_TIE`` of the energy: the fewer clusters). Several counts ("auto"):
    not every one is built, ``converters.fleet_clusters.search_counts`` picks which (1 first, then powers
    of two and the largest, then bisection beside the best). The report records the clusters, and every
    count tried, when more than one cluster was made or tried."""
    factors = {kind: ([s.factors[kind][0] for s in sources], [s.factors[kind][1] for s in sources]) for kind in kinds}
    calibrated = sources[0].calibration is not None
    # a calibrated member's statistics are in the whole fleet's bases (fleet_bases); clusters re-express them
    stats_bases = {kind: fleet_basis(factors[kind][0]) for kind in kinds} if calibrated and max(counts) > 1 else {}
    fraction = DEFAULT_BUDGET if budget is None else budget
    budget_parameters = math.floor(fraction * sum(s.lora_parameters for s in sources))
    built, candidates = [], []

    def evaluate(count: int) -> float | None:
        try:
            fit = (
                None
                if count == 1
                else assign_clusters(
                    form, factors, count, rank=rank, budget=None if rank is not None else budget_parameters
                )
            )
        except ValueError as exc:  # a budget below the smallest setting of this many clusters
            if len(counts) == 1:
                raise ShareportError(f"--budget {fraction:g}: {exc}") from None
            candidates.append({"clusters": count, "refused": str(exc)})
            return None
        fleet, error, energy = _build(
            sources, kinds, form, rank=rank, budget=budget, chosen=chosen, clusters=fit, stats_bases=stats_bases
        )
        built.append((count, fit, fleet, error, energy))
        candidates.append(
            {
                "clusters": count,
                "parameters": fleet.report.parameters,
                "error": error,
                "relative_error": _relative(error, energy),
            }
        )
        return error

    if len(counts) == 1:
        evaluate(counts[0])
    else:
        # the search's own tie, in the members' measure: the weights', or for a calibrated fleet the
        # output energy of dW' = 0, the same at every count: one cluster's build (scored first anyway)
        first = evaluate(counts[0])
        energy = built[0][4] if calibrated and built else sum(s.weight_energy() for s in sources)
        search_counts(counts, lambda c: first if c == counts[0] else evaluate(c), AUTO_TIE * energy)
        built.sort(key=lambda b: b[0])
        candidates.sort(key=lambda c: c["clusters"])
    tie = min(b[3] for b in built) + AUTO_TIE * max(b[4] for b in built)
    count, fit, fleet, error, energy = min((b for b in built if b[3] <= tie), key=lambda b: b[0])
    if len(counts) == 1 and count == 1:
        return fleet, error, energy
    labels = fit.labels if fit is not None else [0] * len(sources)
    record = {
        "count": count,
        "members": {s.name: c + 1 for s, c in zip(sources, labels)},
        "chosen_by": "least error at the budget" if len(counts) > 1 else "--clusters",
        "candidates": [{**c, "winner": c["clusters"] == count} for c in candidates],
    }
    return dataclasses.replace(fleet, report=dataclasses.replace(fleet.report, clusters=record)), error, energy


def _kind_result(sources: list[MemberSource], kind: str, form: str, rank_out: int, rank_in: int, *, stats_basis=None):
    """One kind compressed over ``sources``: plain, or fit to each source's calibration. The
    statistics are in ``stats_basis`` (the whole fleet's, ``fleet_bases``); for a cluster's
    members they are re-expressed in the cluster's own basis (``restrict_statistics``)."""
    As, Bts = [s.factors[kind][0] for s in sources], [s.factors[kind][1] for s in sources]
    if sources[0].calibration is None:
        return converters.fleet_kind(form, As, Bts, rank_in, rank_out=rank_out or None)
    stats = [s.calibration.kind_statistics(s.adapter.kinds()[kind]) for s in sources]
    if stats_basis is not None:
        own = fleet_basis(As)
        stats = [[restrict_statistics(S, stats_basis, own) for S in row] for row in stats]
    return fleet_kind_calibrated(
        form, As, Bts, stats, rank_in, rank_out=rank_out or None, lam=sources[0].calibration.ridge
    )


def _build(
    sources: list[MemberSource],
    kinds: dict[str, list[Site]],
    form: str,
    *,
    rank: int | None,
    budget: float | None,
    chosen: dict | None = None,
    clusters: ClusterFit | None = None,
    stats_bases: dict[str, torch.Tensor] | None = None,
) -> tuple[Fleet, float, float]:
    """One form's fleet, and (sum of the members' squared errors, of their energies) in its measure.

    ``clusters``: the members' clusters and each (cluster, kind)'s ranks (``converters.fleet_clusters``);
    None: one basis per kind for the whole fleet, planned here. ``stats_bases``: per kind the whole
    fleet's basis that calibrated members' statistics are in (needed with ``clusters`` only)."""
    if clusters is None:
        lora_total = sum(s.lora_parameters for s in sources)
        plan = _plan(
            form,
            {kind: ([s.factors[kind][0] for s in sources], [s.factors[kind][1] for s in sources]) for kind in kinds},
            rank,
            budget,
            lora_total,
        )
        groups = [(None, list(range(len(sources))))]
    else:
        plan = {(c, kind): ranks for (c, kind), ranks in clusters.ranks.items()}
        groups = [(c + 1, members) for c, members in enumerate(cluster_members(clusters.labels))]
    calibrated = sources[0].calibration is not None
    shared: dict[str, torch.Tensor] = {}
    cluster_shared: dict[int | None, dict[str, torch.Tensor]] = {}  # what each member's pool holds
    parts = [MemberParts() for _ in sources]
    kind_info = {}
    for cluster, members in groups:
        own = cluster_shared[cluster] = {}
        for kind, sites in kinds.items():
            ranks = plan[kind] if cluster is None else plan[(cluster - 1, kind)]
            if clusters is not None and not calibrated:
                # the assignment already fit it (``fit_clusters``: the same call _kind_result makes)
                result = clusters.kinds[(cluster - 1, kind)]
            else:
                # a cluster's calibrated fit re-expresses the statistics in its own basis
                stats_basis = stats_bases[kind] if clusters is not None else None
                result = _kind_result([sources[i] for i in members], kind, form, *ranks, stats_basis=stats_basis)
            key = kind_key(kind, cluster)
            a_name, u_name = basis_names(key)
            own[a_name] = result.basis_v.contiguous()
            if result.basis_u is not None:
                own[u_name] = result.basis_u.contiguous()
            weight_errors = result.frobenius_errors or result.errors
            for j, i in enumerate(members):
                member = parts[i]
                member.add_kind(kind, sites, result.cores[j], own, cluster)
                member.squared_error += result.errors[j]
                member.energy += result.energies[j]
                member.weight_squared_error += weight_errors[j]
                member.kind_errors[kind] = _relative(result.errors[j], result.energies[j])
            kind_info[key] = {
                "ranks": list(result.ranks),
                "shared_parameters": result.shared_parameters(),
                "relative_error": _relative(result.error, result.energy),
                "iterations": len(result.error_history) - 1,
            }
        shared.update(own)
    settings = {"rank": rank} if rank is not None else {"budget": DEFAULT_BUDGET if budget is None else budget}
    settings.update(chosen or {})
    names = [s.name for s in sources]
    entry = {"step": "fleet", "form": form, "members": names, **settings}
    cluster_of = {i: cluster for cluster, members in groups for i in members}
    members = [
        member_adapter(
            source,
            member,
            cluster_shared[cluster_of[i]],
            form=form,
            cluster=cluster_of[i],
            entry=entry if cluster_of[i] is None else {**entry, "cluster": cluster_of[i], "clusters": len(groups)},
        )
        for i, (source, member) in enumerate(zip(sources, parts))
    ]
    reports = [member_report(source, member) for source, member in zip(sources, parts)]
    calibration = (
        None
        if not calibrated
        else {"ridge": sources[0].calibration.ridge, "members": {s.name: s.calibration.info for s in sources}}
    )
    report = FleetReport(
        form,
        reports,
        sum(t.numel() for t in shared.values()),
        kind_info,
        settings,
        warnings=member_warnings(
            reports, size_hint(rank=rank, budget=budget, default_budget=DEFAULT_BUDGET), calibrated=calibrated
        ),
        calibration=calibration,
    )
    return (
        Fleet(form, names, shared, members, report),
        sum(m.squared_error for m in parts),
        sum(m.energy for m in parts),
    )


def member_adapter(
    source: MemberSource,
    parts: MemberParts,
    shared: dict[str, torch.Tensor],
    *,
    form: str,
    entry: dict,
    cluster: int | None = None,
) -> Adapter:
    """The member adapter: the source's carried config and tensors, its own parts over the shared pool
    (its ``cluster``'s tensors only, in a clustered fleet), and ``entry`` (the fleet step, named for
    this member) in its provenance."""
    ref = {"shared": None, "sha256": None, "form": form, "names": sorted(shared), "products": parts.products}
    if cluster is not None:  # absent in a fleet of one cluster, whose members are as they were
        ref["cluster"] = cluster
    config = {k: v for k, v in source.adapter.config.items() if k == "modules_to_save"}
    member = source.adapter.with_sites(
        {**parts.tensors, **shared}, parts.sites, "sharea", config={**config, FLEET_KEY: ref}
    )
    entry = {**entry, "member": source.name}
    if source.calibration is not None:
        entry["calibration"] = {**source.calibration.info, "ridge": source.calibration.ridge}
    return member.with_step(entry, source_parameters=source.lora_parameters)


def member_report(source: MemberSource, parts: MemberParts) -> MemberReport:
    error, energy = parts.squared_error, parts.energy
    return MemberReport(
        source.name,
        source.lora_parameters,
        parts.stored_parameters(),
        _relative(error, energy),
        parts.kind_errors,
        retained_energy=1.0 - error / energy if energy > 0 else 1.0,
        frobenius_relative_error=None
        if source.calibration is None
        else _relative(parts.weight_squared_error, source.weight_energy()),
    )


def _relative(error: float, energy: float) -> float:
    return math.sqrt(max(error, 0.0) / energy) if energy > 0 else 0.0
