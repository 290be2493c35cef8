"""``shareport generate OUT_DIR --prompt TEXT``: greedy text from an exported decoder."""

from __future__ import annotations

import click

from ..export.choices import ENGINES
from .options import Folder, json_option
from .table import to_json


@click.command("generate")
@click.argument("graph_dir", metavar="OUT_DIR", type=Folder())
@click.option("--prompt", required=True, help="Text to continue (encoded with the folder's tokenizer).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="An .onnx_adapter to activate; repeat for one run per adapter [default: the folder's own].",
)
@click.option("--no-adapter", is_flag=True, help="Run the graph without any adapter (the base model).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="genai: onnxruntime-genai; ort: ONNX Runtime with shareport's loop; auto: genai where installed.",
)
@json_option
def generate_cmd(graph_dir, prompt, adapters, no_adapter, max_new_tokens, engine, as_json) -> None:
    """Greedy continuation of --prompt by a graph exported with --with-past.

    Uses onnxruntime-genai (with the folder's genai_config.json) where it is installed,
    otherwise ONNX Runtime with past key values; both stop at eos or --max-new-tokens.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.generate(
        graph_dir, prompt, list(adapters), max_new_tokens=max_new_tokens, engine=engine, no_adapter=no_adapter
    )
    if as_json:
        click.echo(to_json(data))
        return
    for run in data["runs"]:
        if run["note"]:
            click.echo(f"note: {run['note']}")
        if len(data["runs"]) > 1 or run["adapter"]:
            click.echo(f"[{run['adapter'] or 'no adapter'}] ({data['engine']})")
        click.echo(run["text"])
