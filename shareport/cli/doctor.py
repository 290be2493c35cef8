"""``shareport doctor``: the runtimes on this machine and whether they clash."""

from __future__ import annotations

import sys

import click

from .options import json_option
from .table import to_json


@click.command("doctor")
@json_option
def doctor_cmd(as_json: bool) -> None:
    """Versions of torch, transformers, ONNX Runtime and onnxruntime-genai; which execution
    providers work and whether the CUDA one runs a session (or which library it misses). Exits 1
    when two ONNX Runtime (or genai) wheels are installed together, printing the one fix."""
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.doctor()
    if as_json:
        click.echo(to_json(data))
        sys.exit(1 if data["clashes"] else 0)
    for name in ("torch", "transformers", "onnxruntime", "onnxruntime_genai"):
        info = data[name]
        click.echo(
            f"{name}: {info['version'] or 'not importable'}" + (f" ({info['error']})" if info.get("error") else "")
        )
    ort = data["onnxruntime"]
    if ort["version"]:
        click.echo(f"providers listed: {', '.join(ort['providers_listed'])}")
        click.echo(f"providers working: {', '.join(ort['providers_working'])}")
    click.echo(ort["cuda_ep"]["line"])
    dists = ", ".join(f"{n} {v}" for n, v in data["distributions"].items()) or "none"
    click.echo(f"installed distributions: {dists}")
    for line in data["notes"]:
        click.echo(f"note: {line}")
    for line in data["warnings"]:
        click.echo(f"warning: {line}")
    if data["clashes"]:
        click.echo(f"fix: {data['fix']}")
        sys.exit(1)
