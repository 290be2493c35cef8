"""Quantized storage of an adapter's factors: every pool tensor as integers and float16 scales.

The math is ``converters.quantize`` (symmetric, group-wise, ONNX ``DequantizeLinear``'s convention).
This module decides what is quantized along which axis and what it costs:

- every factor in the pool (A and B, shared or not), once; carried tensors (``modules_to_save``,
  e.g. a classifier head) are not factors and stay as they are;
- A (r, n_in) in groups along n_in (axis 1), B (n_out, r) along n_out (axis 0): along the model
  dimension, never the rank, so every group lies inside one rank component (one row of A, one
  column of B) and shares its magnitude, and the group size does not depend on the rank.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from converters.factored import difference_sq_norm, product_sq_norm
from converters.quantize import quantize

from .adapter import Adapter
from .errors import ShareportError
from .forms import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES

BITS = {name: int(name.removeprefix("int")) for name in QUANTIZE_CHOICES}  # "int4" -> 4
SCHEME = "symmetric"  # zero point 0; see converters/quantize.py


def factor_axes(adapter: Adapter) -> dict[str, int]:
    """The axis each used pool tensor is grouped along: 1 for an A (r, n_in), 0 for a B (n_out, r)."""
    axes = {}
    for site in adapter.sites.values():
        axes[site.a], axes[site.b] = 1, 0
    return dict(sorted(axes.items()))


def check_quantize_options(quantize: str | None, group_size: int | None) -> None:
    if quantize is None:
        if group_size is not None:
            raise ShareportError("--group-size is only used with --quantize int8|int4")
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ShareportError(f"unknown --quantize value {quantize!r} (expected one of {', '.join(QUANTIZE_CHOICES)})")
    if group_size is not None and group_size < 1:
        raise ShareportError(f"--group-size must be a positive number of elements, got {group_size}")


def quantize_adapter(adapter: Adapter, quantize_as: str, group_size: int | None = None) -> tuple[Adapter, dict]:
    """The adapter with every factor quantized (``quantize_as``: "int8" or "int4") in groups of
    ``group_size`` (default ``DEFAULT_GROUP_SIZE``), its float tensors replaced by their dequantized
    values, and a report: the relative error of the updates against ``adapter`` and the storage."""
    check_quantize_options(quantize_as, group_size)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    bits = BITS[quantize_as]
    tensors, records = dict(adapter.tensors), {}
    for name, axis in factor_axes(adapter).items():
        try:
            records[name] = quantize(adapter.tensors[name], bits, group_size, axis)
        except ValueError as exc:
            raise ShareportError(f"tensor '{name}': {exc}") from None
        tensors[name] = records[name].dequantize()
    out = dataclasses.replace(adapter, tensors=tensors, quantized=records)
    settings = {"quantize": quantize_as, "bits": bits, "group_size": group_size, "scheme": SCHEME}
    out = out.with_step({"step": "quantize", **settings})
    return out, {**settings, "relative_error": relative_update_error(adapter, out), **storage(out)}


# the precisions a frontier scores each point at (``shareport frontier --precisions``): float32 is the
# converted adapter itself, float16 its factors rounded to half precision, int8/int4 ``quantize_adapter``
STORED_PRECISIONS = ("fp32", "fp16") + QUANTIZE_CHOICES
_FLOATS = {"fp32": torch.float32, "fp16": torch.float16}


def stored_as(adapter: Adapter, precision: str, group_size: int | None = None) -> tuple[Adapter, int]:
    """The adapter as it reads back after its factors are stored at ``precision`` (one of
    ``STORED_PRECISIONS``; floats as float32 values), and the bytes those stored factors take: the
    integers and float16 scales for int8/int4 (``storage``), else 4 or 2 bytes a parameter."""
    if precision in BITS:
        quantized, report = quantize_adapter(adapter, precision, group_size)
        return quantized, report["bytes"]
    if precision not in _FLOATS:
        raise ShareportError(f"unknown precision {precision!r} (expected one of {', '.join(STORED_PRECISIONS)})")
    dtype = _FLOATS[precision]
    tensors = dict(adapter.tensors)
    for name in adapter.used_tensor_names():
        tensors[name] = tensors[name].detach().to(dtype).to(torch.float32)
    out = dataclasses.replace(adapter, tensors=tensors, quantized={})
    return out, adapter.num_parameters() * torch.empty((), dtype=dtype).element_size()


def relative_update_error(reference: Adapter, other: Adapter) -> float:
    """sqrt(sum_l ||dW'_l - dW_l||_F^2 / sum_l ||dW_l||_F^2) over the sites, factored (no dense update)."""
    error = energy = 0.0
    for path in sorted(reference.sites):
        a, bt = reference.factors(path, torch.float64)
        a2, bt2 = other.factors(path, torch.float64)
        error += difference_sq_norm(bt, a, bt2, a2)
        energy += product_sq_norm(bt, a)
    return math.sqrt(error / energy) if energy > 0 else 0.0


def storage(adapter: Adapter) -> dict:
    """Bytes of the factors as stored (integers and scales for quantized ones, else their dtype),
    bits per factor parameter, and the same factors' bytes in float32 and float16."""
    names = adapter.used_tensor_names()
    stored = 0
    for name in names:
        record = adapter.quantized.get(name)
        tensor = adapter.tensors[name]
        stored += record.stored_bytes() if record is not None else tensor.numel() * tensor.element_size()
    parameters = adapter.num_parameters()
    records = [adapter.quantized[n] for n in names if n in adapter.quantized]
    return {
        "bytes": stored,
        "bits_per_parameter": 8 * stored / parameters if parameters else 0.0,
        "float32_bytes": 4 * parameters,
        "float16_bytes": 2 * parameters,
        "quantized_tensors": len(records),
        "quantized_bits": sorted({r.bits for r in records}),
        "group_sizes": sorted({r.group_size for r in records}),
    }
