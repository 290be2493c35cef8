"""``shareport export-adapter ADAPTER_DIR --graph OUT_DIR``: an .onnx_adapter for an exported graph."""

from __future__ import annotations

from pathlib import Path

import click

from ..export import graph_file
from ..export.ort_adapter import adapter_arrays, save_onnx_adapter
from ..files.adapters import load_adapter
from .options import allow_pickle_option, overwrite_option


@click.command("export-adapter")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--graph", "graph_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="A folder written by 'shareport export --mode adapter'.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Output file [default: <--graph folder>/<adapter folder name>.onnx_adapter].")
@overwrite_option
@allow_pickle_option
def export_adapter_cmd(adapter_dir: str, graph_dir: str, output: str | None, overwrite: bool, allow_pickle: bool) -> None:
    """Write ADAPTER_DIR as an .onnx_adapter that swaps into the graph in OUT_DIR.

    The adapter must have the graph's structure: the same tensor names (so the same form and
    sharing), the same layer sizes; ranks may differ from the exported adapter's as long as the
    tensors that share a rank in the graph agree. It is written in the graph's dtype.
    """
    proto = graph_file.load_proto(graph_dir)
    graph_file.read_info(proto, graph_dir)  # refuses a graph shareport did not write
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    arrays = adapter_arrays(adapter, graph_file.graph_slots(proto), what=f"{adapter_dir}:")
    out = Path(output) if output else Path(graph_dir) / f"{Path(adapter_dir).resolve().name}.onnx_adapter"
    save_onnx_adapter(arrays, out, overwrite=overwrite, inputs=[adapter_dir])
    n = sum(a.size for a in arrays.values())
    click.echo(f"wrote {out} ({len(arrays)} tensors, {n:,} parameters, {next(iter(arrays.values())).dtype})")
