"""On the device, after collect.py: does ONNX Runtime's CUDA provider really run, and compute right?

    python3 -m tests.benchmarks.carry.check_cuda_ep [--cpu]

``onnxruntime.preload_dlls()`` first (CUDA 13 libraries from torch's nvidia-* wheels), then
``shareport doctor``'s check (the provider library loads, or the loader names the missing library;
x + x on a CUDA-only session), then a small MLP (MatMul, Add, Relu, MatMul; fp32 and fp16, built
with onnx.helper) in a session with providers ["CUDAExecutionProvider"] alone, against numpy, once
with plain feeds and once through IO binding with the input and output on the GPU. Exit status 0
when all pass; 2 with the missing library's name; 1 on any other failure.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shareport.export.doctor import PROBE_IR_VERSION, cuda_ep_status

CUDA = "CUDAExecutionProvider"
CUDA_LIBRARIES = ("libcudart", "libcublas", "libcublasLt", "libcurand", "libcudnn", "libcuda.")


def mlp(dtype: np.dtype, rng: np.random.Generator) -> tuple[bytes, list[np.ndarray]]:
    """y = relu(x @ w1 + b1) @ w2, weights as initializers; returns (model bytes, [w1, b1, w2])."""
    weights = [
        rng.standard_normal((64, 128)) * 0.1,
        rng.standard_normal(128) * 0.1,
        rng.standard_normal((128, 32)) * 0.1,
    ]
    weights = [w.astype(dtype) for w in weights]
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", elem, ["batch", 64])],
        [helper.make_tensor_value_info("y", elem, ["batch", 32])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, ["w1", "b1", "w2"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, PROBE_IR_VERSION)  # onnx >= 1.23 writes 14; ORT 1.31 reads <= 13
    onnx.checker.check_model(model)
    return model.SerializeToString(), weights


def loaded_cuda_libraries() -> list[str]:
    """The CUDA libraries this process has mapped (after preload_dlls and a CUDA session), with their folders."""
    seen = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1] if "/" in line else ""
        name = Path(path).name
        if name.startswith(CUDA_LIBRARIES) and ".so" in name:
            seen.setdefault(name, str(Path(path).parent))
    return [f"{name} ({folder})" for name, folder in sorted(seen.items())]


def check(ort, dtype: np.dtype, io_binding: bool, *, provider: str = CUDA) -> str:
    rng = np.random.default_rng(0)
    model, (w1, b1, w2) = mlp(dtype, rng)
    x = rng.standard_normal((8, 64)).astype(dtype)
    session = ort.InferenceSession(model, providers=[provider])
    used = session.get_providers()[0]
    assert used == provider, f"a session asked for {provider} alone runs on {used}"
    if io_binding:
        device = "cuda" if provider == CUDA else "cpu"
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        binding.bind_output("y", device)
        session.run_with_iobinding(binding)
        (out,) = binding.get_outputs()
        assert out.device_name().lower() == device, f"the bound output lives on {out.device_name()}"
        y = out.numpy()
    else:
        (y,) = session.run(None, {"x": x})
    want = np.maximum(x.astype(np.float64) @ w1 + b1, 0) @ w2.astype(np.float64)
    err = float(np.abs(y.astype(np.float64) - want).max())
    limit = 2e-2 * max(1.0, float(np.abs(want).max())) if dtype == np.float16 else 1e-4
    assert y.dtype == dtype and err <= limit, f"max |ORT - numpy| = {err:.3g} > {limit:.3g}"
    return f"{np.dtype(dtype).name} {'io-binding' if io_binding else 'feeds'}: max |ORT - numpy| {err:.2e} (limit {limit:.0e})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU provider (to try them here)")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    provider = "CPUExecutionProvider" if args.cpu else CUDA
    print(
        f"onnxruntime {ort.__version__} ({ort.__file__}); providers listed: {', '.join(ort.get_available_providers())}"
    )
    status = cuda_ep_status(ort) if provider == CUDA else {"state": "working", "line": "--cpu: the CPU provider"}
    print(status["line"])
    if status["state"] != "working":
        if status["missing"]:
            print(f"check_cuda_ep: FAILED: missing {status['missing']}", file=sys.stderr)
            return 2
        print(f"check_cuda_ep: FAILED: {status['line']}", file=sys.stderr)
        return 1
    try:
        for dtype in (np.float32, np.float16):
            for io_binding in (False, True):
                print("  " + check(ort, dtype, io_binding, provider=provider))
    except Exception as exc:  # an assertion above, or ORT's own error
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", str(exc))
        print(f"check_cuda_ep: FAILED: {missing.group(1) if missing else text}", file=sys.stderr)
        return 2 if missing else 1
    print("CUDA libraries loaded: " + ("; ".join(loaded_cuda_libraries()) or "none found in /proc/self/maps"))
    print("check_cuda_ep: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
