"""Read and write safetensors files with errors that name the file and the problem.

The header is checked by hand before the library reads the file, so a truncated file, a
header that declares shapes larger than the file, or a garbled header gives one clear line
instead of a library traceback. Pickled checkpoints are read only when the caller says so.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ShareportError

_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_TORCH_DTYPE = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_header(path: str | os.PathLike) -> dict:
    """Parse and validate the header of a safetensors file; return {name: entry}."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ShareportError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise ShareportError(f"{path}: truncated or not a safetensors file (header claims {header_len} bytes)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShareportError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ShareportError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, entry, data_len)
        entries[name] = entry
    return entries


def _check_entry(path: Path, name: str, entry, data_len: int) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ShareportError(f"{path}: tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise ShareportError(f"{path}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ShareportError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ShareportError(f"{path}: tensor '{name}' has invalid data offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if not 0 <= begin <= end <= data_len or end - begin != nbytes:
        raise ShareportError(f"{path}: tensor '{name}' (shape {shape}) does not fit the file: truncated or corrupt")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, after validating its header."""
    path = Path(path)
    if not path.is_file():
        raise ShareportError(f"{path}: file not found")
    read_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # the library's own error types vary across versions
        raise ShareportError(f"{path}: cannot read safetensors file ({str(exc).splitlines()[0]})") from None


class StreamedTensors(Mapping):
    """The tensors of one safetensors file, each read from a memory map of its own bytes when asked
    for, never held.

    ``names`` maps the names callers use to the file's keys (default: the keys themselves). The
    header is validated as ``load_tensors`` validates it, once, when the mapping is made. Each
    access maps exactly that tensor's byte range (copy-on-write: the file is never written) and
    returns a tensor on it, so pages are read when touched and leave the process's memory when the
    tensor is dropped; a shape or dtype query touches nothing. (safetensors' ``safe_open`` maps the
    whole file, so its page fault read-ahead around every tensor asked for stays resident as long as
    the handle does, and opening it costs about a millisecond.) ``shareport.convert`` drops each
    kind's tensors before the next, so reading a kind costs that kind's bytes, not the file's.
    """

    def __init__(self, path: str | os.PathLike, names: dict[str, str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ShareportError(f"{self.path}: file not found")
        self.entries = read_header(self.path)
        with open(self.path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
        self.data_start = 8 + header_len
        self.names = {k: k for k in sorted(self.entries)} if names is None else dict(names)

    def renamed(self, names: dict[str, str]) -> "StreamedTensors":
        """The same file under other names (``names``: new name -> file key)."""
        out = copy.copy(self)
        out.names = dict(names)
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[self.names[name]]
        return self._map(entry, 0, entry["shape"][0] if entry["shape"] else 1)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), mapping only their bytes (a tensor's
        rows are one contiguous byte range): what one process holds of a tensor sharded on dim 0."""
        entry = self.entries[self.names[name]]
        rows = entry["shape"][0] if entry["shape"] else 1
        if not 0 <= start <= stop <= rows:
            raise ShareportError(f"{self.path}: tensor '{name}' has {rows} rows, not {start}:{stop}")
        return self._map(entry, start, stop)

    def _map(self, entry: dict, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``entry``'s tensor (a 0-dim tensor is one row), on a map of their bytes."""
        dtype, shape = _TORCH_DTYPE[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        row_bytes = (end - begin) // (shape[0] if shape else 1) if end > begin else 0
        if shape:
            shape[0] = stop - start
        begin, end = begin + start * row_bytes, begin + stop * row_bytes
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), start - aligned + end - begin, offset=aligned, access=mmap.ACCESS_COPY)
        # the tensor holds the map (through the buffer it was made from): dropping it unmaps
        flat = torch.frombuffer(
            mapped, dtype=dtype, count=(end - begin) // _ITEMSIZE[entry["dtype"]], offset=start - aligned
        )
        return flat.view(shape)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def release(self) -> None:
        """Hand the heap that the caller's freed copies leave behind back to the system (glibc keeps
        it otherwise, so one kind's scratch memory would stay resident through the next)."""
        _trim_heap()


MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"  # a model saved in shards: which file holds each tensor


class StreamedShards(Mapping):
    """The tensors of several safetensors files (a model saved in shards) as one streamed mapping."""

    def __init__(self, parts: list[StreamedTensors]):
        self.parts = {name: part for part in parts for name in part}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name][name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.parts[name].rows(name, start, stop)

    def __iter__(self):
        return iter(sorted(self.parts))

    def __len__(self) -> int:
        return len(self.parts)


def stream_model_weights(folder: str | os.PathLike) -> StreamedShards:
    """A transformers model folder's weights (``model.safetensors``, or the shards its index lists),
    each tensor read from a map of its own bytes when asked for (see :class:`StreamedTensors`)."""
    folder = Path(folder)
    if (folder / MODEL_WEIGHTS).is_file():
        return StreamedShards([StreamedTensors(folder / MODEL_WEIGHTS)])
    index = folder / MODEL_INDEX
    if not index.is_file():
        raise ShareportError(f"{folder}: no {MODEL_WEIGHTS} or {MODEL_INDEX} (weights are read from safetensors only)")
    try:
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if not all(isinstance(name, str) for name in files):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ShareportError(f"{index}: not a safetensors index (no 'weight_map' of tensor names to files)") from None
    return StreamedShards([StreamedTensors(folder / name) for name in files])


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_pickled(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` state dict with ``weights_only=True`` (the caller asked for it)."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ShareportError(f"{path}: cannot read PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ShareportError(f"{path}: expected a state dict of tensors")
    return state


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors byte-deterministically (sorted names, contiguous, unaliased).

    The metadata is the single entry ``format: pt``: safetensors stores metadata in a hash
    map, so two or more entries come out in a different order from run to run.
    """
    ordered = {}
    seen_storage = set()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; copy only those that do.
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in seen_storage:
            t = t.clone()
        seen_storage.add(key)
        ordered[name] = t
    save_file(ordered, str(path), metadata={"format": "pt"})


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ShareportError(f"{path}: tensor '{name}' contains NaN or Inf values")


def check_floating(path: str | os.PathLike, tensors, names) -> None:
    """LoRA factors hold real numbers: an integer (or bool) tensor is refused, never cast."""
    for name in sorted(names):
        dtype = tensors[name].dtype
        if not dtype.is_floating_point:
            raise ShareportError(
                f"{path}: tensor '{name}' has dtype {str(dtype).removeprefix('torch.')}; "
                "LoRA factors must be floating point (float32, float16 or bfloat16)"
            )
