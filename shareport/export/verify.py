"""``shareport verify``: run the exported graph in ONNX Runtime and the same model in PyTorch.

Cases cover several shapes: batch 1 to 3, sequence lengths 1 to 11, and for with-past graphs a
prefill (empty past) and decode steps over a random past. Every output is compared (all
``present.*`` together, as one row); ``top-1`` is the share of positions whose argmax agrees.

The limits (fp32 against a float64 run, with a multiple of float32 PyTorch's own error; fp16 likewise
against float16 PyTorch's) are ``comparison.py``'s.

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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ShareportError
from ..files.adapters import load_adapter
from ..files.fleet import fleet_members
from ..model import attach, load_base_model
from . import graph_file, quantized, runtime
from .carried import check_baked, graph_inputs, override_feeds, same_carried
from .choices import FP16_MULTIPLE, FP16_RTOL, FP32_ATOL, REFERENCE_MULTIPLE
from .comparison import Comparison, Report, VerifyMismatch, compare_outputs, limit_for  # noqa: F401 (verify's API)
from .ort_adapter import adapter_arrays, check_fits, match_names, read_onnx_adapter
from .signature import Signature, make_inputs
from .slots import check_fleet_member
from .wrapper import call_model

# (batch, sequence, past) per case
PLAIN_CASES = ((2, 5, 0), (3, 11, 0), (1, 1, 0))
PAST_CASES = ((2, 5, 0), (2, 1, 6), (3, 3, 4))


def _feeds(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    return {n: (t.to(dtype) if t.is_floating_point() else t).numpy() for n, t in inputs.items()}


def _torch_outputs(
    model, sig: Signature, inputs: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32
) -> list[np.ndarray]:
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
    kept = [
        (store, key, t.dtype)
        for module in model.modules()
        for store in (module._parameters, module._buffers)
        for key, t in store.items()
        if t is not None and t.is_floating_point()
    ]
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


def verify(
    graph_dir,
    base_dir,
    adapter_dir,
    atol: float = FP32_ATOL,
    rtol: float = FP16_RTOL,
    allow_pickle: bool = False,
    *,
    multiple: float = REFERENCE_MULTIPLE,
) -> Report:
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
            empty = {
                n: np.zeros([0 if isinstance(d, str) else d for d in shape], dtype)
                for n, (dtype, shape) in slots.items()
                if n not in graph_inputs(info)
            }
            checks += [("embedded default", {}, None, True), ("no adapter", {**empty, **carried}, None, False)]
        else:
            checks += [("no adapter", carried, None, False)]

    fp16 = info["dtype"] == "fp16"

    def compare(checks, handle) -> list:
        names = [o.name for o in sess.get_outputs()]
        runs = []  # (check, case, inputs, enabled, ORT's outputs, PyTorch float32's)
        for batch, seq, past in PAST_CASES if sig.with_past else PLAIN_CASES:
            inputs = make_inputs(
                sig, batch, seq, past, graph_dtype, seed=batch * 100 + seq, vocab=int(model.config.vocab_size)
            )
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
                rows += compare_outputs(
                    check,
                    case,
                    names,
                    got,
                    exact,
                    info["dtype"],
                    atol,
                    rtol,
                    own=own,
                    multiple=fp16_multiple if fp16 else multiple,
                )
        return rows

    rows = compare(checks, handle)
    if info["mode"] == "adapter" and info.get("fleet"):
        handle.detach()
        rows += _fleet_rows(
            Path(graph_dir), adapter, model, compare, slots=slots, takes_carried=bool(graph_inputs(info)), notes=notes
        )
    # fp16: relative to the reference's scale, against float16 PyTorch; fp32: absolute, against float32
    floor, floor_text, limit_multiple, reference = (
        (rtol, f"rtol {rtol:g} x max(1, max|ref|)", fp16_multiple, "float16")
        if fp16
        else (atol, f"{atol:g}", multiple, "float32")
    )
    return Report(
        str(graph_dir),
        info["mode"],
        info["dtype"],
        runtime.device_name(),
        _tolerance(floor_text, limit_multiple, reference, rows),
        rows,
        notes,
        floor=floor,
        multiple=limit_multiple,
    )


def _tolerance(floor: str, multiple: float, reference: str, rows) -> str:
    """What was checked, with the numbers used: the larger of the floor and ``multiple`` x the
    reference run's own error (the largest over the comparisons), and the widest limit that gave."""
    own = max((r.reference_error for r in rows if r.reference_error is not None), default=0.0)
    widest = max((r.limit for r in rows), default=0.0)
    return f"tolerance max({floor}, {multiple:g} x {reference} PyTorch's own error {own:.2g}) = {widest:.2g} at most"


def _fleet_rows(
    graph_dir: Path, adapter, model, compare, *, slots: dict, takes_carried: bool, notes: list[str]
) -> list:
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
            notes.append(
                f"fleet member {name}: carries other modules_to_save (e.g. a head) than the verified adapter, "
                "and this graph bakes one in (an export from before fleet heads could swap): export it again"
            )
        arrays = read_onnx_adapter(path)
        check_fits(arrays, slots, str(path))
        handle = attach(model, member)
        try:
            rows += compare([(f"member {name}", {}, runtime.load_lora(arrays), True)], handle)
        finally:
            handle.detach()
    return rows
