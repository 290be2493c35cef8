"""Accelerate glue: one code path for the CPU, one GPU and several processes.

The accelerator chooses CUDA with bf16 autocast when present, else the CPU in float32;
``accelerate launch``/``torchrun`` start several processes. Accelerate wraps the optimizer;
code that edits optimizer state (checkpoints, ASLoRA merges) works on the torch optimizer inside.
"""

from __future__ import annotations

import torch


def make_accelerator(merging: bool):
    """CUDA with bf16 autocast when available, else CPU in float32; one process or many.

    Merging retires B parameters mid-run, so DDP must tolerate parameters without a gradient.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if merging else []
    return Accelerator(mixed_precision="bf16" if bf16 else "no", kwargs_handlers=handlers)


def model_dtype(accelerator) -> torch.dtype:
    """The frozen base is stored in bf16 on a GPU (autocast computes in bf16 anyway), else float32."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)
