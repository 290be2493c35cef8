"""The training recipe behind ``shareport finetune`` (recovery) and ``shareport train`` (from scratch).

Shaped as torchtune's recipes are, a :class:`Trainer` with four verbs, driven by :func:`run`:

    setup      (``Trainer.__init__``) accelerator (CUDA + bf16 autocast when present, else CPU;
               N processes under ``accelerate launch``/``torchrun``), model, adapters, optimizer,
               ASLoRA merger; resume from a checkpoint; evaluate the held-out split at step 0
    train_step the global batch's share of this process -> teacher and student forward -> loss ->
               backward -> AdamW step at the scheduled lr (``schedule.py``) -> ASLoRA merge if due
    evaluate   the held-out split, every ``eval_every`` steps and at the last; the best adapter so
               far (``BestKept``) is kept, by held-out KL (``train``: the task loss), ties to the earlier
    finish     the best adapter and a report: before, after (the published adapter), the curve

**Never worse.** What is published is the best of the evaluated adapters, step 0 included: a
recovery that only makes things worse on held-out data returns its input, and an adapter equal
to its teacher stays equal. (With ASLoRA merges, only adapters after the last merge count: an
earlier one has the wrong number of B groups.) When the job scores on a separate test file
(``Job.selection``), the best step is chosen on the selection split, never on the test data.

The loss is a sum over this process's positions divided by the positions of the whole global
batch, times the number of processes (DDP averages gradients over processes): the update is
that of the global batch mean however it is split, so N processes match one.
Dropout stays off (the model is kept in eval mode): only adapter factors train, and the
distillation target is then a fixed function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..adapter import Adapter, frozen_names, reference
from ..errors import ShareportError
from ..model.base import is_causal_lm, task_type_of
from ..model.surgery import attach
from .accel import average_gradients, local_parameter_bytes, parameter_bytes, shard_base, shards_base
from .best import BestKept, curve_point, selection_score
from .checkpoint import check_same_recipe, load_optimizer_state, optimizer_state, restore_rng, save_checkpoint
from .compiled import compiled_blocks, eager_blocks
from .cores import train_cores_only
from .data import BatchOrder, TokenData, collate, collate_packed, counted_positions, pad_token_id
from .distill import distill_sum, hidden_sum, model_outputs, task_sum
from .evaluation import TeacherCache, evaluate, evaluate_adapter, evaluate_attached
from .fleet_cores import train_cores
from .flops import matmul_parameters, throughput
from .merging import BMerger, MergeSchedule
from .recipe_checks import check_recipe
from .schedule import (
    BACKOFF_FACTOR,
    BACKOFF_RATIO,
    DEFAULT_LR,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    DEFAULT_TRAINABLE,
    DEFAULT_WARMUP,
    LR_SCALE_REFERENCE,
    MIN_HELDOUT_ROWS,
    default_eval_every,
    default_lr_scaling,
    default_site_weight,
    default_temperature,
    diverged,
    eval_steps,
    lr_factor,
)
from .sites import recording, site_sum
from .stored import stored_as_start
from .teacher import Teacher

__all__ = [
    "Job",
    "Recipe",
    "Trainer",
    "evaluate",
    "evaluate_adapter",
    "matmul_parameters",
    "run",
    "throughput",
    "with_provenance",
]


@dataclasses.dataclass
class Recipe:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR  # the peak lr, reached after the warmup
    batch_size: int = 8
    seed: int = 0
    distill_weight: float = 1.0  # 0 for `train`: no teacher
    task_weight: float = 0.0  # the data's own loss (--lm-loss)
    hidden_weight: float = 0.0  # last hidden states at every position against the teacher's (distill.hidden_sum)
    temperature: float | None = None  # of the distillation KL; None: schedule.default_temperature
    # each adapted site's update against the teacher's, a share of the KL (sites.py); None: by the output
    site_weight: float | None = None
    trainable: str = DEFAULT_TRAINABLE  # "factors", or "cores" between frozen orthonormal bases (cores.py)
    backoff: bool = True  # a diverged evaluation puts the best adapter back and lowers the lr (schedule.py)
    # "tensor": each tensor's step scaled by its rms at the start (schedule.LR_SCALE_REFERENCE); None: by the job
    lr_scaling: str | None = None
    schedule: str = DEFAULT_SCHEDULE  # the lr after the warmup: schedule.SCHEDULES
    warmup: float = DEFAULT_WARMUP  # share of the steps
    eval_every: int | None = None  # None: schedule.default_eval_every
    checkpoint_every: int = 0
    merge: MergeSchedule | None = None
    # torch.compile backend for the transformer blocks during the training steps (--compile:
    # "inductor"; tests: "aot_eager"); None: eager. See compiled.py.
    compile: str | None = None
    # several examples per row (causal LMs): the same examples and loss per step as unpadded rows,
    # fewer padded positions to compute (see data.collate_packed)
    pack: bool = False
    # batches of examples of similar length (data.BatchOrder): less padding, the same examples per run
    # of steps, but less varied batches, which costs fidelity (docs/recovery.md): an option, not the default
    group_by_length: bool = False

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
    heldout: TokenData  # what before/after are reported on
    accelerator: object
    inputs: dict  # paths and sizes recorded in the fingerprint and the report
    checkpoint_dir: Path | None = None
    resume_state: tuple[dict, dict] | None = None  # (JSON state, tensors) of the checkpoint
    progress: bool = True  # the training bar (off when a caller shows its own, e.g. the frontier)
    # where the best step is chosen when ``heldout`` is a test file (None: on ``heldout`` itself)
    selection: TokenData | None = None
    # the adapter as given, when ``student`` is a checkpoint's (resuming): a quantized one is published
    # quantized as it came (stored.py); None: ``student`` is the one given
    start: Adapter | None = None

    @property
    def given(self) -> Adapter:
        return self.start if self.start is not None else self.student


# the loss and token count are read back from the device every SYNC_EVERY steps and at the last, not
# every step: a read-back waits for the device to finish, which stalls a GPU between steps
SYNC_EVERY = 10


def run(job: Job, recipe: Recipe, after_step: Callable[[int], None] | None = None) -> tuple[Adapter, dict]:
    """Train; return the best adapter (see the module docstring) and the report. ``after_step(t)``
    runs after each step."""
    trainer = Trainer(job, recipe)
    with compiled_blocks(job.model, recipe.compile):
        for step in range(trainer.start, recipe.steps):
            trainer.train_step(step)
            trainer.after_step(step + 1)
            if after_step is not None:
                after_step(step + 1)
    return trainer.finish()


class Trainer:
    """One training run: ``__init__`` sets up, then ``train_step``/``after_step`` per step, ``finish``."""

    def __init__(self, job: Job, recipe: Recipe):
        self.job, self.recipe, self.acc = job, recipe, job.accelerator
        self.model = job.model
        self.causal = is_causal_lm(self.model)
        # defaults by the output (schedule.py); the report's recipe and a checkpoint record the values
        classifier = task_type_of(self.model) == "SEQ_CLS"
        distilling = job.teacher is not None and bool(recipe.distill_weight)
        if recipe.temperature is None:
            recipe = dataclasses.replace(recipe, temperature=default_temperature(classifier=classifier))
        if recipe.site_weight is None:  # distillation only: `train` has no teacher's sites to match
            site_weight = default_site_weight(classifier=classifier) if distilling else 0.0
            recipe = dataclasses.replace(recipe, site_weight=site_weight)
        if recipe.lr_scaling is None:
            # a fleet member (shared bases frozen, a two-sided one's cores) is not whole factors either
            whole = recipe.trainable == "factors" and reference(job.student) is None
            recipe = dataclasses.replace(
                recipe, lr_scaling=default_lr_scaling(distilling=distilling, whole_factors=whole)
            )
        self.recipe = recipe
        check_recipe(recipe, job, self.causal)
        self.pad = pad_token_id(self.model.config)
        self.base_bytes, self.base_params = parameter_bytes(self.model), matmul_parameters(self.model)
        self.student = attach(self.model, job.student, trainable=True, dtype=torch.float32)
        # a fleet member trains only its own cores, never the shared basis (two-sided: B = U @ C trains C)
        self.cores = train_cores(self.student, job.student, bool(recipe.checkpoint_every or job.resume_state))
        frozen = set(frozen_names(job.student))
        for name in sorted(frozen & set(self.student.parameters)):
            self.student.parameters[name].requires_grad_(False)
        self.names = sorted(set(self.student.parameters) - frozen)
        # --trainable cores: each trainable factor (a two-sided member's B is a core already) as basis x core
        already_cores = set(self.cores.products) if self.cores is not None else set()
        self.bases = (
            train_cores_only(self.student, [n for n in self.names if n not in already_cores])
            if recipe.trainable == "cores"
            else None
        )
        # per trainable tensor, the factor its optimizer step is scaled by (--lr-scaling tensor; a checkpoint
        # keeps them, since a resumed run's tensors are no longer the start's)
        self.step_scales = (
            {n: tensor_step_scale(self.student.parameters[n]) for n in self.names}
            if recipe.lr_scaling == "tensor"
            else {}
        )
        self.optimizer = torch.optim.AdamW(
            [self.student.parameters[n] for n in self.names], lr=recipe.lr, weight_decay=0.0, fused=True
        )
        self.merger = BMerger(self.student, recipe.merge, self.optimizer) if recipe.merge else None
        self.fingerprint = recipe.fingerprint(**job.inputs)
        self.selection = job.selection if job.selection is not None else job.heldout
        self.caches = {id(job.heldout): TeacherCache(), id(self.selection): TeacherCache()}
        self.eval_every = recipe.eval_every or default_eval_every(
            steps=recipe.steps,
            batch_size=recipe.batch_size,
            heldout_examples=len(self.selection),
            teacher_cached=job.teacher is not None,
        )
        self.eval_at = set(eval_steps(recipe.steps, self.eval_every))
        layers = max(len(sites) for sites in job.student.kinds().values())
        self.best = BestKept(recipe.merge.last_merge_step(layers) if recipe.merge else 0)
        self.curve_metrics: dict[int, dict] = {}  # every evaluated step's full metrics on the selection split
        self.lr_scale, self.backoffs = 1.0, []  # lowered at each backoff (steps listed), on top of the schedule
        self.start, self.before = 0, None
        if job.resume_state is not None:
            self.start, self.before = self._restore(job.resume_state)
        if self.before is None:
            self.before = self.evaluate(job.heldout)
            chosen_on = self.before if self.selection is job.heldout else self.evaluate(self.selection)
            self._check_heldout(chosen_on)  # the split that picks the best step must be able to
            self._record(0, chosen_on)
        self.sharded = shards_base(self.acc)
        if self.sharded:  # the base sharded (FSDP2), the adapter replicated: see accel.py
            self.ddp_model = shard_base(self.model, [self.student.parameters[n] for n in self.names])
        else:
            self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.order = BatchOrder.of(job.train_data, recipe.batch_size, recipe.seed, by_length=recipe.group_by_length)
        self.share = recipe.batch_size // self.acc.num_processes
        self.progress = _progress(self.acc, recipe.steps, self.start, job.progress)
        self.started, self.tokens, self.last_loss = time.perf_counter(), 0, float("nan")
        self.eval_seconds = 0.0  # of the evaluations during training (part of the run's seconds)
        self.step_tokens = torch.zeros((), dtype=torch.long, device=self.acc.device)  # since the last sync
        self.loss = None

    # ------------------------------------------------------------------------------------ steps
    def train_step(self, step: int) -> None:
        """One optimizer step on global batch ``step``, at the scheduled lr."""
        recipe, acc = self.recipe, self.acc
        rank = acc.process_index
        indices = self.order.batch(step)[rank * self.share : (rank + 1) * self.share]
        if recipe.pack:  # rows as wide as the data's max_length
            rows = collate_packed(self.job.train_data, indices, self.pad, self.job.inputs.get("max_length", 0))
        else:
            rows = collate(self.job.train_data, indices, self.pad)
        batch = {k: v.to(acc.device) for k, v in rows.items()}
        self.loss = self._loss(batch)
        acc.backward(self.loss)
        if self.sharded:  # merges retire some parameters: average what is there now
            average_gradients([self.student.parameters[n] for n in sorted(self.student.parameters)])
        lr = (
            recipe.lr
            * self.lr_scale
            * lr_factor(step, steps=recipe.steps, schedule=recipe.schedule, warmup=recipe.warmup)
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # (an ASLoRA merge retires the B it drops: only the tensors still trained)
        before = {
            n: self.student.parameters[n].detach().clone() for n in self.step_scales if n in self.student.parameters
        }
        self.optimizer.step()
        with torch.no_grad():  # p = before + scale * (p - before): the step of this tensor, scaled
            for name, start in before.items():
                self.student.parameters[name].sub_(start).mul_(self.step_scales[name]).add_(start)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_tokens += counted_positions(batch).sum()

    def after_step(self, t: int) -> None:
        """After step ``t``: ASLoRA merges, the bar, evaluation and the best kept, checkpoints."""
        recipe, acc = self.recipe, self.acc
        events = self.merger.observe(t) if self.merger else []
        self.progress.update(1)
        if t % SYNC_EVERY == 0 or t == recipe.steps:  # the same steps on every process
            self.last_loss = float(acc.reduce(self.loss.detach(), "mean"))
            self.tokens += int(acc.reduce(self.step_tokens, "sum"))
            self.step_tokens.zero_()
            self._postfix()
        if acc.is_main_process:
            for event in events:
                self.progress.write(
                    f"step {t}: {event.kind}: layers {event.merged} take the B of layers "
                    f"{event.kept} (distance {event.distance:.4g})",
                    file=sys.stderr,  # stdout is the command's report (--json)
                )
        if t in self.eval_at:
            started = time.perf_counter()
            with eager_blocks(self.model) if recipe.compile else contextlib.nullcontext():
                self._record(t, self.evaluate(self.selection))
            self.eval_seconds += time.perf_counter() - started
            self._postfix()
        if recipe.checkpoint_every and t % recipe.checkpoint_every == 0 and t < recipe.steps:
            self._checkpoint(t)

    def evaluate(self, data: TokenData) -> dict:
        """Held-out metrics of the student as it is now (the teacher's outputs computed once per split)."""
        return evaluate(
            self.model,
            self.student,
            self.job.teacher,
            heldout=data,
            batch_size=self.recipe.batch_size,
            pad=self.pad,
            causal=self.causal,
            acc=self.acc,
            cache=self.caches[id(data)],
        )

    def finish(self) -> tuple[Adapter, dict]:
        """Put the best adapter's values back, read it off the model, take the adapter off; the report."""
        self.progress.close()
        elapsed = time.perf_counter() - self.started
        if self.best.step is not None and self.best.step != max(self.curve_metrics, default=None):
            self.best.restore_into(self.student.parameters)
        after = self._after()
        composed = (
            self.bases.factors(self.student, self.job.student, kept_start=self.best.step == 0)
            if self.bases is not None
            else None
        )
        trained = self.student.to_adapter(composed)
        if self.cores is not None:
            trained = self.cores.finish(trained, self.job.student)
        self.student.detach()  # the base is bare again (the frontier recovers several adapters on one base)
        float_after = None
        if self.job.given.quantized:  # published as it came: integers (stored.py)
            float_after, (trained, after) = after, self._stored_as_start(trained)
        report = self._report(after, trained, elapsed)
        if float_after is not None:
            requantized = trained is not self.job.given
            report["stored"] = {
                "quantized": requantized,
                "published": "the trained adapter, quantized as the start was"
                if requantized
                else "the start, as it was given",
                "float_after": float_after,
            }
        report["timings"].update(
            throughput(self.base_params, self.job.teacher is not None, self.tokens, elapsed, self.acc.device)
        )
        if self.sharded:
            # the detached model holds the base alone: this process's shard of it
            report["fsdp"] = {
                "base_parameter_bytes": self.base_bytes,
                "base_parameter_bytes_here": local_parameter_bytes(self.model),
            }
        return trained, report

    # ---------------------------------------------------------------------------------- helpers
    def _stored_as_start(self, trained: Adapter) -> tuple[Adapter, dict]:
        """A quantized start: (the adapter to publish, its metrics on ``heldout``) per ``stored.py``."""
        has_teacher, task_weight = self.job.teacher is not None, self.recipe.task_weight
        measured: dict[int, dict] = {}

        def score(adapter: Adapter) -> float:
            metrics = evaluate_attached(
                self.model, adapter, self.job.teacher, self.selection, batch_size=self.recipe.batch_size, acc=self.acc
            )
            measured[id(adapter)] = metrics
            return selection_score(metrics, has_teacher, task_weight)[1]

        start_score = selection_score(self.curve_metrics[0], has_teacher, task_weight)[1]
        published, requantized = stored_as_start(
            trained, self.job.given, kept_start=self.best.step == 0, score=score, start_score=start_score
        )
        if not requantized:
            return published, self.before
        if self.selection is self.job.heldout:
            return published, measured[id(published)]
        return published, evaluate_adapter(self.job, published, self.recipe.batch_size)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This process's share of the global batch mean loss (see the module docstring)."""
        recipe, acc, teacher = self.recipe, self.acc, self.job.teacher
        hidden = bool(recipe.hidden_weight)
        total = torch.zeros((), device=acc.device)
        sites = bool(recipe.site_weight)
        mine = self.student.wrappers
        theirs = {p: w for p, w in teacher.wrappers.items() if p in mine} if sites else {}
        with recording(mine) if sites else contextlib.nullcontext(), acc.autocast():
            student_out, raw = model_outputs(self.ddp_model, batch, self.causal, hidden=hidden)
        if recipe.distill_weight or hidden or sites:
            with (
                torch.no_grad(),
                teacher.active(self.model),
                recording(theirs) if sites else contextlib.nullcontext(),
                acc.autocast(),
            ):
                teacher_out, _ = model_outputs(self.model, batch, self.causal, hidden=hidden)
        if recipe.distill_weight:
            kl = _normalised(*distill_sum(student_out, teacher_out, recipe.temperature), acc)
            total = total + recipe.distill_weight * kl
        if sites:
            site = _normalised(*site_sum(mine, theirs, counted_positions(batch)), acc)
            total = total + recipe.site_weight * _as_share_of(site, kl, acc)
        if hidden:
            total = total + recipe.hidden_weight * _normalised(*hidden_sum(student_out, teacher_out), acc)
        if recipe.task_weight:
            total = total + recipe.task_weight * _normalised(*task_sum(raw, batch, self.causal), acc)
        return total

    def _record(self, step: int, metrics: dict) -> None:
        """A point of the curve; the adapter is kept if it is the best so far."""
        self.curve_metrics[step] = metrics
        _, score = selection_score(metrics, self.job.teacher is not None, self.recipe.task_weight)
        self.best.offer(step, score, self.student.parameters)
        if self.recipe.backoff and self.best.step not in (None, step) and diverged(score, self.best.score):
            # the lr knocked the adapter off: back to the best, on at a smaller lr (schedule.BACKOFF_RATIO)
            self.best.restore_into(self.student.parameters)
            self.lr_scale *= BACKOFF_FACTOR
            self.backoffs.append(step)
            if self.acc.is_main_process:
                self.progress.write(
                    f"step {step}: held-out score {score:.4g} > {BACKOFF_RATIO:g} x the best ({self.best.score:.4g}, "
                    f"step {self.best.step}): back to step {self.best.step}, lr x {self.lr_scale:g} from here",
                    file=sys.stderr,  # stdout is the command's report (--json)
                )

    def _after(self) -> dict:
        """The published adapter's metrics on ``heldout``: from the curve when it is the selection split."""
        if self.selection is self.job.heldout and self.best.step is not None:
            return self.curve_metrics[self.best.step]
        return self.evaluate(self.job.heldout)

    def _check_heldout(self, metrics: dict) -> None:
        rows = metrics.get("positions", len(self.selection))
        if rows < MIN_HELDOUT_ROWS:
            source = self.job.inputs.get("data") or self.selection.source
            more = "raise --generate or --max-length" if self.job.inputs.get("generated") else "give more data"
            raise ShareportError(
                f"{source}: the held-out split has {rows} compared row(s) (sequences for a classifier, tokens for "
                f"a causal LM); recovery picks its best step on it and needs at least {MIN_HELDOUT_ROWS}: raise "
                f"--eval-fraction or {more}"
            )

    def _postfix(self) -> None:
        fields = {
            "loss": f"{self.last_loss:.4g}",
            "tok_s": f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):,.0f}",
        }
        if self.best.step is not None:
            fields["best"] = f"{self.best.score:.4g}@{self.best.step}"
        if self.merger:
            fields["merged"] = len(self.merger.events)
        self.progress.set_postfix(**fields)

    def _checkpoint(self, t: int) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            hyper, tensors = optimizer_state(self.optimizer, self.student.parameters)
            merge_meta = None
            if self.merger:
                merge_meta, averages = self.merger.state()
                tensors.update(averages)
            best_meta, best_tensors = self.best.state()
            tensors.update(best_tensors)
            state = {
                "step": t,
                "data_position": self.order.position(t),
                "recipe": self.fingerprint,
                "optimizer": hyper,
                "merger": merge_meta,
                "eval_before": self.before,
                "curve_metrics": self.curve_metrics,
                "best": best_meta,
                "backoff": {"lr_scale": self.lr_scale, "steps": self.backoffs},
                "step_scales": self.step_scales,
            }
            save_checkpoint(self.job.checkpoint_dir, self.student.to_adapter(), state, tensors)
        acc.wait_for_everyone()

    def _restore(self, resume_state) -> tuple[int, dict]:
        state, tensors = resume_state
        check_same_recipe(state["recipe"], self.fingerprint, self.job.checkpoint_dir)
        load_optimizer_state(self.optimizer, self.student.parameters, state["optimizer"], tensors)
        if self.merger:
            self.merger.load_state(state["merger"], tensors)
        restore_rng(tensors)
        self.curve_metrics = {int(k): v for k, v in state.get("curve_metrics", {}).items()}
        if state.get("best"):
            self.best.load_state(state["best"], tensors, self.acc.device)
        if state.get("backoff"):
            self.lr_scale, self.backoffs = state["backoff"]["lr_scale"], list(state["backoff"]["steps"])
        if self.step_scales:
            self.step_scales = {n: float(v) for n, v in state["step_scales"].items()}
        return int(state["step"]), state["eval_before"]

    def _report(self, after: dict, trained: Adapter, elapsed: float) -> dict:
        job, recipe = self.job, self.recipe
        selected_by, _ = selection_score(after, job.teacher is not None, recipe.task_weight)
        report = {
            "inputs": job.inputs,
            "recipe": recipe.fingerprint(),
            "device": self.acc.device.type,
            "mixed_precision": self.acc.mixed_precision,
            "processes": self.acc.num_processes,
            "train_examples": len(job.train_data),
            "heldout_examples": len(job.heldout),
            "before": self.before,
            "after": after,
            "best_step": self.best.step,
            "backoffs": self.backoffs,  # evaluated steps that diverged: the best put back, the lr lowered
            "selected_by": selected_by,
            "eval_every": self.eval_every,
            "curve": [curve_point(step, metrics) for step, metrics in sorted(self.curve_metrics.items())],
            "final_train_loss": self.last_loss,
            "parameters": {
                "start": job.student.num_parameters(),
                "end": trained.num_parameters(),
                "trained": sum(p.numel() for p in self.student.parameters.values() if p.requires_grad),
            },
            "groups": {kind: len({s.b for s in sites}) for kind, sites in trained.kinds().items()},
            # wall-clock numbers differ run to run: written apart (training_timings.json) so the report is reproducible
            "timings": {
                "seconds": elapsed,
                "eval_seconds": self.eval_seconds,
                "tokens": self.tokens,
                "tokens_per_second": self.tokens / elapsed if elapsed > 0 else None,
            },
        }
        if self.selection is not job.heldout:
            report["selection_examples"] = len(self.selection)
        if "kl" in self.before and self.before["kl"] > 0:
            report["kl_reduction"] = 1 - after["kl"] / self.before["kl"]
        if self.merger:
            report["merges"] = [e.to_json() for e in self.merger.events]
        return report


def tensor_step_scale(param: torch.Tensor) -> float:
    """--lr-scaling tensor: the factor a tensor's Adam step is scaled by, its entries' rms over the
    reference (schedule.LR_SCALE_REFERENCE); 1 for an all-zero tensor, which has no scale of its own."""
    rms = float(param.detach().float().square().mean().sqrt())
    return rms / LR_SCALE_REFERENCE if rms > 0 else 1.0


def _as_share_of(term: torch.Tensor, reference: torch.Tensor, acc) -> torch.Tensor:
    """``term`` rescaled to ``reference``'s size on this batch, its gradient's direction kept.

    The scale (global reference / global term, both detached) is a constant of the step: the
    rescaled term's value equals the reference's, and its gradient is term's times that ratio. So a
    weight is a share of the reference whatever the two terms' units, and where the reference is
    already small (a student near its teacher) the term does not drown it (sites.py)."""
    pair = acc.reduce(torch.stack([reference.detach(), term.detach()]).float(), "sum")
    return term * (pair[0] / pair[1].clamp(min=1e-12))


def _normalised(loss_sum: torch.Tensor, count: int, acc) -> torch.Tensor:
    global_count = acc.reduce(torch.tensor(float(count), device=acc.device), "sum")
    return loss_sum / global_count.clamp(min=1) * acc.num_processes


def _progress(acc, total: int, initial: int, enabled: bool = True):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only (as every shareport bar), so logs and captured output stay clean
    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        disable=None if enabled and acc.is_local_main_process else True,
    )


def with_provenance(adapter: Adapter, entry: dict) -> Adapter:
    """The adapter with ``entry`` appended to its provenance history (the input's is not changed)."""
    return adapter.with_step(entry)
