"""``shareport train --form F --base BASE --data DATA --target q_proj,v_proj --rank r``: a new shared adapter."""

from __future__ import annotations

import click

from ..files.atomic import check_output
from ..errors import ShareportError
from ..train.recipe import Recipe, run, with_provenance
from ..model.fresh import SHARED
from ..train.jobs import merge_schedule, scratch_job, write_result
from .training_options import checkpoint_folder, echo_report, recipe_options


@click.command("train")
@click.option("--form", required=True, type=click.Choice(sorted(SHARED)), help="Which factors are shared per kind.")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The base model folder (a causal LM, or a classifier when DATA has labels).")
@click.option("--target", "targets", required=True, help="Comma-separated module names to adapt, e.g. q_proj,v_proj.")
@click.option("--rank", required=True, type=int, help="Rank r of every factor.")
@click.option("--alpha", default=8.0, show_default=True, type=float, help="LoRA alpha; the scale is alpha / r.")
@recipe_options
def train_cmd(form, base_dir, targets, rank, alpha, data_path, out, overwrite, steps, lr, batch_size, max_length, seed,
              eval_fraction, checkpoint_every, checkpoint_dir, resume, merges, groups, merge_start, merge_every,
              merge_mode, merge_pairs, as_json) -> None:
    """Train an adapter from scratch (ShareLoRA init: kaiming-uniform A, zero B).

    --form lora trains a plain LoRA (nothing shared), e.g. a teacher to convert and recover.

    The loss is the data's own: next-token prediction for a causal LM, the 'label' field for
    a classifier. --form aslora starts as ShareA and merges B's of similar layers on the
    schedule given by --merges/--groups, --merge-start (T_s) and --merge-every (m).
    """
    if out is None:
        raise ShareportError("train needs an output folder (-o/--output)")
    merging = merges is not None or groups is not None
    if merging and form != "aslora":
        raise ShareportError(f"--merges/--groups merge B's, which only --form aslora does (got --form {form})")
    if form == "aslora" and not merging:
        raise ShareportError("--form aslora needs --merges or --groups (how far to merge the B's)")
    inputs = (base_dir, data_path)
    check_output(out, overwrite, inputs)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    if not target_list:
        raise ShareportError("--target needs at least one module name")
    job = scratch_job(base_dir, data_path, form, target_list, rank, alpha, seed, max_length, eval_fraction,
                      checkpoint_folder(out, checkpoint_dir), resume, merging)
    schedule = merge_schedule(job.student, steps, merges, groups, merge_start, merge_every, merge_mode, merge_pairs)
    recipe = Recipe(steps=steps, lr=lr, batch_size=batch_size, seed=seed, distill_weight=0.0, task_weight=1.0,
                    checkpoint_every=checkpoint_every, merge=schedule)
    adapter, report = run(job, recipe)
    if job.accelerator.is_main_process:
        entry = {"step": "train", "form": form, "data": data_path, "steps": steps, "seed": seed, "after": report["after"]}
        write_result(out, with_provenance(adapter, entry), report, overwrite, inputs)
        echo_report(out, report, as_json)
