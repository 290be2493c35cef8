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

Under FSDP the base is loaded sharded (``load_sharded_base``): built on the meta device, sharded,
then each process reads only its rows of each weight from the safetensors file(s). No process holds
the whole base at any time (Accelerate's ``cpu_ram_efficient_loading`` instead loads it whole on
rank 0 and broadcasts). Memory per process, N processes, b bytes per base weight (2 in bf16 on a
GPU, 4 in fp32), P parameters:

    while loading   b P_base / N  +  b P_largest / N          (its shards, plus one weight's in transit)
    training        b P_base / N                                 (the sharded base)
                    + b P_root                                   (embeddings and head, gathered from
                                                                 the forward to the end of the backward)
                    + 2 b P_block                                (the block computing and the one prefetched)
                    + 16 P_adapter + b P_teacher                 (adapter fp32 weights, gradients, AdamW
                                                                 moments; the teacher's frozen LoRA)
                    + activations of the local batch (B / N sequences)

where a sharded weight's rows are rounded up to ceil(rows / N) per process.
"""

from __future__ import annotations

import os

import torch

from .compiled import transformer_blocks


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


def shards_base(accelerator) -> bool:
    """Whether this run shards the base: FSDP asked for, and more than one process to shard over
    (loading, in jobs.py, and training, in recipe.py, must agree on it)."""
    return fsdp_requested() and accelerator.num_processes > 1


def shard_base(model: torch.nn.Module, trainable) -> torch.nn.Module:
    """Shard ``model``'s parameters across the processes (FSDP2), except ``trainable`` (the adapter's,
    kept whole and replicated). One FSDP unit per transformer block (the classes transformers lists in
    ``_no_split_modules``) and the root for the rest (embeddings, head): a block's weights are
    gathered for its forward (and again for its backward) and freed after. Modules stay in place, so
    the teacher's LoRA wrappers, built around the same base modules, see the gathered weights too.

    A model loaded sharded (:func:`load_sharded_base`) is returned as it is: the adapter, attached
    after the sharding, is not FSDP's to manage, so it stays whole without being named."""
    if is_sharded(model):
        return model
    _fully_shard(model, set(trainable))
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fully_shard(model: torch.nn.Module, ignored: set, mesh=None) -> None:
    """One FSDP2 unit per transformer block, then the root (see :func:`shard_base`)."""
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def load_sharded_base(
    model: torch.nn.Module, weights, device: torch.device, where: str, carried: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Shard ``model`` as :func:`shard_base` does and give this process its shard of every weight, never
    the whole base: the memory-bounded way FSDP2 loads a model (build it on the meta device,
    ``fully_shard`` it, then load each parameter's local shard into a ``DTensor`` and assign it).

    ``model``: parameters on the meta device (``shareport.model.base.empty_base_model``), buffers real.
    ``weights``: the checkpoint, a mapping with ``rows(name, start, stop)`` that reads only those rows
    (``shareport.files.tensorfile.stream_model_weights``). A parameter is sharded on dim 0 in
    ``torch.chunk``'s way, as FSDP2 does: process r of N holds rows ``[r c, (r + 1) c)`` with
    ``c = ceil(rows / N)``; so while loading, a process holds its shards plus one parameter's shard in
    transit. ``carried``: parameter name -> value for weights the adapter supplies (a classifier head
    the base checkpoint may lack); those parameters are kept whole (the adapter's head is copied into
    them when it is attached). A weight in neither raises (``where`` names the base): a process cannot
    initialise a missing shard the way transformers initialises a missing weight. Tied parameters
    (e.g. ``lm_head.weight`` and the input embeddings) stay one parameter.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from ..errors import ShareportError
    from ..model.base import checkpoint_name

    carried = carried or {}
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    unique = dict(model.named_parameters())
    _fully_shard(model, {p for name, p in unique.items() if name in carried}, mesh)

    def read(names: list[str], start: int | None = None, stop: int | None = None) -> torch.Tensor:
        for name in names:
            key = checkpoint_name(model, name, weights)
            if key is not None:
                return weights[key] if start is None else weights.rows(key, start, stop)
        for name in names:
            if name in carried:
                return carried[name] if start is None else carried[name][start:stop]
        raise ShareportError(
            f"{where}: '{names[0]}' is not in the checkpoint; loading the base sharded (FSDP) "
            "needs every weight in it (or in the adapter's modules_to_save)"
        )

    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(name)
    state = {}
    for p, names in aliases.values():
        if isinstance(p, DTensor):
            if p.placements != (Shard(0),) or p.dim() == 0:
                raise AssertionError(f"{names[0]}: expected FSDP's dim-0 sharding, got {p.placements}")
            rows = p.shape[0]
            chunk = -(-rows // world)
            start = min(rows, rank * chunk)
            stop = min(rows, start + chunk)
            if p.to_local().shape[0] != stop - start:
                raise AssertionError(f"{names[0]}: FSDP's shard has {p.to_local().shape[0]} rows, not {stop - start}")
            local = _copy_to(read(names, start, stop), device, p.dtype)
            value = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        else:
            value = _copy_to(read(names), device, p.dtype)
        param = torch.nn.Parameter(value, requires_grad=False)
        state.update(dict.fromkeys(names, param))
    for name, buffer in model.named_buffers():  # persistent buffers a checkpoint holds; others stay computed
        key = checkpoint_name(model, name, weights)
        if key is not None and tuple(weights[key].shape) == tuple(buffer.shape):
            state[name] = _copy_to(weights[key], device, buffer.dtype)
    model.load_state_dict(state, strict=False, assign=True)  # FSDP re-registers its shards after (post-hook)
    return model


def _copy_to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``tensor`` of its own (never a view of a file map), on ``device`` in ``dtype``."""
    return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)


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
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (a sharded parameter counts its shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters, whole (a sharded parameter counts every process's shards)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# dense bf16 peak FLOP/s by device name (first match wins: PCIe before the generic H100)
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_flops(name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in ``PEAK_BF16``."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)
