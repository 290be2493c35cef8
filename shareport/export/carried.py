"""Carried tensors (PEFT ``modules_to_save``, e.g. a classifier head) as adapter inputs of a fleet's graph.

A graph normally bakes the exported adapter's carried tensors into its weights: they are not LoRA
factors and one adapter has only one head. A fleet's adapter-mode graph serves every member, so
when the members carry different tensors (other values, or another set), swapping a member's cores
alone cannot give its outputs. Then each carried tensor becomes a graph input as well, with a
same-named initializer holding the exported member's values (running with no adapter gives the
exported member, as a baked head would), and every ``.onnx_adapter`` holds its member's carried
tensors beside its cores. When every member carries the same tensors (or there is no fleet), the
graph stays as it was: baked, no extra inputs.

Naming: a carried tensor's graph input (and ``.onnx_adapter`` parameter) is the base model's
parameter it replaces, the PEFT key without ``base_model.model.`` and ``modules_to_save.default.``:
``classifier.weight``, ``classifier.bias``. The same under ``--adapter-names olive``: Olive's
``.weight`` suffix turns a LoRA factor's pool name into its module's parameter name, and these
already are parameter names. They cannot meet a LoRA input's name (pool names end in ``lora_A``,
``lora_B``, ``lora_core`` or, with Olive's names, those plus ``.weight``).

The graph's metadata lists them (``carried.inputs``) with the sha256 of the defaults
(``carried.sha256``), so ``verify`` knows whether ``--adapter`` is the member the defaults hold.
A member whose carried tensors cannot fill those inputs (another set, another shape) is refused
with one line naming it: a partial fleet export would be a surprise.

Every other graph bakes them, and an adapter swapped into it (``export-adapter``, ``verify``) runs
with the exported adapter's head, not its own: silently wrong outputs. So the metadata records what
was baked (``carried.baked``: the sha256 of each tensor as the graph holds it, by parameter name,
``{}`` for none) and :func:`check_baked` refuses an adapter whose carried tensors differ, or that
carries more or fewer. Graphs exported before that record have none: there the adapter's tensors
are compared with the graph's initializer of the same parameter (the exporter names it
``model.<parameter>``, the wrapper's attribute first); one with no such initializer cannot be
checked and is refused (export the graph again). What such a graph baked where the adapter carries
nothing cannot be told: that adapter is accepted, as before.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch

from ..adapter import Adapter, carried_parameter_name
from ..errors import ShareportError
from .choices import TORCH_DTYPES
from .slots import Slot

INFO_KEY = "carried"  # the graph metadata's section: {"inputs": [names], "sha256": digest of the defaults}
BAKED_KEY = "baked"  # ... or, where the graph bakes them: {name: tensor_digest of the baked values}
GRAPH_PREFIX = "model."  # the exporter names a parameter's initializer by its path in the wrapper (``.model``)


def carried_tensors(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's carried tensors by graph-input name (the base model's parameter name), in ``dtype``."""
    return {carried_parameter_name(k): t.to(dtype).contiguous() for k, t in sorted(adapter.extra_tensors.items())}


def carried_slots(arrays: dict[str, np.ndarray]) -> dict[str, Slot]:
    """Static graph inputs for carried ``arrays`` (every member's have the exported member's shapes)."""
    shapes = {n: tuple(int(d) for d in a.shape) for n, a in arrays.items()}
    return {n: Slot(n, "carried", shape[0] if shape else 1, None, shape) for n, shape in shapes.items()}


def same_carried(one: Adapter, other: Adapter) -> bool:
    """Bit-identical carried tensors under the same keys (then a baked head serves both)."""
    if sorted(one.extra_tensors) != sorted(other.extra_tensors):
        return False
    return all(torch.equal(t, other.extra_tensors[k]) for k, t in one.extra_tensors.items())


def fleet_needs_inputs(adapter: Adapter, members: dict[str, Adapter], where: dict[str, str]) -> bool:
    """Whether a fleet graph exported from ``adapter`` must take carried tensors as inputs: some member
    carries other ones. Raises, naming the first member (``where``: its folder) that cannot fill them."""
    if all(same_carried(adapter, m) for m in members.values()):
        return False
    want = {n: tuple(t.shape) for n, t in carried_tensors(adapter).items()}
    for name, member in sorted(members.items()):
        have = {n: tuple(t.shape) for n, t in carried_tensors(member).items()}
        why = _misfit(have, want)
        if why:
            raise ShareportError(
                f"{where[name]}: fleet member '{name}' {why}, so its carried tensors (modules_to_save) "
                "cannot be swapped into one graph; nothing was written (export it with --mode "
                "folded, or out of the fleet: convert --to lora first)"
            )
    return True


def _misfit(have: dict[str, tuple], want: dict[str, tuple]) -> str:
    """'' when ``have`` fills the inputs ``want`` (name -> shape), else why not, in words."""
    how, name = first_difference(have, want)
    return {
        "extra": f"carries '{name}', which the exported member does not",
        "missing": f"lacks the carried tensor '{name}' that the exported member has",
        "other": f"carries '{name}' of shape {have.get(name)}, the exported member's is {want.get(name)}",
        "": "",
    }[how]


def first_difference(have: dict, want: dict) -> tuple[str, str]:
    """How ``have`` first differs from ``want`` (by name, then value), in name order: ("extra", name),
    ("missing", name), ("other", name), or ("", "") when equal."""
    extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    if extra or missing:
        return ("extra", extra[0]) if extra else ("missing", missing[0])
    return next((("other", n) for n in sorted(want) if have[n] != want[n]), ("", ""))


def carried_arrays(adapter: Adapter, inputs: list[str], dtype: torch.dtype, what: str) -> dict[str, np.ndarray]:
    """The adapter's values for a graph's carried ``inputs`` (shapes are left to ``check_fits``);
    refuses, in one line, an adapter that carries another set."""
    mine = carried_tensors(adapter, dtype)
    extra, missing = sorted(set(mine) - set(inputs)), sorted(set(inputs) - set(mine))
    if missing:
        raise ShareportError(f"{what} carries no '{missing[0]}' (modules_to_save), which the graph takes as an input")
    if extra:
        raise ShareportError(
            f"{what} carries '{extra[0]}' (modules_to_save), which is not an input of the graph: "
            "its outputs would use another adapter's"
        )
    return {n: t.numpy() for n, t in mine.items()}


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal values, equal digest."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def info_section(arrays: dict[str, np.ndarray]) -> dict:
    """The graph metadata's record of its carried inputs and their defaults."""
    return {INFO_KEY: {"inputs": sorted(arrays), "sha256": digest(arrays)}}


def graph_inputs(info: dict) -> list[str]:
    """The graph's carried inputs (none for a graph that bakes them, or carries none)."""
    return list((info.get(INFO_KEY) or {}).get("inputs", []))


def override_feeds(info: dict, adapter: Adapter, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Feeds for a check run with no adapter active: the adapter's carried tensors where they differ from
    the graph's defaults (another member of the fleet than the exported one), else none, so that the
    defaults themselves are what gets checked."""
    inputs = graph_inputs(info)
    if not inputs:
        return {}
    arrays = carried_arrays(adapter, inputs, dtype, "adapter")
    return {} if digest(arrays) == info[INFO_KEY]["sha256"] else arrays


def tensor_digest(array: np.ndarray) -> str:
    """sha256 over one tensor's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}\0{array.shape}\0".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def baked_section(adapter: Adapter, dtype: torch.dtype) -> dict:
    """The graph metadata's record of the carried tensors baked into its weights, as the graph holds them."""
    return {INFO_KEY: {BAKED_KEY: {n: tensor_digest(t.numpy()) for n, t in carried_tensors(adapter, dtype).items()}}}


def check_baked(info: dict, adapter: Adapter, what: str, *, proto: onnx.ModelProto, folder) -> None:
    """Refuse, in one line naming ``what`` and the tensor, an adapter whose carried tensors are not the
    ones the graph bakes (see the module's docstring; a graph that takes them as inputs is left to
    :func:`carried_arrays`). Compared in the graph's dtype: values that round alike run alike."""
    section = info.get(INFO_KEY) or {}
    if section.get("inputs"):
        return
    dtype = getattr(torch, TORCH_DTYPES.get(info.get("dtype"), "float32"))
    mine = {n: t.numpy() for n, t in carried_tensors(adapter, dtype).items()}
    if BAKED_KEY in section:
        why = _baked_misfit({n: tensor_digest(a) for n, a in mine.items()}, section[BAKED_KEY])
    else:
        why = _initializer_misfit(mine, proto, folder)
    if why:
        raise ShareportError(
            f"{what}: {why}; with this graph its outputs would be wrong (export the graph "
            "from this adapter, or from a fleet whose members' heads differ: those are inputs)"
        )


def _baked_misfit(mine: dict[str, str], baked: dict[str, str]) -> str:
    """'' when the digests ``mine`` are the ``baked`` ones, else why not, in words."""
    how, name = first_difference(mine, baked)
    return {
        "extra": f"carries '{name}' (modules_to_save), which the graph does not bake in: it has the base model's",
        "missing": f"carries no '{name}' (modules_to_save), which the graph bakes in from the exported adapter",
        "other": f"carries another '{name}' (modules_to_save) than the one the graph bakes in",
        "": "",
    }[how]


def _initializer_misfit(mine: dict[str, np.ndarray], proto: onnx.ModelProto, folder) -> str:
    """A graph with no record: each carried tensor against the initializer of its parameter."""
    inits = {i.name: i for i in proto.graph.initializer}
    for name in sorted(mine):
        init = inits.get(GRAPH_PREFIX + name)
        if init is None:
            return (
                f"carries '{name}' (modules_to_save), and this graph (exported before shareport recorded what it "
                "bakes in) has no initializer of that name to check it against: export the graph again"
            )
        baked = onnx.numpy_helper.to_array(init, base_dir=str(folder))  # reads external data where it is there
        if baked.shape != mine[name].shape or not np.array_equal(baked, mine[name]):
            return f"carries another '{name}' (modules_to_save) than the one the graph bakes in"
    return ""
