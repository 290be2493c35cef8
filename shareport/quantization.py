"""Quantized storage of an adapter's factors: every pool tensor as integers and float16 scales.

The math is ``converters.quantize`` (symmetric, group-wise, ONNX ``DequantizeLinear``'s convention).
This module decides what is quantized along which axis and what it costs:

- every factor in the pool (A and B, shared or not), once; carried tensors (``modules_to_save``,
  e.g. a classifier head) are not factors and stay as they are;
- A (r, n_in) in groups along n_in (axis 1), B (n_out, r) along n_out (axis 0): along the model
  dimension, never the rank, so every group lies inside one rank component (one row of A, one
  column of B) and shares its magnitude, and the group size does not depend on the rank;
- a fleet member (``shareport fleet --quantize``) stores what the fleet stores: its shared V as an A,
  and for a two-sided member the shared U (n_out, k1) as a B and its core C (k1, k2) along k2 (as an
  A: both of C's dims are ranks, and a row of C is one of U's components), never the product
  B = U C, which is formed again from the dequantized U and C (``adapter.compose``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from converters.factored import difference_sq_norm, product_sq_norm
from converters.quantize import quantize

from .adapter import Adapter, compose, reference
from .errors import ShareportError
from .forms import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES

BITS = {name: int(name.removeprefix("int")) for name in QUANTIZE_CHOICES}  # "int4" -> 4
SCHEME = "symmetric"  # zero point 0; see converters/quantize.py


def _products(adapter: Adapter) -> dict[str, list[str]]:
    """A two-sided fleet member's products (B name -> [U name, core name]); empty for any other adapter."""
    ref = reference(adapter)
    return dict(ref.get("products") or {}) if ref is not None else {}


def factor_axes(adapter: Adapter) -> dict[str, int]:
    """The axis each stored factor is grouped along: 1 for an A (r, n_in), 0 for a B (n_out, r); a fleet
    member's product B = U C is not stored, its U (a B) and core (along its second dim) are."""
    products = _products(adapter)
    axes = {}
    for site in adapter.sites.values():
        axes[site.a] = 1
        if site.b in products:
            u_name, core_name = products[site.b]
            axes[u_name], axes[core_name] = 0, 1
        else:
            axes[site.b] = 0
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


def quantize_adapter(
    adapter: Adapter, quantize_as: str, group_size: int | None = None, *, known: dict | None = None
) -> tuple[Adapter, dict]:
    """The adapter with every factor quantized (``quantize_as``: "int8" or "int4") in groups of
    ``group_size`` (default ``DEFAULT_GROUP_SIZE``), its float tensors replaced by their dequantized
    values, and a report: the relative error of the updates against ``adapter`` and the storage.
    ``known``: records of tensors already quantized with these settings (a fleet's shared bases,
    the same in every member), used as they are."""
    check_quantize_options(quantize_as, group_size)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    bits = BITS[quantize_as]
    tensors, records = dict(adapter.tensors), {}
    for name, axis in factor_axes(adapter).items():
        if known is not None and name in known:
            records[name] = known[name]
        else:
            try:
                records[name] = quantize(adapter.tensors[name], bits, group_size, axis)
            except ValueError as exc:
                raise ShareportError(f"tensor '{name}': {exc}") from None
        tensors[name] = records[name].dequantize()
    for b_name, (u_name, core_name) in _products(adapter).items():  # what reading the member forms again
        tensors[b_name] = compose(tensors[u_name], tensors[core_name])
    out = dataclasses.replace(adapter, tensors=tensors, quantized=records)
    settings = {"quantize": quantize_as, "bits": bits, "group_size": group_size, "scheme": SCHEME}
    out = out.with_step({"step": "quantize", **settings})
    return out, {**settings, "relative_error": relative_update_error(adapter, out), **storage(out)}


def quantized_like(trained: Adapter, start: Adapter) -> Adapter:
    """``trained`` (float values trained from ``start``, a quantized adapter) stored as ``start`` is: each
    tensor ``start`` holds as integers, as integers again with its own bits, axis and group size; one
    that training left equal (a fleet's frozen shared basis) keeps ``start``'s integers exactly. A fleet
    member's product B = U C is formed again from the dequantized U and core, as reading it does."""
    tensors, records = dict(trained.tensors), {}
    for name, record in sorted(start.quantized.items()):
        if name not in trained.tensors:  # (an ASLoRA merge retired it)
            continue
        if torch.equal(trained.tensors[name], start.tensors[name]):
            records[name] = record
        else:
            records[name] = quantize(trained.tensors[name], record.bits, record.group_size, record.axis)
        tensors[name] = records[name].dequantize()
    for b_name, (u_name, core_name) in _products(trained).items():
        tensors[b_name] = compose(tensors[u_name], tensors[core_name])
    return dataclasses.replace(trained, tensors=tensors, quantized=records)


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


def update_error(reference: Adapter, other: Adapter) -> tuple[float, float]:
    """(sum_l ||dW'_l - dW_l||_F^2, sum_l ||dW_l||_F^2) over ``reference``'s sites, factored (no dense update)."""
    error = energy = 0.0
    for path in sorted(reference.sites):
        a, bt = reference.factors(path, torch.float64)
        a2, bt2 = other.factors(path, torch.float64)
        error += difference_sq_norm(bt, a, bt2, a2)
        energy += product_sq_norm(bt, a)
    return error, energy


def relative_update_error(reference: Adapter, other: Adapter) -> float:
    """sqrt(sum_l ||dW'_l - dW_l||_F^2 / sum_l ||dW_l||_F^2) over the sites (``update_error``)."""
    error, energy = update_error(reference, other)
    return math.sqrt(error / energy) if energy > 0 else 0.0


def _stored_bytes(adapter: Adapter, name: str) -> int:
    record, tensor = adapter.quantized.get(name), adapter.tensors[name]
    return record.stored_bytes() if record is not None else tensor.numel() * tensor.element_size()


def storage(adapter: Adapter) -> dict:
    """Bytes of the factors as stored (integers and scales for quantized ones, else their dtype),
    bits per factor parameter, and the same factors' bytes in float32 and float16. A fleet member's
    factors are what the fleet stores for it (``factor_axes``): ``shared_bytes`` is the part in the
    fleet's shared file, stored once for every member."""
    names = list(factor_axes(adapter))
    stored = sum(_stored_bytes(adapter, name) for name in names)
    parameters = sum(adapter.tensors[name].numel() for name in names)
    records = [adapter.quantized[n] for n in names if n in adapter.quantized]
    ref = reference(adapter)
    shared = {} if ref is None else {"shared_bytes": sum(_stored_bytes(adapter, n) for n in names if n in ref["names"])}
    return {
        "bytes": stored,
        **shared,
        "bits_per_parameter": 8 * stored / parameters if parameters else 0.0,
        "float32_bytes": 4 * parameters,
        "float16_bytes": 2 * parameters,
        "quantized_tensors": len(records),
        "quantized_bits": sorted({r.bits for r in records}),
        "group_sizes": sorted({r.group_size for r in records}),
    }


def quantize_fleet(fleet, loras: list[Adapter], quantize_as: str, *, group_size: int | None = None) -> tuple:
    """A built fleet (``shareport.fleet.Fleet``: ``shared``, ``members``) with every stored factor quantized
    as ``quantize_adapter`` does one adapter's: the shared bases and each member's own B's or cores. Each
    member is quantized on its own; a shared tensor is the same input in every member of its cluster, so
    it quantizes to the same integers in each (checked), which ``files.adapters.save_fleet`` stores once.

    Returns (the fleet, its ``shared`` the dequantized bases; a report: the settings, per member
    ``loras``' weight error against its LoRA in float and quantized and the error quantization adds to the
    member, and the stored bytes)."""
    members, rows, shared, known = [], [], {}, {}
    settings = None
    for member, lora in zip(fleet.members, loras):
        # each shared basis is quantized once, by the first member of its cluster, and reused by the others
        quantized, report = quantize_adapter(member, quantize_as, group_size, known=known)
        settings = {k: report[k] for k in ("quantize", "bits", "group_size", "scheme")}
        for name in reference(member)["names"]:
            known.setdefault(name, quantized.quantized[name])
            shared.setdefault(name, quantized.tensors[name])
        members.append(quantized)
        parts = storage(quantized)
        rows.append(
            {
                "float_relative_error": relative_update_error(lora, member),
                "relative_error": relative_update_error(lora, quantized),
                "added_relative_error": report["relative_error"],
                "bytes": parts["bytes"] - parts["shared_bytes"],
                "float16_bytes": parts["float16_bytes"] - 2 * _shared_parameters(quantized),
            }
        )
    records = {n: r for m in members for n, r in m.quantized.items() if n in shared}
    shared_bytes = sum(r.stored_bytes() for r in records.values())
    shared_parameters = sum(r.values.numel() for r in records.values())
    parameters = shared_parameters + sum(r["float16_bytes"] // 2 for r in rows)
    stored = shared_bytes + sum(r["bytes"] for r in rows)
    report = {
        **settings,
        "shared_bytes": shared_bytes,
        "bytes": stored,
        "bits_per_parameter": 8 * stored / parameters if parameters else 0.0,
        "float32_bytes": 4 * parameters,
        "float16_bytes": 2 * parameters,
        "members": rows,
    }
    return dataclasses.replace(fleet, shared={**fleet.shared, **shared}, members=members), report


def _shared_parameters(member: Adapter) -> int:
    names = set(reference(member)["names"])
    return sum(member.tensors[n].numel() for n in factor_axes(member) if n in names)
