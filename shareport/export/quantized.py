"""A quantized adapter in an adapter-mode graph: integer inputs and scales, dequantized in the graph.

A pool tensor stored as integers (``Adapter.quantized``, see ``shareport.quantization``) becomes, in
place of its float slot ``NAME``, the graph inputs

    NAME           its integers, rank first: A (r, n_in) as stored; B transposed, (r, n_out)
                   int8 (r, D), or for int4 uint8 (r, ceil(D / 2)): two values per byte, each row
                   packed on its own in ONNX's INT4 layout (element 2i in the low nibble)
    scale/NAME     its float16 scales, (r, ceil(D / group_size)), as the native format stores them
    scaling/NAME   float32 (1,): the sites' scale s, only on the factor that carries it

each with a same-named initializer (ORT's multi-LoRA slots), so its ``.onnx_adapter`` holds the
integers and scales. Rank first, so the rank stays the one symbolic dim that the packed bytes of
an int4 row do not cut (D, a model dimension, is even in practice; an odd D ends its row with a
zero nibble). The graph rebuilds the float slot exactly as ``slots.graph_tensors`` computes it for
the dequantized adapter, in float32:

    A_g = Transpose(DequantizeLinear(NAME, Cast(scale/NAME, float32), axis=1, block_size=g))    (n_in, r)
    B_g = DequantizeLinear(NAME, Cast(scale/NAME, float32), axis=1, block_size=g) * scaling/NAME  (r, n_out)

then cast to float16 in an fp16 graph. ``q * scale`` is exact in float32 (8 + 11 significant bits),
so the dequantized factor equals the adapter's float tensor bit for bit, and ``* s`` rounds once as
the float export's ``B * s`` does: the graph computes the same ``A_g`` and ``B_g`` as a float32
export of the dequantized adapter. The scale ``s`` is its own input, not folded into the float16
scales: ``s * scale`` is not a float16 in general (s = alpha / r = 8/3, rsLoRA's alpha / sqrt(r)),
and the file's scales stay the native ones. It is an input (not a constant) so that another
adapter brings its own s.

int4: ONNX Runtime's adapter format refuses INT4 tensors (``adapters::utils::CreateOrtValueOverLoraParameter``:
"IsSupportedLoraParameterType(data_type) was false. Lora Param '...': data_type '22'", onnxruntime
1.31, when the file is read), so int4 travels as the packed bytes in a uint8 tensor and the graph
unpacks them: ``BitwiseXor 0x88`` turns each two's complement nibble into offset binary (q + 8),
``BitwiseAnd 15`` and ``BitShift 4`` take the two nibbles, ``Concat`` + ``Reshape`` interleave them,
and ``DequantizeLinear`` with a uint8 zero point of 8 gives ``q * scale``. Bytes: half a byte per
value plus a float16 scale per group, about 0.27 of the float16 file at groups of 64.
Blocked ``DequantizeLinear`` (``block_size``) needs opset 21, so such a graph is exported at 21 or
later. ``scaling`` is 1-d (1,), not a scalar: ORT's adapter format refuses 0-d tensors too ("Lora Param
'...': dims is missing or empty").

A quantized fleet member (``fleet --quantize``): its slots are its own tensors (``slots.fleet_layout``),
each quantized as above with its static rank in the rank's place and ``scaling/NAME`` on every one (each
slot folds its site's s): a ShareA member's B (a B), a two-sided member's core C (k1, k2), grouped along
k2 as stored, taken as an A is (C rank first, dequantized, times s, transposed: C_g = (s C)^T, the float
layout's value). The shared basis stays the graph's constants, their dequantized values: they are in
every member's graph once, and the integers matter for what is swapped.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from converters.quantize import QuantizedTensor

from ..adapter import Adapter, reference
from ..errors import ShareportError
from ..files.quantized import SCALE_PREFIX, stored_records
from .slots import Slot, fleet_layout, scale_carrier

SCALING_PREFIX = "scaling/"
MIN_OPSET = 21  # DequantizeLinear with block_size
INFO_KEY = "quantization"  # in the graph's metadata: graph name -> {"bits", "group_size", "role", "size"}
GRAPH_AXIS = {"A": 1, "B": 0}  # the axis a factor must be grouped along: its model dimension


@dataclasses.dataclass(frozen=True)
class QuantizedSlot:
    """One quantized pool tensor's graph inputs (see the module docstring)."""

    name: str  # the float slot it replaces: also the integers' input name
    role: str  # "A" or "B"
    bits: int
    group_size: int
    size: int  # D: n_in for an A, n_out for a B (a fleet's core: k2)
    rank_dim: str | int  # a fleet member's slot: its static rank
    scaled: bool  # carries the sites' scale s (``slots.scale_carrier``)

    @property
    def scales_name(self) -> str:
        return SCALE_PREFIX + self.name

    @property
    def scaling_name(self) -> str:
        return SCALING_PREFIX + self.name

    @property
    def groups(self) -> int:
        return math.ceil(self.size / self.group_size)

    @property
    def width(self) -> int:
        """The integers' second dim: D, or the packed bytes of a row for int4."""
        return self.size if self.bits == 8 else (self.size + 1) // 2

    def inputs(self, rank: int | str | None = None) -> dict[str, tuple[np.dtype, tuple]]:
        """Graph input name -> (numpy dtype, shape), ``rank`` (default: the symbolic dim) in its place."""
        rank = self.rank_dim if rank is None else rank
        ints = np.dtype(np.int8 if self.bits == 8 else np.uint8)
        out = {self.name: (ints, (rank, self.width)), self.scales_name: (np.dtype(np.float16), (rank, self.groups))}
        if self.scaled:
            out[self.scaling_name] = (np.dtype(np.float32), (1,))
        return out


def records(adapter: Adapter) -> dict[str, QuantizedTensor]:
    """The adapter's slot tensors still held as their integers (a changed tensor is float again): a
    fleet member's own tensors (its shared basis is not a slot), else every used pool tensor."""
    layout = fleet_layout(adapter)
    names = sorted(layout.member) if layout is not None else adapter.used_tensor_names()
    return stored_records(adapter, names)


def plan(adapter: Adapter, slots: dict[str, Slot], name=lambda n: n) -> dict[str, QuantizedSlot]:
    """The quantized slots of ``adapter``'s adapter-mode graph, by graph name (``name`` maps a pool
    name to it); empty for a float adapter."""
    quantized = records(adapter)
    if not quantized:
        return {}
    if any(s.fixed is not None for s in slots.values()):
        return _fleet_plan(quantized, slots, name)
    carrier = scale_carrier(adapter)
    out = {}
    for pool, record in sorted(quantized.items()):
        slot = slots[pool]
        if record.axis != GRAPH_AXIS[slot.role]:
            raise ShareportError(
                f"quantized tensor '{pool}' is grouped along its rank (axis {record.axis}); an "
                "adapter-mode graph dequantizes factors grouped along the model dimension"
            )
        out[name(pool)] = QuantizedSlot(
            name(pool), slot.role, record.bits, record.group_size, slot.size, slot.rank_dim, scaled=slot.role == carrier
        )
    return out


def _fleet_plan(quantized: dict[str, QuantizedTensor], slots: dict[str, Slot], name) -> dict[str, QuantizedSlot]:
    """A fleet member's slots: static, each scaled; a core (k1, k2) is taken as an A (see the docstring)."""
    missing = sorted(set(slots) - set(quantized))
    if missing:  # e.g. a member whose core was trained after quantization: one graph takes one precision
        raise ShareportError(
            f"fleet member tensor '{missing[0]}' is float while its others are quantized; one graph takes "
            "all of a member's tensors in one precision: quantize the member again, or export --mode folded"
        )
    out = {}
    for pool, record in sorted(quantized.items()):
        role = "B" if slots[pool].role == "B" else "A"
        if record.axis != GRAPH_AXIS[role]:
            raise ShareportError(
                f"quantized fleet tensor '{pool}' is grouped along axis {record.axis}; the graph dequantizes "
                f"it along axis {GRAPH_AXIS[role]}"
            )
        rank, size = record.values.shape if role == "A" else reversed(record.values.shape)
        out[name(pool)] = QuantizedSlot(
            name(pool),
            role,
            record.bits,
            group_size=record.group_size,
            size=int(size),
            rank_dim=int(rank),
            scaled=True,
        )
    return out


def graph_opset(requested: int | None, qslots: dict) -> int | None:
    """The opset to export at: at least ``MIN_OPSET`` for a quantized graph (``--opset`` lower is refused)."""
    if not qslots:
        return requested
    if requested is not None and requested < MIN_OPSET:
        raise ShareportError(
            f"--opset {requested} cannot hold a quantized adapter: the graph dequantizes it with "
            f"blocked DequantizeLinear, which needs opset {MIN_OPSET} or later"
        )
    return MIN_OPSET if requested is None else requested


def info(qslots: dict[str, QuantizedSlot]) -> dict:
    """What the graph's metadata records of its quantized inputs (export-adapter checks adapters against it)."""
    if not qslots:
        return {}
    return {
        INFO_KEY: {
            n: {"bits": q.bits, "group_size": q.group_size, "role": q.role, "size": q.size}
            for n, q in sorted(qslots.items())
        }
    }


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int8 (r, D) values in [-8, 7] -> uint8 (r, ceil(D / 2)): each row in ONNX's INT4 layout."""
    rows, size = values.shape
    nibbles = values.to(torch.int16) & 0xF  # two's complement in 4 bits
    if size % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(rows, 1)], dim=1)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8).contiguous()


def slot_arrays(qslot: QuantizedSlot, record: QuantizedTensor, scale: float) -> dict[str, np.ndarray]:
    """One quantized tensor's graph inputs: integers and scales rank first, and s where it carries it."""
    values, scales = record.values, record.scales
    if qslot.role == "B":  # B (n_out, r) -> (r, n_out); its scales (G, r) -> (r, G)
        values, scales = values.T, scales.T
    ints = values.contiguous() if qslot.bits == 8 else pack_rows(values)
    out = {qslot.name: ints.numpy(), qslot.scales_name: scales.contiguous().numpy()}
    if qslot.scaled:
        out[qslot.scaling_name] = np.array([scale], dtype=np.float32)
    return out


def adapter_values(
    adapter: Adapter, qslots: dict[str, QuantizedSlot], name=lambda n: n, *, what: str = "adapter"
) -> dict[str, np.ndarray]:
    """Every quantized slot's arrays for ``adapter`` (``name``: pool name -> graph name). Refuses, in one
    line, an adapter whose tensors are not quantized as the graph takes them."""
    held = {name(pool): (pool, record) for pool, record in records(adapter).items()}
    products = (reference(adapter) or {}).get("products") or {}
    scale_of = {}
    for site in adapter.sites.values():
        scale_of[name(site.a)], scale_of[name(site.b)] = site.scale, site.scale
        if site.b in products:  # a two-sided fleet member's core carries its site's s
            scale_of[name(products[site.b][1])] = site.scale
    out = {}
    for graph_name, qslot in sorted(qslots.items()):
        if graph_name not in held:
            raise ShareportError(
                f"{what} tensor '{graph_name}' is float; this graph takes it quantized (int{qslot.bits} in groups of "
                f"{qslot.group_size}): convert the adapter with --quantize int{qslot.bits} --group-size {qslot.group_size}"
            )
        pool, record = held[graph_name]
        if (record.bits, record.group_size) != (qslot.bits, qslot.group_size):
            raise ShareportError(
                f"{what} tensor '{graph_name}' is int{record.bits} in groups of {record.group_size}; this graph takes "
                f"int{qslot.bits} in groups of {qslot.group_size}"
            )
        out.update(slot_arrays(qslot, record, scale_of[graph_name]))
    return out


def member_values(members: dict[str, Adapter], qslots: dict[str, QuantizedSlot], name, *, fleet_dir) -> dict:
    """Per member of a quantized fleet's graph (by name) its quantized slots' arrays, computed before
    anything is written: a member whose own tensors are float (e.g. trained after quantization) is
    refused in one line naming its folder, since its file could only hold other values than its own."""
    out = {}
    for member_name, member in members.items():
        if qslots and not records(member):
            raise ShareportError(
                f"{Path(fleet_dir) / member_name}: a member of this quantized fleet whose own tensors are float "
                "(trained or converted after quantization); the graph takes every member's as integers: move it "
                "out of the fleet folder, or export it itself (its graph takes float tensors)"
            )
        out[member_name] = adapter_values(member, qslots, name, what=f"fleet member {member_name}")
    return out


def empty_values(qslots: dict[str, QuantizedSlot]) -> dict[str, np.ndarray]:
    """Zero-rank inputs (the graph then computes the base model); s is 0, which changes nothing at rank 0.
    A fleet member's static slots: zeros of their shape (zero scales and s), the same zero update."""
    return {
        n: np.zeros(shape, dtype)
        for q in qslots.values()
        for n, (dtype, shape) in q.inputs(0 if isinstance(q.rank_dim, str) else None).items()
    }


def slots_from_info(graph_info: dict, slots: dict[str, tuple[np.dtype, tuple]]) -> dict[str, QuantizedSlot]:
    """The quantized slots of an exported graph, from its metadata (``info``) and its inputs."""
    out = {}
    for graph_name, entry in sorted((graph_info.get(INFO_KEY) or {}).items()):
        rank_dim = slots[graph_name][1][0]
        out[graph_name] = QuantizedSlot(
            graph_name,
            entry["role"],
            entry["bits"],
            entry["group_size"],
            entry["size"],
            rank_dim,
            scaled=SCALING_PREFIX + graph_name in slots,
        )
    return out


def describe(qslots: dict[str, QuantizedSlot]) -> str:
    """ "int4 in groups of 64" (or the set of schemes a mixed graph takes)."""
    kinds = sorted({(q.bits, q.group_size) for q in qslots.values()})
    return ", ".join(f"int{b} in groups of {g}" for b, g in kinds)


# ----------------------------------------------------------------------------- the graph's part


def dequantize_inputs(ir_model, qslots: dict[str, QuantizedSlot], dtype: torch.dtype) -> None:
    """Replace each quantized slot's float input in ``ir_model`` (an ``onnx_ir`` model traced with float
    slots) by its integer, scale and scaling inputs and the nodes that rebuild the float value."""
    import onnx_ir as ir

    graph = ir_model.graph
    if ir_model.opset_imports.get("", 0) < MIN_OPSET:
        raise ShareportError(
            f"internal: a quantized graph needs opset {MIN_OPSET}, the exporter gave {ir_model.opset_imports.get('')}"
        )
    first = graph.node(0)
    for graph_name, qslot in sorted(qslots.items()):
        old = next(v for v in graph.inputs if v.name == graph_name)
        old.name = f"{graph_name}/float"  # frees the name for the integers' input
        new_inputs = {
            n: ir.Value(name=n, shape=ir.Shape(list(shape)), type=ir.TensorType(ir.DataType.from_numpy(dtype_)))
            for n, (dtype_, shape) in qslot.inputs().items()
        }
        nodes, value = dequantize_nodes(qslot, new_inputs, float16=dtype == torch.float16)
        graph.insert_before(first, nodes)
        old.replace_all_uses_with(value)
        index = list(graph.inputs).index(old)
        graph.inputs.pop(index)
        for offset, new in enumerate(new_inputs.values()):
            graph.inputs.insert(index + offset, new)


def dequantize_nodes(qslot: QuantizedSlot, inputs: dict, float16: bool = False):
    """(nodes, the output value): ``inputs`` (graph name -> ``onnx_ir`` value) -> A_g (n_in, r) or B_g (r, n_out)."""
    import onnx_ir as ir

    nodes = []
    tag = qslot.name

    def op(op_type: str, args, attrs=None, out: str = ""):
        node = ir.Node(
            "",
            op_type,
            args,
            attributes=[_attr(ir, k, v) for k, v in (attrs or {}).items()],
            num_outputs=1,
            name=f"{tag}/{out or op_type}",
        )
        node.outputs[0].name = f"{tag}/{out or op_type}"
        nodes.append(node)
        return node.outputs[0]

    def const(value: np.ndarray, out: str):
        return op("Constant", [], {"value": ir.tensor(value, name=f"{tag}/{out}")}, out)

    ints, scales = inputs[qslot.name], inputs[qslot.scales_name]
    zero_point = None
    if qslot.bits == 4:  # uint8 (r, ceil(D/2)) -> uint8 (r, D) offset binary, q + 8
        offset = op("BitwiseXor", [ints, const(np.array(0x88, np.uint8), "x88")], out="offset")
        low = op("BitwiseAnd", [offset, const(np.array(0x0F, np.uint8), "x0f")], out="low")
        high = op("BitShift", [offset, const(np.array(4, np.uint8), "four")], {"direction": "RIGHT"}, out="high")
        last = const(np.array([-1], np.int64), "last_axis")
        pairs = op(
            "Concat",
            [op("Unsqueeze", [low, last], out="low_1"), op("Unsqueeze", [high, last], out="high_1")],
            {"axis": -1},
            out="pairs",
        )  # (r, ceil(D/2), 2): element 2i, then 2i + 1
        # [-1, 2w] rather than [0, -1]: a zero-rank (empty) input must reshape too
        ints = op("Reshape", [pairs, const(np.array([-1, 2 * qslot.width], np.int64), "row_shape")], out="nibbles")
        if qslot.size % 2:  # drop the padding nibble of each row
            ints = op(
                "Slice",
                [
                    ints,
                    const(np.array([0], np.int64), "zero"),
                    const(np.array([qslot.size], np.int64), "size"),
                    const(np.array([1], np.int64), "one"),
                ],
                out="unpadded",
            )
        zero_point = op(
            "Expand",
            [const(np.array(8, np.uint8), "eight"), op("Shape", [scales], out="scale_shape")],
            out="zero_point",
        )
    scales32 = op("Cast", [scales], {"to": ir.DataType.FLOAT}, out="scales_f32")
    # (r, D) float32, exact: q * scale holds 8 + 11 significant bits
    value = op(
        "DequantizeLinear",
        [ints, scales32] + ([zero_point] if zero_point is not None else []),
        {"axis": 1, "block_size": qslot.group_size},
        out="dequantized",
    )
    if qslot.scaled:
        value = op("Mul", [value, inputs[qslot.scaling_name]], out="scaled")
    if qslot.role == "A":  # (r, n_in) -> A_g = A^T (n_in, r)
        value = op("Transpose", [value], {"perm": [1, 0]}, out="transposed")
    if float16:
        value = op("Cast", [value], {"to": ir.DataType.FLOAT16}, out="float16")
    return nodes, value


def _attr(ir, key: str, value):
    if isinstance(value, ir.DataType):
        return ir.AttrInt64(key, int(value))
    if isinstance(value, int):
        return ir.AttrInt64(key, value)
    if isinstance(value, str):
        return ir.AttrString(key, value)
    if isinstance(value, list):
        return ir.AttrInt64s(key, value)
    return ir.AttrTensor(key, value)


def verify_notes(adapter: Adapter) -> list[str]:
    """What ``verify`` compares for a quantized adapter (its float source is not at hand)."""
    held = records(adapter)
    if not held:
        return []
    kinds = ", ".join(sorted({f"int{r.bits} in groups of {r.group_size}" for r in held.values()}))
    return [
        f"the adapter is quantized ({kinds}): PyTorch runs its dequantized factors, the values its integers "
        "give; the float adapter it was quantized from is not kept, so the quantization error is not measured "
        "here (convert reports it: quantization.relative_error)"
    ]
