"""``shareport finetune SHARED_DIR --base BASE --teacher LORA --data DATA``: recover a shared adapter."""

from __future__ import annotations

import click

from ..files.atomic import check_output
from ..train.recipe import Recipe, run, with_provenance
from ..train.jobs import merge_schedule, recovery_job, write_result
from .training_options import checkpoint_folder, echo_report, recipe_options


@click.command("finetune")
@click.argument("shared_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The base model folder (with its tokenizer, unless DATA is tokenized).")
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The original LoRA that SHARED_DIR was converted from.")
@click.option("--lm-loss", "lm_loss", default=0.0, show_default=True, type=float,
              help="Weight of the data's own loss (next-token, or the 'label' field) added to the distillation.")
@recipe_options
def finetune_cmd(shared_dir, base_dir, teacher_dir, lm_loss, data_path, out, overwrite, steps, lr, batch_size,
                 max_length, seed, eval_fraction, checkpoint_every, checkpoint_dir, resume, merges, groups,
                 merge_start, merge_every, merge_mode, merge_pairs, as_json) -> None:
    """Recover a shared adapter by distilling toward the LoRA it came from (no labels needed).

    The student (base + SHARED_DIR) learns to match the teacher's outputs (base + the teacher
    LoRA) on DATA: KL on logits, MSE on an encoder's hidden states. Only the adapter trains.
    Runs on CUDA with bf16 autocast when present, else on the CPU; for several GPUs use
    `accelerate launch -m shareport finetune ...`. With --merges/--groups it also merges B's
    on the ASLoRA schedule while recovering.
    """
    out = out or shared_dir.rstrip("/") + "-recovered"
    inputs = (shared_dir, teacher_dir, base_dir, data_path)
    check_output(out, overwrite, inputs)
    ckpt = checkpoint_folder(out, checkpoint_dir)
    merging = merges is not None or groups is not None
    job = recovery_job(shared_dir, base_dir, teacher_dir, data_path, max_length, eval_fraction, ckpt, resume, merging)
    schedule = merge_schedule(job.student, steps, merges, groups, merge_start, merge_every, merge_mode, merge_pairs)
    recipe = Recipe(steps=steps, lr=lr, batch_size=batch_size, seed=seed, distill_weight=1.0, task_weight=lm_loss,
                    checkpoint_every=checkpoint_every, merge=schedule)
    adapter, report = run(job, recipe)
    if job.accelerator.is_main_process:
        entry = {"step": "finetune", "teacher": teacher_dir, "data": data_path, "steps": steps, "seed": seed,
                 "before": report["before"], "after": report["after"]}
        write_result(out, with_provenance(adapter, entry), report, overwrite, inputs)
        echo_report(out, report, as_json)

