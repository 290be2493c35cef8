"""Optional ``torch.compile`` of the base's transformer blocks for training (``--compile``).

Regional compilation: each block (the classes transformers lists in ``_no_split_modules``) is
compiled, not the whole model. The blocks share one code path, so their compiled code is shared
(torch inlines module attributes as inputs), compiling takes one block's time rather than the whole
network's, and what sits between blocks (embeddings, loss, the adapter swap for the teacher) stays
eager. The wins on a GPU are the fused elementwise work around the matmuls (RMSNorm's float32 pass,
rotary embeddings, SiLU * up, residual adds, the adapter's add), which eager mode runs as separate
memory-bound kernels. The teacher's forward sees other wrapper modules in the same blocks: one more
compiled variant, made once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: instances of the classes in transformers' ``_no_split_modules``."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in kinds]


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module, backend) -> Iterator[int]:
    """Within the block, every transformer block of ``model`` runs compiled with ``backend``
    ("inductor" on a GPU; tests use "aot_eager", which captures the same graphs without code
    generation); None: nothing changes. Yields the number of blocks compiled; restores eager after."""
    blocks = transformer_blocks(model) if backend else []
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    # a block that fails to compile (no C compiler or Triton for the device, an unsupported model)
    # runs eagerly, with torch's warning saying why, rather than ending the run at its first step
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = True
    try:
        yield len(blocks)
    finally:
        torch._dynamo.config.suppress_errors = suppress
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: the block runs eagerly again


@contextlib.contextmanager
def eager_blocks(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, compiled transformer blocks run eagerly (their compiled code is kept for
    after). Evaluation during training runs without gradients: compiled, it would add one graph per
    role and padding mask for a few forwards per evaluation, against dynamo's recompile limit."""
    blocks = transformer_blocks(model)
    saved = [block._compiled_call_impl for block in blocks]
    for block in blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, impl in zip(blocks, saved):
            block._compiled_call_impl = impl
