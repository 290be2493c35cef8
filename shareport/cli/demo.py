"""``shareport demo``: convert, recover, export and verify on built-in material."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from .options import Folder, output_option
from .table import format_table, to_json


@click.command("demo")
@output_option(
    "--out",
    type=Folder(Path),
    default=None,
    help="Folder for everything the demo makes [default: a new temporary folder]. It must not exist "
    "(or be empty), unless --overwrite replaces a folder an earlier demo wrote.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if an earlier shareport run wrote it.")
@click.option("--no-export", is_flag=True, help="Stop after recovery (skip ONNX export and verification).")
@click.option("--json", "as_json", is_flag=True, help="Print every step's report as JSON.")
def demo_cmd(out: Path | None, overwrite: bool, no_export: bool, as_json: bool) -> None:
    """Run the whole job on built-in material, with no downloads.

    Builds a small Llama and a tokenizer, trains a LoRA on a built-in corpus, converts it to
    ASLoRA, recovers it by distillation toward the LoRA, exports both ONNX modes and verifies
    them against PyTorch, then prints one table. Under a minute on a 2-core machine (35-40 s measured
    from a fresh clone; longer while other jobs load the cores).
    """
    from ..demo.run import run_demo, summary_rows  # here, not at the top: usage errors and --help need no torch

    if out is None:  # a new, empty folder of our own
        out, overwrite = Path(tempfile.mkdtemp(prefix="shareport-demo-")), True
    start = time.perf_counter()
    reports = run_demo(out, export=not no_export, overwrite=overwrite)
    elapsed = time.perf_counter() - start
    if as_json:
        click.echo(to_json({"out": str(out), "seconds": elapsed, **reports}))
        return
    click.echo(format_table(["", "result"], summary_rows(reports), title="shareport demo"))
    if reports["convert"].get("plot"):
        click.echo(
            f"\nfigure of the conversion (layer distances, groups, energy vs rank): {reports['convert']['plot']}"
        )
    click.echo(f"\neverything is in {out} ({elapsed:.0f} s)")
