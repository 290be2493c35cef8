"""Serving-aware rank rules: plans that an inference server can load without mixed-rank trouble.

Serving engines handle adapters whose sites differ in rank badly: vLLM pads every adapter to
``max_lora_rank`` and computes over the padding, TensorRT pads to a fixed maximum rank, SGLang
has mishandled mixed ranks, diffusers' hotswap needs one rank. A ``ServingRule`` restricts the
ranks a budget plan may give, and the planners (``truncate.allocate_serving`` per site,
``budget.plan`` per kind) return the exact optimum under the restriction:

- ``max_rank=R``: no site (shared forms: no kind) above R;
- ``uniform``: one rank for every site (kind), the one of least error the budget affords;
- ``buckets=(b1, b2, ...)``: every rank one of the listed values.

A per-site plan drops a site (rank 0) only when the budget cannot pay for the least allowed rank
at every site, the unconstrained planner's rule; ``uniform`` never drops (it refuses instead).

``choose_per_item`` is the exact multiple-choice knapsack the buckets need: each item (site) picks
one of a few (cost, error) options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ServingRule:
    """At most one of ``max_rank``, ``uniform`` and ``buckets`` (ascending, distinct, positive)."""

    max_rank: int | None = None
    uniform: bool = False
    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if sum((self.max_rank is not None, self.uniform, bool(self.buckets))) != 1:
            raise ValueError("a serving rule is exactly one of max_rank, uniform and buckets")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {self.max_rank}")
        if any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be ascending distinct positive ranks, got {list(self.buckets)}")

    def allows(self, rank: int) -> bool:
        """Whether one site (kind) may take ``rank`` (``uniform`` allows any: it ties the ranks together)."""
        if self.max_rank is not None:
            return rank <= self.max_rank
        if self.buckets:
            return rank in self.buckets
        return True

    def describe(self) -> str:
        if self.max_rank is not None:
            return f"max rank {self.max_rank}"
        if self.buckets:
            return "rank buckets " + ",".join(map(str, self.buckets))
        return "uniform rank"

    def pads_to(self, ranks: Sequence[int]) -> int:
        """The rank a server pads every site to: R under ``max_rank`` (the server's ``max_lora_rank``),
        else the plan's largest rank (a server that pads, pads to the adapter's maximum)."""
        return self.max_rank if self.max_rank is not None else max(ranks, default=0)


def padded_parameters(widths: Sequence[int], pads_to: int) -> int:
    """Parameters a server holds when every site (``widths[l] = n_in + n_out``) is padded to ``pads_to``:
    every target module, a dropped one too (a server allocates its slot all the same)."""
    return pads_to * sum(int(w) for w in widths)


def choose_per_item(options: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int] | None:
    """One option per item, total cost <= ``budget``, least total error: exact (None if nothing fits).

    ``options[i]`` lists item i's (cost, error) pairs (costs >= 0). Dynamic programming over the
    items: the states after each item are the Pareto front of (cost so far, error so far), each
    remembering the (state, option) it came from; a state that leaves no room for the remaining
    items' cheapest options is dropped. A dominated partial sum cannot lead to a better total, so
    the last front's least error is the optimum. Ties go to the lower cost, then to the earlier
    state and option (deterministic). The states are at most the distinct costs within the budget.
    """
    rest = [0] * (len(options) + 1)
    for i in range(len(options) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(c for c, _ in options[i])
    if rest[0] > budget:
        return None
    cost = torch.zeros(1, dtype=torch.long)
    error = torch.zeros(1, dtype=torch.float64)
    trail = []
    for i, opts in enumerate(options):
        oc = torch.tensor([c for c, _ in opts], dtype=torch.long)
        oe = torch.tensor([e for _, e in opts], dtype=torch.float64)
        c = (cost[:, None] + oc[None, :]).reshape(-1)
        e = (error[:, None] + oe[None, :]).reshape(-1)
        index = (c <= budget - rest[i + 1]).nonzero().squeeze(1)
        by_error = index[torch.sort(e[index], stable=True).indices]
        ordered = by_error[torch.sort(c[by_error], stable=True).indices]  # cost, then error, then index
        e_sorted = e[ordered]
        best_before = torch.cat([e_sorted.new_full((1,), float("inf")), torch.cummin(e_sorted, 0).values[:-1]])
        kept = ordered[e_sorted < best_before]
        trail.append((kept, len(opts)))
        cost, error = c[kept], e[kept]
    chosen = [0] * len(options)
    state = len(cost) - 1  # the front's last state has the least error
    for i in range(len(options) - 1, -1, -1):
        kept, width = trail[i]
        flat = int(kept[state])
        state, chosen[i] = divmod(flat, width)
    return chosen
