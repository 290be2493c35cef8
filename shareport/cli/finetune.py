"""``shareport finetune SHARED_DIR --base BASE --teacher LORA --data DATA``: recover a shared adapter."""

from __future__ import annotations

import click

from ..train.schedule import (
    CLASSIFIER_SITE_WEIGHT,
    CLASSIFIER_TEMPERATURE,
    DEFAULT_TRAINABLE,
    TOKEN_SITE_WEIGHT,
    TOKEN_TEMPERATURE,
    TRAINABLES,
)
from .options import Folder
from .training_options import echo_report, recipe_options, resume_hint


@click.command("finetune")
@click.argument("shared_dir", type=Folder())
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=Folder(),
    help="The base model folder (with its tokenizer, unless DATA is tokenized).",
)
@click.option(
    "--teacher",
    "teacher_dir",
    required=True,
    type=Folder(),
    help="The original LoRA that SHARED_DIR was converted from.",
)
@click.option(
    "--lm-loss",
    "lm_loss",
    default=0.0,
    show_default=True,
    type=float,
    help="Weight of the data's own loss (next-token, or the 'label' field) added to the distillation.",
)
@click.option(
    "--generate",
    type=int,
    default=None,
    help="Causal LMs with no data: recover on N (at least 2) texts sampled from the teacher (base + LoRA), "
    "each from the beginning-of-sequence token, from the top-p 0.9 nucleus, up to --max-length tokens, "
    "instead of --data (seeded by --seed); held-out numbers are then on sampled texts. Text from the task, "
    "even unlabelled, recovers more. Sampled text is learnt more slowly: on the demo, past about 3000 texts "
    "more texts add nothing and more --steps do (about 3000 to come near what its own text gives in 300). "
    "Give --max-length near your texts' length: a base that never ends a text writes every sample that long.",
)
@click.option(
    "--hidden-weight",
    default=0.0,
    show_default=True,
    type=float,
    help="Weight of a second distillation signal: the last hidden states at every token against the "
    "teacher's (mean squared error relative to their scale), besides the output KL.",
)
@click.option(
    "--temperature",
    default=None,
    type=float,
    help="Temperature of the distillation KL (both distributions softened; the loss scaled by T^2). "
    f"[default: by the output: {CLASSIFIER_TEMPERATURE:g} for a classifier's classes, "
    f"{TOKEN_TEMPERATURE:g} for a causal LM's tokens, as measured on two classifier tasks and one causal LM]",
)
@click.option(
    "--site-weight",
    default=None,
    type=float,
    help="Weight of a third signal: each adapted site's update (dW x at every token) against the "
    "teacher's, relative to its energy and averaged over the sites, rescaled at every step to the "
    "output KL's size, so W is its share of the KL (1: as large as the KL). "
    f"[default: by the output: {CLASSIFIER_SITE_WEIGHT:g} for a classifier, {TOKEN_SITE_WEIGHT:g} for a "
    "causal LM, as measured on tasks of each]",
)
@click.option(
    "--trainable",
    type=click.Choice(TRAINABLES),
    default=DEFAULT_TRAINABLE,
    show_default=True,
    help="factors: every factor trains whole. cores: each factor is split once into a frozen "
    "orthonormal basis and a small r x r core, and only the cores train: the same form and "
    "size, the directions the conversion found kept, far fewer trained numbers.",
)
@recipe_options("Output adapter folder [default: SHARED_DIR-recovered beside it].")
def finetune_cmd(
    shared_dir, base_dir, teacher_dir, lm_loss, generate, data_path, out, overwrite, as_json, **training
) -> None:
    """Recover a shared adapter by distilling toward the LoRA it came from (no labels needed).

    The student (base + SHARED_DIR) learns to match the teacher's outputs (base + the teacher
    LoRA) on DATA: KL on logits, MSE on an encoder's hidden states. Only the adapter trains.
    Runs on CUDA with bf16 autocast when present, else on the CPU; for several GPUs use
    `accelerate launch -m shareport finetune ...`. With --merges/--groups it also merges B's
    on the ASLoRA schedule while recovering.

    The learning rate warms up, then decays to zero (--schedule). The held-out split is
    evaluated at step 0, every --eval-every steps and at the end, and the best adapter seen is
    the one written (by held-out KL): recovery never publishes an adapter worse, on held-out
    data, than the one it was given. Modules the conversion cut to rank 0 stay unadapted.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    options = flows.TrainingOptions(**training)
    with resume_hint(out or flows.default_recover_output(shared_dir), options):
        report = flows.recover(
            shared_dir,
            base_dir,
            teacher_dir,
            data_path,
            out,
            lm_loss=lm_loss,
            options=options,
            overwrite=overwrite,
            generate=generate,
        )
    if report is not None:  # the main process
        echo_report(out or flows.default_recover_output(shared_dir), report, as_json)
