"""One in-memory model for every adapter form.

An adapter is a *pool* of named factor tensors plus a *site map*: for each adapted module
(its path inside the base model, e.g. ``model.layers.3.self_attn.q_proj``) the name of the A
it uses, the name of the B it uses, and its scale. The update a site applies is

    dW = scale * B @ A        A: (r, n_in)   B: (n_out, r)   dW: (n_out, n_in)

always in the (out, in) convention of ``nn.Linear``; a base model that stores its weight
transposed (GPT-2's Conv1D, PEFT's ``fan_in_fan_out``) is handled where weights are touched,
never here. Plain LoRA is the case where no tensor is used by two sites; ShareA, ShareB,
ShareAB and ASLoRA differ only in which names repeat. Conversion is adapter -> adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Iterable

import torch

from converters.quantize import QuantizedTensor

from .errors import ShareportError
from .forms import FORM_NAMES as FORMS

# PEFT keys start with this; site paths never do, carried (modules_to_save) tensor keys do
PEFT_PREFIX = "base_model.model."


def carried_parameter_name(key: str) -> str:
    """The base model's parameter name for a carried (``modules_to_save``) PEFT key:
    ``base_model.model.classifier.modules_to_save.default.weight`` -> ``classifier.weight``."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".modules_to_save.default.", ".")


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module: which pooled tensors it uses and how its update is scaled."""

    path: str  # module path inside the base model (no PEFT "base_model.model." prefix)
    kind: str  # the module's role, shared by every layer: "self_attn.q_proj"
    layer: int  # index of the repeated block the module sits in
    a: str  # name of its A in the pool
    b: str  # name of its B in the pool
    scale: float


UNKNOWN_LAYOUT = (
    "expected modules in numbered blocks such as 'model.layers.<i>.self_attn.q_proj' (Llama/Mistral/Qwen2), "
    "'transformer.h.<i>.attn.c_attn' (GPT-2) or 'encoder.layer.<i>.attention.self.query' (BERT/RoBERTa)"
)


def split_path(path: str) -> tuple[str, int, str] | None:
    """Split a module path at its layer index: ``prefix.<i>.suffix`` -> (prefix, i, suffix).

    Every transformer family shareport knows keeps its blocks in a numbered container
    (``model.layers.3``, ``transformer.h.3``, ``encoder.layer.3``); the part after the
    index names the module's role. Returns None for a module outside any block (a pooler,
    an LM head): it is a kind of its own, with nothing to share across layers.
    """
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and 0 < i < len(parts) - 1:
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return None


OUTSIDE_BLOCKS = -1  # the "layer" of a module outside the numbered blocks


def kinds_for_paths(paths: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Map each path to (kind, layer).

    The kind is the role after the layer index ("self_attn.q_proj"). If the same role occurs
    under two containers (an encoder-decoder's encoder and decoder blocks), those are different
    kinds and get the container as a qualifier, so they are never shared with each other.
    A module outside any block (BERT's pooler, an LM head) is its own kind, at layer
    ``OUTSIDE_BLOCKS`` (-1), named without the model's root container: ``bert.pooler.dense``
    is the kind ``pooler.dense``, as the blocks' kinds carry no ``bert.encoder.layer.<i>``.
    """
    split = {p: split_path(p) for p in paths}
    prefixes_per_suffix: dict[str, set[str]] = {}
    for parts in split.values():
        if parts:
            prefixes_per_suffix.setdefault(parts[2], set()).add(parts[0])
    roots = {parts[0].split(".")[0] for parts in split.values() if parts}
    out = {}
    for path, parts in split.items():
        if parts is None:
            out[path] = (path, OUTSIDE_BLOCKS)
            continue
        prefix, layer, suffix = parts
        kind = suffix if len(prefixes_per_suffix[suffix]) == 1 else f"{prefix}.{suffix}"
        out[path] = (kind, layer)
    taken = {kind for kind, _ in out.values()}
    for path, parts in split.items():
        root, _, rest = path.partition(".")
        if parts is None and rest and root in roots and rest not in taken:
            out[path] = (rest, OUTSIDE_BLOCKS)
    return out


def plain_pool(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[dict[str, torch.Tensor], dict[str, Site]]:
    """Pool and site map of a plain LoRA: site ``p`` uses ``p.lora_A`` and ``p.lora_B``."""
    kinds = kinds_for_paths(factors)
    tensors, sites = {}, {}
    for path in sorted(factors):
        a, b, scale = factors[path]
        kind, layer = kinds[path]
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = a, b
        sites[path] = Site(path, kind, layer, f"{path}.lora_A", f"{path}.lora_B", float(scale))
    return tensors, sites


@dataclasses.dataclass
class Adapter:
    """A pool of factor tensors and the sites that use them.

    ``extra_tensors`` holds tensors that are not LoRA factors (PEFT's ``modules_to_save``,
    e.g. a classifier head), keyed by their PEFT key; they are carried through untouched.
    ``config`` keeps the source's PEFT fields that do not change the math (target_modules,
    task_type, ...) so that writers can pass them on.
    ``quantized`` holds, for pool tensors stored as integers, their integers and scales: the float
    tensor in ``tensors`` is then exactly their dequantization (what every command computes with),
    and the native writer stores the integers again (``shareport.quantization``). A new pool
    (``with_sites``) drops it: changed tensors are no longer those integers.
    """

    tensors: dict[str, torch.Tensor]
    sites: dict[str, Site]
    form: str = "lora"
    base_model: str | None = None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    extra_tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_factors(
        cls,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
        **fields,
    ) -> "Adapter":
        """A plain LoRA from ``{path: (A, B, scale)}``: every site gets its own tensors."""
        tensors, sites = plain_pool(factors)
        return cls(tensors=tensors, sites=sites, form="lora", **fields)

    def validate(self) -> None:
        """Check the site map against the pool: names exist, shapes chain, kinds agree."""
        if self.form not in FORMS:
            raise ShareportError(f"unknown adapter form '{self.form}' (expected one of {', '.join(FORMS)})")
        if not self.sites:
            raise ShareportError("adapter has no LoRA sites")
        shape_of_kind: dict[str, tuple[int, int]] = {}
        for path, site in self.sites.items():
            for name in (site.a, site.b):
                if name not in self.tensors:
                    raise ShareportError(f"site '{path}' uses tensor '{name}', which the adapter does not hold")
            a, b = self.tensors[site.a], self.tensors[site.b]
            if a.dim() != 2 or b.dim() != 2:
                raise ShareportError(
                    f"site '{path}': A and B must be matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
                )
            if a.shape[0] != b.shape[1]:
                raise ShareportError(
                    f"site '{path}': A {tuple(a.shape)} and B {tuple(b.shape)} disagree on the rank "
                    f"({a.shape[0]} vs {b.shape[1]})"
                )
            if not math.isfinite(site.scale):
                raise ShareportError(f"site '{path}': scale {site.scale} is not finite")
            shape = (b.shape[0], a.shape[1])
            if shape_of_kind.setdefault(site.kind, shape) != shape:
                raise ShareportError(
                    f"site '{path}' of kind '{site.kind}' has update shape {shape}, "
                    f"other sites of that kind have {shape_of_kind[site.kind]}"
                )
        for name, record in self.quantized.items():
            if name not in self.tensors or tuple(record.values.shape) != tuple(self.tensors[name].shape):
                raise ShareportError(f"quantized tensor '{name}' does not match the adapter's tensor of that name")

    # ----------------------------------------------------------------------------- queries
    def kinds(self) -> dict[str, list[Site]]:
        """Sites grouped by kind, each list in layer order; kinds in sorted order."""
        grouped: dict[str, list[Site]] = {}
        for site in sorted(self.sites.values(), key=lambda s: (s.kind, s.layer, s.path)):
            grouped.setdefault(site.kind, []).append(site)
        return grouped

    def layers(self) -> list[int]:
        """Indices of the numbered blocks the adapter adapts (not modules outside them)."""
        return sorted({s.layer for s in self.sites.values() if s.layer != OUTSIDE_BLOCKS})

    def outside_kinds(self) -> list[str]:
        """Kinds of the modules outside the numbered blocks (a pooler, an LM head)."""
        return sorted({s.kind for s in self.sites.values() if s.layer == OUTSIDE_BLOCKS})

    def rank(self, path: str) -> int:
        return int(self.tensors[self.sites[path].a].shape[0])

    def shape(self, path: str) -> tuple[int, int]:
        """(n_out, n_in) of the site's update."""
        site = self.sites[path]
        return int(self.tensors[site.b].shape[0]), int(self.tensors[site.a].shape[1])

    def factors(self, path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scale * B) of one site: the update is their product."""
        site = self.sites[path]
        return self.tensors[site.a].to(dtype), self.tensors[site.b].to(dtype) * site.scale

    def update(self, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``scale * B @ A`` (n_out, n_in) of one site."""
        a, bt = self.factors(path, dtype)
        return bt @ a

    def used_tensor_names(self) -> list[str]:
        return sorted({n for s in self.sites.values() for n in (s.a, s.b)})

    def num_parameters(self) -> int:
        """Unique factor parameters: a tensor shared by many sites counts once."""
        return sum(self.tensors[n].numel() for n in self.used_tensor_names())

    def num_lora_parameters(self) -> int:
        """What a plain LoRA with the same per-site ranks would hold."""
        total = 0
        for path in self.sites:
            n_out, n_in = self.shape(path)
            total += self.rank(path) * (n_in + n_out)
        return total

    def shared_names(self) -> list[str]:
        """Tensors used by more than one site."""
        uses = Counter(n for s in self.sites.values() for n in (s.a, s.b))
        return sorted(n for n, c in uses.items() if c > 1)

    # ------------------------------------------------------------------------ transforms
    def with_step(self, entry: dict, **facts) -> "Adapter":
        """The adapter with ``entry`` (``{"step": "convert"|"finetune"|"train", ...}``) appended to
        its provenance history and ``facts`` set beside it: the one shape every step records.

        ``provenance = {"tool", "source_parameters" (the original LoRA's), "history": [...]}``;
        the input's provenance is not changed."""
        from . import __version__

        history = list(self.provenance.get("history", [])) + [entry]
        provenance = {**self.provenance, **facts, "tool": f"shareport {__version__}", "history": history}
        return dataclasses.replace(self, provenance=provenance)

    def with_sites(self, tensors: dict[str, torch.Tensor], sites: dict[str, Site], form: str, **changes) -> "Adapter":
        """A new adapter with another pool and site map, keeping the rest (extras, config) but not the
        integers of a quantized pool (unless ``changes`` gives ``quantized``)."""
        changes.setdefault("quantized", {})
        return dataclasses.replace(self, tensors=tensors, sites=sites, form=form, **changes)

    def expand(self) -> "Adapter":
        """Plain LoRA: every site gets its own copy of its A and B (scale kept)."""
        factors = {}
        for path, site in self.sites.items():
            factors[path] = (self.tensors[site.a].clone(), self.tensors[site.b].clone(), site.scale)
        return self.with_sites(*plain_pool(factors), "lora")

    # ------------------------------------------------------------------------ comparison
    def max_update_diff(self, other: "Adapter") -> float:
        """Largest absolute difference between the two adapters' updates, over all sites."""
        if set(self.sites) != set(other.sites):
            missing = sorted(set(self.sites) ^ set(other.sites))
            raise ShareportError(f"adapters adapt different modules (e.g. '{missing[0]}')")
        worst = 0.0
        for path in sorted(self.sites):
            diff = (self.update(path, torch.float64) - other.update(path, torch.float64)).abs().max()
            worst = max(worst, float(diff))
        return worst

    def identical(self, other: "Adapter") -> bool:
        """Same sites, same names, same scales, bit-identical tensors and extras."""
        if self.sites != other.sites or self.form != other.form:
            return False
        if self.used_tensor_names() != other.used_tensor_names():
            return False
        for name in self.used_tensor_names():
            a, b = self.tensors[name], other.tensors[name]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                return False
        if sorted(self.extra_tensors) != sorted(other.extra_tensors):
            return False
        return all(torch.equal(self.extra_tensors[k], other.extra_tensors[k]) for k in self.extra_tensors)


# ---------------------------------------------------------------------------- queries on an adapter
def kind_factors(adapter: Adapter, sites: list[Site]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kind's A's and scaled B's, in layer order (dW_l = Bts[l] @ As[l])."""
    As, Bts = [], []
    for site in sites:
        a, bt = adapter.factors(site.path, adapter.tensors[site.a].dtype)
        As.append(a)
        Bts.append(bt)
    return As, Bts


def recorded_source_parameters(adapter: Adapter) -> int | None:
    """Parameters of the LoRA the adapter was converted from, if its provenance records them."""
    recorded = adapter.provenance.get("source_parameters")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return recorded
    return None


def source_parameters(adapter: Adapter) -> int:
    """The denominator of every size: the source LoRA's parameters, else the adapter's own."""
    return recorded_source_parameters(adapter) or adapter.num_parameters()


# ---------------------------------------------------------------------------- fleet members
FLEET_KEY = "fleet"  # Adapter.config key (and the native config's shareport section key) of a member


CLUSTER_PREFIX = "cluster"  # a clustered fleet's shared tensors: cluster<c>.<kind>.fleet_A (kind_key)


def kind_key(kind: str, cluster: int | None) -> str:
    """A kind's name in a fleet's shared tensors and report: the kind itself in a fleet of one
    cluster (so those fleets are what they were before clusters), ``cluster<c>.<kind>`` for the
    basis of cluster c (numbered from 1)."""
    return kind if cluster is None else f"{CLUSTER_PREFIX}{cluster}.{kind}"


def compose(u: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """A two-sided member's B = U @ C, (n_out, k1) @ (k1, k2), in float64 cast to the core's dtype:
    one definition for building, reading and checking a member, so all three agree bit for bit."""
    return (u.double() @ core.double()).to(core.dtype)


def reference(adapter: Adapter) -> dict | None:
    """The fleet reference of a member (None for any other adapter)."""
    ref = adapter.config.get(FLEET_KEY)
    return ref if isinstance(ref, dict) else None


def frozen_names(adapter: Adapter) -> list[str]:
    """Pool tensors a member shares with its fleet: training must leave them alone."""
    ref = reference(adapter)
    return sorted(ref["names"]) if ref else []
