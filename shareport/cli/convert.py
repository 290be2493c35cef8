"""``shareport convert LORA_DIR --to FORM``: exact shared projection, with a report."""

from __future__ import annotations

import click

from .. import flows
from ..convert import GROUPINGS, TARGET_FORMS
from .table import format_table, to_json
from .options import allow_pickle_option, json_option, overwrite_option, plot_option


@click.command("convert")
@click.argument("lora_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--to", "to", type=click.Choice(TARGET_FORMS), required=True,
              help="Target form. 'lora' writes a plain PEFT LoRA expanded from any form.")
@click.option("-o", "--out", type=click.Path(path_type=str), default=None,
              help="Output folder [default: LORA_DIR-<form> beside the input].")
@click.option("--rank", type=int, default=None,
              help="Shared rank per kind (may exceed the LoRA's r). Default: the kind's largest LoRA rank.")
@click.option("--energy", type=float, default=None,
              help="Instead of --rank: the smallest rank per kind keeping this fraction of its energy, e.g. 0.99.")
@click.option("--budget", type=float, default=None,
              help="Instead of --rank: a fraction of the LoRA's parameters, e.g. 0.25, spent across kinds "
                   "(and for aslora between rank and groups) where the error drops most per parameter. "
                   "Values above 1 are allowed: a shared rank may exceed the LoRA's r.")
@click.option("--groups", type=int, default=None,
              help="aslora: number of B groups per kind. Default: the most groups that keep each kind "
                   "within 25% of its LoRA parameters (the paper's setting).")
@click.option("--grouping", type=click.Choice(GROUPINGS), default="any", show_default=True,
              help="aslora: 'any' groups any layers (Ward clustering), 'adjacent' only contiguous runs "
                   "(exact dynamic programme).")
@overwrite_option
@allow_pickle_option
@json_option
@plot_option
def convert_cmd(lora_dir, to, out, rank, energy, budget, groups, grouping, overwrite, allow_pickle, as_json, plot):
    """Convert a LoRA (PEFT or native, any form) into a shared form.

    \b
    sharea   one A per kind, one B per layer        (ShareLoRA)
    shareb   one A per layer, one B per kind        (ShareLoRA)
    shareab  one A and one B per kind               (ShareLoRA)
    aslora   one A per kind, one B per group of layers (ASLoRA)
    lora     plain PEFT LoRA, expanded from any form

    With --plot, also write a PNG of the layer distance matrix per kind with the
    chosen groups outlined, and the energy kept against the shared rank.

    The projection is exact: for the chosen rank the result is the least-squares optimum
    (Eckart-Young) over all layers of a kind, computed from the factors without forming any
    dense update. The output is shareport's native format (or PEFT for --to lora).
    """
    data = flows.convert(lora_dir, to, out, rank=rank, energy=energy, budget=budget, groups=groups,
                         grouping=grouping, overwrite=overwrite, allow_pickle=allow_pickle, plot=plot,
                         progress=not as_json)
    click.echo(to_json(data) if as_json else render(data))


def render(data: dict) -> str:
    head = (
        f"{data['form']} written to {data['output']}\n"
        f"parameters: {data['parameters_before']:,} -> {data['parameters_after']:,} ({data['ratio']:.1%})"
    )
    if not data["kinds"]:
        return head
    rows = []
    for k in data["kinds"]:
        rows.append((k["kind"], k["sites"], k["lora_rank"], k["rank"], _groups(k["groups"], k["sites"]),
                     k["relative_error"], k["retained_energy"], k["parameters_after"],
                     "yes" if k["already_shared"] else "no"))
    table = format_table(["kind", "sites", "LoRA r", "rank", "B groups (layers)", "rel. error", "energy kept",
                          "params", "A already shared"], rows)
    return head + "\n\n" + table


def _groups(groups: list[list[int]], sites: int) -> str:
    if len(groups) == sites:
        return "one per layer"
    if len(groups) == 1:
        return "one for all"
    return " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
