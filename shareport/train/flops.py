"""FLOPs per token and model FLOP utilisation (MFU) of a training run."""

from __future__ import annotations

import torch

from .accel import peak_flops


def matmul_parameters(model: torch.nn.Module) -> int:
    """N for the FLOP count: the weights every token is multiplied by, those of the linear layers
    (GPT-2's Conv1D too), the output head included. Embeddings are lookups and cost no FLOPs; norms
    and biases are negligible; attention's scores (QK^T, AV: 4 * seq * hidden per layer and token)
    are left out, so the MFU is an underestimate (about 4% at hidden 2048, seq 512)."""
    return sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    )


def throughput(base_params: int, teacher: bool, tokens: int, seconds: float, device: torch.device) -> dict:
    """FLOPs per token and MFU, with ``base_params`` = :func:`matmul_parameters` (N). Per token the
    frozen base costs 2N in the student's forward, 2N in its backward (input gradients only: the base
    has no weight gradients) and 2N in the teacher's forward, so 6N with a teacher and 4N without (the
    adapter's own FLOPs are negligible). MFU divides the achieved FLOP/s by the device's dense bf16
    peak (``peak_flops``; None where unknown, e.g. CPUs)."""
    per_token = (6 if teacher else 4) * base_params
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = peak_flops(name)
    achieved = per_token * tokens / seconds if seconds > 0 else None
    return {
        "flops_per_token": per_token,
        "achieved_flops": achieved,
        "device_name": name,
        "peak_flops": peak,
        "mfu": achieved / peak if achieved is not None and peak else None,
    }
