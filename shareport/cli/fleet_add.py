"""``shareport fleet-add FLEET_DIR [NAME=]LORA_DIR``: one more LoRA in a built fleet, the others kept."""

from __future__ import annotations

import click

from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_output_option
from .table import format_table, to_json


@click.command("fleet-add")
@click.argument("fleet_dir", type=Folder())
@click.argument("lora_dir", type=Folder(), metavar="[NAME=]LORA_DIR")
@click.option(
    "--max-error",
    type=float,
    default=None,
    help="The new member's largest relative error before the basis grows (0 to 1). Default: the worst "
    "existing member's relative error, so the new member is never the fleet's worst by more than "
    "what growing the basis cannot fix.",
)
@output_option(
    type=click.Path(path_type=str),
    default=None,
    help="Write the grown fleet to this new folder and leave FLEET_DIR as it is. Default: FLEET_DIR is "
    "replaced in one step (it must hold only the fleet).",
)
@overwrite_output_option
@allow_pickle_option
@json_option
def fleet_add_cmd(fleet_dir, lora_dir, max_error, out, overwrite, allow_pickle, as_json):
    """Add one LoRA (PEFT or native) to a fleet made by 'shareport fleet'.

    \b
    The new LoRA is projected onto the fleet's shared basis (exact least
    squares). The basis grows only when the new member's relative error is
    above --max-error (default: the worst existing member's): then directions
    from its own residual are appended, each time the one keeping the most of
    its energy per parameter added, until its error is at most that.

    \b
    The other members' updates never change:
      basis kept    only NAME/ and fleet_report.json are new; shared.safetensors
                    and every other member folder are kept byte for byte
      basis grown   their cores are padded with zeros (same updates), so
                    shared.safetensors and their folders are rewritten

    \b
    NAME=LORA_DIR names the new member; otherwise it takes its shortest
    distinct path suffix, as in 'shareport fleet': run4/lora beside the
    input run1/lora of member run1 is run4 (the trailing folders it shares
    with a member's input still on disk dropped, then the fewest trailing
    folder names that no member has).
    Refused in one line, nothing written: a name the fleet has, a LoRA of
    another base or other sites or shapes, a fleet whose shared.safetensors
    changed (sha256), a fleet folder holding anything else (without -o).
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.fleet_add(
        fleet_dir, lora_dir, out=out, max_error=max_error, overwrite=overwrite, allow_pickle=allow_pickle
    )
    click.echo(to_json(data) if as_json else render(data))
    for warning in data["added"]["warnings"]:  # the others' were given when they joined
        click.echo(f"warning: {warning}", err=True)


def render(data: dict) -> str:
    added = data["added"]
    grown = added["grown"]
    how = (
        "the basis is kept: its error on it is within the target"
        if not grown
        else "the basis grew (kind: +U columns, +V rows): "
        + ", ".join(f"{kind} +{u}/+{v}" for kind, (u, v) in sorted(grown.items()))
    )
    joined = f", in cluster {added['cluster']} (where its error is least)" if "cluster" in added else ""
    parts = [
        f"added {added['member']} to the fleet in {data['output']} ({data['form']}, {len(data['members'])} "
        f"members){joined}",
        f"{added['member']}: relative error {added['error_before']:.4f} on the basis as it was, target "
        f"{added['target']:.4f} ({added['rule']}); {how}; now {added['relative_error']:.4f}",
        f"rewritten: {', '.join(data['rewritten'])}; total {data['parameters']:,} parameters "
        f"({data['ratio']:.1%} of {data['lora_parameters']:,} in {len(data['members'])} separate LoRAs)",
    ]
    parts.append(
        format_table(
            ["member", "rel. error", "energy kept", "own params", "LoRA params"],
            [
                (m["name"], m["relative_error"], f"{m['retained_energy']:.1%}", m["parameters"], m["lora_parameters"])
                for m in data["members"]
            ],
        )
    )
    return "\n\n".join(parts)
