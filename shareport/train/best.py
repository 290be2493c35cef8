"""Keeping the best adapter of a run: what "best" is measured by, and the copy that is kept.

Recovery evaluates the held-out split at step 0 and every ``eval_every`` steps (``schedule.py``)
and publishes the best adapter it saw, so a run can only end worse than its input on data it
never evaluated. Ties keep the earlier step: an adapter equal to its teacher (KL 0 at step 0)
is returned unchanged.
"""

from __future__ import annotations

import torch


class BestKept:
    """The best evaluated adapter so far: its step, score and a copy of its trainable tensors."""

    def __init__(self, eligible_from: int):
        self.eligible_from = eligible_from  # no adapter before this step counts (ASLoRA's last merge)
        self.step: int | None = None
        self.score = float("inf")
        self.tensors: dict[str, torch.Tensor] = {}

    def offer(self, step: int, score: float, parameters: dict[str, torch.nn.Parameter]) -> bool:
        """Keep this step's adapter if it is strictly better (ties keep the earlier)."""
        if step < self.eligible_from or not score < self.score:
            return False
        self.step, self.score = step, score
        self.tensors = {n: p.detach().clone() for n, p in parameters.items()}
        return True

    def restore_into(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        """Put the kept adapter's values back into the trained ``parameters`` (in place)."""
        with torch.no_grad():
            for name, value in self.tensors.items():
                parameters[name].copy_(value)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return (
            {"step": self.step, "score": self.score if self.step is not None else None},
            {f"best/{n}": t.cpu() for n, t in self.tensors.items()},
        )

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor], device) -> None:
        self.step = meta["step"]
        self.score = float("inf") if meta["score"] is None else meta["score"]
        self.tensors = {k[len("best/") :]: v.to(device) for k, v in tensors.items() if k.startswith("best/")}


def selection_score(metrics: dict, has_teacher: bool, task_weight: float = 0.0) -> tuple[str, float]:
    """(what it is, the value) that picks the best step: the held-out value of what the run
    minimises. With a teacher: the KL (an encoder without logits: the hidden MSE), plus
    ``task_weight`` times the task loss when ``--lm-loss`` asks for it; without one (``train``):
    the task loss."""
    task_key = "label_loss" if "label_loss" in metrics else "lm_loss"
    if not has_teacher:
        return f"held-out {task_key.replace('_', ' ')}", metrics[task_key]["student"]
    name, value = ("KL", metrics["kl"]) if "kl" in metrics else ("hidden MSE", metrics["hidden_mse"])
    if task_weight and task_key in metrics:
        return (
            f"held-out {name} + {task_weight:g} x {task_key.replace('_', ' ')}",
            value + task_weight * metrics[task_key]["student"],
        )
    return f"held-out {name}", value


def curve_point(step: int, metrics: dict) -> dict:
    """One row of the report's curve: the step and its headline held-out numbers."""
    point = {"step": step}
    for key in ("kl", "top1_agreement", "hidden_mse"):
        if key in metrics:
            point[key] = metrics[key]
    for key in ("accuracy", "label_loss", "lm_loss"):
        if key in metrics:
            point[key] = metrics[key]["student"]
    return point
