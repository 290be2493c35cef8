"""Learning-rate backoff for the recovery ablation (issue 26, item 3): a peak lr that is too large for
a task is found out at the held-out evaluations, not tuned beforehand.

At each evaluation after the start, if the held-out score is not better than the best so far, the
trainer puts the best adapter's values back and halves the lr for the rest of the run (the schedule's
shape unchanged). A task that wants a large lr (the demo) never backs off; one that does not (the
docstrings classifier at 1e-2 made every evaluated step worse) loses one evaluation interval per
halving. Measured here before it is kept (``bench_recovery.py --backoff``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from shareport.train import recipe


@contextlib.contextmanager
def lr_backoff(factor: float = 0.5):
    """Inside: recovery halves its lr and returns to the best adapter at every evaluation that regresses."""
    original = recipe.Trainer._record

    def record(self, step: int, metrics: dict) -> None:
        kept_before = self.best.step
        original(self, step, metrics)
        if step == 0 or self.best.step != kept_before or self.best.step is None:
            return
        with torch.no_grad():
            for name, value in self.best.tensors.items():
                self.student.parameters[name].copy_(value)
        self.recipe = dataclasses.replace(self.recipe, lr=self.recipe.lr * factor)
        self.backoffs = getattr(self, "backoffs", []) + [step]

    recipe.Trainer._record = record
    try:
        yield
    finally:
        recipe.Trainer._record = original
