"""Held-out metrics of a student against its teacher: KL, top-1 agreement, and the task's own.

Recovery evaluates many times (every ``eval_every`` steps, ``schedule.py``) against a teacher that
never changes, so the teacher's held-out outputs are computed once and kept (``TeacherCache``)
while they fit in ``CACHE_BYTES``; past that (a causal LM's logits over a large vocabulary) they
are recomputed at each evaluation, as before.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.base import is_causal_lm
from ..model.surgery import Attached, attach
from .data import TokenData, collate, pad_token_id
from .distill import EvalTotals, Outputs, model_outputs, task_sum
from .teacher import Teacher

CACHE_BYTES = 256 * 2**20


class TeacherCache:
    """The teacher's outputs on each held-out batch (and its task sums), kept while they fit."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit = limit
        self.batches: dict[int, tuple[Outputs, tuple[float, int] | None]] | None = {}
        self.bytes = 0

    def get(self, start: int):
        return None if self.batches is None else self.batches.get(start)

    def put(self, start: int, outputs: Outputs, task: tuple[float, int] | None) -> None:
        if self.batches is None:
            return
        self.bytes += outputs.values.numel() * outputs.values.element_size()
        if self.bytes > self.limit:
            self.batches = None  # too large to keep: recompute from now on
            return
        self.batches[start] = (outputs, task)


@torch.no_grad()
def evaluate(
    model,
    student: Attached,
    teacher: Teacher | None,
    *,
    heldout: TokenData,
    batch_size: int,
    pad: int,
    causal: bool,
    acc,
    cache: TeacherCache | None = None,
) -> dict:
    """KL and top-1 agreement with the teacher (MSE for hidden states), plus the task metric.

    Every process evaluates the whole held-out split (it is small), so all agree on the result.
    """
    totals = EvalTotals()
    has_task = causal or heldout.labels is not None
    # shortest first, ties in file order: each batch pads to little more than its own texts (the
    # metrics are sums over examples, so the order changes nothing but the cost)
    order = sorted(range(len(heldout)), key=lambda i: len(heldout.sequences[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = {k: v.to(acc.device) for k, v in collate(heldout, indices, pad).items()}
        with acc.autocast():
            student_out, raw_student = model_outputs(model, batch, causal)
        if teacher is not None:
            teacher_out, teacher_task = _teacher_outputs(
                model, teacher, batch, start=start, causal=causal, has_task=has_task, acc=acc, cache=cache
            )
            totals.add(student_out, teacher_out)
        if has_task:
            totals.add_task(raw_student, batch, causal, correct=_correct(raw_student, batch, causal))
            if teacher is not None:
                totals.add_teacher_task(*teacher_task)
    return totals.report(causal, has_teacher=teacher is not None)


def _correct(raw, batch, causal: bool) -> int | None:
    return None if causal else int((raw.logits.argmax(-1) == batch["labels"]).sum())


def _teacher_outputs(
    model, teacher: Teacher, batch, *, start: int, causal: bool, has_task: bool, acc, cache: TeacherCache | None
):
    """(outputs, (task loss sum, correct)) of the teacher on one held-out batch, from the cache if kept."""
    kept = cache.get(start) if cache is not None else None
    if kept is not None:
        return kept
    with teacher.active(model), acc.autocast():
        outputs, raw = model_outputs(model, batch, causal)
    task = (float(task_sum(raw, batch, causal)[0]), _correct(raw, batch, causal)) if has_task else None
    if cache is not None:
        cache.put(start, outputs, task)
    return outputs, task


def evaluate_attached(
    model, adapter, teacher: Teacher | None, data: TokenData, *, batch_size: int, acc, cache: TeacherCache | None = None
) -> dict:
    """:func:`evaluate` with ``adapter`` attached for the call (None: the bare base), taken off after."""
    attached = attach(model, adapter, trainable=False, dtype=torch.float32) if adapter is not None else None
    try:
        return evaluate(
            model,
            attached,
            teacher,
            heldout=data,
            batch_size=batch_size,
            pad=pad_token_id(model.config),
            causal=is_causal_lm(model),
            acc=acc,
            cache=cache,
        )
    finally:
        if attached is not None:
            attached.detach()


def evaluate_adapter(job, adapter, batch_size: int) -> dict:
    """Held-out metrics of ``adapter`` on the job's base against its teacher, without training."""
    return evaluate_attached(job.model, adapter, job.teacher, job.heldout, batch_size=batch_size, acc=job.accelerator)


class _OnModelDevice:
    """What :func:`evaluate` asks of an accelerator, for a model used outside training: its device
    and no autocast (conversion runs in the model's own dtype)."""

    def __init__(self, model):
        self.device = next(model.parameters()).device

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def output_kl_measure(model, lora, data: TokenData, batch_size: int = 16):
    """An error measure for ``convert_adapter(error_measure=...)`` (``--to auto`` with data): the
    KL of each candidate's model outputs to the LoRA's on ``data`` (held-out-style metrics of
    :func:`evaluate`: class logits, next-token logits, or an encoder's hidden-state MSE), against
    the same measure of the base alone (no adapter) as the "energy". The LoRA's outputs are
    computed once. Ranks forms by what the model outputs, which is what a user keeps or loses."""
    acc, teacher, cache = _OnModelDevice(model), Teacher(model, lora), TeacherCache()

    def measured(adapter) -> float:
        metrics = evaluate_attached(model, adapter, teacher, data, batch_size=batch_size, acc=acc, cache=cache)
        return metrics["kl"] if "kl" in metrics else metrics["hidden_mse"]

    base_error = measured(None)

    def measure(source, converted, report) -> tuple[float, float]:
        return measured(converted), base_error

    measure.describes = "the model's outputs: KL to the LoRA's on the calibration data"
    return measure
