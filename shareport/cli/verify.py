"""``shareport verify OUT_DIR --base BASE_DIR --adapter ADAPTER_DIR``: ORT against PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..export.choices import FP16_RTOL, FP32_ATOL, REFERENCE_MULTIPLE
from .options import Folder, allow_pickle_option, json_option
from .table import format_table, to_json

if TYPE_CHECKING:
    from ..export.verify import Report


def tolerance_options(func):
    """--atol / --rtol, shared by verify and export (which verifies at the end)."""
    func = click.option(
        "--rtol",
        type=float,
        default=FP16_RTOL,
        show_default=True,
        help="fp16 graphs: allowed max abs diff as a share of max(1, max |PyTorch output|).",
    )(func)
    return click.option(
        "--atol",
        type=float,
        default=FP32_ATOL,
        show_default=True,
        help="fp32 graphs: allowed max abs diff against float64 PyTorch where float32 PyTorch's own "
        f"error is small; the limit is the larger of this and {REFERENCE_MULTIPLE:g} x atol / "
        f"{FP32_ATOL:g} x that error.",
    )(func)


def render_report(report: Report) -> str:
    head = f"verify {report.graph}: {report.mode} graph, {report.dtype}, ONNX Runtime on {report.device}, {report.tolerance}"
    own = report.multiple is not None  # fp32: against float64, the limit set by float32 PyTorch's own error
    rows = [
        (
            r.check,
            r.case,
            r.output,
            r.max_abs,
            r.mean_abs,
            "-" if r.top1 is None else f"{r.top1:.1%}",
            *([r.reference_error if r.reference_error is not None else "-"] if own else []),
            r.limit,
            "ok" if r.ok else "FAIL",
        )
        for r in report.rows
    ]
    headers = [
        "check",
        "case",
        "output",
        "max abs diff",
        "mean abs diff",
        "top-1 agree",
        *([f"torch {report.dtype} own err"] if own else []),
        "limit",
        "result",
    ]
    table = format_table(headers, rows)
    failed = sum(not r.ok for r in report.rows)
    verdict = (
        "all comparisons within tolerance"
        if report.ok
        else f"{failed} of {len(report.rows)} comparisons exceed the tolerance; worst: {report.failure()}"
    )
    notes = "".join(f"note: {n}\n" for n in report.notes)
    rule = f"{report.rule}\n" if own else ""
    return f"{head}\n{rule}{notes}{table}\n{verdict}"


def emit_report(report: Report, as_json: bool, extra: dict | None = None, fail: bool = True) -> None:
    """Print the report (under "verify" with ``extra`` fields in JSON); with ``fail``, exit
    non-zero when any comparison failed."""
    if as_json:
        click.echo(to_json({**extra, "verify": report.to_dict()} if extra else report.to_dict()))
    else:
        click.echo(render_report(report))
    if fail and not report.ok:
        raise click.ClickException(
            f"verify: {report.graph} does not match PyTorch within tolerance: {report.failure()}"
        )


@click.command("verify")
@click.argument("graph_dir", metavar="OUT_DIR", type=Folder())
@click.option("--base", "base_dir", required=True, type=Folder(), help="Base model folder.")
@click.option(
    "--adapter", "adapter_dir", required=True, type=Folder(), help="The adapter the graph was exported with (any form)."
)
@tolerance_options
@json_option
@allow_pickle_option
def verify_cmd(
    graph_dir: str, base_dir: str, adapter_dir: str, atol: float, rtol: float, as_json: bool, allow_pickle: bool
) -> None:
    """Run an exported graph in ONNX Runtime and the model in PyTorch; compare every output.

    Several shapes (batch 1-3, several sequence lengths, with and without past); adapter-mode
    graphs with the adapter active and without it (= base model). Exits non-zero above tolerance.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    emit_report(
        flows.verify(graph_dir, base_dir, adapter_dir, atol=atol, rtol=rtol, allow_pickle=allow_pickle), as_json
    )
