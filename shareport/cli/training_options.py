"""Options and output shared by ``finetune`` and ``train``: the recipe, data, checkpoints, ASLoRA merges."""

from __future__ import annotations

import contextlib
from typing import Iterator

import click

from ..train.choices import MERGE_MODES, MERGE_PAIRS
from ..train.schedule import (
    BACKOFF_FACTOR,
    BACKOFF_RATIO,
    DEFAULT_LR,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    DEFAULT_WARMUP,
    LR_SCALE_REFERENCE,
    LR_SCALINGS,
    SCHEDULES,
)
from .options import output_option
from .table import format_table, to_json

_RECIPE_OPTIONS = [
    click.option(
        "--data",
        "data_path",
        default=None,
        type=click.Path(path_type=str),
        help="A text file (one example a line), a .jsonl with 'text' (and 'label'), or a tokenized folder.",
    ),
    click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists."),
    click.option(
        "--steps", default=DEFAULT_STEPS, show_default=True, type=click.IntRange(min=1), help="Optimizer steps."
    ),
    click.option(
        "--lr",
        default=DEFAULT_LR,
        show_default=True,
        type=float,
        help="AdamW's peak learning rate (after the warmup; the schedule then lowers it).",
    ),
    click.option(
        "--lr-scaling",
        type=click.Choice(LR_SCALINGS),
        default=None,
        help="tensor: each trainable tensor's step is scaled by its entries' size at the start (rms / "
        f"{LR_SCALE_REFERENCE:g}), so one --lr suits wide and narrow models alike (Adam steps every entry by "
        "about the lr, whatever its size). none: --lr for every tensor. [default: tensor for finetune of "
        "whole factors; none for train, whose B's start at zero, and for cores: fleet members, --trainable cores]",
    ),
    click.option(
        "--schedule",
        default=DEFAULT_SCHEDULE,
        show_default=True,
        help=f"How the learning rate falls after the warmup ({'|'.join(SCHEDULES)}): to zero along a "
        "cosine or a line, or not at all.",
    ),
    click.option(
        "--warmup",
        default=DEFAULT_WARMUP,
        show_default=True,
        type=float,
        help="Share of the steps over which the learning rate rises linearly to --lr.",
    ),
    click.option(
        "--eval-every",
        type=int,
        default=None,
        help="Evaluate the held-out split every N steps (and at step 0 and the last); the best "
        "adapter evaluated is the one written [default: about 10% of the run's compute].",
    ),
    click.option(
        "--backoff/--no-backoff",
        default=True,
        show_default=True,
        help=f"When an evaluation's held-out score is more than {BACKOFF_RATIO:g}x the best so far (the lr "
        f"knocked the adapter off a good point), put the best adapter back and scale the lr by "
        f"{BACKOFF_FACTOR:g} for the rest of the run.",
    ),
    click.option(
        "--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Global batch (all processes)."
    ),
    click.option("--max-length", default=128, show_default=True, type=int, help="Tokens per example, at most."),
    click.option("--seed", default=0, show_default=True, type=int, help="Seed of the batch order (and init)."),
    click.option(
        "--eval-fraction",
        default=0.1,
        show_default=True,
        type=float,
        help="Share of the examples held out (a fixed split): evaluated before, during (to keep the "
        "best step) and after.",
    ),
    click.option(
        "--checkpoint-every",
        default=0,
        show_default=True,
        type=int,
        help="Save a resumable checkpoint every N steps (0: never).",
    ),
    click.option(
        "--checkpoint-dir",
        type=click.Path(path_type=str),
        default=None,
        help="Checkpoint folder [default: OUTPUT.checkpoint].",
    ),
    click.option("--resume", is_flag=True, help="Continue from the checkpoint folder (same options required)."),
    click.option("--merges", type=int, default=None, help="ASLoRA: merges per kind during training."),
    click.option("--groups", type=int, default=None, help="ASLoRA: or the number of B groups per kind to end with."),
    click.option(
        "--merge-start",
        type=int,
        default=None,
        help="ASLoRA T_s: first merge after this step [steps/4, earlier when the merges would not fit].",
    ),
    click.option(
        "--merge-every", type=int, default=None, help="ASLoRA m: steps between merges [spread over half the run]."
    ),
    click.option(
        "--merge-mode",
        type=click.Choice(MERGE_MODES),
        default="tie",
        show_default=True,
        help="tie: the lower layer takes the upper's B (the paper); mean: both take the mean.",
    ),
    click.option(
        "--merge-pairs",
        type=click.Choice(MERGE_PAIRS),
        default="adjacent",
        show_default=True,
        help="Which groups may merge: neighbouring layers only, or any pair.",
    ),
    click.option(
        "--compile",
        is_flag=True,
        help="torch.compile the base's transformer blocks for the training steps: faster on a GPU "
        "for long runs (fused elementwise work), at a compile cost of tens of seconds up front.",
    ),
    click.option(
        "--pack",
        is_flag=True,
        help="Causal LMs: pack several examples into each row (attention kept apart by position ids): "
        "the same examples, loss and update per step, fewer padded positions to compute.",
    ),
    click.option(
        "--group-by-length",
        is_flag=True,
        help="Faster steps, at some fidelity: every 16 batches of the shuffled stream are sorted by length "
        "and cut again, so each batch pads little. Measured in finetune: a classifier's step about 0.7x a "
        "shuffled one with no clear KL difference; a causal LM ended 12-40% further from its teacher "
        "(--pack saves padding without that cost there). Not with --pack.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
]


def recipe_options(output_help: str):
    """Attach -o/--output (its help says the command's default) and every shared option, in --help's order."""
    options = [
        _RECIPE_OPTIONS[0],
        output_option("--out", type=click.Path(path_type=str), default=None, help=output_help),
        *_RECIPE_OPTIONS[1:],
    ]

    def attach(func):
        for option in reversed(options):
            func = option(func)
        return func

    return attach


@contextlib.contextmanager
def resume_hint(out: str | None, options) -> Iterator[None]:
    """On Ctrl-C: say whether a checkpoint was saved and how to continue from it, instead of click's
    bare "Aborted!"."""
    try:
        yield
    except KeyboardInterrupt:
        folder = options.checkpoint_folder(out) if out else None
        if folder is not None and folder.is_dir():
            click.echo(
                f"\ninterrupted: the last checkpoint is in {folder}; rerun the same command with --resume "
                "to continue from it",
                err=True,
            )
        else:
            every = options.checkpoint_every
            why = f"the first is saved at step {every}" if every else "--checkpoint-every N saves one every N steps"
            click.echo(f"\ninterrupted: no checkpoint was saved ({why})", err=True)
        raise SystemExit(130) from None


def echo_report(out: str, report: dict, as_json: bool) -> None:
    if as_json:
        click.echo(to_json(report))
        return
    before, after = report["before"], report["after"]
    rows = [
        (key, _fmt(before.get(key)), _fmt(after.get(key)))
        for key in ("kl", "top1_agreement", "hidden_mse", "lm_loss", "label_loss", "accuracy")
        if key in after
    ]
    click.echo(format_table(["held-out metric", "before", "after"], rows))
    click.echo(_curve_line(report))
    params = report["parameters"]
    trained = (
        f" ({params['trained']:,} trained: cores between frozen bases)"
        if report["recipe"].get("trainable") == "cores"
        else ""
    )
    click.echo(
        f"parameters: {params['start']:,} -> {params['end']:,}{trained}; B matrices per kind: "
        + ", ".join(f"{k}={v}" for k, v in report["groups"].items())
    )
    for event in report.get("merges", []):
        click.echo(f"  step {event['step']}: {event['kind']} layers {event['merged']} -> B of {event['kept']}")
    dropped = report["inputs"].get("teacher_only_sites")
    if dropped:
        click.echo(
            f"{len(dropped)} module(s) the teacher adapts are not adapted in the student (cut to rank 0 "
            f"by the conversion), e.g. {dropped[0]}"
        )
    if report["inputs"].get("generated"):
        click.echo(
            f"held-out: {report['heldout_examples']} of the {report['inputs']['generated']} texts sampled from the "
            "teacher, not text from the task"
        )
    if report.get("backoffs"):
        click.echo(
            f"backed off at step(s) {', '.join(map(str, report['backoffs']))}: the held-out score rose past "
            f"{BACKOFF_RATIO:g}x the best, so the best adapter was put back and the lr scaled by "
            f"{BACKOFF_FACTOR:g} each time"
        )
    stored = report.get("stored")
    if stored:  # a quantized start is published quantized (train/stored.py)
        key = "kl" if "kl" in stored["float_after"] else None
        figures = (
            f" (held-out {key} {stored['float_after'][key]:.4g} in float, {after[key]:.4g} as written)" if key else ""
        )
        click.echo(
            f"the start held integers, so step {report['best_step']}'s adapter was quantized the same way: "
            + (
                "it is written" + figures
                if stored["quantized"]
                else "it no longer beat the start, which is written as it was given"
            )
        )
    if report.get("best_step") == 0 and len(report.get("curve", [])) > 1:
        click.echo(
            "no evaluated step beat the start: the adapter is written as it was given "
            f"(the lr, {report['recipe']['lr']:g}, may be too large for it: try a smaller --lr)"
        )
    worse = worse_metrics(before, after)
    if worse:
        click.echo("held-out numbers got worse: " + "; ".join(f"{k} {b:.4g} -> {a:.4g}" for k, b, a in worse))
    click.echo(f"wrote {out}")


def _curve_line(report: dict) -> str:
    """Which evaluated step was written, and the held-out curve in one line."""
    key = (
        "kl"
        if "kl" in report["after"]
        else next((k for k in ("hidden_mse", "label_loss", "lm_loss") if k in report["after"]), None)
    )
    points = ", ".join(f"{p['step']}: {p[key]:.4g}" for p in report["curve"] if key in p)
    return (
        f"kept step {report['best_step']} (best {report['selected_by']}; evaluated every "
        f"{report['eval_every']} steps): {key} at step {points}"
    )


# metric -> whether higher is better (dict-valued metrics compare the student's number)
_DIRECTION = {
    "kl": False,
    "top1_agreement": True,
    "hidden_mse": False,
    "lm_loss": False,
    "label_loss": False,
    "accuracy": True,
}


def worse_metrics(before: dict, after: dict) -> list[tuple[str, float, float]]:
    """(metric, before, after) for every held-out number that moved the wrong way."""
    out = []
    for key, higher in _DIRECTION.items():
        if key not in before or key not in after:
            continue
        b, a = before[key], after[key]
        if isinstance(b, dict):
            b, a = b.get("student"), a.get("student")
        if b is None or a is None:
            continue
        if (a < b) if higher else (a > b):
            out.append((key, b, a))
    return out


def _fmt(value) -> str:
    if isinstance(value, dict):  # student / teacher pair
        return " / ".join(f"{k} {_fmt(v)}" for k, v in sorted(value.items()))
    # "#": 4 significant digits always (0.5340, not 0.534), so a column reads in one format
    return "-" if value is None else f"{value:#.4g}"
