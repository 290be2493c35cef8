"""The teacher for distillation: the base model with the original LoRA, sharing the student's base.

Teacher and student differ only in the adapter, so they share one copy of the base weights:
the teacher's LoRA wrappers are built around the same base modules as the student's, kept
aside, and swapped into the model for the teacher's (gradient-free) forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..adapter import Adapter
from ..errors import ShareportError
from ..model.base import swap_module
from ..model.surgery import LoRALinear, attach


def check_pair(teacher: Adapter, student: Adapter) -> list[str]:
    """The student must adapt modules the teacher adapts, with the same shapes, for the same task and
    head. Returns the modules only the teacher adapts.

    The student may leave out modules the teacher adapts: a budget that truncates a site to rank 0
    drops it (``convert --to lora --budget``, and ``--to auto`` or fleets when truncation wins), and
    the student then recovers with that site unadapted. The teacher's update there is still part of
    the target, so the student's other sites learn to make up for it. (Regrowing a dropped site
    would spend parameters the budget did not give: the user asked for that size.) A module that
    only the student adapts has no teacher to match and is refused."""
    if teacher.task_type and student.task_type and teacher.task_type != student.task_type:
        raise ShareportError(f"teacher is a {teacher.task_type} adapter but the student is {student.task_type}")
    only_teacher = sorted(set(teacher.sites) - set(student.sites))
    only_student = sorted(set(student.sites) - set(teacher.sites))
    if only_student:
        raise ShareportError(
            f"teacher and student adapt different modules: only the student adapts '{only_student[0]}'"
        )
    for path in sorted(student.sites):
        if teacher.shape(path) != student.shape(path):
            raise ShareportError(
                f"site '{path}': teacher update is {teacher.shape(path)}, student update is {student.shape(path)}"
            )
    if sorted(teacher.extra_tensors) != sorted(student.extra_tensors):
        raise ShareportError("teacher and student carry different modules_to_save tensors (e.g. a classifier head)")
    for key in sorted(teacher.extra_tensors):
        if not torch.equal(teacher.extra_tensors[key], student.extra_tensors[key]):
            raise ShareportError(f"teacher and student carry different values for '{key}'")
    return only_teacher


class Teacher:
    """The teacher's wrappers around the model's base modules, ready to be swapped in."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        handle = attach(model, adapter, trainable=False)
        self.wrappers: dict[str, LoRALinear] = handle.wrappers
        handle.detach()  # the model is bare again; the wrappers keep references to its modules

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model`` computes the teacher's outputs; the student's wrappers return after."""
        displaced = {}
        try:
            for path, wrapper in self.wrappers.items():
                current = model.get_submodule(path)
                if getattr(current, "base", current) is not wrapper.base:
                    raise ShareportError(f"module '{path}' of the model is not the one the teacher was built on")
                displaced[path] = swap_module(model, path, wrapper)
            yield model
        finally:
            for path, module in displaced.items():
                swap_module(model, path, module)
