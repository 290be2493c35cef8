"""ONNX Runtime sessions on the provider that really works on this machine.

``onnxruntime-gpu`` lists CUDAExecutionProvider even where no GPU or CUDA library exists, and a
session asked for it then silently falls back to CPU after logging errors. So CUDA is probed once
on a one-node graph and used only if the probe session really runs on it. Before the probe,
``onnxruntime.preload_dlls()`` (ORT >= 1.21) loads the CUDA and cuDNN libraries from the
``nvidia-*`` wheels or the system, so a pip-only CUDA install works; what it prints about a missing
library becomes the one-line ``provider_note()`` (shown by ``shareport doctor``), not output.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tempfile
from pathlib import Path

import numpy as np

# onnx >= 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses: a probe at that IR would
# report a working CUDA provider as broken
PROBE_IR_VERSION = 10

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache
def _selection() -> tuple[tuple[str, ...], str]:
    """(providers, note): CUDA first where a probe session really runs on it; else CPU and why."""
    import onnx
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return (CPU,), ""
    preload = getattr(ort, "preload_dlls", None)  # ORT >= 1.21: loads CUDA/cuDNN (e.g. from nvidia-* wheels)
    said = ""
    if preload is not None:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                preload()  # prints one line per library it cannot find; kept for the note
        except Exception as exc:  # a failed preload only means the probe below will fail too
            captured.write(f"{type(exc).__name__}: {exc}\n")
        said = next((line for line in captured.getvalue().splitlines() if line.strip()), "")
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "probe", [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])]
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    probe.ir_version = min(probe.ir_version, PROBE_IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failed CUDA load is expected on CPU machines; keep it quiet
    # the provider library's load error goes to ORT's default logger, not the session's: silence that
    # too for the probe, then put back ORT's default (warnings; ORT has no getter for the level)
    set_severity = getattr(ort, "set_default_logger_severity", lambda level: None)  # absent in stubs
    set_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
        working = session.get_providers()[0] == CUDA
    except Exception as exc:
        said = said or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        working = False
    finally:
        set_severity(2)
    if working:
        return (CUDA, CPU), ""
    why = f" ({said.strip()[:160]})" if said else " (no GPU, or no CUDA/cuDNN libraries found)"
    return (CPU,), f"{CUDA} is listed but cannot run here{why}: using {CPU}"


def providers() -> tuple[str, ...]:
    """("CUDAExecutionProvider", "CPUExecutionProvider") where CUDA works, else ("CPUExecutionProvider",)."""
    return _selection()[0]


def provider_note() -> str:
    """One line saying why CUDA is listed but not used ("" when it is used or not listed)."""
    return _selection()[1]


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
