"""Accelerate glue: one code path for the CPU, one GPU and several processes.

The accelerator chooses CUDA with bf16 autocast when present, else the CPU in float32;
``accelerate launch``/``torchrun`` start several processes. Accelerate wraps the optimizer;
code that edits optimizer state (checkpoints, ASLoRA merges) works on the torch optimizer inside.

FSDP (``ACCELERATE_USE_FSDP=true``, which ``accelerate launch --config_file examples/fsdp.yaml``
sets): the frozen base is sharded with PyTorch's FSDP2 ``fully_shard`` (one unit per transformer
block, plus the root), the adapter's parameters stay whole on every process and their gradients
are averaged by ``average_gradients``, as DDP would. shareport shards the model itself rather than
through ``Accelerator.prepare``: this Accelerate (1.15) turns its FSDP plugin on only for
accelerator devices (``AcceleratorState`` switches to FSDP from MULTI_GPU/XPU/NPU/..., never from
MULTI_CPU: on CPU processes the plugin is silently dropped and the model wrapped in DDP), while
``fully_shard`` itself works on CPU processes over gloo.
"""

from __future__ import annotations

import os

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


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_base(model: torch.nn.Module, trainable) -> torch.nn.Module:
    """Shard ``model``'s parameters across the processes (FSDP2), except ``trainable`` (the adapter's,
    kept whole and replicated). One FSDP unit per transformer block (the classes transformers lists in
    ``_no_split_modules``) and the root for the rest (embeddings, head): a block's weights are
    gathered for its forward (and again for its backward) and freed after. Modules stay in place, so
    the teacher's LoRA wrappers, built around the same base modules, see the gathered weights too."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def average_gradients(parameters) -> None:
    """Average the gradients of replicated ``parameters`` over the processes (one all-reduce; every
    process passes them in the same order and the same ones have a gradient, the graph being the same)."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (a sharded parameter counts its shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


# dense bf16 peak FLOP/s by device name (first match wins: PCIe before the generic H100)
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_flops(name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in ``PEAK_BF16``."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)
