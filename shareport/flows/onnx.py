"""``export``, ``verify``, ``export_adapter``, ``generate`` and ``doctor``: ONNX folders made, checked and
run. Exports are verified before they are published. See ``shareport.flows``."""

from __future__ import annotations

from pathlib import Path

from ..export import graph_file
from ..export.carried import check_baked, graph_inputs
from ..export.doctor import doctor as doctor_report
from ..export.exporter import ExportOptions
from ..export.exporter import export as export_graph
from ..export.generate import generate as generate_text
from ..export.ort_adapter import adapter_arrays, check_fits, match_names, read_onnx_adapter, save_onnx_adapter
from ..export.slots import check_fleet_member
from ..export.verify import FP16_RTOL, FP32_ATOL, Report
from ..export.verify import verify as verify_graph
from ..files import load_adapter


def export(
    adapter_dir: str,
    base_dir: str,
    out: str,
    options: ExportOptions = ExportOptions(),
    *,
    verify: bool = True,
    atol: float = FP32_ATOL,
    rtol: float = FP16_RTOL,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Export, verify in the temporary folder, publish: a mismatch publishes nothing (``VerifyMismatch``)."""
    result = export_graph(
        adapter_dir,
        base_dir,
        out,
        options,
        overwrite=overwrite,
        progress=progress,
        allow_pickle=allow_pickle,
        verify=verify,
        atol=atol,
        rtol=rtol,
    )
    summary = {
        "graph": out,
        "mode": options.mode,
        "dtype": options.dtype,
        "with_past": options.with_past,
        "embedded_adapter": options.embed_adapter,
        "genai_config": result.genai_config,
        "warnings": list(result.warnings),
    }
    members = _fleet_member_files(adapter_dir, out, options.dtype) if options.mode == "adapter" else []
    if members:
        summary["fleet_members"] = members
    return {**summary, "verify": result.report.to_dict() if result.report else None}


def _fleet_member_files(adapter_dir: str, out: str, dtype: str) -> list[dict]:
    """Per fleet member: its ``.onnx_adapter`` (cores, and carried tensors where the graph takes them)
    against its plain LoRA's tensors in that dtype (with the same carried tensors, which a PEFT LoRA holds too)."""
    from ..files.fleet import fleet_members

    members = fleet_members(load_adapter(adapter_dir))
    if not members:
        return []  # not a fleet's graph: its metadata need not be read (a whole graph, without external data)
    takes_carried = bool(graph_inputs(graph_file.read_info(graph_file.load_proto(out), out)))
    rows = []
    for name, folder in members.items():
        path = Path(out) / graph_file.member_adapter_name(name)
        if path.is_file():
            member = load_adapter(folder)
            lora = member.provenance.get("source_parameters") or 0
            if takes_carried:
                lora += sum(t.numel() for t in member.extra_tensors.values())
            rows.append(
                {
                    "member": name,
                    "file": str(path),
                    "bytes": path.stat().st_size,
                    "plain_lora_bytes": lora * (2 if dtype == "fp16" else 4),
                }
            )
    return rows


def verify(
    graph_dir: str,
    base_dir: str,
    adapter_dir: str,
    *,
    atol: float = FP32_ATOL,
    rtol: float = FP16_RTOL,
    allow_pickle: bool = False,
) -> Report:
    return verify_graph(graph_dir, base_dir, adapter_dir, atol=atol, rtol=rtol, allow_pickle=allow_pickle)


def export_adapter(
    adapter_dir: str, graph_dir: str, out: str | None = None, *, overwrite: bool = False, allow_pickle: bool = False
) -> dict:
    """An ``.onnx_adapter`` of ``adapter_dir`` for the graph in ``graph_dir`` (refuses one that does not fit).

    ``adapter_dir`` may also be an ``.onnx_adapter`` file (e.g. Olive's, whose ``.weight`` name
    suffix is mapped to the graph's names): it is checked and rewritten for the graph.
    """
    proto = graph_file.load_proto(graph_dir)
    info = graph_file.read_info(proto, graph_dir)  # refuses a graph shareport did not write
    slots = graph_file.graph_slots(proto)
    note = ""
    if Path(adapter_dir).is_file():
        arrays, note = match_names(read_onnx_adapter(adapter_dir), slots, str(adapter_dir))
        check_fits(arrays, slots, what=f"{adapter_dir}:")
    else:
        adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
        check_fleet_member(info, adapter, str(adapter_dir))  # a fleet's graph holds its shared basis
        check_baked(info, adapter, str(adapter_dir), proto=proto, folder=graph_dir)  # and maybe another's head
        arrays = adapter_arrays(adapter, slots, what=f"{adapter_dir}:", carried=graph_inputs(info), graph_info=info)
    name = Path(adapter_dir).resolve().name
    path = Path(out) if out else Path(graph_dir) / (name if name.endswith(".onnx_adapter") else f"{name}.onnx_adapter")
    save_onnx_adapter(arrays, path, overwrite=overwrite, inputs=[adapter_dir])
    first = next(iter(arrays.values()))
    return {
        "output": str(path),
        "tensors": len(arrays),
        "parameters": sum(a.size for a in arrays.values()),
        "dtype": str(first.dtype),
        "note": note,
    }


def generate(
    graph_dir: str,
    prompt: str,
    adapters: list[str] | tuple = (),
    *,
    max_new_tokens: int = 32,
    engine: str = "auto",
    no_adapter: bool = False,
) -> dict:
    """Greedy text from a with-past export, once per adapter (onnxruntime-genai, else ONNX Runtime)."""
    return generate_text(
        graph_dir, prompt, adapters, max_new_tokens=max_new_tokens, engine=engine, no_adapter=no_adapter
    )


def doctor() -> dict:
    """Versions of torch, transformers, ONNX Runtime (and genai), providers that work, clashes."""
    return doctor_report()
