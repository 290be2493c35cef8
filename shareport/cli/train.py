"""``shareport train --form F --base BASE --data DATA --target q_proj,v_proj --rank r``: a new shared adapter."""

from __future__ import annotations

import click

from ..errors import ShareportError
from ..forms import SHARED
from .options import Folder
from .training_options import echo_report, recipe_options, resume_hint


@click.command("train")
@click.option("--form", required=True, type=click.Choice(sorted(SHARED)), help="Which factors are shared per kind.")
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=Folder(),
    help="The base model folder (a causal LM, or a classifier when DATA has labels).",
)
@click.option("--target", "targets", required=True, help="Comma-separated module names to adapt, e.g. q_proj,v_proj.")
@click.option("--rank", required=True, type=int, help="Rank r of every factor.")
@click.option("--alpha", default=8.0, show_default=True, type=float, help="LoRA alpha; the scale is alpha / r.")
@recipe_options("Output adapter folder (required).")
def train_cmd(form, base_dir, targets, rank, alpha, data_path, out, overwrite, as_json, **training) -> None:
    """Train an adapter from scratch (ShareLoRA init: kaiming-uniform A, zero B).

    --form lora trains a plain LoRA (nothing shared), e.g. a teacher to convert and recover.

    The loss is the data's own: next-token prediction for a causal LM, the 'label' field for
    a classifier. --form aslora starts as ShareA and merges B's of similar layers on the
    schedule given by --merges/--groups, --merge-start (T_s) and --merge-every (m).
    """
    if out is None:
        raise ShareportError("train needs an output folder (-o/--output)")
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    options = flows.TrainingOptions(**training)
    with resume_hint(out, options):
        report = flows.train(
            form, base_dir, target_list, rank, data_path, out, alpha=alpha, options=options, overwrite=overwrite
        )
    if report is not None:  # the main process
        echo_report(out, report, as_json)
