"""``shareport frontier LORA --base BASE --data DATA -o OUT``: which form and size to ship."""

from __future__ import annotations

import click

from ..train.choices import DEFAULT_FRONTIER_BUDGETS, FRONTIER_FORMS, MAX_FRONTIER_BUDGET
from ..train.schedule import DEFAULT_LR
from .options import Folder, json_option
from .table import format_table, to_json


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@click.command("frontier")
@click.argument("lora_dir", type=Folder())
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=Folder(),
    help="The base model folder (with its tokenizer, unless DATA is tokenized).",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=str),
    help="Text, .jsonl (with 'label' for accuracy) or tokenized folder: recovery trains on it and, "
    "without --eval, its fixed held-out split scores every point.",
)
@click.option(
    "--eval",
    "eval_path",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="A labelled .jsonl to score every point on (accuracy, KL and agreement) instead.",
)
@click.option(
    "--budgets",
    default=",".join(f"{b:g}" for b in DEFAULT_FRONTIER_BUDGETS),
    show_default=True,
    help=f"Sizes to try, as fractions of the LoRA's parameters, in (0, {MAX_FRONTIER_BUDGET:g}].",
)
@click.option(
    "--forms",
    default=",".join(FRONTIER_FORMS),
    show_default=True,
    help="Forms to try ('lora' is the LoRA truncated per site).",
)
@click.option(
    "--recover-steps",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also recover every point for N distillation steps (shareport finetune's recipe) and score it again.",
)
@click.option(
    "--serving",
    multiple=True,
    metavar="RULE",
    help="Also plan every form and budget under a serving rule and score it as its own line: 'uniform' "
    "(convert --uniform-rank), 'max-rank=R' (--max-rank R) or 'buckets=R1,R2,...' (--rank-buckets). "
    "Repeat for several.",
)
@click.option(
    "--precisions",
    default=None,
    metavar="LIST",
    help="Also score every point with its factors stored at each of these precisions, comma-separated: "
    "fp16, int8, int4 (int8/int4 as `convert --quantize` stores them: integers with float16 scales, "
    "default group size). Every point then gives its bytes, the front and --keep's choice are by bytes, "
    "and the figure is fidelity against bytes, a line per form and precision.",
)
@click.option(
    "--keep",
    default=0.99,
    show_default=True,
    type=float,
    help="Name the smallest point keeping this share of the LoRA's accuracy (or top-1 agreement).",
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=str),
    help="Output folder: frontier.json and frontier.png (with matplotlib).",
)
@click.option(
    "--lr",
    default=DEFAULT_LR,
    show_default=True,
    type=float,
    help="Recovery: AdamW's peak learning rate (warmup, then cosine decay; the best step is kept).",
)
@click.option(
    "--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Recovery and scoring batch."
)
@click.option("--max-length", default=128, show_default=True, type=int, help="Tokens per example, at most.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the recovery batch order.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if an earlier shareport run wrote it.")
@json_option
def frontier_cmd(
    lora_dir,
    base_dir,
    data_path,
    eval_path,
    budgets,
    forms,
    recover_steps,
    serving,
    precisions,
    keep,
    out,
    lr,
    batch_size,
    max_length,
    seed,
    overwrite,
    as_json,
) -> None:
    """Convert LORA_DIR into every form at every budget, score each against the LoRA on held-out
    data (and again after --recover-steps of recovery), and name the smallest that keeps --keep.

    Writes frontier.json (every point) and, with matplotlib installed, frontier.png (fidelity
    against size, one line per form, recovered points hollow, the Pareto front drawn). Finished
    points are cached in OUTPUT.cache, so an interrupted run picks up where it stopped; a finished
    run removes the cache.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    options = flows.TrainingOptions(lr=lr, batch_size=batch_size, max_length=max_length, seed=seed)
    data = flows.frontier(
        lora_dir,
        base_dir,
        data_path,
        out,
        eval_path=eval_path,
        budgets=_floats(budgets),
        forms=tuple(f.strip() for f in forms.split(",") if f.strip()),
        recover_steps=recover_steps,
        keep=keep,
        options=options,
        overwrite=overwrite,
        progress=not as_json,
        serving=serving,
        precisions=() if precisions is None else tuple(p.strip() for p in precisions.split(",")),
    )
    click.echo(to_json(data) if as_json else render(data))


def render(data: dict) -> str:
    def key(p):
        return p["form"], p.get("serving"), p["budget"], p["recovered"], p.get("precision")

    def label(p):
        text = p["form"] if p.get("serving") is None else f"{p['form']} [{p['serving']}]"
        return text if p.get("precision") is None else f"{text} {p['precision']}"

    sized = "precisions" in data  # --precisions: a bytes column, and size means bytes

    front = {key(p) for p in data["pareto"]}
    rows = [
        (
            label(p),
            f"{p['budget']:g}",
            f"{p['parameters']:,}",
            *([f"{p['bytes']:,}"] if sized else []),
            f"{p['ratio']:.1%}",
            f"after {p['steps']}" if p["recovered"] else "converted",
            p["kl"],
            p["top1_agreement"],
            "-" if p["accuracy"] is None else p["accuracy"],
            p["fidelity"],
            "*" if key(p) in front else "",
        )
        for p in data["points"]
    ]
    lora = data["lora"]
    head = f"LoRA: {data['lora_parameters']:,} parameters"
    if lora.get("accuracy"):
        head += f", accuracy {lora['accuracy']['student']:.4g}"
    head += f", {data['lora_float32_bytes']:,} bytes in float32" if sized else ""
    columns = ["form", "budget", "params", *(["bytes"] if sized else []), "of LoRA", "state"]
    table = format_table([*columns, "KL", "top-1", "accuracy", "fidelity", "front"], rows)
    chosen = data["smallest_keeping"]
    kept = "accuracy" if lora.get("accuracy") else "top-1 agreement"
    verdict = (
        f"smallest point keeping {data['keep']:.0%} of the LoRA's {kept}: {label(chosen)} at "
        f"{chosen['ratio']:.1%} of its parameters ({chosen['parameters']:,}"
        f"{'; ' + format(chosen['bytes'], ',') + ' bytes' if sized else ''}"
        f"{', recovered' if chosen['recovered'] else ''}; fidelity {chosen['fidelity']:.4f})"
        if chosen
        else f"no point keeps {data['keep']:.0%} of the LoRA's {kept}"
    )
    tail = f"\nwrote {data['output']}" + (
        f" (figure: {data['plot']})" if data.get("plot") else f" (no figure: {data['plot_missing']})"
    )
    return f"{head}\n{table}\n{verdict}{tail}"
