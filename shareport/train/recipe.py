"""The training recipe behind ``shareport finetune`` (recovery) and ``shareport train`` (from scratch).

One loop, read top to bottom:

    set up   accelerator (CUDA + bf16 autocast when present, else CPU; N processes under
             ``accelerate launch``/``torchrun``), data and held-out split, model, adapters, optimizer
    resume   adapter, optimizer, ASLoRA state and step from a checkpoint
    evaluate on the held-out split (before)
    train    for each step: the global batch's share of this process -> teacher and student
             forward -> loss -> backward -> AdamW step -> ASLoRA merge if due -> checkpoint
    evaluate on the held-out split (after), return the adapter and a report

The loss is a sum over this process's positions divided by the positions of the whole global
batch, times the number of processes (DDP averages gradients over processes): the update is
that of the global batch mean however it is split, so N processes match one.
Dropout stays off (the model is kept in eval mode): only adapter factors train, and the
distillation target is then a fixed function.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..adapter import Adapter
from .accel import average_gradients, local_parameter_bytes, parameter_bytes, peak_flops, shard_base, shards_base
from .merging import BMerger, MergeSchedule
from .compiled import compiled_blocks
from .checkpoint import check_same_recipe, load_optimizer_state, optimizer_state, restore_rng, save_checkpoint
from .fleet_cores import train_cores
from .data import BatchOrder, TokenData, collate, collate_packed, counted_positions, pad_token_id
from .distill import EvalTotals, distill_sum, model_outputs, task_sum
from ..errors import ShareportError
from ..fleet import frozen_names
from ..model.base import is_causal_lm
from ..model.surgery import Attached, attach
from .teacher import Teacher


@dataclasses.dataclass
class Recipe:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    distill_weight: float = 1.0  # 0 for `train`: no teacher
    task_weight: float = 0.0  # the data's own loss (--lm-loss)
    checkpoint_every: int = 0
    merge: MergeSchedule | None = None
    # fused AdamW where torch has it, and no host sync per step (loss and tokens are read every
    # SYNC_EVERY steps and at the end); False: the foreach AdamW and a sync every step, as before
    fast: bool = True
    # torch.compile backend for the transformer blocks during the training steps (--compile:
    # "inductor"; tests: "aot_eager"); None: eager. See compiled.py.
    compile: str | None = None
    # several examples per row (causal LMs): the same examples and loss per step as unpadded rows,
    # fewer padded positions to compute (see data.collate_packed)
    pack: bool = False

    def fingerprint(self, **inputs) -> dict:
        """What a resumed run must share with the interrupted one."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "merge"}
        out["merge"] = dataclasses.asdict(self.merge) if self.merge else None
        return {**out, **inputs}


@dataclasses.dataclass
class Job:
    """Everything one run trains on; built by the commands, consumed by :func:`run`."""

    model: torch.nn.Module  # on the accelerator's device, frozen, eval mode
    student: Adapter  # the adapter to train (from the checkpoint when resuming)
    teacher: Teacher | None
    train_data: TokenData
    heldout: TokenData
    accelerator: object
    inputs: dict  # paths and sizes recorded in the fingerprint and the report
    checkpoint_dir: Path | None = None
    resume_state: tuple[dict, dict] | None = None  # (JSON state, tensors) of the checkpoint
    progress: bool = True  # the training bar (off when a caller shows its own, e.g. the frontier)


def run(job: Job, recipe: Recipe, after_step: Callable[[int], None] | None = None) -> tuple[Adapter, dict]:
    """Train; return the trained adapter and the report. ``after_step(t)`` runs after each step."""
    acc = job.accelerator
    model = job.model
    causal = is_causal_lm(model)
    _check_losses(recipe, job, causal)
    if recipe.batch_size % acc.num_processes:
        raise ShareportError(f"--batch-size {recipe.batch_size} must be a multiple of the {acc.num_processes} processes")
    pad = pad_token_id(model.config)

    base_bytes = parameter_bytes(model)
    base_params = matmul_parameters(model)
    student = attach(model, job.student, trainable=True, dtype=torch.float32)
    # a fleet member trains only its own cores, never the shared basis (two-sided: B = U @ C trains C)
    cores = train_cores(student, job.student, bool(recipe.checkpoint_every or job.resume_state))
    frozen = set(frozen_names(job.student))
    for name in sorted(frozen & set(student.parameters)):
        student.parameters[name].requires_grad_(False)
    names = sorted(set(student.parameters) - frozen)
    optimizer = torch.optim.AdamW([student.parameters[n] for n in names], lr=recipe.lr, weight_decay=0.0,
                                  **({"fused": True} if recipe.fast else {}))
    merger = BMerger(student, recipe.merge, optimizer) if recipe.merge else None
    fingerprint = recipe.fingerprint(**job.inputs)

    start, before = 0, None
    if job.resume_state is not None:
        start, before = _restore(job, student, optimizer, merger, fingerprint)
    if before is None:
        before = evaluate(model, student, job.teacher, job.heldout, recipe.batch_size, pad, causal, acc)

    sharded = shards_base(acc)
    if sharded:  # the base sharded (FSDP2), the adapter replicated: see accel.py
        ddp_model = shard_base(model, [student.parameters[n] for n in names])
    else:
        ddp_model, optimizer = acc.prepare(model, optimizer)
    order = BatchOrder(len(job.train_data), recipe.batch_size, recipe.seed)
    share = recipe.batch_size // acc.num_processes
    rank = acc.process_index

    progress = _progress(acc, recipe.steps, start, job.progress)
    started, tokens, last_loss = time.perf_counter(), 0, float("nan")
    step_tokens = torch.zeros((), dtype=torch.long, device=acc.device)  # since the last sync
    with compiled_blocks(model, recipe.compile):
        for step in range(start, recipe.steps):
            indices = order.batch(step)[rank * share:(rank + 1) * share]
            if recipe.pack:  # rows as wide as the data's max_length
                rows = collate_packed(job.train_data, indices, pad, job.inputs.get("max_length", 0))
            else:
                rows = collate(job.train_data, indices, pad)
            batch = {k: v.to(acc.device) for k, v in rows.items()}
            loss = _loss(ddp_model, model, job.teacher, batch, recipe, causal, acc)
            acc.backward(loss)
            if sharded:
                average_gradients([student.parameters[n] for n in sorted(student.parameters)])  # merges retire some
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            t = step + 1
            events = merger.observe(t) if merger else []
            step_tokens += counted_positions(batch).sum()
            progress.update(1)
            if not recipe.fast or t % SYNC_EVERY == 0 or t == recipe.steps:  # the same steps on every process
                last_loss = float(acc.reduce(loss.detach(), "mean"))
                tokens += int(acc.reduce(step_tokens, "sum"))
                step_tokens.zero_()
                progress.set_postfix(loss=f"{last_loss:.4g}", tok_s=f"{tokens / (time.perf_counter() - started):,.0f}",
                                     **({"merged": len(merger.events)} if merger else {}))
            if acc.is_main_process:
                for event in events:
                    progress.write(f"step {t}: {event.kind}: layers {event.merged} take the B of layers {event.kept} "
                                   f"(distance {event.distance:.4g})")
            if recipe.checkpoint_every and t % recipe.checkpoint_every == 0 and t < recipe.steps:
                _checkpoint(job, student, optimizer, merger, fingerprint, before, order, t)
            if after_step is not None:
                after_step(t)
    progress.close()
    elapsed = time.perf_counter() - started

    after = evaluate(model, student, job.teacher, job.heldout, recipe.batch_size, pad, causal, acc)
    trained = student.to_adapter() if cores is None else cores.finish(student.to_adapter(), job.student)
    student.detach()  # the base is bare again (the frontier recovers several adapters on one base)
    report = _report(job, recipe, before, after, trained, merger, acc, last_loss, tokens, elapsed)
    report["timings"].update(throughput(base_params, job.teacher is not None, tokens, elapsed, acc.device))
    if sharded:
        # the detached model holds the base alone: this process's shard of it
        report["fsdp"] = {"base_parameter_bytes": base_bytes, "base_parameter_bytes_here": local_parameter_bytes(model)}
    return trained, report


SYNC_EVERY = 10


def matmul_parameters(model: torch.nn.Module) -> int:
    """N for the FLOP count: the weights every token is multiplied by, those of the linear layers
    (GPT-2's Conv1D too), the output head included. Embeddings are lookups and cost no FLOPs; norms
    and biases are negligible; attention's scores (QK^T, AV: 4 * seq * hidden per layer and token)
    are left out, so the MFU is an underestimate (about 4% at hidden 2048, seq 512)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def throughput(base_params: int, teacher: bool, tokens: int, seconds: float, device: torch.device) -> dict:
    """FLOPs per token and MFU, with ``base_params`` = :func:`matmul_parameters` (N). Per token the
    frozen base costs 2N in the student's forward, 2N in its backward (input gradients only: the base
    has no weight gradients) and 2N in the teacher's forward, so 6N with a teacher and 4N without (the
    adapter's own FLOPs are negligible). MFU divides the achieved FLOP/s by the device's dense bf16
    peak (``peak_flops``; None where unknown, e.g. CPUs)."""
    per_token = (6 if teacher else 4) * base_params
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = peak_flops(name)
    achieved = per_token * tokens / seconds if seconds > 0 else None
    return {"flops_per_token": per_token, "achieved_flops": achieved, "device_name": name, "peak_flops": peak,
            "mfu": achieved / peak if achieved is not None and peak else None}


def _check_losses(recipe: Recipe, job: Job, causal: bool) -> None:
    if recipe.distill_weight and job.teacher is None:
        raise ShareportError("distillation needs a teacher adapter")
    if recipe.task_weight and not causal and job.train_data.labels is None:
        raise ShareportError(f"{job.train_data.source}: the data has no 'label' field, which the task loss needs")
    if not recipe.distill_weight and not recipe.task_weight:
        raise ShareportError("nothing to train on: the distillation and task loss weights are both 0")
    if recipe.steps < 1:
        raise ShareportError(f"--steps must be at least 1, got {recipe.steps}")
    if recipe.pack and not causal:
        raise ShareportError("--pack needs a causal LM: a packed row holds several examples, and a "
                             f"{type(job.model).__name__} gives one output per row")


def _loss(ddp_model, model, teacher, batch, recipe: Recipe, causal: bool, acc) -> torch.Tensor:
    """This process's share of the global batch mean loss (see the module docstring)."""
    total = torch.zeros((), device=acc.device)
    with acc.autocast():
        student_out, raw = model_outputs(ddp_model, batch, causal)
    if recipe.distill_weight:
        with torch.no_grad(), teacher.active(model), acc.autocast():
            teacher_out, _ = model_outputs(model, batch, causal)
        total = total + recipe.distill_weight * _normalised(*distill_sum(student_out, teacher_out), acc)
    if recipe.task_weight:
        total = total + recipe.task_weight * _normalised(*task_sum(raw, batch, causal), acc)
    return total


def _normalised(loss_sum: torch.Tensor, count: int, acc) -> torch.Tensor:
    global_count = acc.reduce(torch.tensor(float(count), device=acc.device), "sum")
    return loss_sum / global_count.clamp(min=1) * acc.num_processes


def evaluate_adapter(job: Job, adapter: Adapter, batch_size: int) -> dict:
    """Held-out metrics of ``adapter`` on the job's base against its teacher, without training."""
    model = job.model
    student = attach(model, adapter, trainable=False, dtype=torch.float32)
    try:
        return evaluate(model, student, job.teacher, job.heldout, batch_size, pad_token_id(model.config),
                        is_causal_lm(model), job.accelerator)
    finally:
        student.detach()


@torch.no_grad()
def evaluate(model, student: Attached, teacher: Teacher | None, heldout: TokenData, batch_size: int, pad: int,
             causal: bool, acc) -> dict:
    """KL and top-1 agreement with the teacher (MSE for hidden states), plus the task metric.

    Every process evaluates the whole held-out split (it is small), so all agree on the result.
    """
    totals = EvalTotals()
    has_task = causal or heldout.labels is not None
    for start in range(0, len(heldout), batch_size):
        indices = list(range(start, min(start + batch_size, len(heldout))))
        batch = {k: v.to(acc.device) for k, v in collate(heldout, indices, pad).items()}
        with acc.autocast():
            student_out, raw_student = model_outputs(model, batch, causal)
            if teacher is not None:
                with teacher.active(model):
                    teacher_out, raw_teacher = model_outputs(model, batch, causal)
                totals.add(student_out, teacher_out)
            else:
                raw_teacher = None
        if has_task:
            totals.add_task(raw_student, raw_teacher, batch, causal)
    return totals.report(causal, has_teacher=teacher is not None)


def _progress(acc, total: int, initial: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                disable=not (enabled and acc.is_local_main_process) or os.environ.get("SHAREPORT_NO_PROGRESS") == "1")


def _checkpoint(job: Job, student: Attached, optimizer, merger, fingerprint, before, order, t: int) -> None:
    acc = job.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        hyper, tensors = optimizer_state(optimizer, student.parameters)
        merge_meta = None
        if merger:
            merge_meta, averages = merger.state()
            tensors.update(averages)
        state = {"step": t, "data_position": order.position(t), "recipe": fingerprint, "optimizer": hyper,
                 "merger": merge_meta, "eval_before": before}
        save_checkpoint(job.checkpoint_dir, student.to_adapter(), state, tensors)
    acc.wait_for_everyone()


def _restore(job: Job, student: Attached, optimizer, merger, fingerprint) -> tuple[int, dict]:
    state, tensors = job.resume_state
    check_same_recipe(state["recipe"], fingerprint, job.checkpoint_dir)
    load_optimizer_state(optimizer, student.parameters, state["optimizer"], tensors)
    if merger:
        merger.load_state(state["merger"], tensors)
    restore_rng(tensors)
    return int(state["step"]), state["eval_before"]


def _report(job, recipe, before, after, trained: Adapter, merger, acc, last_loss, tokens, elapsed) -> dict:
    report = {
        "inputs": job.inputs,
        "recipe": recipe.fingerprint(),
        "device": acc.device.type,
        "mixed_precision": acc.mixed_precision,
        "processes": acc.num_processes,
        "train_examples": len(job.train_data),
        "heldout_examples": len(job.heldout),
        "before": before,
        "after": after,
        "final_train_loss": last_loss,
        "parameters": {"start": job.student.num_parameters(), "end": trained.num_parameters()},
        "groups": {kind: len({s.b for s in sites}) for kind, sites in trained.kinds().items()},
        # wall-clock numbers differ run to run: written apart (training_timings.json) so the report is reproducible
        "timings": {"seconds": elapsed, "tokens": tokens, "tokens_per_second": tokens / elapsed if elapsed > 0 else None},
    }
    if "kl" in before and before["kl"] > 0:
        report["kl_reduction"] = 1 - after["kl"] / before["kl"]
    if merger:
        report["merges"] = [e.to_json() for e in merger.events]
    return report


def with_provenance(adapter: Adapter, entry: dict) -> Adapter:
    """The adapter with ``entry`` appended to its provenance history (the input's is not changed)."""
    return adapter.with_step(entry)
