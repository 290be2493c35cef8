"""Parameter counts of a plain LoRA and of each form for one kind (unique tensors count once).

Each form's formula is its row's ``parameter_count`` (forms.py, where the table of them is).
"""

from __future__ import annotations

from .forms import SHARED_FORMS as METHODS
from .forms import any_form

__all__ = ["METHODS", "lora_parameter_count", "parameter_count"]


def lora_parameter_count(n_out: int, n_in: int, ranks: list[int]) -> int:
    """Parameters of a plain LoRA with one (A, B) pair of rank ranks[l] per site."""
    return sum(ranks) * (n_in + n_out)


def parameter_count(method: str, n_out: int, n_in: int, n_sites: int, rank: int, groups: int | None = None) -> int:
    """Parameters of one kind converted to ``method`` (or "lora" with every site at ``rank``)."""
    return any_form(method).parameter_count(n_out, n_in, n_sites, rank=rank, groups=groups)
