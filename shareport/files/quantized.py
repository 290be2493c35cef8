"""How the native format stores quantized factors (``shareport.quantization``).

For a quantized pool tensor ``NAME`` the safetensors file holds

    NAME            int8 values (I8, the tensor's shape), or for int4 the values packed two per byte
                    (U8, 1-d, ceil(numel / 2) bytes, ONNX's INT4 layout: safetensors has no 4-bit type)
    scale/NAME      float16 scales (the tensor's shape with ceil(D / group_size) along the axis)

and the config's ``shareport.quantization`` records the scheme and, per tensor, its bits, axis, group
size and shape. An integer tensor under a factor's name makes an older reader refuse the file (it
reads factors as floats only), and such a file says ``format_version`` 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from converters.quantize import QMAX, QuantizedTensor, pack_int4, unpack_int4

from ..adapter import Adapter
from ..errors import ShareportError

SCALE_PREFIX = "scale/"
SCHEME = {
    "scheme": "symmetric",
    "zero_point": 0,
    "scale_dtype": "float16",
    "dequantize": "ONNX DequantizeLinear (opset 21): y = x * scale, scale repeated over block_size along axis",
}


def stored_records(adapter: Adapter, names: list[str]) -> dict[str, QuantizedTensor]:
    """The records of ``names`` whose float tensor is still exactly their dequantization."""
    return {
        name: record
        for name in names
        if (record := adapter.quantized.get(name)) is not None
        and torch.equal(adapter.tensors[name], record.dequantize())
    }


def dump(records: dict[str, QuantizedTensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config section and the stored tensors (integers and scales) of ``records``."""
    tensors, entries = {}, {}
    for name in sorted(records):
        r = records[name]
        tensors[name] = pack_int4(r.values) if r.bits == 4 else r.values
        tensors[SCALE_PREFIX + name] = r.scales
        entries[name] = {"bits": r.bits, "axis": r.axis, "group_size": r.group_size, "shape": list(r.values.shape)}
    return {**SCHEME, "tensors": entries}, tensors


def load(cfg_path: Path, weights_path: Path, section, stored: dict[str, torch.Tensor]):
    """(float pool, records) from the stored tensors: each quantized tensor dequantized, its scale
    entry consumed; errors name the file and the tensor."""
    if not isinstance(section, dict) or not isinstance(section.get("tensors"), dict):
        raise ShareportError(f"{cfg_path}: 'shareport.quantization' must be an object with 'tensors'")
    if section.get("scheme") != "symmetric":
        raise ShareportError(
            f"{cfg_path}: quantization scheme {section.get('scheme')!r} is not supported (expected 'symmetric')"
        )
    pool, records = dict(stored), {}
    for name, entry in sorted(section["tensors"].items()):
        record = _record(cfg_path, weights_path, name, entry, pool)
        pool[name] = record.dequantize()
        records[name] = record
    return pool, records


def _record(cfg_path: Path, weights_path: Path, name: str, entry, pool: dict) -> QuantizedTensor:
    fields = entry if isinstance(entry, dict) else {}
    bits, axis, group, shape = (fields.get(k) for k in ("bits", "axis", "group_size", "shape"))
    if not (
        bits in QMAX
        and isinstance(shape, list)
        and len(shape) == 2
        and axis in (0, 1)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        and isinstance(group, int)
        and not isinstance(group, bool)
        and group >= 1
    ):
        raise ShareportError(
            f"{cfg_path}: quantized tensor '{name}' needs bits (4 or 8), axis (0 or 1), "
            f"a positive group_size and a 2-d shape, got {entry!r}"
        )
    if name not in pool or SCALE_PREFIX + name not in pool:
        raise ShareportError(f"{weights_path}: quantized tensor '{name}' or its scales are missing")
    values, scales = pool[name], pool.pop(SCALE_PREFIX + name)
    if bits == 4:
        if values.dtype != torch.uint8 or values.dim() != 1 or values.numel() != (math.prod(shape) + 1) // 2:
            raise ShareportError(
                f"{weights_path}: tensor '{name}' must be {(math.prod(shape) + 1) // 2} bytes "
                f"of packed int4 (uint8), got {str(values.dtype).removeprefix('torch.')} "
                f"{tuple(values.shape)}"
            )
        values = unpack_int4(values, shape)
    elif values.dtype != torch.int8 or list(values.shape) != shape:
        raise ShareportError(
            f"{weights_path}: tensor '{name}' must be int8 of shape {tuple(shape)}, got "
            f"{str(values.dtype).removeprefix('torch.')} {tuple(values.shape)}"
        )
    expected = list(shape)
    expected[axis] = math.ceil(shape[axis] / group)
    if scales.dtype != torch.float16 or list(scales.shape) != expected:
        raise ShareportError(
            f"{weights_path}: scales of '{name}' must be float16 of shape {tuple(expected)}, "
            f"got {str(scales.dtype).removeprefix('torch.')} {tuple(scales.shape)}"
        )
    return QuantizedTensor(values, scales, bits, axis, group)
