"""Losses and held-out metrics for recovering a shared adapter toward its original LoRA.

The quantity compared is what the model outputs: logits when it has a head (next-token logits
of a causal LM, class logits of a classifier), else the last hidden states of an encoder.

- logits: KL(teacher || student) of the softmax distributions, per position (per sequence
  for a sequence classifier), and top-1 agreement;
- hidden states: mean squared error per position.

Recovery can add more signal per example than one KL per sequence (a 12-class classifier's KL
carries a few bits): with ``hidden`` the outputs also hold the last hidden state of every counted
position (every token of a classifier's input, not only the pooled one), compared by
:func:`hidden_sum`, and ``temperature`` softens both distributions of the KL.

Every loss is returned as a (sum, count) pair rather than a mean, so that the training loop can
divide by the count over *all* processes: the gradient is then that of the global batch mean,
whichever way the batch was split.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .data import counted_positions

IGNORE = -100


@dataclasses.dataclass
class Outputs:
    """A model's comparable output: one row per counted (non-padded) position, or per sequence."""

    values: torch.Tensor  # (N, V)
    is_logits: bool
    hidden: torch.Tensor | None = None  # (N', H): the last hidden state per counted position, when asked


def model_outputs(
    model, batch: dict[str, torch.Tensor], causal: bool = False, hidden: bool = False
) -> tuple[Outputs, object]:
    """Run the model; return the counted rows of its output (float32) and the raw output.
    ``hidden``: also the last hidden state at every counted position (``Outputs.hidden``).

    A causal LM runs without its key/value cache: nothing here reuses it, and building it costs a
    copy of every layer's keys and values per forward (under torch.compile, also a recompile per
    layer, the cache's state differing from layer to layer)."""
    extra = {"use_cache": False} if causal else {}
    if hidden:
        extra["output_hidden_states"] = True
    if "position_ids" in batch:  # packed rows (collate_packed): the positions separate the examples
        raw = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra)
    else:
        raw = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    logits = getattr(raw, "logits", None)
    values = logits if logits is not None else raw.last_hidden_state
    values = values.float()
    counted = counted_positions(batch).bool()
    if values.dim() == 3:  # per position: keep the non-padded ones
        values = values[counted]
    states = raw.hidden_states[-1].float()[counted] if hidden and logits is not None else None
    return Outputs(values, logits is not None, states), raw


def distill_sum(student: Outputs, teacher: Outputs, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) over rows (logits) or summed per-row MSE (hidden states).

    At a ``temperature`` T other than 1 both logits are divided by T and the KL is multiplied by
    T^2, which keeps its gradient on the scale of T = 1 (Hinton et al.)."""
    if student.is_logits:
        if temperature == 1.0:
            return kl_rows(teacher.values, student.values).sum(), student.values.shape[0]
        kl = kl_rows(teacher.values / temperature, student.values / temperature).sum()
        return kl * temperature**2, student.values.shape[0]
    return (student.values - teacher.values).square().mean(dim=-1).sum(), student.values.shape[0]


def hidden_sum(student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, int]:
    """Summed per-position squared error of the last hidden states, relative to the teacher's mean
    square (so the weight means the same for every model's scale of activations)."""
    scale = teacher.hidden.square().mean().clamp(min=1e-12)
    return (student.hidden - teacher.hidden).square().mean(dim=-1).sum() / scale, student.hidden.shape[0]


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) of each row."""
    t = F.log_softmax(teacher_logits, dim=-1)
    s = F.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1)


def task_sum(raw, batch: dict[str, torch.Tensor], is_causal_lm: bool) -> tuple[torch.Tensor, int]:
    """The data's own loss, summed: next-token cross-entropy, or the class labels' cross-entropy."""
    logits = raw.logits.float()
    if is_causal_lm:
        valid = counted_positions(batch)[:, 1:] == 1
        if "segments" in batch:  # packed: the last token of one example does not predict the next's first
            valid &= batch["segments"][:, 1:] == batch["segments"][:, :-1]
        targets = batch["input_ids"][:, 1:].masked_fill(~valid, IGNORE)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((targets != IGNORE).sum())
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), int(batch["labels"].numel())


@dataclasses.dataclass
class EvalTotals:
    """Running sums over held-out batches; :meth:`report` turns them into means."""

    distill: float = 0.0
    agree: int = 0
    rows: int = 0
    task_student: float = 0.0
    task_teacher: float = 0.0
    task_count: int = 0
    correct_student: int = 0
    correct_teacher: int = 0
    is_logits: bool = True

    def add(self, student: Outputs, teacher: Outputs) -> None:
        total, rows = distill_sum(student, teacher)
        self.distill += float(total)
        self.rows += rows
        self.is_logits = student.is_logits
        if student.is_logits:
            self.agree += int((student.values.argmax(-1) == teacher.values.argmax(-1)).sum())

    def add_task(self, raw_student, batch, is_causal_lm: bool, correct: int | None) -> None:
        """The student's own task loss on a batch, and (labels) how many it got right."""
        s, n = task_sum(raw_student, batch, is_causal_lm)
        self.task_student += float(s)
        self.task_count += n
        if correct is not None:
            self.correct_student += correct

    def add_teacher_task(self, loss_sum: float, correct: int | None) -> None:
        self.task_teacher += loss_sum
        if correct is not None:
            self.correct_teacher += correct

    def report(self, is_causal_lm: bool, has_teacher: bool = True) -> dict:
        out: dict = {}
        if has_teacher:
            out["positions"] = self.rows
            if self.is_logits:
                out["kl"] = self.distill / max(self.rows, 1)
                out["top1_agreement"] = self.agree / max(self.rows, 1)
            else:
                out["hidden_mse"] = self.distill / max(self.rows, 1)
        if self.task_count:
            n = self.task_count
            key = "lm_loss" if is_causal_lm else "label_loss"
            out[key] = {"student": self.task_student / n}
            if not is_causal_lm:
                out["accuracy"] = {"student": self.correct_student / n}
            if has_teacher:
                out[key]["teacher"] = self.task_teacher / n
                if not is_causal_lm:
                    out["accuracy"]["teacher"] = self.correct_teacher / n
        return out
