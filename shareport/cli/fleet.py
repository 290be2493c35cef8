"""``shareport fleet LORA_DIR... -o FLEET_DIR``: many LoRAs of one base, one shared basis, small cores each."""

from __future__ import annotations

import click

from ..forms import DEFAULT_FLEET_BUDGET, FLEET_FORMS
from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_output_option
from .table import format_table, human_bytes, to_json


@click.command("fleet")
@click.argument("lora_dirs", nargs=-1, required=True, type=Folder())
@output_option("--out", type=click.Path(path_type=str), required=True,
               help="The fleet folder: shared.safetensors, one member folder per input (named as the input "
                    "folder), fleet_report.json.")
@click.option("--form", type=click.Choice(FLEET_FORMS), default="sharea", show_default=True,
              help="sharea: one right basis V per kind for every adapter and layer, a B per adapter and layer "
                   "(exact least squares). shareab: shared U and V per kind, a small core C per adapter and "
                   "layer (dW = U C V; alternating refinement, the error never rises).")
@click.option("--rank", type=int, default=None,
              help="Shared rank per kind (shareab: both U and V). Instead of --budget.")
@click.option("--budget", type=float, default=None,
              help="A fraction of the N LoRAs' total parameters, spent over the kinds where the error drops "
                   f"most (exact knapsack). Default when no --rank: {DEFAULT_FLEET_BUDGET}.")
@overwrite_output_option
@allow_pickle_option
@json_option
def fleet_cmd(lora_dirs, out, form, rank, budget, overwrite, allow_pickle, as_json):
    """Compress several LoRAs (PEFT or native) of one base into a fleet.

    \b
    FLEET_DIR/shared.safetensors      the shared basis, stored once
    FLEET_DIR/<name>/                 a native adapter per input: its own cores and
                                      a reference to ../shared.safetensors (sha256)

    Every member folder works with every command (inspect, convert --to lora,
    finetune, export). Moving the whole fleet folder keeps it valid; a missing or
    changed shared file is refused, naming the member.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.fleet(list(lora_dirs), out, form=form, rank=rank, budget=budget, overwrite=overwrite,
                       allow_pickle=allow_pickle)
    click.echo(to_json(data) if as_json else render(data))


def render(data: dict) -> str:
    parts = [f"fleet of {len(data['members'])} adapters ({data['form']}) written to {data['output']}",
             f"total {data['parameters']:,} parameters ({data['ratio']:.1%} of {data['lora_parameters']:,} in "
             f"{len(data['members'])} separate LoRAs), {human_bytes(data['bytes'])} against "
             f"{human_bytes(data['lora_bytes'])}; shared basis {data['shared_parameters']:,} parameters "
             f"({human_bytes(data['shared_bytes'])})"]
    parts.append(format_table(
        ["member", "rel. error", "own params", "LoRA params", "bytes", "LoRA bytes"],
        [(m["name"], m["relative_error"], m["parameters"], m["lora_parameters"], human_bytes(m["bytes"]),
          human_bytes(m["lora_bytes"])) for m in data["members"]]))
    parts.append(format_table(
        ["kind", "rank U", "rank V", "shared params", "rel. error"],
        [(k, v["ranks"][0] or "-", v["ranks"][1], v["shared_parameters"], v["relative_error"])
         for k, v in sorted(data["kinds"].items())]))
    return "\n\n".join(parts)
