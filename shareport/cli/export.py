"""``shareport export ADAPTER_DIR --base BASE_DIR --onnx OUT_DIR``: ONNX graph, folded or adapter-preserving."""

from __future__ import annotations

import dataclasses

import click

from ..export.exporter import DTYPES, MODES, ExportOptions, export
from ..export.verify import verify
from .table import to_json
from .options import allow_pickle_option, json_option, overwrite_option
from .verify import emit_report, tolerance_options


@click.command("export")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="Base model folder.")
@click.option("--onnx", "out_dir", required=True, type=click.Path(path_type=str), help="Output folder for the graph.")
@click.option("--mode", type=click.Choice(MODES), default="folded", show_default=True,
              help="folded: adapter merged into the weights. adapter: adapter tensors stay swappable graph inputs.")
@click.option("--with-past", is_flag=True, help="Decoders: past_key_values inputs and present outputs (KV cache).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True,
              help="Precision of the graph's weights and activations (fp16 is verified with a relative bound).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--embed-adapter", is_flag=True,
              help="Adapter mode: the adapter's values become the graph's defaults (still swappable).")
@click.option("--verify/--no-verify", "run_verify", default=True, show_default=True, help="Verify against PyTorch at the end.")
@tolerance_options
@overwrite_option
@json_option
@allow_pickle_option
def export_cmd(adapter_dir, base_dir, out_dir, mode, with_past, dtype, opset, embed_adapter, run_verify, atol, rtol,
               overwrite, as_json, allow_pickle) -> None:
    """Export the base model with ADAPTER_DIR (any form) to an ONNX folder.

    The folder holds model.onnx, config and tokenizer files, and in adapter mode
    adapter.onnx_adapter (ONNX Runtime's multi-LoRA format) with the exported adapter.
    """
    options = ExportOptions(mode=mode, with_past=with_past, dtype=dtype, opset=opset, embed_adapter=embed_adapter)
    summary = {"graph": out_dir, "mode": mode, "dtype": dtype, "with_past": with_past, "embedded_adapter": embed_adapter}
    reports = []

    def check(tmp):
        """Verify the finished graph before it is published: a mismatch publishes nothing."""
        report = dataclasses.replace(verify(tmp, base_dir, adapter_dir, atol=atol, rtol=rtol,
                                            allow_pickle=allow_pickle), graph=out_dir)
        if not report.ok:
            emit_report(report, as_json, extra=summary, fail=False)
            raise click.ClickException(f"verify: {out_dir} does not match PyTorch within tolerance; nothing was "
                                       "written (--no-verify keeps the graph, to inspect it with shareport verify)")
        reports.append(report)

    out = export(adapter_dir, base_dir, out_dir, options, overwrite=overwrite, allow_pickle=allow_pickle,
                 before_publish=check if run_verify else None)
    if not as_json:
        click.echo(f"wrote {out} ({mode}, {dtype}{', with past' if with_past else ''})")
    if run_verify:
        emit_report(reports[0], as_json, extra=summary)
    elif as_json:
        click.echo(to_json({**summary, "verify": None}))
