"""``finetune`` (recover), ``train`` and ``frontier``: training runs from folders, written atomically with
their reports and provenance; under several processes only the main one writes. See ``shareport.flows``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

from ..errors import ShareportError
from ..files import save_adapter, weights_sha256
from ..files.atomic import MARKER_NAME, MARKER_TEXT, atomic_dir, atomic_file, check_output
from ..files.folder import dump_json
from ..forms import (
    GROUPED_FORMS,
)
from ..plots import has_matplotlib, plot_frontier
from ..train.checkpoint import STATE_JSON
from ..train.choices import DEFAULT_FRONTIER_BUDGETS as DEFAULT_BUDGETS
from ..train.choices import FRONTIER_FORMS as FORMS
from ..train.frontier import (
    check_budgets,
    measure,
    pareto,
    parse_precisions,
    parse_serving,
    point_line,
    smallest_keeping,
    stages,
)
from ..train.generated import check_generate
from ..train.jobs import REPORT_NAME, TIMINGS_NAME, TrainingOptions, check_inputs, recovery_job, scratch_job
from ..train.recipe import run, with_provenance


def default_recover_output(shared_dir: str) -> str:
    return str(shared_dir).rstrip("/") + "-recovered"


def recover(
    shared_dir: str,
    base_dir: str,
    teacher_dir: str,
    data_path: str | None,
    out: str | None = None,
    *,
    lm_loss: float = 0.0,
    options: TrainingOptions = TrainingOptions(),
    overwrite: bool = False,
    generate: int | None = None,
) -> dict | None:
    """Distil ``shared_dir`` toward ``teacher_dir``; returns the training report (None on non-main processes).

    ``generate`` (causal LMs, instead of ``data_path``): recover on that many texts sampled from the
    teacher (``train.generated``), seeded by ``options.seed``."""
    out = out or default_recover_output(shared_dir)
    if (data_path is None) == (generate is None):
        both = ", and not both" if data_path is not None else ""
        raise ShareportError(f"finetune needs --data DATA or --generate N (texts sampled from the teacher){both}")
    check_generate(generate, options.max_length)
    inputs = tuple(p for p in (shared_dir, teacher_dir, base_dir, data_path) if p is not None)
    student, teacher = check_inputs(base_dir, data_path, (shared_dir, teacher_dir), pack=options.pack)
    check_output(out, overwrite, inputs)
    job = recovery_job(
        shared_dir,
        base_dir,
        teacher_dir,
        data_path=data_path,
        max_length=options.max_length,
        eval_fraction=options.eval_fraction,
        checkpoint_dir=options.checkpoint_folder(out),
        resume=options.resume,
        merging=options.merging,
        adapters=(student, teacher),
        generate=generate,
        seed=options.seed,
    )
    recipe = options.recipe(job.student, distill_weight=1.0, task_weight=lm_loss)
    entry = {
        "step": "finetune",
        "teacher": teacher_dir,
        "data": data_path,
        "steps": options.steps,
        "seed": options.seed,
        **({"generated": generate} if generate is not None else {}),
    }
    return _train_and_write(
        job,
        recipe,
        out,
        overwrite,
        inputs,
        entry,
        keep=("before", "after"),
        own_checkpoint=options.checkpoint_dir is None,
    )


def train(
    form: str,
    base_dir: str,
    targets: list[str],
    rank: int,
    data_path: str,
    out: str,
    *,
    alpha: float = 8.0,
    options: TrainingOptions = TrainingOptions(),
    overwrite: bool = False,
) -> dict | None:
    """Train a new adapter of ``form`` from scratch; returns the training report (None on non-main processes)."""
    if options.merging and form not in GROUPED_FORMS:
        raise ShareportError(f"--merges/--groups merge B's, which only --form aslora does (got --form {form})")
    if form in GROUPED_FORMS and not options.merging:
        raise ShareportError("--form aslora needs --merges or --groups (how far to merge the B's)")
    if data_path is None:
        raise ShareportError("train needs --data DATA (the examples to train on)")
    inputs = (base_dir, data_path)
    check_inputs(base_dir, data_path, pack=options.pack)
    check_output(out, overwrite, inputs)
    if not targets:
        raise ShareportError("--target needs at least one module name")
    job = scratch_job(
        base_dir,
        data_path,
        form,
        targets=targets,
        rank=rank,
        alpha=alpha,
        seed=options.seed,
        max_length=options.max_length,
        eval_fraction=options.eval_fraction,
        checkpoint_dir=options.checkpoint_folder(out),
        resume=options.resume,
        merging=options.merging,
    )
    recipe = options.recipe(job.student, distill_weight=0.0, task_weight=1.0)
    entry = {"step": "train", "form": form, "data": data_path, "steps": options.steps, "seed": options.seed}
    return _train_and_write(
        job, recipe, out, overwrite, inputs, entry, keep=("after",), own_checkpoint=options.checkpoint_dir is None
    )


def _train_and_write(
    job, recipe, out, overwrite, inputs, entry: dict, keep: tuple[str, ...], own_checkpoint: bool
) -> dict | None:
    """Run the recipe; the main process writes the adapter (with its history), the report (the same bytes for
    the same inputs) and the timings (which are not). With ``own_checkpoint`` (the default folder beside
    the output, not one the user named with --checkpoint-dir) the checkpoint is removed once the adapter
    is published: its only use was to resume this run."""
    _note_stale_checkpoint(job)
    adapter, report = run(job, recipe)
    if not job.accelerator.is_main_process:
        return None
    entry = {**entry, **{k: report[k] for k in keep}}
    reproducible = {k: v for k, v in report.items() if k != "timings"}
    save_adapter(
        with_provenance(adapter, entry),
        out,
        overwrite=overwrite,
        inputs=inputs,
        reports={REPORT_NAME: reproducible, TIMINGS_NAME: report["timings"]},
    )
    folder = job.checkpoint_dir
    if (
        own_checkpoint
        and folder is not None
        and (Path(folder) / MARKER_NAME).is_file()
        and (Path(folder) / STATE_JSON).is_file()
    ):
        import shutil

        shutil.rmtree(folder)
    return report


def _note_stale_checkpoint(job) -> None:
    """Say so when a fresh run starts beside the checkpoint of an interrupted one (it replaces it at its
    first checkpoint): the user may have meant --resume."""
    folder = job.checkpoint_dir
    if job.resume_state is not None or folder is None or not (Path(folder) / STATE_JSON).is_file():
        return
    try:
        step = json.loads((Path(folder) / STATE_JSON).read_text(encoding="utf-8")).get("step")
    except (OSError, json.JSONDecodeError):
        step = None
    if job.accelerator.is_main_process:
        print(
            f"note: {folder} holds the checkpoint of an interrupted run (step {step}); this run starts at step 0 "
            "and replaces it. To continue that run instead, rerun with --resume.",
            file=sys.stderr,
        )


def frontier(
    lora_dir: str,
    base_dir: str,
    data_path: str,
    out: str,
    *,
    eval_path: str | None = None,
    budgets=DEFAULT_BUDGETS,
    forms=FORMS,
    recover_steps: int = 0,
    keep: float = 0.99,
    options: TrainingOptions = TrainingOptions(),
    overwrite: bool = False,
    progress: bool = True,
    serving=(),
    precisions=(),
) -> dict:
    """Every form at every budget, evaluated (and recovered) against the LoRA; a table's worth of
    points, the Pareto front, and the smallest point keeping ``keep`` of the LoRA's fidelity.
    ``serving`` ("uniform", "max-rank=R", "buckets=R1,R2"): each adds a point per form and budget, planned
    under that rule (``convert --uniform-rank`` ...), drawn as its own line.
    ``precisions`` ("fp16", "int8", "int4"): every point is also scored with its factors stored so (as
    ``convert --quantize`` stores them, default group size), every point records its bytes (``bytes``,
    ``precision``), size is measured in bytes (the front, the smallest point keeping ``keep``) and the
    figure is fidelity against bytes, a line per form and precision. Without them the output is as before.

    Finished points are kept in ``<out>.cache`` (a folder of ours), so a rerun with the same
    inputs resumes where an interrupted one stopped; the output folder appears at the end, and the
    cache is removed then (as a finished ``finetune`` removes its checkpoint).
    """
    budgets = check_budgets(budgets)
    serving = parse_serving(serving)
    precisions = parse_precisions(precisions)
    size = "bytes" if precisions else "parameters"
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        raise ShareportError(f"--forms: unknown form '{unknown[0] if unknown else ''}' (known: {', '.join(FORMS)})")
    if not 0 < keep <= 1:
        raise ShareportError(f"--keep must be in (0, 1], got {keep}")
    inputs = [lora_dir, base_dir, data_path] + ([eval_path] if eval_path else [])
    (lora,) = check_inputs(base_dir, data_path, (lora_dir,), pack=options.pack)
    if eval_path and not Path(eval_path).is_file():
        raise ShareportError(f"{eval_path}: evaluation file not found")
    check_output(out, overwrite, inputs)
    job = recovery_job(
        lora_dir,
        base_dir,
        lora_dir,
        data_path=data_path,
        max_length=options.max_length,
        eval_fraction=options.eval_fraction,
        adapters=(lora, lora),
        eval_path=eval_path,
    )
    cache = _PointCache(
        Path(f"{str(out).rstrip('/')}.cache"),
        {
            "lora": weights_sha256(lora_dir),
            "base": str(Path(base_dir).resolve()),
            "data": str(data_path),
            "eval": eval_path,
            "options": dataclasses.asdict(options),
        },
    )
    reference, points = _measure_with_progress(
        job, lora, forms, budgets, options, recover_steps, cache, progress, serving, precisions
    )
    labelled = reference.get("accuracy") is not None
    front, chosen = pareto(points, size=size), smallest_keeping(points, keep, size=size)
    data = {
        "output": str(out),
        "lora_parameters": lora.num_parameters(),
        "budgets": list(budgets),
        "forms": list(forms),
        "recover_steps": recover_steps,
        "serving": list(serving),
        **({"precisions": list(precisions), "lora_float32_bytes": 4 * lora.num_parameters()} if precisions else {}),
        "keep": keep,
        "fidelity": "accuracy / LoRA accuracy" if labelled else "top-1 agreement with the LoRA",
        "lora": reference,
        "points": [p.to_dict() for p in points],
        "pareto": [p.to_dict() for p in front],
        "smallest_keeping": chosen.to_dict() if chosen else None,
    }
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / "frontier.json").write_text(dump_json(data), encoding="utf-8")
        if has_matplotlib():
            labelled_points = [dataclasses.replace(p, form=p.label) for p in points]  # a line per form and rule
            plot_frontier(
                labelled_points,
                [dataclasses.replace(p, form=p.label) for p in front],
                None if chosen is None else dataclasses.replace(chosen, form=chosen.label),
                tmp / "frontier.png",
                "accuracy relative to the LoRA" if labelled else "top-1 agreement with the LoRA",
                keep,
                size=size,
            )
    if has_matplotlib():
        data["plot"] = str(Path(out) / "frontier.png")
    else:  # said, rather than a figure the help promises silently missing
        data["plot_missing"] = "matplotlib is not installed: `pip install matplotlib` draws frontier.png"
    cache.remove()  # the output holds every point now; the cache only served an interrupted run
    return data


def _measure_with_progress(
    job, lora, forms, budgets, options, recover_steps, cache, progress: bool, serving=(), precisions=()
):
    """``frontier.measure`` under one bar over every point (form, budget, converting or recovering,
    elapsed time), each point's line printed as it finishes; all on stderr, nothing with ``progress``
    off (--json)."""
    from tqdm import tqdm

    with tqdm(
        total=stages(forms, budgets, recover_steps, serving, precisions),
        desc="frontier",
        unit="point",
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    ) as bar:

        def on_stage(form: str, budget: float, what: str) -> None:
            bar.set_postfix_str(f"{form} at {budget:g}: {what}")

        def on_point(point) -> None:
            bar.update(1)
            if progress:
                bar.write(point_line(point), file=sys.stderr)

        return measure(
            job,
            lora,
            forms,
            budgets=budgets,
            options=options,
            recover_steps=recover_steps,
            cached=cache.get,
            store=cache.put,
            on_stage=on_stage,
            on_point=on_point,
            serving=serving,
            precisions=precisions,
        )


class _PointCache:
    """Finished frontier points, one JSON file each, valid only for the same inputs (``key``)."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = hashlib.sha256(dump_json(key).encode()).hexdigest()[:16]

    def get(self, name: str):
        path = self.folder / f"{self.key}-{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def remove(self) -> None:
        """Delete the cache folder, only if it is ours (the marker shareport writes in it)."""
        if (self.folder / MARKER_NAME).is_file():
            shutil.rmtree(self.folder)

    def put(self, name: str, data) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)  # -o new/x: the parents are made as for every output
            (self.folder / MARKER_NAME).write_text(MARKER_TEXT, encoding="utf-8")
        elif not (self.folder / MARKER_NAME).is_file():
            raise ShareportError(
                f"{self.folder}: a folder shareport did not write is where the frontier keeps its cache; move it away"
            )
        with atomic_file(
            self.folder / f"{self.key}-{name}.json", overwrite=True, owned=lambda p: True
        ) as tmp:  # our cache folder, our files
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
