"""``shareport verify``: run the exported graph in ONNX Runtime and the same model in PyTorch.

Cases cover several shapes: batch 1 to 3, sequence lengths 1 to 11, and for with-past graphs a
prefill (empty past) and decode steps over a random past. Every output is compared (all
``present.*`` together, as one row); ``top-1`` is the share of positions whose argmax agrees.

fp32 graphs are compared with PyTorch run in **float64** (the same float32-stored weights and
adapter, computed in float64: exact to float32's eyes), and the limit is set by how far PyTorch's
own float32 run is from it. Per comparison (one case, one output group):

    max |ORT - PyTorch float64| <= max(atol, MULTIPLE x max |PyTorch float32 - PyTorch float64|)

with atol 1e-4 (the floor) and MULTIPLE 8 (``REFERENCE_MULTIPLE``; another ``--atol`` scales it alike,
8 x atol / 1e-4, so the option tightens or loosens the whole limit, and ``--atol 0`` asks for an exact
match). float32 PyTorch is what a fixed
tolerance used to trust as the truth, but its own error grows with the model (bench_onnx's 33M-parameter
Llama: 7e-4 on the logits), so a fixed atol refuses correct exports of every real LLM. A graph is
accepted when it is within a small multiple of the error of the reference everyone accepts; the floor
keeps the old absolute bound where that error is tiny (small models: the limit is exactly atol).
Both sides use the same statistic (max abs over the same elements), so a single wrong position counts.
Why 8: ORT is another float32 implementation (other summation orders, fused kernels; a folded graph
also rounds W + s*B*A to float32, which the attached reference never does). Measured ORT/PyTorch
ratios of those max errors, where above the floor: 0.3 to 2.4 on most model/adapter draws, 3.4 on the
worst (4-layer, hidden 256, random r=16 LoRA); 8 leaves twice that. A real error is far above it: an
adapter scale off by 1.001 gives 50 to 600 times float32's own error (tests/test_verify_tolerance.py).

The float64 run converts the model in place to float64 and back (exact: float64 holds every float32
value), on CPU, once per set of checks: it holds the weights at twice their float32 size for that
while, which is accepted for a check that runs once per export; the float32 copy is not kept beside it.

fp16 graphs follow the same idea, with float16 PyTorch as the reference whose error is measured:

    max |ORT - PyTorch float64| <= max(rtol x max(1, max |PyTorch|), FP16_MULTIPLE x max |PyTorch float16 - PyTorch float64|)

rtol 2e-2 (the floor: fp16's 11-bit mantissa, relative step ~1e-3, errors accumulating over layers)
and FP16_MULTIPLE 4 (another ``--rtol`` scales it alike, 4 x rtol / 2e-2). The fixed share alone
refused correct fp16 exports of real models: on bench_onnx's 33M Llama (random r=16 LoRA) float16
PyTorch itself is up to 0.77 from float64 on its logits, and ORT fp16 0.90; a graph about as close to
the exact result as PyTorch's own fp16 run is as good as fp16 gets on that model. Measured ORT/float16
PyTorch ratios of those max errors: 0.4 to 0.9 (4-layer, hidden 256), 0.5 to 1.9 (the 33M Llama);
4 is twice the worst, smaller than fp32's 8 because float16's own error is already a large share of
the output. What the check can still see is limited by fp16 itself: on those two models an adapter
scaled by 1.001 moves the logits less than float16 PyTorch's own error and passes (as it did under
the fixed share); one scaled by 1.05 fails, 5 to 16 times float16's own error. On small models
PyTorch's fp16 error is far below the floor, so the floor decides and the check is as strict as before. The float16 run is the
model cast in place the way the exporter casts it (``model.half()``; the float32 values are kept
and put back, since float16 cannot hold them), on CPU: torch runs every op of these models in
float16 there, slowly (matmuls without fused kernels), once per set of checks.

Folded graphs are checked against PyTorch with the adapter *attached* (``LoRALinear`` wrappers,
``base(x) + scale * (x A^T) B^T``), not folded: the reference must not share the exporter's
``fold``, or a fold that got the update wrong would be compared with itself and pass.
Adapter-mode graphs are checked with the adapter active (through ``RunOptions.add_active_adapter``,
with the adapter read from ADAPTER_DIR) against PyTorch with the adapter attached, and without any
adapter against the base model (for an ``--embed-adapter`` graph: also its embedded default
against the adapter, and "no adapter" by feeding zero-rank tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ShareportError
from ..files.adapters import load_adapter
from ..model import attach, load_base_model
from . import graph_file, quantized, runtime
from .choices import FP16_MULTIPLE, FP16_RTOL, FP32_ATOL, REFERENCE_MULTIPLE
from .carried import check_baked, graph_inputs, override_feeds, same_carried
from .ort_adapter import adapter_arrays, check_fits, match_names, read_onnx_adapter
from .slots import check_fleet_member
from ..files.fleet import fleet_members
from .signature import Signature, make_inputs
from .wrapper import call_model

# (batch, sequence, past) per case
PLAIN_CASES = ((2, 5, 0), (3, 11, 0), (1, 1, 0))
PAST_CASES = ((2, 5, 0), (2, 1, 6), (3, 3, 4))
REFERENCE_NAMES = {"fp32": "float32", "fp16": "float16"}  # the PyTorch run whose own error sets the limit


@dataclasses.dataclass
class Comparison:
    check: str  # "folded", "adapter active", "no adapter", "embedded default"
    case: str  # "b2 s5 p0"
    output: str
    max_abs: float
    mean_abs: float
    top1: float | None  # share of positions with the same argmax (logits only)
    limit: float
    ok: bool
    # max |PyTorch in the graph's dtype - PyTorch float64| over the same elements (the reference's own
    # error, which sets the limit); None in reports from before fp16 rows had one
    reference_error: float | None = None

    def describe(self, floor: float | None, multiple: float | None, dtype: str = "fp32") -> str:
        """One line: where, measured against allowed, and where the allowed value comes from."""
        where = f"{self.check}, {self.case}, {self.output}"
        if self.reference_error is None:
            return (f"{where}: ORT differs from PyTorch by {self.max_abs:.3g}, allowed {self.limit:.3g} "
                    "(fp16: rtol of max(1, max |PyTorch|))")
        own = f"{multiple:g} x {REFERENCE_NAMES[dtype]} PyTorch's own error {self.reference_error:.3g}"
        bound = f"the floor {floor:g}" if dtype == "fp32" else f"{floor:g} x max(1, max |PyTorch|)"
        return (f"{where}: ORT differs from float64 PyTorch by {self.max_abs:.3g}, allowed {self.limit:.3g} "
                f"(the larger of {own} and {bound})")


@dataclasses.dataclass
class Report:
    graph: str
    mode: str
    dtype: str
    device: str
    tolerance: str
    rows: list[Comparison]
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. adapter names mapped from Olive's
    # limit = max(floor, multiple x reference_error); fp16: floor is rtol, of max(1, max |PyTorch|)
    floor: float | None = None
    multiple: float | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def rule(self) -> str:
        """How the limits were set, in words."""
        if self.multiple is None:
            return "ORT against float32 PyTorch; limit: the tolerance above"
        errors = [r.reference_error for r in self.rows if r.reference_error is not None]
        name = REFERENCE_NAMES[self.dtype]
        own = f"; {name} PyTorch's own error here: up to {max(errors):.2g}" if errors else ""
        floor = f"the floor {self.floor:g}" if self.dtype == "fp32" else f"{self.floor:g} x max(1, max |PyTorch|)"
        return (f"ORT against float64 PyTorch; limit per comparison: the larger of {floor} and "
                f"{self.multiple:g} x {name} PyTorch's own error against float64{own}")

    def failure(self) -> str:
        """The failed comparison furthest over its limit, with measured and allowed values ('' if none)."""
        failed = [r for r in self.rows if not r.ok]
        if not failed:
            return ""
        worst = max(failed, key=lambda r: r.max_abs / r.limit if math.isfinite(r.max_abs) and r.limit > 0 else math.inf)
        more = f" (and {len(failed) - 1} more comparisons)" if len(failed) > 1 else ""
        return worst.describe(self.floor, self.multiple, self.dtype) + more

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row in data["rows"]:  # only rows with a float64 run carry their reference's error
            if row["reference_error"] is None:
                del row["reference_error"]
        data["ok"] = self.ok
        if self.multiple is not None:
            data["rule"] = self.rule
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        fields = {k: v for k, v in data.items() if k not in ("ok", "rows", "rule")}
        return cls(**fields, rows=[Comparison(**row) for row in data["rows"]])


class VerifyMismatch(ShareportError):
    """A graph that does not match PyTorch within tolerance; ``report`` says where."""

    def __init__(self, report: "Report", message: str):
        super().__init__(message)
        self.report = report


def limit_for(dtype: str, reference: np.ndarray, atol: float, rtol: float, *, own_error: float | None = None,
              multiple: float = REFERENCE_MULTIPLE) -> float:
    """The larger of a floor and ``multiple`` x the reference's own error (``own_error``: max |PyTorch
    in the graph's dtype - PyTorch float64|). The floor: fp32 atol; fp16 rtol x max(1, max |reference|).
    A non-finite own error (PyTorch overflowed) widens nothing: its failure is no excuse for ORT's."""
    floor = rtol * max(1.0, float(np.abs(reference).max()) if reference.size else 0.0) if dtype == "fp16" else atol
    if own_error is None or not math.isfinite(own_error):
        return floor
    return max(floor, multiple * own_error)


def compare_outputs(
    check: str, case: str, names: list[str], got: list[np.ndarray], want: list[np.ndarray], dtype: str, atol: float,
    rtol: float, *, own: list[np.ndarray] | None = None, multiple: float = REFERENCE_MULTIPLE,
) -> list[Comparison]:
    """One row for the main output, one for all ``present.*`` together.

    ``want`` is the reference ORT is measured against; with ``own``, ``want`` is PyTorch in float64
    and ``own`` PyTorch's outputs in the graph's dtype, whose distance from ``want`` sets the limit
    (:func:`limit_for`).
    """
    groups: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        mine = () if own is None else (own[i].astype(np.float64),)
        groups.setdefault("present.*" if name.startswith("present.") else name, []).append(
            (g.astype(np.float64), w.astype(np.float64), *mine)
        )
    rows = []
    for output, pairs in groups.items():
        diff = np.concatenate([np.abs(p[0] - p[1]).ravel() for p in pairs])
        reference = np.concatenate([p[1].ravel() for p in pairs])
        own_error = None
        if own is not None:
            errors = np.concatenate([np.abs(p[2] - p[1]).ravel() for p in pairs])
            own_error = float(errors.max()) if errors.size else 0.0
        top1 = None
        if output == "logits":
            g, w = pairs[0][:2]
            top1 = float((g.argmax(-1) == w.argmax(-1)).mean())
        max_abs = float(diff.max()) if diff.size else 0.0
        limit = limit_for(dtype, reference, atol, rtol, own_error=own_error, multiple=multiple)
        rows.append(Comparison(check, case, output, max_abs, float(diff.mean()) if diff.size else 0.0, top1, limit,
                               bool(np.isfinite(diff).all()) and max_abs <= limit, own_error))
    return rows


def _feeds(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    return {n: (t.to(dtype) if t.is_floating_point() else t).numpy() for n, t in inputs.items()}


def _torch_outputs(model, sig: Signature, inputs: dict[str, torch.Tensor], *,
                   dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    """The model's outputs as numpy in ``dtype``, floating inputs cast to it (the model must hold it)."""
    cast = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    with torch.no_grad():
        return [t.to(dtype).numpy() for t in call_model(model, sig, cast)]


@contextlib.contextmanager
def _in_float64(model: nn.Module):
    """``model`` with its floating parameters and buffers in float64 inside the block, then each back to
    its own dtype (exact: float64 holds every float32/16 value). Converted in place, so the weights
    take twice their float32 memory while inside, not three times; parameter objects (the attached
    adapter's, shared between sites) stay the same objects."""
    kept = [(store, key, t.dtype) for module in model.modules() for store in (module._parameters, module._buffers)
            for key, t in store.items() if t is not None and t.is_floating_point()]
    if any(t.device.type != "cpu" for t in model.parameters()):
        raise ShareportError("verify: the float64 reference runs on CPU; the model is elsewhere")
    try:
        model.double()
        yield model
    finally:
        for store, key, dtype in kept:
            t = store[key]
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(dtype)
            else:
                store[key] = t.to(dtype)


@contextlib.contextmanager
def _in_float16(model: nn.Module):
    """``model`` cast to float16 in place inside the block, as the exporter casts it, then its own
    tensors put back: float16 cannot hold float32's values, so they are kept (the weights take 1.5
    times their float32 memory while inside), not converted back. Shared parameters once each."""
    kept, seen = [], set()
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and t.is_floating_point() and (id(t), key) not in seen:
                    seen.add((id(t), key))
                    kept.append((store, key, t, t.data))
    try:
        for store, key, t, data in kept:
            if isinstance(t, nn.Parameter):
                t.data = data.half()
            else:
                store[key] = data.half()
        yield model
    finally:
        for store, key, t, data in kept:
            if isinstance(t, nn.Parameter):
                t.data = data
            else:
                store[key] = t


def verify(graph_dir, base_dir, adapter_dir, atol: float = FP32_ATOL, rtol: float = FP16_RTOL, allow_pickle: bool = False,
           *, multiple: float = REFERENCE_MULTIPLE) -> Report:
    """Compare the graph in ONNX Runtime with the model in PyTorch (see the module's docstring for the
    limits: fp32 against float64 PyTorch, within ``max(atol, multiple x float32 PyTorch's own error)``).

    ``multiple`` is the multiple at the default atol; another atol scales it alike
    (``multiple x atol / FP32_ATOL``), so ``atol`` tightens or loosens the whole limit, also where
    float32's own error decides it: atol 0 asks for an exact match, as it always did.
    """
    fp16_multiple = FP16_MULTIPLE * rtol / FP16_RTOL  # --rtol scales fp16's whole limit as --atol does fp32's
    multiple = multiple * atol / FP32_ATOL
    proto = graph_file.load_proto(graph_dir)
    info = graph_file.read_info(proto, graph_dir)
    sig = Signature.from_dict(info["signature"])
    graph_dtype = torch.float16 if info["dtype"] == "fp16" else torch.float32
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    # another adapter's head in the graph: refused in one line naming it, not left to fail row by row
    check_baked(info, adapter, str(adapter_dir), proto=proto, folder=graph_dir)
    model = load_base_model(base_dir, info.get("task_type") or adapter.task_type, carried=adapter.extra_tensors)
    sess = runtime.session(Path(graph_dir) / graph_file.GRAPH_NAME)
    notes: list[str] = quantized.verify_notes(adapter)

    # each check: (name, ORT extra feeds, ORT adapter, PyTorch adapter enabled?)
    if info["mode"] == "folded":
        handle = attach(model, adapter)  # an independent path: the export folded with surgery.fold
        checks = [("folded", {}, None, True)]
    else:
        check_fleet_member(info, adapter, str(adapter_dir))
        slots = graph_file.graph_slots(proto)
        # the folder's own adapter file is what gets deployed: run that one against PyTorch
        # with --adapter, so a shipped file that is not ADAPTER_DIR's values fails
        shipped = Path(graph_dir) / graph_file.ADAPTER_NAME
        if info.get("fleet"):  # a fleet's graph: this member's own file (adapter.onnx_adapter is the exported one's)
            shipped = Path(graph_dir) / graph_file.member_adapter_name(Path(adapter_dir).resolve().name)
        if shipped.is_file():
            arrays, note = match_names(read_onnx_adapter(shipped), slots, str(shipped))
            notes += [note] if note else []
            check_fits(arrays, slots, str(shipped))
        else:
            arrays = adapter_arrays(adapter, slots, "adapter", carried=graph_inputs(info), graph_info=info)
        lora = runtime.load_lora(arrays)
        handle = attach(model, adapter)
        checks = [("adapter active", {}, lora, True)]
        # with no adapter active, PyTorch keeps ADAPTER_DIR's carried tensors (a head): so does ORT, fed
        # them where the graph takes them and its defaults are another fleet member's
        carried = override_feeds(info, adapter, graph_dtype)
        if info.get("embedded_adapter"):
            empty = {n: np.zeros([0 if isinstance(d, str) else d for d in shape], dtype)
                     for n, (dtype, shape) in slots.items() if n not in graph_inputs(info)}
            checks += [("embedded default", {}, None, True), ("no adapter", {**empty, **carried}, None, False)]
        else:
            checks += [("no adapter", carried, None, False)]

    fp16 = info["dtype"] == "fp16"

    def compare(checks, handle) -> list:
        names = [o.name for o in sess.get_outputs()]
        runs = []  # (check, case, inputs, enabled, ORT's outputs, PyTorch float32's)
        for batch, seq, past in PAST_CASES if sig.with_past else PLAIN_CASES:
            inputs = make_inputs(sig, batch, seq, past, graph_dtype, seed=batch * 100 + seq,
                                 vocab=int(model.config.vocab_size))
            case = f"b{batch} s{seq}" + (f" p{past}" if sig.with_past else "")
            for check, extra, lora, enabled in checks:
                handle.set_enabled(enabled)
                want = _torch_outputs(model, sig, inputs)
                got = runtime.run(sess, {**_feeds(inputs, graph_dtype), **extra}, lora)
                runs.append((check, case, inputs, enabled, got, want))
        if fp16:  # the reference's own error: PyTorch cast to float16 as the exporter casts the model
            with _in_float16(model):
                owns = []
                for _, _, inputs, enabled, _, _ in runs:
                    handle.set_enabled(enabled)
                    owns.append(_torch_outputs(model, sig, inputs, dtype=torch.float16))
        else:
            owns = [want for *_, want in runs]
        rows = []
        with _in_float64(model):  # every float64 run of this set in one conversion
            for (check, case, inputs, enabled, got, _), own in zip(runs, owns):
                handle.set_enabled(enabled)
                exact = _torch_outputs(model, sig, inputs, dtype=torch.float64)
                rows += compare_outputs(check, case, names, got, exact, info["dtype"], atol, rtol, own=own,
                                        multiple=fp16_multiple if fp16 else multiple)
        return rows

    rows = compare(checks, handle)
    if info["mode"] == "adapter" and info.get("fleet"):
        handle.detach()
        rows += _fleet_rows(Path(graph_dir), adapter, model, compare, slots=slots,
                            takes_carried=bool(graph_inputs(info)), notes=notes)
    if fp16:
        widened = [r.limit for r in rows if r.reference_error is not None and r.limit == fp16_multiple * r.reference_error]
        tolerance = f"rtol {rtol:g} of max(1, max|ref|)" + (
            f" or {fp16_multiple:g} x float16 PyTorch's own error, up to {max(widened):.2g}" if widened else "")
        return Report(str(graph_dir), info["mode"], info["dtype"], runtime.device_name(), tolerance, rows, notes,
                      floor=rtol, multiple=fp16_multiple)
    widest = max((r.limit for r in rows), default=atol)
    tolerance = f"atol {atol:g}" if widest <= atol else (
        f"atol {atol:g} or {multiple:g} x float32 PyTorch's own error, up to {widest:.2g}")
    return Report(str(graph_dir), info["mode"], info["dtype"], runtime.device_name(), tolerance, rows, notes,
                  floor=atol, multiple=multiple)


def _fleet_rows(graph_dir: Path, adapter, model, compare, *, slots: dict, takes_carried: bool, notes: list[str]) -> list:
    """Every member of the exported member's fleet, swapped in through its ``<member>.onnx_adapter``
    (cores, and carried tensors such as its head where the graph takes them), against PyTorch with
    that member attached (its head included)."""
    rows = []
    for name, folder in fleet_members(adapter).items():
        path = graph_dir / graph_file.member_adapter_name(name)
        if not path.is_file():
            notes.append(f"fleet member {name}: no {path.name} in the folder (exported before it joined); not checked")
            continue
        member = load_adapter(folder)
        if not takes_carried and not same_carried(member, adapter):  # checked all the same: it fails, as it should
            notes.append(f"fleet member {name}: carries other modules_to_save (e.g. a head) than the verified adapter, "
                         "and this graph bakes one in (an export from before fleet heads could swap): export it again")
        arrays = read_onnx_adapter(path)
        check_fits(arrays, slots, str(path))
        handle = attach(model, member)
        try:
            rows += compare([(f"member {name}", {}, runtime.load_lora(arrays), True)], handle)
        finally:
            handle.detach()
    return rows
