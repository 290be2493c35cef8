"""``shareport export``: base model + adapter -> a self-contained ONNX folder.

- folded: the adapter is merged into the weights (``surgery.fold``); a plain graph.
- adapter: every site computes ``x W^T + (x A_g) B_g`` with each pool tensor one graph input
  (see ``slots``), which also has a same-named initializer: empty (rank 0, so running without an
  adapter gives the base model) or, with ``embed``, the exported adapter's values. ORT's
  multi-LoRA API swaps them at run time; ``adapter.onnx_adapter`` holds the exported adapter.

Carried tensors (PEFT ``modules_to_save``, e.g. a classifier head) are not LoRA factors: they are
written into the base weights in both modes, so "no adapter" means the base model with those
modules. The one exception: a fleet member's adapter-mode graph whose fleet's members carry different
tensors takes them as inputs too (``carried``), with the exported member's as defaults.

The exporter's optimiser constant-folds only initializers; the adapter tensors are plain graph
inputs while it runs and become overridable only afterwards, so it cannot fold them away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from ..adapter import Adapter, reference
from ..errors import ShareportError
from ..files.adapters import load_adapter
from ..files.atomic import atomic_dir, check_output
from ..files.fleet import fleet_members
from ..files.tensorfile import read_header
from ..model import attach, fold, load_base_model
from ..model.base import CAUSAL_LM_CLASS, auto_class_name, read_base_config
from . import graph_file, quantized
from .carried import baked_section, carried_slots, carried_tensors, fleet_needs_inputs, info_section
from .choices import ADAPTER_NAMES, MODES, TORCH_DTYPES
from .genai_config import special_tokens, write_genai_config
from .ort_adapter import OLIVE_SUFFIX, write_onnx_adapter
from .signature import Signature, dynamic_axes, make_inputs, signature_for
from .slots import Slot, empty_tensors, fleet_layout, graph_tensors, slots_for
from .verify import FP16_RTOL, FP32_ATOL, Report, VerifyMismatch
from .verify import verify as verify_graph
from .wrapper import graph_module

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_DTYPES.items()}
FORMAT_VERSION = 1
# Memory an export needs, above the interpreter: MEMORY_FACTOR[dtype] x the base's float32 weight
# bytes + MEMORY_FIXED. The base is loaded in float32 (and cast for fp16), the exporter's graph
# and ONNX Runtime's session hold more copies, and verification loads the base again for PyTorch.
# Measured peaks above a fixed ~120 MiB (tests/benchmarks/bench_export_memory.py, MiniLM-L6, 22.7M
# parameters, 87 MiB in float32, verified): folded fp32 3.9x, folded fp16 2.75x, adapter fp32 4.06x;
# with a margin here.
MEMORY_FACTOR = {"fp32": 4.5, "fp16": 3.5}
MEMORY_FIXED = 256 * 2**20
SKIP_MEMORY_CHECK = "SHAREPORT_SKIP_MEMORY_CHECK"  # =1: export even when the estimate exceeds what is free
# example sizes for tracing: a dynamic dim traced at size 0 or 1 gets specialised, so >= 2
EXAMPLE = dict(batch=2, seq=3, past=5, rank=4)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    mode: str = "folded"
    with_past: bool = False
    dtype: str = "fp32"
    opset: int | None = None
    embed_adapter: bool = False
    adapter_names: str = "shareport"

    def check(self) -> None:
        if self.mode not in MODES:
            raise ShareportError(f"unknown export mode '{self.mode}' (expected {' or '.join(MODES)})")
        if self.dtype not in DTYPES:
            raise ShareportError(f"unknown dtype '{self.dtype}' (expected {' or '.join(DTYPES)})")
        if self.opset is not None:
            import onnx

            newest = onnx.defs.onnx_opset_version()
            # the dynamo exporter emits opset 18 and converts from there; lower targets fail
            if not 18 <= self.opset <= newest:
                raise ShareportError(f"--opset {self.opset} is not supported: use 18 to {newest}")
        if self.adapter_names not in ADAPTER_NAMES:
            raise ShareportError(
                f"unknown adapter names '{self.adapter_names}' (expected {' or '.join(ADAPTER_NAMES)})"
            )
        if self.adapter_names != "shareport" and self.mode != "adapter":
            raise ShareportError("--adapter-names needs --mode adapter (a folded graph has no adapter inputs)")
        if self.embed_adapter and self.mode != "adapter":
            raise ShareportError("--embed-adapter needs --mode adapter (a folded graph has no adapter inputs)")


def prepare_model(base_dir, adapter: Adapter, mode: str, dtype: torch.dtype) -> torch.nn.Module:
    """The base model with the adapter folded in (folded) or only its carried modules (adapter)."""
    model = load_base_model(base_dir, adapter.task_type, carried=adapter.extra_tensors)
    if mode == "folded":
        fold(model, adapter)
    else:
        attach(model, adapter).detach()  # attach loads the carried modules; detach drops the LoRA wrappers
    return model.to(dtype)


def _trace_inputs(sig: Signature, slots: dict[str, Slot], dtype: torch.dtype):
    """Example inputs and their dynamic shapes, flat and in the graph's input order."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}

    def dim(name: str) -> Dim:
        return dims.setdefault(name, Dim(name))

    examples = make_inputs(sig, EXAMPLE["batch"], EXAMPLE["seq"], EXAMPLE["past"] if sig.with_past else 0, dtype)
    axes = dynamic_axes(sig)
    gen = torch.Generator().manual_seed(0)
    for name, slot in sorted(slots.items()):
        examples[name] = torch.randn(slot.shape(EXAMPLE["rank"]), generator=gen).to(dtype)
        axes[name] = {} if slot.fixed is not None else {1 if slot.role == "A" else 0: slot.rank_dim}
    shapes = tuple({axis: dim(n) for axis, n in axes[name].items()} for name in examples)
    return tuple(examples.values()), shapes


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx reports progress and warnings on stdout/stderr; shareport shows its own."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def trace_to_onnx(
    model,
    sig: Signature,
    slots: dict[str, Slot],
    wiring: dict,
    dtype: torch.dtype,
    opset: int | None,
    constants: dict[str, torch.Tensor] | None = None,
    *,
    carried=(),
):
    """``torch.onnx.export(dynamo=True)`` of the flat wrapper; returns the ``onnx_ir`` model.
    ``carried``: slots that stand in for the model's parameters of the same names."""
    args, shapes = _trace_inputs(sig, slots, dtype)
    with graph_module(model, sig, wiring, constants, carried=carried) as module, _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                optimize=True,
                verbose=False,
                opset_version=opset,
                input_names=module.input_names,
                output_names=sig.output_names,
                dynamic_shapes=(shapes,),  # forward(*flat): one entry, the tuple for the *args
            )
        except Exception as exc:
            cause = exc.__cause__ or exc  # torch.onnx wraps torch.export's error in a long report
            raise ShareportError(
                f"torch.onnx.export failed for {type(model).__name__}: {type(cause).__name__}: {str(cause).splitlines()[0]}"
            ) from exc
    return program.model


@contextlib.contextmanager
def _stages(enabled: bool, total: int):
    """A one-line progress display on stderr; yields ``stage(name)``, called as each stage begins."""
    from tqdm import tqdm

    bar = tqdm(
        total=total, desc="export: ", file=sys.stderr, disable=not enabled, bar_format="{desc}[{n}/{total}, {elapsed}]"
    )
    started = [False]

    def stage(name: str) -> None:
        if started[0]:
            bar.update()
        started[0] = True
        bar.set_description(f"export: {name}")

    try:
        yield stage
        bar.update()
    finally:
        bar.close()


def _write_member_adapters(
    members: dict[str, Adapter], folder: Path, dtype: torch.dtype, *, name, carried: bool, integers: dict
) -> None:
    """``<member>.onnx_adapter`` for every member of the exported member's fleet: its cores (a quantized
    fleet's: their integers and scales, ``integers``), and its carried tensors where the graph takes them."""
    for member_name, member in members.items():
        values = {name(n): t.numpy() for n, t in graph_tensors(member, dtype).items()}
        values.update(integers[member_name])
        if carried:
            values.update({n: t.numpy() for n, t in carried_tensors(member, dtype).items()})
        write_onnx_adapter(values, folder / graph_file.member_adapter_name(member_name))


def _fleet_adapters(adapter: Adapter, layout) -> tuple[dict[str, Adapter], bool]:
    """(every member of the exported member's fleet, by name; whether the graph takes carried tensors
    as inputs): read before any output, so a member that cannot fit the graph stops the export first."""
    folders = fleet_members(adapter) if layout is not None else {}
    members = {n: load_adapter(folder) for n, folder in folders.items()}
    return members, bool(members) and fleet_needs_inputs(adapter, members, {n: str(f) for n, f in folders.items()})


def _info(options: ExportOptions, sig: Signature, adapter: Adapter, ir_model, layout=None, carried=None) -> dict:
    """What verify and export-adapter need to know about the graph (stored in its metadata): with the
    carried tensors either the inputs' defaults or what was baked in, so another adapter's are refused."""
    fleet = {"fleet": {"sha256": layout.sha256, "members": sorted(fleet_members(adapter))}} if layout else {}
    return {
        **fleet,
        **(info_section(carried) if carried else baked_section(adapter, DTYPES[options.dtype])),
        "format_version": FORMAT_VERSION,
        "mode": options.mode,
        "dtype": options.dtype,
        "embedded_adapter": options.embed_adapter,
        "adapter_names": options.adapter_names,
        "signature": sig.to_dict(),
        "task_type": adapter.task_type,
        "adapter_form": adapter.form,
        "opset": ir_model.opset_imports.get("", None),
    }


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    report: Report | None  # the verification of the published graph (None with verify=False)
    genai_config: str = ""  # what was done about onnxruntime-genai's config (written, or why not)
    warnings: tuple[str, ...] = ()  # e.g. a base without tokenizer files: the folder cannot generate from text

    def __fspath__(self) -> str:
        return str(self.path)


def base_parameters(base_dir) -> int:
    """Parameters in the base's safetensors weights, from their (validated) headers: nothing is loaded."""
    total = 0
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        total += sum(math.prod(entry["shape"]) for entry in read_header(path).values())
    return total


def export_memory(base_dir, dtype: str) -> int:
    """Estimated peak bytes of ``export`` (with verification) for this base: see ``MEMORY_FACTOR``."""
    return int(MEMORY_FACTOR[dtype] * 4 * base_parameters(base_dir)) + MEMORY_FIXED


def available_memory() -> int | None:
    """Bytes the system can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(base_dir, dtype: str) -> None:
    """Refuse, before anything is loaded, an export the machine's free memory cannot hold."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return
    need, have = export_memory(base_dir, dtype), available_memory()
    if have is not None and need > have:
        hint = "--dtype fp16, " if dtype == "fp32" else ""
        raise ShareportError(
            f"{base_dir}: exporting this base ({base_parameters(base_dir) / 1e9:.2f}B parameters, {dtype}) needs "
            f"about {need / 2**30:.1f} GiB of memory and {have / 2**30:.1f} GiB is available; free memory, "
            f"try {hint}or set {SKIP_MEMORY_CHECK}=1 to export anyway"
        )


def export(
    adapter_dir,
    base_dir,
    out,
    options: ExportOptions,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    verify: bool = True,
    atol: float = FP32_ATOL,
    rtol: float = FP16_RTOL,
) -> ExportResult:
    """Export, verify against PyTorch, and only then publish the folder (atomically).

    The graph is verified in its temporary folder before it is renamed into place: a graph
    that does not match PyTorch within tolerance is never published (:class:`VerifyMismatch`,
    which carries the report). ``verify=False`` publishes without checking.
    """
    options.check()
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)  # inputs, then outputs, then the slow part
    config = read_base_config(base_dir)
    # genai_config.json's special tokens: a base without an eos id is refused here, before the slow part
    causal = auto_class_name(adapter.task_type, config) == CAUSAL_LM_CLASS
    tokens = special_tokens(base_dir) if options.with_past and causal else None
    dtype, adapter_mode = DTYPES[options.dtype], options.mode == "adapter"
    layout = fleet_layout(adapter) if adapter_mode else None
    members, takes_carried = _fleet_adapters(adapter, layout)
    name = (lambda n: n + OLIVE_SUFFIX) if options.adapter_names == "olive" else (lambda n: n)
    # a quantized adapter's slots take its integers and scales, dequantized in the graph (opset >= 21)
    qslots = quantized.plan(adapter, slots_for(adapter), name) if adapter_mode else {}
    opset = quantized.graph_opset(options.opset, qslots)
    # every member file checked (and its integers taken) before the slow part; the fleet folder names it
    integers = (
        quantized.member_values(members, qslots, name, fleet_dir=Path(reference(adapter)["shared"]).parent)
        if members
        else {}
    )
    check_output(out, overwrite, [adapter_dir, base_dir])
    check_memory(base_dir, options.dtype)
    report = None
    with _stages(progress, 4 + verify) as stage:
        stage("loading")
        model = prepare_model(base_dir, adapter, options.mode, dtype)
        sig = signature_for(model, options.with_past)
        slots = (
            {name(n): dataclasses.replace(s, name=name(n)) for n, s in slots_for(adapter).items()}
            if adapter_mode
            else {}
        )
        values = {name(n): t.numpy() for n, t in graph_tensors(adapter, dtype).items()} if adapter_mode else {}
        values.update(quantized.adapter_values(adapter, qslots, name))
        # carried inputs keep their parameter names under either naming (see ``carried``)
        carried = {n: t.numpy() for n, t in carried_tensors(adapter, dtype).items()} if takes_carried else {}

        stage("tracing and converting (slowest step)")
        wiring = {path: (name(s.a), name(s.b)) for path, s in adapter.sites.items()} if adapter_mode else {}
        constants = {}
        if layout is not None:  # a fleet member: the shared basis is part of the graph, its cores are the slots
            constants = {n: t.to(dtype) for n, t in layout.constants.items()}
            wiring = {p: tuple(n if n in constants else name(n) for n in chain) for p, chain in layout.chains.items()}
        ir_model = trace_to_onnx(
            model, sig, {**slots, **carried_slots(carried)}, wiring, dtype, opset, constants, carried=sorted(carried)
        )
        if qslots:
            quantized.dequantize_inputs(ir_model, qslots, dtype)

        stage("adding adapter slots")
        defaults = (
            values
            if options.embed_adapter
            else {**{n: t.numpy() for n, t in empty_tensors(slots, dtype).items()}, **quantized.empty_values(qslots)}
        )
        graph_file.make_overridable(ir_model, {**defaults, **carried})  # carried: the exported member's, always

        stage("writing")
        with atomic_dir(out, overwrite=overwrite, inputs=[adapter_dir, base_dir]) as tmp:
            graph_file.save_graph(
                ir_model,
                tmp,
                {**_info(options, sig, adapter, ir_model, layout=layout, carried=carried), **quantized.info(qslots)},
            )
            if adapter_mode:
                write_onnx_adapter({**values, **carried}, tmp / graph_file.ADAPTER_NAME)
            if layout is not None:
                _write_member_adapters(members, tmp, dtype, name=name, carried=takes_carried, integers=integers)
            copied = graph_file.copy_side_files(base_dir, tmp, use_cache=sig.with_past if sig.decoder else None)
            warned = tuple(w for w in [graph_file.tokenizer_warning(base_dir, copied)] if w)
            genai_note = write_genai_config(tmp, sig, tokens)
            if verify:
                stage("verifying against PyTorch")
                report = dataclasses.replace(
                    verify_graph(tmp, base_dir, adapter_dir, atol=atol, rtol=rtol, allow_pickle=allow_pickle),
                    graph=str(out),
                )
                if not report.ok:
                    raise VerifyMismatch(
                        report,
                        f"verify: {out} does not match PyTorch within tolerance "
                        f"({report.failure()}); nothing was written (--no-verify keeps the "
                        "graph, to inspect it with shareport verify)",
                    )
    return ExportResult(Path(out), report, genai_note, warned)
