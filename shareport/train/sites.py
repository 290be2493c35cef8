"""Site distillation: each adapted site's update ``dW x`` against the teacher's, beside the output KL.

A classifier's KL is one distribution over a dozen classes per example: a few bits. Every adapted
site's update is a vector per token, and the teacher's is known at every one of them, so matching
them gives recovery far more signal per example (issue 26, item 4). Each model's update is of its own
input ``x`` (the student's drifts from the teacher's in later layers), as in feature distillation.

Per site the term is the squared error of the student's update over the counted (non-padded)
positions relative to the teacher's update energy there, so every site counts alike whatever its
scale, averaged over the sites the student adapts (a site that the conversion cut to rank 0 has no
update to match). The trainer then rescales it, at every step, to the output KL's size
(``recipe._as_share_of``): ``--site-weight W`` adds W times the KL's value, with the site term's
gradient direction. Added as it was (an absolute weight), it paid on the docstrings classifier, far
from its LoRA, but drowned the KL of classifiers already near theirs (KL 1e-4) and cost on the demo's
causal LM: its size does not follow the KL's. As a share it follows it by construction. The default
is by the output (``schedule.default_site_weight``), as measured (docs/results.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..model.surgery import LoRALinear


@contextlib.contextmanager
def recording(wrappers: dict[str, LoRALinear]) -> Iterator[dict[str, LoRALinear]]:
    """Within the block, each wrapper keeps the update of its last forward (``LoRALinear.update``)."""
    for wrapper in wrappers.values():
        wrapper.recording, wrapper.update = True, None
    try:
        yield wrappers
    finally:
        for wrapper in wrappers.values():
            wrapper.recording = False


def site_sum(
    student: dict[str, LoRALinear], teacher: dict[str, LoRALinear], counted: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """(mean relative site-update error x rows, rows): the (sum, count) convention of ``distill``'s
    losses, so the trainer's global normalisation averages it over processes like the others.
    ``counted``: (batch, seq) 1 where a position counts. The wrappers let go of their updates (the
    student's stay alive in the autograd graph until the backward)."""
    mask = counted.bool()
    terms = []
    for path in sorted(student):
        mine, theirs = student[path].update, teacher[path].update
        # (batch, seq, n_out) -> (counted positions, n_out); the teacher's is a constant (no grad)
        mine, theirs = mine[mask].float(), theirs[mask].float()
        terms.append((mine - theirs).square().sum() / theirs.square().sum().clamp(min=1e-12))
        student[path].update = teacher[path].update = None
    rows = int(counted.shape[0])
    return torch.stack(terms).mean() * rows, rows
