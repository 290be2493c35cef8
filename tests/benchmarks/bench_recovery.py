"""Recovery, old recipe against new: fidelity against step, steps and wall time to 95% and 99% of the LoRA.

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_recovery --out /tmp/bench-recovery \\
        [--tasks docstrings demo] [--forms lora sharea aslora] [--budgets 0.05 0.1 0.25 0.5] \\
        [--recipes old new] [--steps 300] [--lrs 1e-3] [--hidden-weights 0] [--calibrated] \\
        [--trainables factors cores]

Not collected by pytest. Every run is kept under ``--out`` (``stages.py``), so a rerun with more
forms, budgets or recipes only computes what is new; the table and ``results.json`` cover every
run asked for, and ``curves.png`` plots them.

Tasks:
- **docstrings**: the real MiniLM with a PEFT LoRA (r=16 on all six kinds) trained on CPython's
  docstrings (``bench_frontier.py``'s stages: the same data and LoRA). Recovery distils toward the
  LoRA on the train texts (no labels); the best step is picked on the train file's 10% held-out
  split, and before/after are scored on the test split. Fidelity = accuracy / the LoRA's accuracy.
- **demo**: ``shareport demo``'s causal LM (8-layer Llama, hidden 64, BPE vocabulary 384) and its
  LoRA (q, v, o, down; r=8) trained on the domain corpus, recovered on that corpus. Fidelity =
  next-token top-1 agreement with the LoRA on the held-out split.
- **demo-long**: the same corpora and LoRA shape on a wider Llama (6 layers, hidden 128) pretrained
  1500 steps instead of 150, its LoRA trained 200 steps instead of 50: a second causal LM whose
  teacher models its text better (``CAUSAL_SHAPES``).

Recipes:
- **old**: what recovery did before issue 26: constant lr (2e-3, the frontier's), no warmup, the
  last step published whatever it is (``BestKept.offer`` patched to accept every step).
- **new**: the library's defaults (warmup 10%, cosine decay to 0, the best evaluated step kept),
  at each ``--lrs``, ``--hidden-weights`` and ``--trainables`` (``factors``: every factor trains;
  ``cores``: only r x r cores between frozen orthonormal bases, ``shareport.train.cores``).

The curve is the trainer's own evaluation on the held-out split, every ``--curve-every`` steps
(more often than the library's default, to draw the curve); "s/step" counts training alone plus
the evaluations the library's default ``eval_every`` would make, both measured in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from shareport import flows
from shareport.errors import ShareportError
from shareport.files import load_adapter
from shareport.train import best as best_module
from shareport.train import generated, schedule
from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import evaluate_adapter, run
from shareport.train.schedule import LR_SCALINGS, default_eval_every, default_lr_scaling, default_site_weight
from tests.benchmarks import bench_frontier as frontier  # first: sets the offline environment
from tests.benchmarks import docstrings_data
from tests.benchmarks.bench_frontier import minilm  # examples/minilm_end_to_end.py
from tests.benchmarks.stages import stage

OLD_LR = 2e-3


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    out: Path
    base: Path
    lora: Path
    data: Path
    test: Path | None
    batch: int
    max_length: int


def docstrings_task(out: Path) -> Task:
    root = out / "docstrings"
    root.mkdir(parents=True, exist_ok=True)
    s = frontier.Settings()
    stage(root, "data", lambda: docstrings_data.write_fresh(root / "data"))
    base = minilm.write_base_folder(root, docstrings_data.CLASSES)
    stage(root, "lora", lambda: frontier.train_lora(base, root / "data", root, s))
    return Task(
        "docstrings",
        root,
        base,
        root / "lora",
        root / "data" / "train.jsonl",
        root / "data" / "test.jsonl",
        batch=s.batch,
        max_length=s.max_length,
    )


# tasks scored by accuracy on a test file. (The project's `topics` sentences were tried as a second
# classifier: their LoRA scores 100% and truncation at 10% keeps KL 0.001 of it, so recovery has
# nothing to show there.)
CLASSIFIERS = ("docstrings",)


# The second causal LM: the demo's corpora on a wider Llama pretrained 10x longer, with its LoRA trained 4x
# longer: a teacher that models its text better, to tell what --generate owes to the teacher's quality.
CAUSAL_SHAPES = {
    "demo": dict(layers=8, hidden=64, pretrain_steps=150, lora_steps=None),
    "demo-long": dict(layers=6, hidden=128, pretrain_steps=1500, lora_steps=200),
}


def demo_task(out: Path, name: str = "demo") -> Task:
    from shareport.demo import run as demo
    from shareport.demo.assets import build_base, corpus

    shape = CAUSAL_SHAPES[name]
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    data = root / "domain.txt"

    def build() -> dict:
        data.write_text("\n".join(corpus(domain=True, seed=1)) + "\n", encoding="utf-8")
        build_base(
            root / "base",
            corpus(),
            layers=shape["layers"],
            hidden=shape["hidden"],
            pretrain_steps=shape["pretrain_steps"],
        )
        return flows.train(
            "lora",
            str(root / "base"),
            demo.TARGETS,
            demo.RANK,
            str(data),
            str(root / "lora"),
            alpha=2.0 * demo.RANK,
            options=demo._recipe(shape["lora_steps"] or demo.TRAIN_STEPS),
            overwrite=True,
        )

    stage(root, "lora", build)
    return Task(name, root, root / "base", root / "lora", data, None, batch=demo.BATCH, max_length=demo.LENGTH)


@contextlib.contextmanager
def last_step_published():
    """The old recipe: every evaluated step replaces the kept one, so the last is published."""
    original = best_module.BestKept.offer

    def offer(self, step, score, parameters):
        self.step, self.score = step, score
        self.tensors = {n: p.detach().clone() for n, p in parameters.items()}
        return True

    best_module.BestKept.offer = offer
    try:
        yield
    finally:
        best_module.BestKept.offer = original


def convert(task: Task, form: str, budget: float, calibrated: bool) -> Path:
    folder = task.out / "converted" / f"{form}-{budget:g}-{'calibrated' if calibrated else 'plain'}"
    extra = dict(calibration=str(task.data), base=str(task.base)) if calibrated else {}
    if not folder.is_dir():
        flows.convert(str(task.lora), form, str(folder), budget=budget, progress=False, **extra)
    return folder


@contextlib.contextmanager
def backoff_at_every_regression():
    """Inside: the library's backoff (recipe.Trainer, schedule.diverged) fires at any evaluation worse
    than the best so far, not only past schedule.BACKOFF_RATIO x it: the variant measured first."""
    ratio = schedule.BACKOFF_RATIO
    schedule.BACKOFF_RATIO = 1.0
    try:
        yield
    finally:
        schedule.BACKOFF_RATIO = ratio


@contextlib.contextmanager
def masked_inputs(share: float, task: Task):
    """Inside: each training batch's rows are, with probability 1/2, shown to teacher and student alike
    with ``share`` of their tokens (not special ones, not padding) replaced by the tokenizer's mask token:
    input augmentation for distillation (TinyBERT's idea, with BERT's own corruption). The teacher labels
    any input, so a masked text is one more example near the data. Benchmark-only, an experiment.
    Seeded per call, so a run is the same twice."""
    if not share:
        yield
        return
    from transformers import AutoTokenizer

    from shareport.train import recipe as recipe_module

    tokenizer = AutoTokenizer.from_pretrained(str(task.base))
    if tokenizer.mask_token_id is None:
        raise SystemExit(f"--augment-masks: {task.name}'s tokenizer has no mask token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    original = recipe_module.Trainer._loss
    calls = itertools.count()

    def loss(self, batch):
        generator = torch.Generator().manual_seed(1_000_003 + next(calls))
        ids = batch["input_ids"]
        rows = torch.rand(ids.shape[0], 1, generator=generator) < 0.5
        tokens = torch.rand(ids.shape, generator=generator) < share
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, special)
        masked = ids.masked_fill(rows & tokens & maskable, tokenizer.mask_token_id)
        return original(self, {**batch, "input_ids": masked})

    recipe_module.Trainer._loss = loss
    try:
        yield
    finally:
        recipe_module.Trainer._loss = original


def recover(
    task: Task,
    student: Path,
    recipe: str,
    steps: int,
    lr: float,
    hidden: float,
    curve_every: int,
    generate: int | None = None,
    trainable: str = "factors",
    temperature: float | None = None,
    batch: int | None = None,
    site: float | None = None,
    backoff: int = 2,
    seed: int = 0,
    lr_scaling: str | None = None,
    task_weight: float = 0.0,
    augment: float = 0.0,
    warmup: float | None = None,
    by_length: bool = False,
) -> dict:
    """One recovery. ``generate``: on that many texts sampled from the teacher instead of the data
    file (the curve is then on generated held-out texts; before/after are scored on the data's own
    held-out split, as every other run is)."""
    scoring = recovery_job(
        student, task.base, task.lora, data_path=task.data, max_length=task.max_length, eval_path=task.test
    )
    job = (
        scoring
        if generate is None
        else recovery_job(student, task.base, task.lora, max_length=task.max_length, generate=generate)
    )
    job = dataclasses.replace(job, progress=False)
    if recipe == "old":
        options = TrainingOptions(
            steps=steps,
            lr=OLD_LR,
            batch_size=task.batch,
            max_length=task.max_length,
            schedule="constant",
            warmup=0.0,
            eval_every=curve_every,
            temperature=1.0,  # the loss as it was: the KL alone
            site_weight=0.0,
            backoff=False,
            lr_scaling="none",
            group_by_length=False,  # the loop as it was: shuffled batches
        )
    else:
        options = TrainingOptions(
            steps=steps,
            lr=lr,
            batch_size=batch or task.batch,
            max_length=task.max_length,
            eval_every=curve_every,
            hidden_weight=hidden,
            trainable=trainable,
            temperature=temperature,
            site_weight=site,
            seed=seed,
            lr_scaling=lr_scaling,
            backoff=backoff == 2,
            group_by_length=by_length,
            **({} if warmup is None else {"warmup": warmup}),
        )
    selection = job.selection if job.selection is not None else job.heldout
    # the LoRA on the selection split: the reference of the curve's fidelity
    lora_on_selection = evaluate_adapter(dataclasses.replace(job, heldout=selection), load_adapter(task.lora), 32)
    started = time.perf_counter()
    with (
        last_step_published() if recipe == "old" else contextlib.nullcontext(),
        backoff_at_every_regression() if backoff == 1 else contextlib.nullcontext(),
        masked_inputs(augment, task),
    ):
        trained, report = run(job, options.recipe(job.student, distill_weight=1.0, task_weight=task_weight))
    seconds = time.perf_counter() - started
    if generate is not None:  # scored on the data's held-out split like every other run
        report["before"] = evaluate_adapter(scoring, job.student, 32)
        report["after"] = evaluate_adapter(scoring, trained, 32)
    timings = report["timings"]
    evals = len(report["curve"]) - 1
    return {
        "before": report["before"],
        "after": report["after"],
        "curve": report["curve"],
        "best_step": report["best_step"],
        "seconds": seconds,
        "selection_examples": len(selection),
        "train_seconds": timings["seconds"] - timings["eval_seconds"],
        "seconds_per_eval": timings["eval_seconds"] / max(evals, 1),
        "lora_on_selection": lora_on_selection,
        "temperature_used": report["recipe"]["temperature"],
        "site_used": report["recipe"]["site_weight"],
    }


def step_cost(row: dict, task: Task) -> dict:
    """Seconds per step with the evaluations the library's default ``eval_every`` makes (today's
    default, from the run's measured training and per-evaluation times) and their share."""
    steps = row["steps"]
    every = default_eval_every(
        steps=steps,
        batch_size=row.get("batch", task.batch),
        heldout_examples=row["selection_examples"],
        teacher_cached=True,
    )
    evals = len(range(every, steps + 1, every)) + (steps % every != 0)
    eval_seconds = evals * row["seconds_per_eval"]
    return {
        "default_eval_every": every,
        "s_per_step_train": row["train_seconds"] / steps,
        "s_per_step_with_default_eval": (row["train_seconds"] + eval_seconds) / steps,
        "eval_share_default": eval_seconds / (row["train_seconds"] + eval_seconds),
    }


def fidelity(task: str, metrics: dict, lora: dict) -> float:
    if task in CLASSIFIERS:
        return (
            metrics["accuracy"] / lora["accuracy"]["student"]
            if isinstance(metrics["accuracy"], float)
            else metrics["accuracy"]["student"] / lora["accuracy"]["student"]
        )
    return metrics["top1_agreement"]


def summarise(task: str, row: dict, lora_test: dict) -> dict:
    """Fidelity on the test split before/after, and the first curve steps reaching 95% and 99%."""
    curve = [(p["step"], fidelity(task, p, row["lora_on_selection"])) for p in row["curve"]]
    reach = {f"steps_{int(100 * k)}": next((t for t, f in curve if f >= k), None) for k in (0.95, 0.99)}
    return {
        "fidelity_before": fidelity(task, row["before"], lora_test),
        "fidelity_after": fidelity(task, row["after"], lora_test),
        "kl_before": row["before"]["kl"],
        "kl_after": row["after"]["kl"],
        "curve_fidelity": curve,
        **reach,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| task | form | budget | start | recipe | trains | lr | backoff | hidden w | site w | T | batch | steps | KL before -> after | "
        "fidelity before -> after | best step | steps to 95% / 99% (held-out) | s/step (default eval) | "
        "eval share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        reach = " / ".join("-" if s[k] is None else str(s[k]) for k in ("steps_95", "steps_99"))
        lines.append(
            f"| {r['task']} | {r['form']} | {100 * r['budget']:g}% | {r['start']} | {r['recipe']} | "
            f"{r.get('trainable', 'factors')} | "
            f"{r['lr']:g} | {r.get('backoff') if isinstance(r.get('backoff'), str) else ('every' if r.get('backoff') else 'no')} | {r['hidden']:g} | {r.get('site_used', r.get('site') or 0.0):g} | {r.get('temperature_used', r.get('temperature', 1.0)):g} | {r.get('batch', '-')} | {r['steps']} | {s['kl_before']:.4f} -> {s['kl_after']:.4f} | "
            f"{s['fidelity_before']:.3f} -> {s['fidelity_after']:.3f} | {r['best_step']} | {reach} | "
            f"{r['s_per_step_with_default_eval']:.3f} | {100 * r['eval_share_default']:.1f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            steps, fids = zip(*r["summary"]["curve_fidelity"])
            ax.plot(
                steps,
                fids,
                "--" if r["recipe"] == "old" else "-",
                marker=".",
                label=f"{r['form']} {100 * r['budget']:g}% {r['start']} {r['recipe']} lr {r['lr']:g}"
                + (" cores" if r.get("trainable") == "cores" else "")
                + (f" hidden {r['hidden']:g}" if r["hidden"] else ""),
            )
        ax.axhline(0.99, color="grey", lw=0.8)
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task}: held-out fidelity during recovery")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy / LoRA accuracy" if task in CLASSIFIERS else "top-1 agreement with the LoRA")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench-recovery")
    parser.add_argument("--tasks", nargs="+", default=["docstrings", "demo"], choices=["docstrings", *CAUSAL_SHAPES])
    parser.add_argument("--forms", nargs="+", default=["lora", "sharea", "aslora"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--recipes", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", nargs="+", type=float, default=[None], help="new recipe's peak lr [library default]")
    parser.add_argument("--hidden-weights", nargs="+", type=float, default=[0.0])
    parser.add_argument("--calibrated", action="store_true", help="start from calibrated conversions too")
    parser.add_argument(
        "--trainables",
        nargs="+",
        default=["factors"],
        choices=["factors", "cores"],
        help="new recipe: train every factor, or only cores between frozen bases",
    )
    parser.add_argument(
        "--temperatures",
        nargs="+",
        type=float,
        default=[None],
        help="new recipe: the distillation KL's temperature [library default, by the output]",
    )
    parser.add_argument(
        "--site-weights",
        nargs="+",
        type=float,
        default=[None],
        help="new recipe: each adapted site's update error as a share of the KL (--site-weight) [library "
        "default, by the output; runs are named by the value it resolves to]",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="new recipe: seeds of the batch order (the spread of a run)"
    )
    parser.add_argument(
        "--backoff",
        nargs="+",
        type=int,
        default=[2],
        choices=[0, 1, 2],
        help="new recipe: 0 = no backoff (--no-backoff); 1 = halve the lr and return to the best adapter at "
        "every regressing evaluation (the library's backoff at ratio 1); 2 = the library's: only at a diverged one "
        "(schedule.BACKOFF_RATIO) [2]",
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[None], help="new recipe: the batch size [the task's own]"
    )
    parser.add_argument(
        "--lr-scalings",
        nargs="+",
        default=[None],
        choices=list(LR_SCALINGS),
        help="new recipe: --lr-scaling [the library's default; runs are named by the value it resolves to]",
    )
    parser.add_argument(
        "--task-weights",
        nargs="+",
        type=float,
        default=[0.0],
        help="new recipe: the data's own loss beside the KL (finetune --lm-loss: the labels' cross-entropy for "
        "a classifier, the next token's for a causal LM) [0]",
    )
    parser.add_argument(
        "--augment-masks",
        nargs="+",
        type=float,
        default=[0.0],
        help="new recipe, classifier: mask this share of tokens in half the training rows, for teacher and "
        "student alike (an experiment: input augmentation for distillation) [0]",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example, and per generated text with --generate [the task's own: docstrings 128, demo 32]",
    )
    parser.add_argument(
        "--warmups", nargs="+", type=float, default=[None], help="new recipe: the warmup's share of the steps [library]"
    )
    parser.add_argument(
        "--orders",
        nargs="+",
        default=["shuffled"],
        choices=["length", "shuffled"],
        help="new recipe: shuffled batches (the library's default) or grouped by length (--group-by-length; "
        "runs named -bylen) [shuffled]",
    )
    parser.add_argument("--curve-every", type=int, default=25)
    parser.add_argument(
        "--generate",
        nargs="+",
        type=int,
        default=[None],
        help="causal LM task: also recover on N texts sampled from the teacher (no data file)",
    )
    parser.add_argument(
        "--generate-temperature",
        type=float,
        default=generated.SAMPLING_TEMPERATURE,
        help="with --generate: the temperature the teacher samples at (the library's: 1, its distribution as it is)",
    )
    parser.add_argument(
        "--generate-top-p",
        type=float,
        default=generated.SAMPLING_TOP_P,
        help="with --generate: nucleus sampling's top-p (the library's by default)",
    )
    args = parser.parse_args(argv)
    generated.SAMPLING_TEMPERATURE = args.generate_temperature
    generated.SAMPLING_TOP_P = args.generate_top_p
    torch.set_num_threads(1)  # one thread, fixed: a shared 2-core machine (see bench_frontier)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_lr = TrainingOptions().lr
    rows = []
    for task_name in args.tasks:
        task = docstrings_task(out) if task_name == "docstrings" else demo_task(out, task_name)
        (task.out / "converted").mkdir(exist_ok=True)
        job = recovery_job(
            task.lora, task.base, task.lora, data_path=task.data, max_length=task.max_length, eval_path=task.test
        )
        lora_test = stage(task.out, "lora-test", lambda job=job: evaluate_adapter(job, load_adapter(task.lora), 32))
        del job
        if args.max_length:  # the runs' data (and generated texts') length; the stored LoRA score is at the task's
            task = dataclasses.replace(task, max_length=args.max_length)
        for start in ["plain"] + (["calibrated"] if args.calibrated else []):
            for form in args.forms:
                for budget in args.budgets:
                    try:
                        student = convert(task, form, budget, start == "calibrated")
                    except ShareportError as exc:
                        print(f"[bench_recovery] {task_name} {form} {budget:g}: {exc}")
                        continue
                    for recipe in args.recipes:
                        for lr in [OLD_LR] if recipe == "old" else [lr or default_lr for lr in args.lrs]:
                            for (
                                hidden,
                                generate,
                                trainable,
                                temperature,
                                batch,
                                site,
                                backoff,
                                seed,
                                lr_scaling,
                                task_weight,
                                augment,
                                warmup,
                                order,
                            ) in itertools.product(
                                [0.0] if recipe == "old" else args.hidden_weights,
                                [None] if task.test else args.generate,
                                ["factors"] if recipe == "old" else args.trainables,
                                [1.0] if recipe == "old" else args.temperatures,
                                [None] if recipe == "old" else args.batch_sizes,
                                [0.0] if recipe == "old" else args.site_weights,
                                [0] if recipe == "old" else args.backoff,
                                [0] if recipe == "old" else args.seeds,
                                ["none"] if recipe == "old" else args.lr_scalings,
                                [0.0] if recipe == "old" else args.task_weights,
                                [0.0] if recipe == "old" else args.augment_masks,
                                [None] if recipe == "old" else args.warmups,
                                ["shuffled"] if recipe == "old" else args.orders,
                            ):
                                scaling = lr_scaling or default_lr_scaling(
                                    distilling=True, whole_factors=trainable == "factors"
                                )
                                site_value = (
                                    default_site_weight(classifier=task_name in CLASSIFIERS) if site is None else site
                                )
                                name = (
                                    f"run-{form}-{budget:g}-{start}-{recipe}-lr{lr:g}-h{hidden:g}-"
                                    f"{args.steps}-e{args.curve_every}"
                                    + (f"-gen{generate}" if generate else "")
                                    + (
                                        f"-gt{args.generate_temperature:g}"
                                        if generate and args.generate_temperature != 1.0
                                        else ""
                                    )
                                    + (f"-tp{args.generate_top_p:g}" if generate and args.generate_top_p != 1.0 else "")
                                    + ("-cores" if trainable == "cores" else "")
                                    # no suffix: T = 1 (runs from before the default followed the output)
                                    + ("-Tauto" if temperature is None else "")
                                    + (f"-T{temperature:g}" if temperature not in (None, 1.0) else "")
                                    + (f"-b{batch}" if batch else "")
                                    # no suffix: weight 0 (-ks: the site term as a share of the KL; -s, -sauto: the absolute term of 2026-12-07 morning)
                                    + (f"-ks{site_value:g}" if site_value else "")
                                    # no suffix: no backoff (runs from before the library's)
                                    + {0: "", 1: "-backoff", 2: "-bo1.5"}[backoff]
                                    + (f"-seed{seed}" if seed else "")
                                    # no suffix: every tensor at --lr (runs from before --lr-scaling)
                                    + ("-lst" if scaling == "tensor" else "")
                                    + (f"-tw{task_weight:g}" if task_weight else "")
                                    + (f"-mask{augment:g}" if augment else "")
                                    + (f"-len{args.max_length}" if args.max_length else "")
                                    + (f"-wu{warmup:g}" if warmup is not None else "")
                                    # no suffix: shuffled batches (runs from before grouping by length)
                                    + ("-bylen" if order == "length" else "")
                                )
                                row = stage(
                                    task.out,
                                    name,
                                    lambda: recover(
                                        task,
                                        student,
                                        recipe,
                                        args.steps,
                                        lr,
                                        hidden,
                                        args.curve_every,
                                        generate,
                                        trainable,
                                        temperature,
                                        batch,
                                        site,
                                        backoff,
                                        seed,
                                        scaling,
                                        task_weight,
                                        augment,
                                        warmup,
                                        order == "length",
                                    ),
                                )
                                row = {
                                    **row,
                                    "task": task_name,
                                    "form": form,
                                    "budget": budget,
                                    "start": start if generate is None else f"{start}, {generate} generated",
                                    "recipe": recipe,
                                    "lr": lr,
                                    "hidden": hidden,
                                    "steps": args.steps,
                                    "trainable": trainable,
                                    "temperature": temperature,
                                    "batch": batch or task.batch,
                                    "site": site_value,
                                    "backoff": {0: "no", 1: "every", 2: "diverged"}[backoff],
                                    "seed": seed,
                                    "lr_scaling": scaling,
                                    "task_weight": task_weight,
                                    "augment_mask": augment,
                                    "warmup": warmup,
                                    "order": order,
                                }
                                row.update(step_cost(row, task))
                                row["summary"] = summarise(task_name, row, lora_test)
                                rows.append(row)
                                print(table([row]).splitlines()[-1], flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(table(rows))
    try:
        plot(rows, out / "curves.png")
        print(f"curves: {out / 'curves.png'}")
    except ImportError:
        pass
    return rows


if __name__ == "__main__":
    main()
