"""Site distillation for the recovery ablation (issue 26, item 4): each adapted site's update ``dW x``
against the teacher's, beside the output KL.

The library's loop does not have this term; this context adds it by patching ``Trainer._loss``, so
it can be measured before it is kept (``bench_recovery.py --site-weights``). Per site the term is the
squared error of the student's update over the counted positions, relative to the teacher's update
energy there (every site counts alike, whatever its scale); the loss adds ``weight`` times the mean
over the sites the student adapts. Inputs differ: each model's update is of its own input ``x``
(the student's drifts from the teacher's in later layers), as in feature distillation.
"""

from __future__ import annotations

import contextlib

import torch

from shareport.train import recipe
from shareport.train.data import counted_positions


def _recorder(store: dict, path: str):
    def hook(module, inputs, output):
        x = inputs[0]
        # (..., n_in) @ (n_in, r) @ (r, n_out): the update alone, as LoRALinear adds it
        store[path] = (x @ module.lora_A.T.to(x.dtype)) @ module.lora_B.T.to(x.dtype) * module.scale

    return hook


@contextlib.contextmanager
def site_distillation(weight: float):
    """Inside: recovery's loss adds ``weight`` x the mean relative site-update error."""
    original = recipe.Trainer._loss

    def loss(self, batch):
        student, teacher = {}, {}
        hooks = [w.register_forward_hook(_recorder(student, p)) for p, w in self.student.wrappers.items()]
        hooks += [
            w.register_forward_hook(_recorder(teacher, p))
            for p, w in self.job.teacher.wrappers.items()
            if p in self.student.wrappers
        ]
        try:
            total = original(self, batch)
        finally:
            for hook in hooks:
                hook.remove()
        counted = counted_positions(batch).bool()
        terms = []
        for path, mine in student.items():
            theirs = teacher[path]
            if mine.dim() == 3:  # (batch, seq, n_out): the counted positions only
                mine, theirs = mine[counted], theirs[counted]
            terms.append((mine - theirs).square().sum() / theirs.square().sum().clamp(min=1e-12))
        return total + weight * torch.stack(terms).mean()

    recipe.Trainer._loss = loss
    try:
        yield
    finally:
        recipe.Trainer._loss = original
