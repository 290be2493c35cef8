"""Group-wise symmetric integer quantization of factor tensors, in ONNX ``DequantizeLinear``'s convention.

A tensor ``x`` is cut into groups of ``group_size`` consecutive elements along ``axis``; a dimension that
is not a multiple of ``group_size`` ends with a shorter group, as ONNX's blocked ``DequantizeLinear``
(opset 21, ``block_size``) covers it with ``ceil(D / group_size)`` scales. Each group gets one float16
scale and the integers

    s = amax(|group|) / qmax, rounded *up* to float16   (qmax: 127 for int8, 7 for int4)
    q = round_half_to_even(x / s), in [-qmax, qmax]     (zero point 0: symmetric)
    y = (q - 0) * s                                     (DequantizeLinear, exactly)

Rounding the scale up (not to nearest) means no value is clipped, so every element's error is at most
s/2. ``y`` is computed in float32, where ``q * s`` is exact (8 + 11 significant bits): it equals
DequantizeLinear with the float16 scales cast to float32 bit for bit, and DequantizeLinear with float16
scales is ``y`` rounded to float16. Symmetric, because LoRA factors are centred on zero (an orthonormal
A, B = U S); a zero point would cost a stored tensor per factor for a level int4 hardly uses.

int4 values are held in int8 tensors here; ``pack_int4`` lays them out two per byte as ONNX's INT4
raw data does (element 2i in the low nibble, 2i+1 in the high one, the flattened tensor padded with a
zero nibble to whole bytes), which is also how shareport stores them (safetensors has no 4-bit integer).

Shapes: ``x`` any shape; ``values`` the shape of ``x``; ``scales`` the shape of ``x`` with ``D`` (the
size along ``axis``) replaced by ``ceil(D / group_size)``. Pure tensor math, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

QMAX = {8: 127, 4: 7}  # symmetric: int8 never uses -128, int4 never uses -8


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers and float16 scales of one tensor; ``dequantize()`` gives its float32 values."""

    values: Tensor  # int8, the float tensor's shape (int4 values lie in [-7, 7])
    scales: Tensor  # float16, the float tensor's shape with ceil(D / group_size) along ``axis``
    bits: int
    axis: int
    group_size: int

    def dequantize(self) -> Tensor:
        return dequantize(self.values, self.scales, self.group_size, self.axis)

    def stored_bytes(self) -> int:
        """Bytes of integers (int4: two per byte) and scales."""
        ints = math.ceil(self.values.numel() * self.bits / 8)
        return ints + self.scales.numel() * self.scales.element_size()


def _check(bits: int, group_size: int, axis: int, dim: int) -> None:
    if bits not in QMAX:
        raise ValueError(f"bits must be one of {sorted(QMAX)}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    if not 0 <= axis < dim:
        raise ValueError(f"axis {axis} is out of range for a {dim}-d tensor")


def _round_up_fp16(s: Tensor) -> Tensor:
    """The least float16 >= each (non-negative, float64) ``s``."""
    near = s.to(torch.float16)
    low = near.to(torch.float64) < s
    # for positive finite float16 values the next larger one is the next bit pattern
    bumped = (near.view(torch.int16) + 1).view(torch.float16)
    return torch.where(low, bumped, near)


def quantize(x: Tensor, bits: int, group_size: int, axis: int) -> QuantizedTensor:
    """Symmetric group-wise quantization of ``x`` along ``axis`` (see the module docstring)."""
    _check(bits, group_size, axis, x.dim())
    qmax = QMAX[bits]
    x64 = x.detach().to(torch.float64).movedim(axis, -1)  # (..., D)
    size = x64.shape[-1]
    groups = math.ceil(size / group_size)
    # zeros pad the last group to full length: they change no group's amax
    padded = torch.nn.functional.pad(x64, (0, groups * group_size - size))
    grouped = padded.reshape(*x64.shape[:-1], groups, group_size)  # (..., G, g)
    scales = _round_up_fp16(grouped.abs().amax(dim=-1) / qmax)  # (..., G)
    if not torch.isfinite(scales).all():
        raise ValueError(f"values up to {float(x64.abs().max()):.3g} need scales beyond float16's range")
    s64 = scales.to(torch.float64).unsqueeze(-1)
    # an all-zero group has scale 0: its integers are 0 (y = 0 * 0), not 0/0
    q = torch.where(s64 > 0, torch.round(grouped / torch.where(s64 > 0, s64, 1.0)), 0.0).clamp(-qmax, qmax)
    values = q.reshape(*x64.shape[:-1], groups * group_size)[..., :size].to(torch.int8)
    return QuantizedTensor(
        values.movedim(-1, axis).contiguous(), scales.movedim(-1, axis).contiguous(), bits, axis, group_size
    )


def dequantize(values: Tensor, scales: Tensor, group_size: int, axis: int) -> Tensor:
    """``values * scales`` with each scale repeated over its group along ``axis``, in float32 (exact)."""
    size = values.shape[axis]
    expanded = scales.to(torch.float32).repeat_interleave(group_size, dim=axis).narrow(axis, 0, size)
    return values.to(torch.float32) * expanded


def pack_int4(values: Tensor) -> Tensor:
    """int8 values in [-8, 7] -> uint8 (ceil(numel / 2),): ONNX INT4 raw data, low nibble first."""
    flat = values.reshape(-1).to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = flat & 0xF  # two's complement in 4 bits
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """The inverse of ``pack_int4``: int8 values of ``shape``, sign-extended from 4 bits."""
    numel = math.prod(shape)
    if packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} int4 values")
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8).reshape(tuple(shape))
