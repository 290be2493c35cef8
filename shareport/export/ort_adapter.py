"""``.onnx_adapter`` files (ONNX Runtime's multi-LoRA format) and the check that one fits a graph.

ORT matches adapter parameters to the graph's overridable initializers by name at run time and
reports a mismatch obscurely (or, for a tensor it does not know, only when it runs). So every
adapter is checked against the graph's slots before it is written: names, dtypes, static dims,
and that tensors sharing a symbolic rank dim agree on its size. A graph that takes carried tensors
(a fleet's differing heads, see ``carried``) gets the adapter's own as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..adapter import Adapter
from ..errors import ShareportError
from ..files.atomic import atomic_file
from ..files.quantized import SCALE_PREFIX
from . import quantized
from .carried import carried_arrays
from .slots import graph_tensors

ADAPTER_VERSION = 1


def write_onnx_adapter(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(1)
    # an OrtValue from numpy points into the array without holding it: a copy made here (of an array that is
    # not C-contiguous, e.g. a transposed one) must stay alive until the file is written, or garbage is written
    kept = {n: np.ascontiguousarray(a) for n, a in sorted(arrays.items())}
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in kept.items()})
    fmt.export_adapter(str(path))
    del kept


def save_onnx_adapter(arrays: dict[str, np.ndarray], path: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Write one ``.onnx_adapter`` file atomically, with the output rules of every command."""
    with atomic_file(path, overwrite=overwrite, inputs=inputs, owned=_is_adapter_file) as tmp:
        write_onnx_adapter(arrays, tmp)
    return Path(path)


def _is_adapter_file(path: Path) -> bool:
    """An existing ONNX Runtime adapter file (of the version shareport writes) may be replaced."""
    import onnxruntime as ort

    try:
        return ort.AdapterFormat.read_adapter(str(path)).get_adapter_version() == ADAPTER_VERSION
    except Exception:
        return False


def read_onnx_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The file's tensors, as arrays that own their memory.

    ``OrtValue.numpy()`` of an adapter's parameter is a view into memory owned by the
    ``AdapterFormat`` object; once that object is collected the view reads freed memory
    (garbage or NaN). So the format object is held while every array is copied out.
    """
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT raises its own types with long messages
        raise ShareportError(f"{path}: not a readable .onnx_adapter file ({str(exc).splitlines()[0][:200]})") from None
    arrays = {n: v.numpy().copy() for n, v in fmt.get_parameters().items()}
    del fmt  # only now may ORT free the memory the views pointed into
    return arrays


def _first(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"'{names[0]}'{more}"


OLIVE_SUFFIX = ".weight"  # Olive's convert-adapters names tensors "...q_proj.lora_A.weight"


def _other_name(name: str) -> str:
    return name[: -len(OLIVE_SUFFIX)] if name.endswith(OLIVE_SUFFIX) else name + OLIVE_SUFFIX


def match_names(arrays: dict[str, np.ndarray], slots: dict[str, tuple], what: str = "adapter"):
    """``arrays`` renamed to the graph's slot names where they differ only by Olive's ``.weight`` suffix.

    Returns ``(arrays, note)``; ``note`` is one line when names were mapped, else "". An Olive
    file meets a shareport graph, or a shareport adapter a graph exported with
    ``--adapter-names olive``. Names that fit already, or fit neither way, are left for
    :func:`check_fits`.
    """
    renamed, mapped = {}, 0
    for name, array in arrays.items():
        other = _other_name(name)
        if name not in slots and other in slots and other not in arrays:
            renamed[other] = array
            mapped += 1
        else:
            renamed[name] = array
    note = (
        f"{what}: mapped {mapped} tensor names between Olive's '<name>{OLIVE_SUFFIX}' and the graph's names"
        if mapped
        else ""
    )
    return renamed, note


def check_fits(arrays: dict[str, np.ndarray], slots: dict[str, tuple[np.dtype, tuple]], what: str = "adapter") -> None:
    """Raise a one-line ShareportError unless ``arrays`` can be swapped into a graph with ``slots``."""
    if not slots:
        raise ShareportError("the graph has no adapter inputs (it was exported with --mode folded)")
    graph_quantized = any(n.startswith(SCALE_PREFIX) and n[len(SCALE_PREFIX) :] in slots for n in slots)
    if graph_quantized != any(n.startswith(SCALE_PREFIX) for n in arrays):
        raise ShareportError(
            f"{what} holds float tensors; this graph takes a quantized adapter (integers and float16 scales): "
            "write it from a quantized adapter folder (convert --quantize)"
            if graph_quantized
            else f"{what} holds a quantized adapter (integers and scales); this graph takes float tensors: export a graph "
            "from the quantized adapter, or write the file from a float one"
        )
    unknown, missing = set(arrays) - set(slots), set(slots) - set(arrays)
    if unknown:
        raise ShareportError(
            f"{what} tensor {_first(unknown)} is not an input of the graph, whose adapter inputs are named like "
            f"'{min(slots)}' (adapter of another form or model?)"
        )
    if missing:
        raise ShareportError(f"{what} lacks the graph's adapter input {_first(missing)} (adapter of another form?)")
    sizes: dict[str, tuple[int, str]] = {}
    for name in sorted(arrays):
        array, (dtype, shape) = arrays[name], slots[name]
        if array.dtype != dtype:
            raise ShareportError(f"{what} tensor '{name}' is {array.dtype}, the graph's input is {dtype}")
        if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
            raise ShareportError(f"{what} tensor '{name}' has shape {tuple(array.shape)}, the graph's input is {shape}")
        for dim, size in zip(shape, array.shape):
            if isinstance(dim, str):
                seen = sizes.setdefault(dim, (size, name))
                if seen[0] != size:
                    raise ShareportError(
                        f"{what} tensors '{seen[1]}' and '{name}' share the graph's rank dim '{dim}' "
                        f"but have ranks {seen[0]} and {size}"
                    )


def adapter_arrays(
    adapter: Adapter,
    slots: dict[str, tuple[np.dtype, tuple]],
    what: str = "adapter",
    carried: list[str] = (),
    graph_info: dict | None = None,
) -> dict[str, np.ndarray]:
    """The adapter in the graph's layout and dtype, checked to fit the graph's slots; ``carried``: the
    graph's carried inputs (``carried.graph_inputs``), filled from the adapter's own carried tensors.
    ``graph_info``: the graph's metadata, which says which slots take integers (``quantized``); a
    quantized adapter for a float graph, or the reverse, is refused in one line."""
    qslots = quantized.slots_from_info(graph_info or {}, slots)
    taken = {n for q in qslots.values() for n in q.inputs()}
    dtype = next((d for n, (d, _) in sorted(slots.items()) if n not in taken), np.dtype(np.float32))
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    held = quantized.records(adapter)
    if held and not qslots and slots:
        kinds = sorted({f"int{r.bits} in groups of {r.group_size}" for r in held.values()})
        raise ShareportError(
            f"{what} is quantized ({', '.join(kinds)}); this graph takes float adapter tensors: export a graph from "
            "the quantized adapter (adapter mode keeps it quantized), or use a float adapter"
        )
    arrays, _ = match_names({n: t.numpy() for n, t in graph_tensors(adapter, torch_dtype).items()}, slots)
    if qslots:  # the integers and scales in place of the float values of the same names
        arrays.update(
            quantized.adapter_values(adapter, qslots, lambda n: n if n in slots else _other_name(n), what=what)
        )
    if carried:  # already the graph's names: Olive's suffix is for LoRA factors only
        arrays.update(carried_arrays(adapter, list(carried), torch_dtype, what))
    check_fits(arrays, slots, what)
    return arrays
