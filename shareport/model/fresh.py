"""A new, untrained adapter in a shared form, initialised as ShareLoRA's code does.

Each kind's shared factor is one tensor used by every layer (one parameter object once
attached). A is kaiming-uniform like ``nn.Linear``'s default weight, B is zero, so the adapter
starts as the identity update; the scale is ``alpha / r``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapter import Adapter, Site, kinds_for_paths
from ..errors import ShareportError
from ..forms import SHARED
from .base import task_type_of, weight_shape


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the linear-like modules that a target names, matched as PEFT's ``target_modules``
    matches: the path equals the target or ends with ``.<target>``. So ``q_proj`` is every
    layer's ``q_proj``, and ``output.dense`` is BERT's two output layers but not its pooler's
    ``dense``."""

    def named(path: str, target: str) -> bool:
        return path == target or path.endswith("." + target)

    paths = [
        path
        for path, module in model.named_modules()
        if any(named(path, t) for t in targets) and getattr(module, "weight", None) is not None
    ]
    missing = [t for t in targets if not any(named(p, t) for p in paths)]
    if missing:
        raise ShareportError(f"the base model has no module named '{missing[0]}' (--target)")
    return sorted(paths)


def fresh_adapter(
    model: nn.Module,
    form: str,
    targets: list[str],
    *,
    rank: int,
    alpha: float,
    seed: int,
    base_model: str | None = None,
) -> Adapter:
    if form not in SHARED:
        raise ShareportError(f"--form must be one of {', '.join(SHARED)}, got '{form}'")
    if rank < 1:
        raise ShareportError(f"--rank must be at least 1, got {rank}")
    paths = target_paths(model, targets)
    kinds = kinds_for_paths(paths)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    sites = {}
    for path in paths:
        kind, layer = kinds[path]
        n_out, n_in = weight_shape(model.get_submodule(path), path)
        a_name = f"{kind}.lora_A" if "A" in SHARED[form] else f"{path}.lora_A"
        b_name = f"{kind}.lora_B" if "B" in SHARED[form] else f"{path}.lora_B"
        if a_name not in tensors:
            tensors[a_name] = _kaiming_uniform(rank, n_in, gen)
        if b_name not in tensors:
            tensors[b_name] = torch.zeros(n_out, rank)
        sites[path] = Site(path, kind, layer, a_name, b_name, alpha / rank)
    return Adapter(
        tensors=tensors,
        sites=sites,
        form=form,
        base_model=base_model,
        task_type=task_type_of(model),
        config={"target_modules": sorted(set(targets))},
    )


def _kaiming_uniform(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))`` (nn.Linear's default), from a private generator."""
    bound = math.sqrt(6.0 / ((1 + 5.0) * cols))  # gain^2 = 2 / (1 + a^2) with a^2 = 5
    return (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound
