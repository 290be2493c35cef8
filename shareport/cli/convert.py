"""``shareport convert LORA_DIR --to FORM``: exact shared projection or LoRA truncation, with a report."""

from __future__ import annotations

import click

from ..forms import (
    CALIBRATION_MAX_LENGTH,
    CALIBRATION_RIDGE,
    CALIBRATION_SAMPLES,
    DEFAULT_ASLORA_BUDGET,
    DEFAULT_GROUP_SIZE,
    GROUPINGS,
    QUANTIZE_CHOICES,
    TARGET_FORMS,
)
from .options import Folder, allow_pickle_option, json_option, output_option, overwrite_option, plot_option
from .table import format_table, human_bytes, share_of_source, to_json


@click.command("convert")
@click.argument("lora_dir", type=Folder())
@click.option(
    "--to",
    "to",
    type=click.Choice(TARGET_FORMS),
    required=True,
    help="Target form. 'lora' writes a plain PEFT LoRA: each site truncated to its best rank with "
    "--rank/--energy/--budget, else expanded exactly from any form. 'auto' (needs --budget) "
    "converts to lora, sharea, shareb, shareab and aslora at that budget and writes only the one "
    "with the least total squared error of the updates (sum of ||dW - dW'||_F^2).",
)
@output_option(
    "--out",
    type=click.Path(path_type=str),
    default=None,
    help="Output folder [default: LORA_DIR-<to> beside the input].",
)
@click.option(
    "--rank",
    type=int,
    default=None,
    help="Shared rank per kind (may exceed the LoRA's r); for --to lora the rank of every site "
    "(never raised). Default: the kind's largest LoRA rank (for aslora see --budget).",
)
@click.option(
    "--energy",
    type=float,
    default=None,
    help="Instead of --rank: the smallest rank per kind (--to lora: per site) keeping this fraction "
    "of its energy, e.g. 0.99.",
)
@click.option(
    "--budget",
    type=float,
    default=None,
    help="Instead of --rank: a fraction of the source LoRA's parameters, e.g. 0.25, spent across kinds "
    "for the least total error, chosen exactly (aslora: between rank and groups; lora: between "
    "sites, optimally; a site cut to rank 0 is dropped, no longer adapted). Values above 1 are "
    "allowed: a shared rank may exceed the LoRA's r. Default for aslora with no --rank or --energy: "
    f"{DEFAULT_ASLORA_BUDGET} (the paper's setting).",
)
@click.option(
    "--groups",
    type=int,
    default=None,
    help="aslora: number of B groups per kind. Default: chosen with the rank by the --budget planner; "
    "with --rank K, the most groups that keep each kind within 25% of its LoRA parameters at rank K.",
)
@click.option(
    "--grouping",
    type=click.Choice(GROUPINGS),
    default="any",
    show_default=True,
    help="aslora (and auto's aslora candidate): 'any' groups any layers (Ward clustering), 'adjacent' "
    "only contiguous runs (exact dynamic programme).",
)
@click.option(
    "--calibration",
    "calibration",
    type=click.Path(path_type=str),
    default=None,
    help="Calibration data (a text file, .jsonl or tokenized folder, as finetune reads it): every form "
    "then minimises the error of the update's outputs on these inputs, measured with the LoRA "
    "attached to --base, instead of the plain ||dW - dW'||_F^2; --budget and --to auto use that "
    "error too. Needs --base.",
)
@click.option(
    "--base",
    "base",
    type=Folder(),
    default=None,
    help="With --calibration: the base model folder (with its tokenizer, unless the data is tokenized).",
)
@click.option(
    "--calibration-samples",
    type=int,
    default=CALIBRATION_SAMPLES,
    show_default=True,
    help="With --calibration: how many examples to run, drawn at random across the file (fixed seed, "
    "kept in file order; all of them if the file has fewer).",
)
@click.option(
    "--calibration-max-length",
    type=int,
    default=CALIBRATION_MAX_LENGTH,
    show_default=True,
    help="With --calibration: tokens kept of each example.",
)
@click.option(
    "--calibration-ridge",
    type=float,
    default=CALIBRATION_RIDGE,
    show_default=True,
    help="With --calibration: damping of each site's statistics, relative to its mean eigenvalue "
    "(GPTQ's damp_percent).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE_CHOICES),
    default=None,
    help="After the projection, store every factor (A and B, each unique tensor once; not carried tensors "
    "such as a classifier head) as integers with float16 scales, symmetric (zero point 0) in ONNX "
    "DequantizeLinear's convention; int4 is packed two per byte. The adapter is then written in "
    "shareport's native format (also for --to lora); `convert --to lora` of it writes a plain PEFT "
    "LoRA of the dequantized values. Default: no quantization.",
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help=f"With --quantize: elements per float16 scale, along each factor's model dimension (A's input, "
    f"B's output; never the rank). A dimension that is not a multiple of it ends in a shorter group "
    f"(no padding is stored; as ONNX's blocked DequantizeLinear does).  [default: {DEFAULT_GROUP_SIZE}]",
)
@click.option(
    "--max-rank",
    type=int,
    default=None,
    help="Serving (with --budget): no site above rank R (vLLM's max_lora_rank, TensorRT's fixed maximum): "
    "the budget plan is the exact optimum under that cap. Per site for --to lora; for the shared forms "
    "the rank of each kind (every site's rank once expanded to a plain LoRA). The report gives the "
    "error against the plan without the cap and the parameters a server holds padding every site to R.",
)
@click.option(
    "--uniform-rank",
    is_flag=True,
    default=False,
    help="Serving (with --budget): one rank for every site (shared forms: every kind), the one of least "
    "error the budget affords (for servers that need equal ranks: SGLang, diffusers' hotswap). "
    "A site whose own rank is lower keeps it. Not with --rank.",
)
@click.option(
    "--rank-buckets",
    default=None,
    metavar="R1,R2,...",
    help="Serving (with --budget): every site's rank (shared forms: every kind's) is one of these, e.g. "
    "4,8,16, chosen exactly for the least error; a site may be dropped (rank 0, no longer adapted) "
    "only when the budget does not pay for the smallest bucket at every site. Servers pad to the "
    "largest rank used, which the report gives.",
)
@overwrite_option
@allow_pickle_option
@json_option
@plot_option
def convert_cmd(
    lora_dir,
    to,
    out,
    rank,
    energy,
    budget,
    groups,
    grouping,
    calibration,
    base,
    calibration_samples,
    calibration_max_length,
    calibration_ridge,
    quantize,
    group_size,
    max_rank,
    uniform_rank,
    rank_buckets,
    overwrite,
    allow_pickle,
    as_json,
    plot,
):
    """Convert a LoRA (PEFT or native, any form) into a shared form, or truncate it.

    \b
    sharea   one A per kind, one B per layer        (ShareLoRA)
    shareb   one A per layer, one B per kind        (ShareLoRA)
    shareab  one A and one B per kind               (ShareLoRA)
    aslora   one A per kind, one B per group of layers (ASLoRA)
    lora     plain PEFT LoRA: truncated per site, or expanded from any form
    auto     the form with the least error at --budget: with --calibration DATA
             --base BASE, the least KL of the model's outputs to the LoRA's on
             DATA (what a user keeps); without, the least weight error

    With --plot, also write a PNG of the layer distance matrix per kind with the
    chosen groups outlined, and the energy kept against the shared rank.

    The projection is exact: for the chosen rank the result is the least-squares optimum
    (Eckart-Young) over all layers of a kind, computed from the factors without forming any
    dense update. Sizes are fractions of the source LoRA's parameters (kept in the provenance
    through recovery and re-conversion). A kind keeping under 50% of its energy gets a warning
    on stderr (also under "warnings" in --json). The output is shareport's native format (or
    PEFT when the result is a plain LoRA).
    """
    source = click.get_current_context().get_parameter_source

    def given(name, value):
        # a calibration setting left at its default is passed as None, so that the library can refuse
        # one given without --calibration (it would do nothing) and still apply the default with it
        return None if source(name) is click.core.ParameterSource.DEFAULT else value

    from .. import flows  # here, not at the top: usage errors and --help need no torch

    data = flows.convert(
        lora_dir,
        to,
        out,
        rank=rank,
        energy=energy,
        budget=budget,
        groups=groups,
        grouping=grouping,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        plot=plot,
        progress=not as_json,
        calibration=calibration,
        base=base,
        calibration_samples=given("calibration_samples", calibration_samples),
        calibration_max_length=given("calibration_max_length", calibration_max_length),
        calibration_ridge=given("calibration_ridge", calibration_ridge),
        quantize=quantize,
        group_size=group_size,
        max_rank=max_rank,
        uniform_rank=uniform_rank,
        rank_buckets=rank_buckets,
    )
    click.echo(to_json(data) if as_json else render(data))
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)


def render(data: dict) -> str:
    parts = [
        f"{data['form']} written to {data['output']}\n"
        f"parameters: {data['parameters_before']:,} -> {data['parameters_after']:,} = "
        + share_of_source(data["ratio"], data["source_parameters"])
    ]
    if data["candidates"]:
        by_outputs = data["ranked_by"].startswith("the model's outputs")
        # ranked by outputs: the error is the KL to the LoRA, its reference the base's (no adapter) KL
        names = (
            ("KL to LoRA", "sqrt(KL / base KL)", "output effect kept")
            if by_outputs
            else ("error", "rel. error", "energy kept")
        )
        rows = [
            (
                c["form"],
                c["parameters"],
                f"{c['ratio']:.1%}",
                c["error"],
                c["relative_error"],
                c["retained_energy"],
                "yes" if c["winner"] else "",
            )
            if "refused" not in c
            else (c["form"], "-", "-", "-", "-", "-", f"refused: {c['refused']}")
            for c in data["candidates"]
        ]
        parts.append(
            format_table(
                ["form", "params", "of source LoRA", *names, "written"],
                rows,
                title=f"--to auto at --budget {data['settings']['budget']:g}: {data['winner']} "
                f"ranks first by {data['ranked_by']}",
            )
        )
    if "calibration" in data:
        c = data["calibration"]
        drawn = (
            f"all {c['samples']:,} examples"
            if c["samples"] == c["examples"]
            else f"{c['samples']:,} of its {c['examples']:,} examples (drawn across the file)"
        )
        parts.append(
            f"calibrated on {c['data']}: {drawn}, {c['tokens']:,} tokens, ridge "
            f"{c['ridge']:g}, {c['seconds']:.1f} s; errors below are output errors on those inputs"
        )
        parts.append(
            format_table(
                ["kind", "plain objective", "calibrated objective"],
                [(name, v["plain_objective"], v["objective"]) for name, v in c["kinds"].items()],
            )
        )
    if "quantization" in data:
        parts.append(quantization_line(data["quantization"]))
    if "serving" in data:
        parts.append(serving_lines(data["serving"], data["settings"]["budget"]))
    if data["kinds"]:
        rows = [
            (
                k["kind"],
                k["sites"],
                k["lora_rank"],
                _ranks(k["site_ranks"]),
                _groups(k["groups"], k["sites"]),
                k["relative_error"],
                k["retained_energy"],
                k["parameters_after"],
                "yes" if k["already_shared"] else "no",
            )
            for k in data["kinds"]
        ]
        parts.append(
            format_table(
                [
                    "kind",
                    "sites",
                    "LoRA r",
                    "rank",
                    "B groups (layers)",
                    "rel. error",
                    "energy kept",
                    "params",
                    "A already shared",
                ],
                rows,
            )
        )
        dropped = sum(r == 0 for k in data["kinds"] for r in k["site_ranks"].values())
        if dropped:
            parts.append(f"{dropped} site(s) cut to rank 0 are no longer adapted (see site_ranks in --json)")
    return "\n\n".join(parts)


def quantization_line(q: dict) -> str:
    return (
        f"quantized {q['quantize']} in groups of {q['group_size']} (float16 scales, symmetric): "
        f"{human_bytes(q['bytes'])} of factors = {q['bits_per_parameter']:.2f} bits per parameter "
        f"(float32 {human_bytes(q['float32_bytes'])}, float16 {human_bytes(q['float16_bytes'])}); "
        f"update error it adds: {q['relative_error']:.2%} relative"
    )


def serving_lines(s: dict, budget: float) -> str:
    """The serving rule's price: its error against the unconstrained plan at the same budget, and padding."""
    ranks = ",".join(map(str, s["ranks_used"]))
    return (
        f"{s['rule']} at --budget {budget:g}: relative error {s['relative_error']:.4%} against "
        f"{s['unconstrained_relative_error']:.4%} for the unconstrained plan "
        f"({s['relative_error_difference'] * 100:+.4f} points; squared error {s['error']:.6g} vs "
        f"{s['unconstrained_error']:.6g}); ranks used {ranks}\n"
        f"a server padding every site to rank {s['pads_to']} holds {s['padded_parameters']:,} parameters "
        f"(unconstrained plan: {s['unconstrained_parameters']:,} parameters, padded to its rank "
        f"{s['unconstrained_max_rank']}: {s['unconstrained_padded_parameters']:,})"
    )


def _ranks(site_ranks: dict[str, int]) -> int | str:
    """One rank, or 'min-max' when the sites differ (a truncated LoRA)."""
    low, high = min(site_ranks.values()), max(site_ranks.values())
    return high if low == high else f"{low}-{high}"


def _groups(groups: list[list[int]], sites: int) -> str:
    if len(groups) == sites:
        return "one per layer"
    if len(groups) == 1:
        return "one for all"
    return " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
