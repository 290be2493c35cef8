"""Assemble a training :class:`~shareport.train.recipe.Job` from folders on disk.

``recovery_job``: the shared adapter to recover, its teacher LoRA, the base and the data.
``scratch_job``: a fresh shared adapter (ShareLoRA init) on the base, trained on the data alone.
Both load the base once, on the accelerator's device, frozen (under FSDP, each process its shard
of it); resuming swaps the starting adapter for the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..adapter import Adapter, carried_parameter_name
from ..errors import ShareportError, note
from ..files import load_adapter
from ..files.tensorfile import stream_model_weights
from ..model import load_base_model
from ..model.base import CAUSAL_LM_CLASS, auto_class_name, empty_base_model, read_base_config, task_type_of
from ..model.fresh import fresh_adapter
from . import generated
from .accel import load_sharded_base, make_accelerator, model_dtype, shards_base
from .checkpoint import load_checkpoint
from .data import load_data, split_heldout
from .generated import generate_data, start_note
from .merging import MergeSchedule
from .recipe import Job, Recipe
from .schedule import DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_STEPS, DEFAULT_TRAINABLE, DEFAULT_WARMUP
from .teacher import Teacher, check_pair

REPORT_NAME = "training_report.json"
TIMINGS_NAME = "training_timings.json"  # the run's wall-clock numbers, apart from the reproducible report


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """What ``finetune`` and ``train`` share: the recipe, data split, checkpoints, ASLoRA merges."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    eval_fraction: float = 0.1
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None  # default: OUTPUT.checkpoint
    resume: bool = False
    merges: int | None = None
    groups: int | None = None
    merge_start: int | None = None
    merge_every: int | None = None
    merge_mode: str = "tie"
    merge_pairs: str = "adjacent"
    compile: bool = False  # torch.compile the transformer blocks for the training steps
    pack: bool = False  # several examples per row (causal LMs)
    group_by_length: bool = False  # batches of examples of similar length (data.BatchOrder)
    schedule: str = DEFAULT_SCHEDULE  # the lr after warmup (schedule.SCHEDULES)
    warmup: float = DEFAULT_WARMUP  # share of the steps
    eval_every: int | None = None  # None: about 10% of the run's compute (schedule.default_eval_every)
    backoff: bool = True  # a diverged evaluation puts the best back and halves the lr (schedule.BACKOFF_RATIO)
    hidden_weight: float = 0.0  # distil the last hidden states too (recovery only)
    temperature: float | None = None  # of the distillation KL; None: by the output (schedule.default_temperature)
    site_weight: float | None = None  # each site's update, a share of the KL (sites.py); None: by the output
    trainable: str = DEFAULT_TRAINABLE  # recovery: "factors", or "cores" between frozen bases (cores.py)
    lr_scaling: str | None = None  # "tensor" or "none"; None: tensor for recovery, none for train (schedule.py)

    @property
    def merging(self) -> bool:
        return self.merges is not None or self.groups is not None

    def checkpoint_folder(self, out: str | os.PathLike) -> Path:
        """Where checkpoints go: ``checkpoint_dir``, else beside the output."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(out).rstrip("/") + ".checkpoint")

    def recipe(self, adapter: Adapter, distill_weight: float, task_weight: float) -> Recipe:
        schedule = merge_schedule(
            adapter,
            self.steps,
            merges=self.merges,
            groups=self.groups,
            start=self.merge_start,
            every=self.merge_every,
            mode=self.merge_mode,
            pairs=self.merge_pairs,
        )
        return Recipe(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            distill_weight=distill_weight,
            task_weight=task_weight,
            checkpoint_every=self.checkpoint_every,
            merge=schedule,
            compile="inductor" if self.compile else None,
            pack=self.pack,
            group_by_length=self.group_by_length,
            schedule=self.schedule,
            warmup=self.warmup,
            eval_every=self.eval_every,
            backoff=self.backoff,
            hidden_weight=self.hidden_weight,
            temperature=self.temperature,
            site_weight=self.site_weight,
            lr_scaling=self.lr_scaling,
            trainable=self.trainable,
        )


def merge_schedule(
    adapter: Adapter,
    steps: int,
    *,
    merges: int | None,
    groups: int | None,
    start: int | None,
    every: int | None,
    mode: str,
    pairs: str,
) -> MergeSchedule | None:
    """The ASLoRA schedule asked for (None without --merges/--groups); it must finish within ``steps``."""
    if merges is None and groups is None:
        if start is not None or every is not None:
            raise ShareportError("--merge-start/--merge-every need --merges or --groups")
        return None
    layers = max(len(sites) for sites in adapter.kinds().values())
    schedule = MergeSchedule.spread(
        steps, layers, merges=merges, groups=groups, start=start, every=every, mode=mode, pairs=pairs
    )
    last = schedule.last_merge_step(layers)
    if last > steps:
        raise ShareportError(
            f"the merge schedule ends at step {last}, after the last step ({steps}); "
            "lower --merge-start/--merge-every or raise --steps"
        )
    return schedule


def _base_model(base_dir, task_type, acc, carried=None):
    """The frozen base on the accelerator's device; under FSDP with several processes each process
    reads and holds only its shard of every weight (``accel.load_sharded_base``), never the whole base."""
    if shards_base(acc):
        model = empty_base_model(base_dir, task_type, dtype=model_dtype(acc), carried=carried)
        heads = {carried_parameter_name(k): v for k, v in (carried or {}).items()}
        load_sharded_base(model, stream_model_weights(base_dir), acc.device, str(base_dir), heads)
    else:
        model = load_base_model(base_dir, task_type, dtype=model_dtype(acc), carried=carried).to(acc.device)
    model.requires_grad_(False)
    return model


def _data(data_path, base_dir, max_length: int, eval_fraction: float, eval_path=None):
    """(train, held-out, selection, record): the data's fixed held-out split (which also picks the
    best step: selection None), or with a labelled ``eval_path``, that file for the reported scores
    and the data's held-out split for picking the best step (never the test file itself).
    Class-name labels: the record holds their indices."""
    data = load_data(data_path, base_dir, max_length)
    inputs = {
        "data": str(data_path),
        "data_examples": len(data),
        "max_length": max_length,
        "eval_fraction": eval_fraction,
    }
    if data.label_ids is not None:
        inputs["label_ids"] = {"ids": data.label_ids, "from": data.label_ids_from}
    train, heldout = split_heldout(data, eval_fraction)
    if eval_path is None:
        return train, heldout, None, inputs
    given = (data.label_ids, data.label_ids_from) if data.label_ids is not None else None
    test = load_data(eval_path, base_dir, max_length, label_mapping=given)
    both = test.labels is not None and data.labels is not None
    if both and (data.label_ids is None) != (test.label_ids is None):
        kinds = {True: "class indices", False: "class names"}
        raise ShareportError(
            f"{eval_path}: its labels are {kinds[test.label_ids is None]} and {data_path}'s are "
            f"{kinds[data.label_ids is None]}: give both the same kind"
        )
    if test.labels is None:
        raise ShareportError(f"{eval_path}: the evaluation rows have no 'label' field, which accuracy needs")
    return train, test, heldout, {**inputs, "eval": str(eval_path), "eval_examples": len(test)}


def check_labels(model, base_dir, *splits) -> None:
    """A classifier's labels must be its classes: a label past the last one would end the run in
    torch's cross-entropy (a traceback), and one that names no class would score every accuracy
    against a class the model cannot output. Checked once the model is loaded, before any step."""
    if task_type_of(model) != "SEQ_CLS":
        return
    classes = int(model.config.num_labels)
    for data in splits:
        if data is None or data.labels is None:
            continue
        bad = sorted({label for label in data.labels if label >= classes})
        if not bad:
            continue
        names = {index: name for name, index in (data.label_ids or {}).items()}
        shown = f"'{names[bad[0]]}' (class {bad[0]} by {data.label_ids_from})" if bad[0] in names else str(bad[0])
        raise ShareportError(
            f"{data.source}: label {shown} is not a class of {base_dir}, which has {classes} "
            f"(0..{classes - 1}){f'; {len(bad)} labels are out of range' if len(bad) > 1 else ''}"
        )


def _resume(checkpoint_dir: Path | None, resume: bool):
    if not resume:
        return None, None
    if checkpoint_dir is None or not Path(checkpoint_dir).exists():
        raise ShareportError(f"--resume: no checkpoint folder '{checkpoint_dir}'")
    adapter, state, tensors = load_checkpoint(checkpoint_dir)
    return adapter, (state, tensors)


def check_inputs(base_dir, data_path, adapter_dirs=(), pack: bool = False) -> list[Adapter]:
    # data_path None: the data will be generated (finetune --generate)
    """Read what is cheap to read before any output is checked or any model loaded: the
    adapters (returned, in order), the base folder's config and the data path's existence; with
    ``pack``, that the model will be a causal LM (the recipe checks again on the loaded model)."""
    adapters = [load_adapter(folder) for folder in adapter_dirs]
    config = read_base_config(base_dir)
    if data_path is not None and not Path(data_path).exists():
        raise ShareportError(f"{data_path}: data file not found")
    if pack:
        # the last adapter (recovery's teacher) decides first, as recovery_job loads the base
        loads = auto_class_name(next((a.task_type for a in reversed(adapters) if a.task_type), None), config)
        if loads != CAUSAL_LM_CLASS:
            raise ShareportError(
                f"--pack needs a causal LM: {base_dir} loads as {loads}, which gives one output "
                "per row, and a packed row holds several examples"
            )
    return adapters


def recovery_job(
    shared_dir,
    base_dir,
    teacher_dir,
    *,
    data_path=None,
    max_length: int = 128,
    eval_fraction: float = 0.1,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    merging: bool = False,
    adapters: tuple[Adapter, Adapter] | None = None,
    eval_path=None,
    generate: int | None = None,
    seed: int = 0,
) -> Job:
    """``adapters``: the student and teacher already read by :func:`check_inputs` (else read here).
    ``generate``: no ``data_path``; that many texts sampled from the teacher are the data
    (``generated.py``), split into training and held-out as a file would be."""
    student, teacher_adapter = adapters or (load_adapter(shared_dir), load_adapter(teacher_dir))
    dropped = check_pair(teacher_adapter, student)
    resumed, state = _resume(checkpoint_dir, resume)
    if resumed is not None:
        check_pair(teacher_adapter, resumed)
    acc = make_accelerator(merging)
    if generate is None:
        train, heldout, selection, inputs = _data(data_path, base_dir, max_length, eval_fraction, eval_path)
    model = _base_model(base_dir, teacher_adapter.task_type or student.task_type, acc, teacher_adapter.extra_tensors)
    teacher = Teacher(model, teacher_adapter)
    if generate is not None:
        data = generate_data(
            model,
            teacher,
            count=generate,
            max_length=max_length,
            seed=seed,
            where=str(base_dir),
            progress=acc.is_local_main_process,
        )
        train, heldout = split_heldout(data, eval_fraction)
        selection = None
        inputs = {
            "data": None,
            "generated": generate,
            "generate_seed": seed,
            "generate_top_p": generated.SAMPLING_TOP_P,  # read now: a benchmark may patch it
            "max_length": max_length,
            "eval_fraction": eval_fraction,
        }
        start = start_note(base_dir, getattr(model.config, "bos_token_id", None))
        if start:  # said now, before the run, and kept in the report
            inputs["generate_note"] = start
            note(start)
    check_labels(model, base_dir, train, heldout, selection)  # generated texts have none: nothing to check
    inputs.update({"student": str(shared_dir), "teacher": str(teacher_dir), "base": str(base_dir)})
    if dropped:  # sites the conversion cut to rank 0: the student recovers without them (teacher.check_pair)
        inputs["teacher_only_sites"] = dropped
    return Job(
        model,
        resumed or student,
        teacher,
        train_data=train,
        heldout=heldout,
        accelerator=acc,
        inputs=inputs,
        checkpoint_dir=checkpoint_dir,
        resume_state=state,
        selection=selection,
        start=student if resumed is not None else None,
    )


def scratch_job(
    base_dir,
    data_path,
    form: str,
    *,
    targets: list[str],
    rank: int,
    alpha: float,
    seed: int,
    max_length: int,
    eval_fraction: float,
    checkpoint_dir: Path | None,
    resume: bool,
    merging: bool,
) -> Job:
    resumed, state = _resume(checkpoint_dir, resume)
    acc = make_accelerator(merging)
    train, heldout, _, inputs = _data(data_path, base_dir, max_length, eval_fraction)
    model = _base_model(base_dir, None, acc)
    check_labels(model, base_dir, train, heldout)
    adapter = fresh_adapter(
        model, form, targets, rank=rank, alpha=alpha, seed=seed, base_model=str(Path(base_dir).resolve())
    )
    inputs.update({"base": str(base_dir), "form": form, "targets": sorted(targets), "rank": rank, "alpha": alpha})
    return Job(
        model,
        resumed or adapter,
        None,
        train_data=train,
        heldout=heldout,
        accelerator=acc,
        inputs=inputs,
        checkpoint_dir=checkpoint_dir,
        resume_state=state,
    )
