"""``shareport fleet LORA_DIR... -o FLEET_DIR``: many LoRAs of one base, one shared basis, small cores each."""

from __future__ import annotations

import click

from ..forms import (
    AUTO_CLUSTERS,
    DEFAULT_FLEET_BUDGET,
    DEFAULT_FLEET_CLUSTERS,
    DEFAULT_GROUP_SIZE,
    FLEET_FORMS,
    QUANTIZE_CHOICES,
)
from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_output_option
from .table import format_table, human_bytes, to_json


def _clusters(ctx, param, value: str) -> int | str:
    """'auto' or a whole number (its range is the library's check: one line naming the problem)."""
    if value == AUTO_CLUSTERS:
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a whole number or '{AUTO_CLUSTERS}', got {value!r}") from None


@click.command("fleet")
@click.argument("lora_dirs", nargs=-1, required=True, type=Folder(), metavar="[NAME=]LORA_DIR...")
@output_option(
    "--out",
    type=click.Path(path_type=str),
    required=True,
    help="The fleet folder: shared.safetensors, one member folder per input (named as described above), "
    "fleet_report.json.",
)
@click.option(
    "--form",
    type=click.Choice(FLEET_FORMS),
    default=None,
    help="sharea: one right basis V per kind for every adapter and layer, a B per adapter and layer "
    "(exact least squares). shareab: shared U and V per kind, a small core C per adapter and "
    "layer (dW = U C V; alternating refinement, the error never rises). Default: both are built "
    "at --budget and the one with the least error is written (by the output error with "
    "--calibration, else by the weight error); the report lists both.",
)
@click.option(
    "--rank",
    type=int,
    default=None,
    help="Shared rank per kind (shareab: both U and V). Instead of --budget; needs --form (a rank is "
    "a different size for each form).",
)
@click.option(
    "--budget",
    type=float,
    default=None,
    help="A fraction of the N LoRAs' total parameters, spent over the kinds where the error drops "
    f"most (exact knapsack). Default when no --rank: {DEFAULT_FLEET_BUDGET}.",
)
@click.option(
    "--bytes",
    "bytes_share",
    type=float,
    default=None,
    metavar="SHARE",
    help="A share of the N LoRAs' bytes (their factors in float32) for the fleet's stored factors, "
    "instead of --budget and --quantize: the fleet is built as float32, int8 and int4, each at the "
    "budget those bytes hold (int8 about 3.9x the parameters of float32, int4 7.5x), and the one with "
    "the least weight error, as its factors read back, is written (within 2% of the least: the fewest "
    "bytes); the report lists all three. "
    "Different LoRAs share few directions, so fewer bits often keep more than fewer directions (on 8 "
    "MiniLM LoRAs at 0.125: worst member 0.946 of its LoRA's accuracy in float32, 0.991 in int8). "
    "Not with --calibration. With --clusters auto, float32 searches the number of clusters and int8 "
    "and int4 take its count.",
)
@click.option(
    "--clusters",
    default=DEFAULT_FLEET_CLUSTERS,
    show_default=True,
    metavar="N|auto",
    callback=_clusters,
    help="Split the members into N clusters, each with its own shared basis (at least 2 members a "
    "cluster; members go where the error of their updates is least, and the budget is spent "
    "over every cluster's kinds). auto: 1 up to members/2 clusters are built at --budget and the least "
    "error wins (1 with --rank; by the output error with --calibration). LoRAs from different seeds span nearly "
    "disjoint spaces, which one basis holds badly: clusters find the groups that share one.",
)
@click.option(
    "--calibration",
    multiple=True,
    metavar="[NAME=]DATA",
    help="Fit each member to the outputs of its own data (text, jsonl or tokenized, as finetune "
    "reads it; needs --base): DATA for every member, NAME=DATA for member NAME (repeat the "
    "option; a plain DATA serves the members without their own). Each member's LoRA is "
    "attached while its data runs through the base; its cores are then the least squares of "
    "its output error, and every error reported is that error.",
)
@click.option(
    "--base",
    type=Folder(),
    default=None,
    help="The base model folder the calibration data runs through (only with --calibration).",
)
@click.option(
    "--quantize",
    default=None,
    metavar="|".join(QUANTIZE_CHOICES),
    help="After the fleet is built, store every factor it stores (each shared basis once, each member's "
    "B's or cores) as integers with float16 scales, symmetric, as convert --quantize does (int4 packed "
    "two per byte). The report gives each member's weight error against its LoRA in float and quantized; "
    "export --mode adapter of a member keeps its cores as integers (each <member>.onnx_adapter), "
    "dequantized in the graph. fleet-add refuses a quantized fleet. Default: float.",
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help="With --quantize: elements per float16 scale, along each factor's model dimension (a core's "
    f"second rank).  [default: {DEFAULT_GROUP_SIZE}]",
)
@overwrite_output_option
@allow_pickle_option
@json_option
def fleet_cmd(
    lora_dirs,
    out,
    form,
    rank,
    budget,
    clusters,
    calibration,
    base,
    quantize,
    group_size,
    bytes_share,
    overwrite,
    allow_pickle,
    as_json,
):
    """Compress several LoRAs (PEFT or native) of one base into a fleet.

    \b
    FLEET_DIR/shared.safetensors      the shared basis, stored once
    FLEET_DIR/<name>/                 a native adapter per input: its own cores and
                                      a reference to ../shared.safetensors (sha256)

    \b
    Member names are folder names (letters, digits, '.', '_', '-'):
      NAME=LORA_DIR     names that member NAME
      LORA_DIR          the shortest distinct path suffix: the trailing folders
                        every input shares are dropped, then the fewest trailing
                        folders no other input ends with, joined with '-'
                        (runs/a/lora runs/b/lora -> a, b; x/lora y/lora z/b -> x-lora ...)
    A name given twice, two inputs taking one name, or an invalid name is refused.

    Every member folder works with every command (inspect, convert --to lora,
    finetune, export). Moving the whole fleet folder keeps it valid; a missing or
    changed shared file is refused, naming the member. A member keeping under half
    of its energy (squared error above half its squared norm: relative error above
    0.707) gets a warning on stderr (also under "warnings" in --json). So does a
    fleet that keeps less than truncating each LoRA alone at the same size would:
    "alone" in the report has those errors (in float weights), the warning the
    convert command that gives them (not for calibrated fleets).

    With --quantize int8|int4, every stored factor is written as integers with
    float16 scales (shared.safetensors and each member's own file; the configs
    record the scheme); reading a member gives its dequantized factors. With
    --bytes SHARE, fleet picks the storage too: whichever of float32, int8 and
    int4 keeps the least error within those bytes.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.fleet(
        list(lora_dirs),
        out,
        form=form,
        rank=rank,
        budget=budget,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        calibration=list(calibration),
        base=base,
        clusters=clusters,
        quantize=quantize,
        group_size=group_size,
        bytes_share=bytes_share,
    )
    click.echo(to_json(data) if as_json else render(data))
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for hint in data.get("hints", []):
        click.echo(f"hint: {hint}", err=True)


def render(data: dict) -> str:
    parts = [
        f"fleet of {len(data['members'])} adapters ({data['form']}) written to {data['output']}",
        f"total {data['parameters']:,} parameters ({data['ratio']:.1%} of {data['lora_parameters']:,} in "
        f"{len(data['members'])} separate LoRAs), {human_bytes(data['bytes'])} against "
        f"{human_bytes(data['lora_bytes'])}; shared basis {data['shared_parameters']:,} parameters "
        f"({human_bytes(data['shared_bytes'])})",
    ]
    if data["candidates"]:
        errors = ", ".join(
            f"{c['form']} {c['relative_error']:.3f}" if "refused" not in c else f"{c['form']} refused ({c['refused']})"
            for c in data["candidates"]
        )
        parts.append(f"form: {data['form']}, the least error ranked by {data['ranked_by']} (relative errors: {errors})")
    if data.get("calibration"):
        c = data["calibration"]
        files = sorted({m["data"] for m in c["members"].values()})
        parts.append(
            f"calibrated on {', '.join(files)} through {next(iter(c['members'].values()))['base']} "
            f"(ridge {c['ridge']:g}, {c['seconds']:.1f} s): errors are output errors on each "
            "member's data; 'weight error' is the plain one"
        )
    clusters = data.get("clusters")
    if clusters:
        tried = ", ".join(
            f"{c['clusters']} {c['relative_error']:.3f}" if "refused" not in c else f"{c['clusters']} refused"
            for c in clusters["candidates"]
        )
        parts.append(
            f"clusters: {clusters['count']}, each with its own basis ({clusters['chosen_by']}; relative "
            f"error by number of clusters: {tried})"
        )
    if data.get("storage"):
        parts.append(storage_line(data["storage"]))
    quantization = data.get("quantization")
    if quantization:
        parts.append(quantization_line(quantization))
    calibrated = bool(data.get("calibration"))
    parts.append(
        format_table(
            [
                "member",
                *(["cluster"] if clusters else []),
                "rel. error",
                *(["weight error"] if calibrated else []),
                *([f"{quantization['quantize']} weight error"] if quantization else []),
                "energy kept",
                "own params",
                "LoRA params",
                "bytes",
                "LoRA bytes",
            ],
            [
                (
                    m["name"],
                    *([clusters["members"][m["name"]]] if clusters else []),
                    m["relative_error"],
                    *([m["frobenius_relative_error"]] if calibrated else []),
                    *([m["quantization"]["relative_error"]] if quantization else []),
                    f"{m['retained_energy']:.1%}",
                    m["parameters"],
                    m["lora_parameters"],
                    human_bytes(m["bytes"]),
                    human_bytes(m["lora_bytes"]),
                )
                for m in data["members"]
            ],
        )
    )
    parts.append(
        format_table(
            ["kind", "rank U", "rank V", "shared params", "rel. error"],
            [
                (k, v["ranks"][0] or "-", v["ranks"][1], v["shared_parameters"], v["relative_error"])
                for k, v in sorted(data["kinds"].items())
            ],
        )
    )
    return "\n\n".join(parts)


def storage_line(storage: dict) -> str:
    tried = "; ".join(
        f"{c['storage']} at budget {c['budget']:g}: refused ({c['refused']})"
        if "refused" in c
        else f"{c['storage']} at budget {c['budget']:g}: {c['share']:.1%} of the bytes, relative error "
        f"{c['relative_error']:.3f}"
        for c in storage["candidates"]
    )
    return (
        f"storage: {storage['chosen']}, the least weight error at --bytes {storage['share']:g} of the LoRAs' "
        f"{human_bytes(storage['lora_bytes'])} of float32 factors ({tried})"
    )


def quantization_line(q: dict) -> str:
    return (
        f"quantized {q['quantize']} in groups of {q['group_size']} (float16 scales, symmetric): "
        f"{human_bytes(q['bytes'])} of factors = {q['bits_per_parameter']:.2f} bits per parameter, shared "
        f"basis {human_bytes(q['shared_bytes'])} (float16 {human_bytes(q['float16_bytes'])}, float32 "
        f"{human_bytes(q['float32_bytes'])}); '{q['quantize']} weight error' is each member's against its "
        "LoRA once quantized"
    )
