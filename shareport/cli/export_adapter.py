"""``shareport export-adapter ADAPTER_DIR --graph OUT_DIR``: an .onnx_adapter for an exported graph."""

from __future__ import annotations

import click

from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_output_option
from .table import to_json


@click.command("export-adapter")
@click.argument("adapter_dir", metavar="ADAPTER", type=click.Path(path_type=str))
@click.option(
    "--graph", "graph_dir", required=True, type=Folder(), help="A folder written by 'shareport export --mode adapter'."
)
@output_option(
    dest="output",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Output file [default: <--graph folder>/<adapter folder name>.onnx_adapter].",
)
@overwrite_output_option
@json_option
@allow_pickle_option
def export_adapter_cmd(
    adapter_dir: str, graph_dir: str, output: str | None, overwrite: bool, as_json: bool, allow_pickle: bool
) -> None:
    """Write ADAPTER (a folder, or an .onnx_adapter file) as an .onnx_adapter for the graph in OUT_DIR.

    The adapter must have the graph's structure: the same tensor names (so the same form and
    sharing), the same layer sizes; ranks may differ from the exported adapter's as long as the
    tensors that share a rank in the graph agree. It is written in the graph's dtype. An
    .onnx_adapter file (e.g. from Olive, names ending in '.weight') is checked and renamed.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.export_adapter(adapter_dir, graph_dir, output, overwrite=overwrite, allow_pickle=allow_pickle)
    if as_json:
        click.echo(to_json(data))
        return
    if data["note"]:
        click.echo(f"note: {data['note']}")
    click.echo(
        f"wrote {data['output']} ({data['tensors']} tensors, {data['parameters']:,} parameters, {data['dtype']})"
    )
