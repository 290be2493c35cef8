"""The recovery loop as it was before the throughput work, for the benchmarks that compare against it.

That loop used the foreach AdamW and read the loss and token count back from the device after
every step. The library has one loop (fused AdamW, a read-back every ``recipe.SYNC_EVERY`` steps);
this context rebuilds the old one around it by patching, so the library needs no switch for it.
"""

from __future__ import annotations

import contextlib

import torch

from shareport.train import recipe


@contextlib.contextmanager
def old_loop():
    """Inside: recovery runs the foreach AdamW and synchronises every step."""
    fused_adamw = torch.optim.AdamW

    def foreach_adamw(params, **options):
        options.pop("fused", None)
        return fused_adamw(params, **options)

    sync_every = recipe.SYNC_EVERY
    recipe.SYNC_EVERY, recipe.torch.optim.AdamW = 1, foreach_adamw
    try:
        yield
    finally:
        recipe.SYNC_EVERY, recipe.torch.optim.AdamW = sync_every, fused_adamw
