"""``shareport verify``: run the exported graph in ONNX Runtime and the same model in PyTorch.

Cases cover several shapes: batch 1 to 3, sequence lengths 1 to 11, and for with-past graphs a
prefill (empty past) and decode steps over a random past. Every output is compared (all
``present.*`` together, as one row); ``top-1`` is the share of positions whose argmax agrees.

The PyTorch side is always fp32 (the ground truth). A comparison passes when

- fp32 graph: max |ORT - PyTorch| <= atol (default 1e-4);
- fp16 graph: max |ORT - PyTorch| <= rtol * max(1, max |PyTorch|), rtol default 2e-2: fp16 has an
  11-bit mantissa (relative step ~1e-3) and errors accumulate over layers, so the bound scales
  with the output's magnitude.

Folded graphs are checked against PyTorch with the adapter *attached* (``LoRALinear`` wrappers,
``base(x) + scale * (x A^T) B^T``), not folded: the reference must not share the exporter's
``fold``, or a fold that got the update wrong would be compared with itself and pass.
Adapter-mode graphs are checked with the adapter active (through ``RunOptions.add_active_adapter``,
with the adapter read from ADAPTER_DIR) against PyTorch with the adapter attached, and without any
adapter against the base model (for an ``--embed-adapter`` graph: also its embedded default
against the adapter, and "no adapter" by feeding zero-rank tensors).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..errors import ShareportError
from ..files.adapters import load_adapter
from ..model import attach, load_base_model
from . import graph_file, runtime
from .ort_adapter import adapter_arrays, check_fits, match_names, read_onnx_adapter
from .slots import check_fleet_member
from ..files.fleet import fleet_members
from .signature import Signature, make_inputs
from .wrapper import call_model

FP32_ATOL = 1e-4
FP16_RTOL = 2e-2
# (batch, sequence, past) per case
PLAIN_CASES = ((2, 5, 0), (3, 11, 0), (1, 1, 0))
PAST_CASES = ((2, 5, 0), (2, 1, 6), (3, 3, 4))


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


@dataclasses.dataclass
class Report:
    graph: str
    mode: str
    dtype: str
    device: str
    tolerance: str
    rows: list[Comparison]
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. adapter names mapped from Olive's

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        fields = {k: v for k, v in data.items() if k not in ("ok", "rows")}
        return cls(**fields, rows=[Comparison(**row) for row in data["rows"]])


class VerifyMismatch(ShareportError):
    """A graph that does not match PyTorch within tolerance; ``report`` says where."""

    def __init__(self, report: "Report", message: str):
        super().__init__(message)
        self.report = report


def limit_for(dtype: str, reference: np.ndarray, atol: float, rtol: float) -> float:
    if dtype == "fp16":
        return rtol * max(1.0, float(np.abs(reference).max()) if reference.size else 0.0)
    return atol


def compare_outputs(
    check: str, case: str, names: list[str], got: list[np.ndarray], want: list[np.ndarray], dtype: str, atol: float, rtol: float
) -> list[Comparison]:
    """One row for the main output, one for all ``present.*`` together."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, g, w in zip(names, got, want):
        groups.setdefault("present.*" if name.startswith("present.") else name, []).append(
            (g.astype(np.float64), w.astype(np.float64))
        )
    rows = []
    for output, pairs in groups.items():
        diff = np.concatenate([np.abs(g - w).ravel() for g, w in pairs])
        reference = np.concatenate([w.ravel() for _, w in pairs])
        top1 = None
        if output == "logits":
            g, w = pairs[0]
            top1 = float((g.argmax(-1) == w.argmax(-1)).mean())
        max_abs = float(diff.max()) if diff.size else 0.0
        limit = limit_for(dtype, reference, atol, rtol)
        rows.append(Comparison(check, case, output, max_abs, float(diff.mean()) if diff.size else 0.0, top1, limit,
                               bool(np.isfinite(diff).all()) and max_abs <= limit))
    return rows


def _feeds(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    return {n: (t.to(dtype) if t.is_floating_point() else t).numpy() for n, t in inputs.items()}


def _torch_outputs(model, sig: Signature, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    fp32 = {n: t.float() if t.is_floating_point() else t for n, t in inputs.items()}
    with torch.no_grad():
        return [t.float().numpy() for t in call_model(model, sig, fp32)]


def verify(graph_dir, base_dir, adapter_dir, atol: float = FP32_ATOL, rtol: float = FP16_RTOL, allow_pickle: bool = False) -> Report:
    proto = graph_file.load_proto(graph_dir)
    info = graph_file.read_info(proto, graph_dir)
    sig = Signature.from_dict(info["signature"])
    graph_dtype = torch.float16 if info["dtype"] == "fp16" else torch.float32
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    model = load_base_model(base_dir, info.get("task_type") or adapter.task_type, carried=adapter.extra_tensors)
    sess = runtime.session(Path(graph_dir) / graph_file.GRAPH_NAME)
    notes: list[str] = []

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
            arrays = adapter_arrays(adapter, slots, "adapter")
        lora = runtime.load_lora(arrays)
        handle = attach(model, adapter)
        checks = [("adapter active", {}, lora, True)]
        if info.get("embedded_adapter"):
            empty = {n: np.zeros([0 if isinstance(d, str) else d for d in shape], dtype) for n, (dtype, shape) in slots.items()}
            checks += [("embedded default", {}, None, True), ("no adapter", empty, None, False)]
        else:
            checks += [("no adapter", {}, None, False)]

    def compare(checks, handle) -> list:
        rows = []
        names = [o.name for o in sess.get_outputs()]
        for batch, seq, past in PAST_CASES if sig.with_past else PLAIN_CASES:
            inputs = make_inputs(sig, batch, seq, past, graph_dtype, seed=batch * 100 + seq,
                                 vocab=int(model.config.vocab_size))
            case = f"b{batch} s{seq}" + (f" p{past}" if sig.with_past else "")
            for check, extra, lora, enabled in checks:
                handle.set_enabled(enabled)
                want = _torch_outputs(model, sig, inputs)
                got = runtime.run(sess, {**_feeds(inputs, graph_dtype), **extra}, lora)
                rows += compare_outputs(check, case, names, got, want, info["dtype"], atol, rtol)
        return rows

    rows = compare(checks, handle)
    if info["mode"] == "adapter" and info.get("fleet"):
        handle.detach()
        rows += _fleet_rows(Path(graph_dir), adapter, model, compare, notes)
    tolerance = f"rtol {rtol:g} of max(1, max|ref|)" if info["dtype"] == "fp16" else f"atol {atol:g}"
    return Report(str(graph_dir), info["mode"], info["dtype"], runtime.device_name(), tolerance, rows, notes)


def _fleet_rows(graph_dir: Path, adapter, model, compare, notes: list[str]) -> list:
    """Every member of the exported member's fleet, swapped in through its ``<member>.onnx_adapter``,
    against PyTorch with that member attached."""
    rows = []
    for name, folder in fleet_members(adapter).items():
        path = graph_dir / graph_file.member_adapter_name(name)
        if not path.is_file():
            notes.append(f"fleet member {name}: no {path.name} in the folder (exported before it joined); not checked")
            continue
        member = load_adapter(folder)
        if sorted(member.extra_tensors) != sorted(adapter.extra_tensors) or not all(
                torch.equal(member.extra_tensors[k], adapter.extra_tensors[k]) for k in adapter.extra_tensors):
            notes.append(f"fleet member {name}: carries its own modules_to_save (e.g. a head), which the graph bakes "
                         "in from the exported member; swapping its cores alone cannot give its outputs; not checked")
            continue
        slots = graph_file.graph_slots(graph_file.load_proto(graph_dir))
        arrays = read_onnx_adapter(path)
        check_fits(arrays, slots, str(path))
        handle = attach(model, member)
        try:
            rows += compare([(f"member {name}", {}, runtime.load_lora(arrays), True)], handle)
        finally:
            handle.detach()
    return rows
