"""An adapter's pool as graph tensors ("slots"): one graph input per pool tensor.

A site computes ``x W^T + s (x A^T) B^T``. In the graph that is ``x @ A_g @ B_g`` with

    A_g = A^T          (n_in, r)
    B_g = (s * B)^T    (r, n_out)

the layout Olive's ``ExtractAdapters`` uses: already transposed for MatMul, and the scale folded
into a factor so that the graph holds no per-site scale constant that swapping the adapter could
not change. A tensor shared by several sites is one slot, named by its pool name, used by all of
them. Each slot's rank is a symbolic dim; tensors that must agree on the rank (an A and every B
it is multiplied with) share one dim, so an adapter of another rank fits the same graph.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..adapter import Adapter, reference
from ..errors import ShareportError


@dataclasses.dataclass(frozen=True)
class Slot:
    """One adapter input of the graph."""

    name: str  # the pool name; also the graph input's and the .onnx_adapter parameter's name
    role: str  # "A" (n_in, rank) or "B" (rank, n_out); a fleet member's slots: "B" or "core", static;
    # "carried": a fleet's differing modules_to_save tensor (``carried``), static
    size: int  # n_in for an A, n_out for a B, the first dim of a carried tensor
    rank_dim: str | None  # symbolic dim name of the rank (None: a static slot, see ``fixed``)
    fixed: tuple | None = None  # a fleet member's slot: its static shape (its fleet's ranks are fixed)

    def shape(self, rank: int | str | None = None) -> tuple:
        """The graph shape, with ``rank`` (default: the symbolic dim) in the rank's place."""
        if self.fixed is not None:
            return self.fixed
        rank = self.rank_dim if rank is None else rank
        return (self.size, rank) if self.role == "A" else (rank, self.size)


def _roles(adapter: Adapter) -> dict[str, str]:
    roles: dict[str, str] = {}
    for site in adapter.sites.values():
        for name, role in ((site.a, "A"), (site.b, "B")):
            if roles.setdefault(name, role) != role:
                raise ShareportError(f"tensor '{name}' is used both as an A and as a B; it cannot be exported")
    return roles


def _rank_groups(adapter: Adapter) -> dict[str, str]:
    """Union-find over sites: each tensor -> the smallest A name of its connected group."""
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for site in adapter.sites.values():
        ra, rb = find(site.a), find(site.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = {n: find(n) for n in adapter.used_tensor_names()}
    # name each group by an A in it, so the dim reads as "the rank of <that A>"
    first_a: dict[str, str] = {}
    for site in sorted(adapter.sites.values(), key=lambda s: s.a):
        first_a.setdefault(roots[site.a], site.a)
    return {n: first_a[root] for n, root in roots.items()}


def rank_dim_name(a_name: str) -> str:
    """A dim name that is also a Python identifier (torch.export's Dim needs one)."""
    return "rank_" + re.sub(r"\W", "_", a_name)


def slots_for(adapter: Adapter) -> dict[str, Slot]:
    """The graph's adapter inputs for ``adapter``, by name."""
    layout = fleet_layout(adapter)
    if layout is not None:
        return {
            n: Slot(n, "core" if n in layout.cores else "B", int(t.shape[1]), None, tuple(t.shape))
            for n, t in layout.member.items()
        }
    roles, groups = _roles(adapter), _rank_groups(adapter)
    slots = {}
    for name in adapter.used_tensor_names():
        tensor = adapter.tensors[name]
        size = int(tensor.shape[1] if roles[name] == "A" else tensor.shape[0])
        slots[name] = Slot(name, roles[name], size, rank_dim_name(groups[name]))
    return slots


def scale_carrier(adapter: Adapter) -> str:
    """ "B" when every B's sites agree on the scale (the usual case), else "A" if every A's do."""
    for role in ("B", "A"):
        scales: dict[str, set[float]] = {}
        for site in adapter.sites.values():
            scales.setdefault(site.b if role == "B" else site.a, set()).add(site.scale)
        if all(len(s) == 1 for s in scales.values()):
            return role
    raise ShareportError(
        "adapter shares tensors between sites with different scales in a way no factor can carry; "
        "expand it to a plain LoRA first"
    )


def graph_tensors(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every slot's value in the graph layout (transposed, scale folded in), contiguous."""
    layout = fleet_layout(adapter)
    if layout is not None:
        return {n: t.contiguous().to(dtype) for n, t in layout.member.items()}
    slots, carrier = slots_for(adapter), scale_carrier(adapter)
    scale_of = {(site.b if carrier == "B" else site.a): site.scale for site in adapter.sites.values()}
    out = {}
    for name, slot in slots.items():
        value = adapter.tensors[name].to(torch.float32)
        if slot.role == carrier:
            value = value * scale_of[name]
        out[name] = value.T.contiguous().to(dtype)
    return out


def empty_tensors(slots: dict[str, Slot], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero-rank values: x @ A_g @ B_g is then exactly zero, so the graph computes the base model
    (a fleet member's static slots: zeros of their shape, the same zero update)."""
    return {
        name: torch.zeros(slot.fixed if slot.fixed is not None else slot.shape(0), dtype=dtype)
        for name, slot in slots.items()
    }


@dataclasses.dataclass(frozen=True)
class FleetLayout:
    """A fleet member in the graph: its fleet's shared tensors are constants of the graph, its own
    tensors are the slots. Site ``path`` computes ``x @ t_1 @ t_2 [@ t_3]`` over ``chains[path]``:

        sharea   (V_g, B_g)            V_g = V^T (n_in, k) constant, B_g = (s B)^T (k, n_out) slot
        shareab  (V_g, C_g, U_g)       C_g = (s C)^T (k2, k1) slot, U_g = U^T (k1, n_out) constant
    """

    constants: dict[str, torch.Tensor]
    member: dict[str, torch.Tensor]
    chains: dict[str, tuple[str, ...]]
    cores: frozenset
    sha256: str


def fleet_layout(adapter: Adapter) -> FleetLayout | None:
    """The member's graph layout, or None for an adapter that is not a fleet member (or no longer is one:
    a shared tensor of the fleet is no longer used as such)."""
    ref = reference(adapter)
    if ref is None or not ref.get("sha256"):
        return None
    shared, products = set(ref["names"]), ref["products"]
    constants, member, chains = {}, {}, {}
    for path, site in sorted(adapter.sites.items()):
        if site.a not in shared or site.b in shared:
            return None
        constants[site.a] = adapter.tensors[site.a].to(torch.float32).T
        if site.b in products:
            u_name, core_name = products[site.b]
            if core_name not in adapter.tensors or u_name not in adapter.tensors:
                return None
            constants[u_name] = adapter.tensors[u_name].to(torch.float32).T
            member[core_name] = (adapter.tensors[core_name].to(torch.float32) * site.scale).T
            chains[path] = (site.a, core_name, u_name)
        else:
            member[site.b] = (adapter.tensors[site.b].to(torch.float32) * site.scale).T
            chains[path] = (site.a, site.b)
    cores = frozenset(c for _, c in products.values())
    return FleetLayout(constants, member, chains, cores, ref["sha256"])


def check_fleet_member(info: dict, adapter: Adapter, where: str) -> None:
    """A graph exported for a fleet takes only members of that fleet (the same shared file's sha256)."""
    fleet = info.get("fleet")
    if not fleet:
        return
    layout = fleet_layout(adapter)
    if layout is None or layout.sha256 != fleet["sha256"]:
        raise ShareportError(
            f"{where}: not a member of the fleet this graph was exported for (its shared "
            f"basis is in the graph; shared file sha256 {fleet['sha256'][:12]}...)"
        )
