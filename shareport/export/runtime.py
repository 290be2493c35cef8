"""ONNX Runtime sessions on the provider that really works on this machine.

``onnxruntime-gpu`` lists CUDAExecutionProvider even where no GPU or CUDA library exists, and a
session asked for it then silently falls back to CPU after logging errors. So CUDA is probed once
on a one-node graph and used only if the probe session really runs on it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache
def providers() -> tuple[str, ...]:
    """("CUDAExecutionProvider", "CPUExecutionProvider") where CUDA works, else ("CPUExecutionProvider",)."""
    import onnx
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return (CPU,)
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "probe", [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failed CUDA load is expected on CPU machines; keep it quiet
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception:
        return (CPU,)
    return (CUDA, CPU) if session.get_providers()[0] == CUDA else (CPU,)


def device_name() -> str:
    return "cuda" if providers()[0] == CUDA else "cpu"


def session(graph_path: str | Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(graph_path), options, providers=list(providers()))


def load_lora(arrays: dict[str, np.ndarray]):
    """An ``ort.LoraAdapter`` holding ``arrays`` (ORT loads adapters only from files)."""
    import onnxruntime as ort

    from .ort_adapter import write_onnx_adapter

    with tempfile.TemporaryDirectory(prefix="shareport-") as tmp:
        path = Path(tmp) / "adapter.onnx_adapter"
        write_onnx_adapter(arrays, path)
        lora = ort.LoraAdapter()
        lora.Load(str(path))
    return lora


def run(sess, feeds: dict[str, np.ndarray], lora=None) -> list[np.ndarray]:
    """Run with ``lora`` active (through RunOptions, the only path that honours adapters)."""
    import onnxruntime as ort

    options = None
    if lora is not None:
        options = ort.RunOptions()
        options.add_active_adapter(lora)
    return sess.run(None, feeds, options)
