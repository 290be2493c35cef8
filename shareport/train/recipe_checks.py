"""What a training recipe must satisfy before a run starts: losses that have what they need, and
settings in range. Raised as one-line ``ShareportError``s, before any step."""

from __future__ import annotations

from ..errors import ShareportError
from .schedule import check_eval_every, check_lr_scaling, check_schedule, check_trainable


def check_recipe(recipe, job, causal: bool) -> None:
    """Refuse, in one line, a recipe that cannot train on ``job`` (before anything runs)."""
    if recipe.distill_weight and job.teacher is None:
        raise ShareportError("distillation needs a teacher adapter")
    if recipe.hidden_weight and job.teacher is None:
        raise ShareportError("--hidden-weight distils hidden states toward a teacher; `train` has none")
    if recipe.site_weight and job.teacher is None:
        raise ShareportError("--site-weight distils each site's update toward a teacher's; `train` has none")
    if recipe.site_weight and not recipe.distill_weight:
        raise ShareportError("--site-weight is a share of the output KL, which this run does not train on")
    if recipe.site_weight is not None and not recipe.site_weight >= 0:
        raise ShareportError(f"--site-weight must be >= 0, got {recipe.site_weight}")
    if recipe.task_weight and not causal and job.train_data.labels is None:
        raise ShareportError(f"{job.train_data.source}: the data has no 'label' field, which the task loss needs")
    if not recipe.distill_weight and not recipe.task_weight and not recipe.hidden_weight:
        raise ShareportError("nothing to train on: the distillation and task loss weights are both 0")
    if recipe.steps < 1:
        raise ShareportError(f"--steps must be at least 1, got {recipe.steps}")
    if recipe.temperature is not None and not recipe.temperature > 0:
        raise ShareportError(f"--temperature must be > 0, got {recipe.temperature}")
    check_schedule(recipe.schedule, recipe.warmup)
    check_trainable(recipe.trainable)
    check_lr_scaling(recipe.lr_scaling)
    if recipe.trainable == "cores" and recipe.merge is not None:
        raise ShareportError(
            "--trainable cores cannot run with ASLoRA merges (--merges/--groups): a merge replaces "
            "whole B factors, which then have no basis of their own; train the factors"
        )
    if recipe.trainable == "cores" and (recipe.checkpoint_every or job.resume_state is not None):
        raise ShareportError(
            "--trainable cores does not checkpoint (--checkpoint-every/--resume): a checkpoint "
            "would have to keep the frozen bases too; run without them"
        )
    check_eval_every(recipe.eval_every, recipe.steps)
    if recipe.pack and recipe.group_by_length:
        raise ShareportError(
            "--group-by-length and --pack: a packed row is --max-length tokens wide whatever lengths it holds, "
            "so grouping saves nothing there; give one of them"
        )
    if recipe.pack and not causal:
        raise ShareportError(
            "--pack needs a causal LM: a packed row holds several examples, and a "
            f"{type(job.model).__name__} gives one output per row"
        )
    if recipe.batch_size % job.accelerator.num_processes:
        raise ShareportError(
            f"--batch-size {recipe.batch_size} must be a multiple of the {job.accelerator.num_processes} processes"
        )
