"""Adding a member to a built fleet without rebuilding it (``shareport fleet-add``).

The new LoRA is projected onto the fleet's bases (``converters.fleet_extend.project``: its cores
are the exact least squares on them, so its error is the least the bases allow). The bases grow
only when that error is over the target:

    target = max_error if given, else the worst existing member's relative weight error
             (its ``frobenius_relative_error`` in a calibrated fleet, else its ``relative_error``).

Then directions from the new member's own residual are appended, one step at a time, always the
kind's next step that keeps the most of its energy per parameter the fleet grows by (exact kept
energies, ``converters.fleet_extend.extension``), until its error is at most the target or no
step keeps any more. The new member's cores are then re-fit on the grown bases.

The other members' reconstructions never change: when nothing grows, their files (and
``shared.safetensors``) are kept byte for byte; when a kind grows, their cores of that kind are
padded with zeros (``[U X] [[C, 0], [0, 0]] [V; W] = U C V``), so their updates are the same,
and only the files holding the padded cores and the new shared file's sha256 are rewritten.
Their recorded errors therefore still hold and are reported as they were.

The new member is fit to the weights (a calibrated fleet's new member has no calibration data).

A clustered fleet: the new LoRA is projected onto every cluster's bases and joins the cluster where
its error is least (the error of its update, as everywhere); only that cluster's bases may grow and
only its members' cores are padded (the others' updates and cores are untouched; every member's
config is rewritten when the shared file changes, for its sha256).
"""

from __future__ import annotations

import dataclasses
import math

import torch

import converters
from converters.fleet_extend import Extension, extension, pad_core, project
from converters.forms import FLEET_TWO_SIDED

from .adapter import FLEET_KEY, Adapter, compose, kind_key, reference
from .errors import ShareportError
from .fleet import (
    ALONE_WARNING,
    Fleet,
    MemberParts,
    MemberSource,
    basis_names,
    check_compatible,
    member_adapter,
    member_report,
)
from .fleet_report import FleetReport, member_warnings

# a step keeping less than this share of the new member's energy keeps nothing (roundoff)
NO_GAIN = 1e-12


@dataclasses.dataclass
class Addition:
    """A fleet grown by one member, and how."""

    fleet: Fleet  # every member, the new one last
    grown: dict[str, list[int]]  # per kind that grew: [columns added to U, rows added to V]
    error_before: float  # the new member's relative error on the bases as they were
    target: float
    rule: str  # where the target came from
    cluster: int | None = None  # the cluster it joined (clustered fleets)

    @property
    def unchanged(self) -> bool:
        """The shared file and every other member are as they were."""
        return not self.grown


def worst_error(report: FleetReport) -> float:
    """The worst member's relative weight error (what a new member's error is measured in)."""
    return max(
        m.relative_error if m.frobenius_relative_error is None else m.frobenius_relative_error for m in report.members
    )


def add_member(fleet: Fleet, adapter: Adapter, name: str, *, max_error: float | None = None) -> Addition:
    """``fleet`` (members loaded from its folder, report read back) with ``adapter`` added as ``name``."""
    if name in fleet.names:
        raise ShareportError(f"{name}: the fleet already has a member of that name; name the new one with NAME=PATH")
    if max_error is not None and not 0 <= max_error < 1:
        raise ShareportError(f"--max-error must be at least 0 and below 1 (a relative error), got {max_error:g}")
    check_compatible([fleet.members[0], adapter], [fleet.names[0], name])
    source = MemberSource.read(adapter, name)
    target = worst_error(fleet.report) if max_error is None else max_error
    rule = "the worst existing member's relative error" if max_error is None else "--max-error"
    clusters = sorted({reference(m).get("cluster") for m in fleet.members}, key=lambda c: c or 0)
    # the cluster where it fits best (ties: the first); a fleet of one cluster has only None
    cluster = min(clusters, key=lambda c: _relative_total(_projected(fleet.shared, source, c)))
    error_before = _relative_total(_projected(fleet.shared, source, cluster))
    grown = {} if error_before <= target else _grow(fleet, source, target, cluster)
    shared = _grown_shared(fleet.shared, grown, fleet.form, cluster)
    members = [
        _padded(m, shared, grown, cluster) if grown and reference(m).get("cluster") == cluster else m
        for m in fleet.members
    ]
    if grown:  # every member's reference names the new shared file's tensors
        members = [_renamed(m, shared) for m in members]
    parts = MemberParts()
    for kind, fit in _projected(shared, source, cluster).items():  # the exact least squares on the stored bases
        parts.add_kind(kind, adapter.kinds()[kind], fit.cores, shared, cluster)
        parts.squared_error += fit.error
        parts.energy += fit.energy
        parts.weight_squared_error += fit.error
        parts.kind_errors[kind] = math.sqrt(fit.error / fit.energy) if fit.energy > 0 else 0.0
    sizes = {kind_key(kind, cluster): list(ext.sizes(steps)) for kind, (ext, steps) in sorted(grown.items())}
    record = {"target": target, "rule": rule, "grown": sizes, **({} if cluster is None else {"cluster": cluster})}
    own_shared = {n: t for n, t in shared.items() if n in _cluster_names(shared, cluster)}
    new = member_adapter(
        source,
        parts,
        own_shared,
        form=fleet.form,
        cluster=cluster,
        entry={"step": "fleet add", "form": fleet.form, **record},
    )
    names = [*fleet.names, name]
    report = _grown_report(
        fleet.report,
        member_report(source, parts),
        shared=shared,
        stored=dict(zip(fleet.names, map(_stored, members))),
        addition={"member": name, "error_before": error_before, **record},
    )
    return Addition(
        Fleet(fleet.form, names, shared, [*members, new], report), sizes, error_before, target, rule, cluster
    )


def _cluster_names(shared: dict[str, torch.Tensor], cluster: int | None) -> set[str]:
    """The shared tensors of ``cluster`` (all of them in a fleet of one cluster)."""
    prefix = kind_key("", cluster) if cluster is not None else ""
    return {n for n in shared if n.startswith(prefix)}


def _renamed(member: Adapter, shared: dict[str, torch.Tensor]) -> Adapter:
    """A member whose cores are unchanged, with its cluster's shared tensors taken from the new ``shared``
    (the same values where its cluster did not grow)."""
    ref = reference(member)
    names = _cluster_names(shared, ref.get("cluster"))
    tensors = {**member.tensors, **{n: shared[n] for n in names}}
    return dataclasses.replace(
        member, tensors=tensors, config={**member.config, FLEET_KEY: {**ref, "names": sorted(names)}}
    )


def _projected(shared: dict[str, torch.Tensor], source: MemberSource, cluster: int | None = None) -> dict:
    """Per kind the new member's ``Projection`` on the bases in ``shared`` (``cluster``'s)."""
    out = {}
    for kind, (As, Bts) in source.factors.items():
        a_name, u_name = basis_names(kind_key(kind, cluster))
        out[kind] = project(As, Bts, shared[a_name], shared.get(u_name))
    return out


def _relative_total(projections: dict) -> float:
    error, energy = sum(p.error for p in projections.values()), sum(p.energy for p in projections.values())
    return math.sqrt(error / energy) if energy > 0 else 0.0


def _grow(fleet: Fleet, source: MemberSource, target: float, cluster: int | None) -> dict[str, tuple[Extension, int]]:
    """Per kind that grows (of ``cluster``'s bases), its ``Extension`` and the steps taken: greedy by kept
    energy per parameter."""
    extensions = {}
    for kind, (As, Bts) in source.factors.items():
        a_name, u_name = basis_names(kind_key(kind, cluster))
        extensions[kind] = (extension(As, Bts, fleet.shared[a_name], fleet.shared.get(u_name)), len(As))
    energy = sum(ext.energy for ext, _ in extensions.values())
    kept = sum(ext.kept[0] for ext, _ in extensions.values())
    steps = dict.fromkeys(extensions, 0)
    n_members = sum(reference(m).get("cluster") == cluster for m in fleet.members) + 1
    while energy > 0 and energy - kept > target**2 * energy:
        best = None
        for kind, (ext, n_layers) in extensions.items():
            if steps[kind] == ext.steps:
                continue
            gain = ext.kept[steps[kind] + 1] - ext.kept[steps[kind]]
            cost = _step_cost(
                fleet,
                kind_key(kind, cluster),
                ext,
                steps[kind],
                n_sites=n_members * n_layers,
                n_out=source.factors[kind][1][0].shape[0],
            )
            if gain > NO_GAIN * energy and (best is None or gain / cost > best[0]):
                best = (gain / cost, kind, gain)
        if best is None:
            break
        steps[best[1]] += 1
        kept += best[2]
    return {kind: (extensions[kind][0], e) for kind, e in steps.items() if e}


def _step_cost(fleet: Fleet, kind: str, ext: Extension, step: int, *, n_sites: int, n_out: int) -> int:
    """Parameters the fleet grows by when ``kind`` (a ``kind_key``) takes its step ``step + 1`` (bases and
    every core of its cluster)."""
    a_name, u_name = basis_names(kind)
    v = fleet.shared[a_name]
    k1 = fleet.shared[u_name].shape[1] if u_name in fleet.shared else 0
    size = [
        converters.fleet_parameter_count(fleet.form, n_out, v.shape[1], n_sites, k1 + e1, v.shape[0] + e2)
        for e1, e2 in (ext.sizes(step), ext.sizes(step + 1))
    ]
    return max(size[1] - size[0], 1)


def _grown_shared(
    shared: dict[str, torch.Tensor], grown: dict[str, tuple[Extension, int]], form: str, cluster: int | None
) -> dict[str, torch.Tensor]:
    """The shared tensors with each grown kind's new directions (of ``cluster``'s bases) appended (V's rows,
    U's columns)."""
    out = dict(shared)
    for kind, (ext, steps) in grown.items():
        e1, e2 = ext.sizes(steps)
        a_name, u_name = basis_names(kind_key(kind, cluster))
        v = shared[a_name]
        out[a_name] = torch.cat([v, ext.rows_v[:e2].to(v.dtype)]).contiguous()
        if FLEET_TWO_SIDED[form]:
            u = shared[u_name]
            out[u_name] = torch.cat([u, ext.cols_u[:, :e1].to(u.dtype)], dim=1).contiguous()
    return out


def _padded(
    member: Adapter, shared: dict[str, torch.Tensor], grown: dict[str, tuple[Extension, int]], cluster: int | None
) -> Adapter:
    """An existing member over the grown bases: its cores of the grown kinds padded with zeros, so its
    updates are unchanged; its B = U C re-formed from the padded core."""
    ref = reference(member)
    by_b = {b: core for b, (_, core) in ref["products"].items()}
    tensors = {**member.tensors, **{n: shared[n] for n in ref["names"]}}  # its cluster's, grown
    for site in member.sites.values():
        if site.kind not in grown:
            continue
        e1, e2 = grown[site.kind][0].sizes(grown[site.kind][1])
        if site.b in by_b:  # shareab: the core is stored, B = U C is formed
            core = by_b[site.b]
            tensors[core] = pad_core(member.tensors[core], e1, e2).contiguous()
            tensors[site.b] = compose(shared[basis_names(kind_key(site.kind, cluster))[1]], tensors[core])
        else:
            tensors[site.b] = pad_core(member.tensors[site.b], 0, e2).contiguous()
    entry = {
        "step": "fleet add: padded",
        "grown": {kind_key(k, cluster): list(ext.sizes(e)) for k, (ext, e) in sorted(grown.items())},
    }
    return dataclasses.replace(member, tensors=tensors).with_step(entry)


def _stored(member: Adapter) -> int:
    """What a member stores on its own: its used tensors less the shared ones and the formed B's,
    plus its cores."""
    ref = reference(member)
    own = set(member.used_tensor_names()) - set(ref["names"]) - set(ref["products"])
    own |= {core for _, core in ref["products"].values()}
    return sum(member.tensors[n].numel() for n in own)


def _grown_report(
    report: FleetReport, new, *, shared: dict[str, torch.Tensor], stored: dict[str, int], addition: dict
) -> FleetReport:
    """The report with the new member, the grown kinds' ranks and sizes, every member's stored size and
    the addition recorded; the other members' errors are as they were (their updates did not change)."""
    reports = [dataclasses.replace(m, parameters=stored.get(m.name, m.parameters)) for m in report.members]
    clusters = report.clusters
    if clusters is not None:
        clusters = {**clusters, "members": {**clusters["members"], new.name: addition.get("cluster", 1)}}
    kinds = {k: dict(v) for k, v in report.kinds.items()}
    for kind in addition["grown"]:
        a_name, u_name = basis_names(kind)
        kinds[kind]["ranks"] = [shared[u_name].shape[1] if u_name in shared else 0, shared[a_name].shape[0]]
        kinds[kind]["shared_parameters"] = sum(shared[n].numel() for n in (a_name, u_name) if n in shared)
    hint = "a lower --max-error (the basis grows until the new member's error is at most it)"
    return dataclasses.replace(
        report,
        members=[*reports, new],
        shared_parameters=sum(t.numel() for t in shared.values()),
        kinds=kinds,
        # the comparison with each LoRA alone was of the fleet as built: the earlier members' LoRAs are not
        # at hand to redo it, so it is dropped rather than left describing another fleet
        warnings=[*(w for w in report.warnings if not w.startswith(ALONE_WARNING)), *member_warnings([new], hint)],
        alone=None,
        additions=[*report.additions, addition],
        clusters=clusters,
    )


def read_fleet(members: dict[str, Adapter], report: dict, where: str) -> Fleet:
    """The in-memory fleet of members read from one folder (their shared tensors are the same file's)
    and its report as written; ``where`` names the report in the one line refusing a malformed one."""
    first = next(iter(members.values()))
    ref = reference(first)
    shared = {n: m.tensors[n] for m in members.values() for n in reference(m)["names"]}  # every cluster's
    try:
        fleet_report = FleetReport.from_dict(report)
    except (KeyError, TypeError) as exc:
        raise ShareportError(f"{where}: not a fleet report ({exc!r})") from None
    return Fleet(ref["form"], list(members), dict(sorted(shared.items())), list(members.values()), fleet_report)
