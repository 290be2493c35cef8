"""``shareport export ADAPTER_DIR --base BASE_DIR -o OUT_DIR``: ONNX graph, folded or adapter-preserving."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..export.choices import ADAPTER_NAMES, MODES, TORCH_DTYPES
from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_output_option
from .table import to_json
from .verify import emit_report, tolerance_options

if TYPE_CHECKING:
    from ..export.exporter import ExportOptions


@click.command("export")
@click.argument("adapter_dir", type=Folder())
@click.option("--base", "base_dir", required=True, type=Folder(), help="Base model folder.")
@output_option(
    "--onnx",
    dest="out_dir",
    shown=("-o", "--output", "--onnx"),
    required=True,
    type=click.Path(path_type=str),
    help="Output folder for the graph.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="folded",
    show_default=True,
    help="folded: adapter merged into the weights. adapter: adapter tensors stay swappable graph inputs.",
)
@click.option("--with-past", is_flag=True, help="Decoders: past_key_values inputs and present outputs (KV cache).")
@click.option(
    "--dtype",
    type=click.Choice(sorted(TORCH_DTYPES)),
    default="fp32",
    show_default=True,
    help="Precision of the graph's weights and activations (fp16 is verified with a relative bound).",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option(
    "--embed-adapter",
    is_flag=True,
    help="Adapter mode: the adapter's values become the graph's defaults (still swappable).",
)
@click.option(
    "--adapter-names",
    type=click.Choice(ADAPTER_NAMES),
    default="shareport",
    show_default=True,
    help="Adapter mode: name the adapter inputs by the pool names, or as Olive does ('<name>.weight').",
)
@click.option(
    "--verify/--no-verify", "run_verify", default=True, show_default=True, help="Verify against PyTorch at the end."
)
@tolerance_options
@overwrite_output_option
@json_option
@allow_pickle_option
def export_cmd(
    adapter_dir,
    base_dir,
    out_dir,
    mode,
    with_past,
    dtype,
    opset,
    embed_adapter,
    adapter_names,
    run_verify,
    atol,
    rtol,
    overwrite,
    as_json,
    allow_pickle,
) -> None:
    """Export the base model with ADAPTER_DIR (any form) to an ONNX folder.

    The folder holds model.onnx, config and tokenizer files, and in adapter mode
    adapter.onnx_adapter (ONNX Runtime's multi-LoRA format) with the exported adapter.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch
    from ..export.verify import Report, VerifyMismatch

    options = flows.ExportOptions(
        mode=mode,
        with_past=with_past,
        dtype=dtype,
        opset=opset,
        embed_adapter=embed_adapter,
        adapter_names=adapter_names,
    )
    try:
        data = flows.export(
            adapter_dir,
            base_dir,
            out_dir,
            options,
            verify=run_verify,
            atol=atol,
            rtol=rtol,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
        )
    except VerifyMismatch as exc:
        emit_report(exc.report, as_json, extra=_summary(out_dir, options), fail=False)
        raise
    members = {"fleet_members": data["fleet_members"]} if "fleet_members" in data else {}
    warned = {"warnings": data["warnings"]}
    if not as_json:
        click.echo(f"wrote {out_dir} ({mode}, {dtype}{', with past' if with_past else ''})")
        click.echo(data["genai_config"])
        for m in members.get("fleet_members", []):  # a fleet member's export: one cores-only file per member
            click.echo(
                f"fleet member {m['member']}: {m['file']} {m['bytes']:,} bytes (its plain LoRA's tensors: "
                f"{m['plain_lora_bytes']:,} bytes)"
            )
    if data["verify"] is not None:
        emit_report(
            Report.from_dict(data["verify"]), as_json, extra={**_summary(out_dir, options), **members, **warned}
        )
    elif as_json:
        click.echo(to_json(data))
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)


def _summary(out_dir: str, options: ExportOptions) -> dict:
    return {
        "graph": out_dir,
        "mode": options.mode,
        "dtype": options.dtype,
        "with_past": options.with_past,
        "embedded_adapter": options.embed_adapter,
    }
