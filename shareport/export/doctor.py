"""``shareport doctor``: which runtimes this machine has, and whether they can work together.

The ONNX Runtime wheels ``onnxruntime`` and ``onnxruntime-gpu`` both install the same
``onnxruntime/`` package; installed together, the one installed last overwrites the other's
files and pip's record of either no longer matches the disk (a later uninstall of one breaks
the other). ``onnxruntime-genai`` requires ``onnxruntime`` (the CPU wheel), so a plain
``pip install onnxruntime-genai`` next to ``onnxruntime-gpu`` makes exactly that clash; installed
with ``--no-deps`` it runs on onnxruntime-gpu's library. doctor lists what is installed, which
providers ORT lists and which really run (``runtime.providers``), and one warning per clash.

A clash's fix uninstalls every ONNX Runtime and genai wheel (the survivor's files were overwritten,
so it is reinstalled too) and installs ``onnxruntime-gpu`` (the CUDA wheel also runs on CPU-only
machines), plus ``onnxruntime-genai-cuda`` where a genai wheel was there: the CPU
``onnxruntime-genai`` requires the CPU ``onnxruntime``, so keeping it would leave ``pip check``
complaining. ``cuda_ep_status`` says whether the CUDA provider really runs a session, and when it
cannot, which shared library is missing (the dynamic loader's own words on the provider library).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata as metadata
import io
import re
from pathlib import Path

from . import runtime

# distributions that install the "onnxruntime" package, and those that install "onnxruntime_genai"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")
CUDA_PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"  # in onnxruntime/capi/
CUDA_NOT_AVAILABLE = "CUDA EP: not available (CPU build of onnxruntime)"


def installed_distributions(names=ORT_DISTRIBUTIONS + GENAI_DISTRIBUTIONS) -> dict[str, str]:
    """name -> version for the distributions among ``names`` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def onnxruntime_dependents() -> list[str]:
    """Installed distributions, outside the ORT and genai wheels, that require the CPU ``onnxruntime``
    by name: ``pip check`` flags them once only ``onnxruntime-gpu`` provides the package."""
    found = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower() in ORT_DISTRIBUTIONS + GENAI_DISTRIBUTIONS:
            continue
        for requirement in dist.requires or []:
            required = re.split(r"[ <>=!~;\[(]", requirement, maxsplit=1)[0].lower()
            if required == "onnxruntime" and "extra ==" not in requirement:
                found.add(name)
    return sorted(found)


def fix_command(dists: dict[str, str]) -> str:
    """One command after which one ONNX Runtime wheel (and at most one genai wheel) is installed,
    each freshly (a clash overwrote files of the one that stays), and ``pip check`` has nothing to
    say about them: onnxruntime-gpu, and onnxruntime-genai-cuda (which requires it) for any genai."""
    remove = [n for n in ORT_DISTRIBUTIONS + GENAI_DISTRIBUTIONS if n in dists]
    install = ["onnxruntime-gpu"] + (["onnxruntime-genai-cuda"] if any(n in dists for n in GENAI_DISTRIBUTIONS) else [])
    return f"pip uninstall -y {' '.join(remove)} && pip install {' '.join(install)}"


def clashes(dists: dict[str, str]) -> list[str]:
    """One warning line per package that two installed distributions both provide."""
    warnings = []
    for package, group in (("onnxruntime", ORT_DISTRIBUTIONS), ("onnxruntime_genai", GENAI_DISTRIBUTIONS)):
        owners = [n for n in group if n in dists]
        if len(owners) > 1:
            listed = " and ".join(f"{n} {dists[n]}" for n in owners)
            warnings.append(
                f"{listed} are installed together and both own the '{package}/' package: the one "
                f"installed last overwrote the other (fix: {fix_command(dists)})"
            )
    return warnings


def missing_library(message: str) -> str | None:
    """The shared library a loader error names as missing (glibc's dlopen, or ORT's own wording)."""
    for pattern in (
        r"([\w.+-]+\.so[\w.]*): cannot open shared object file",
        r'depends on "([^"]+)" which is missing',
        r"([\w.+-]+\.so[\w.]*): cannot open",
    ):
        found = re.search(pattern, message)
        if found:
            return Path(found.group(1)).name
    return None


def _preload_quietly(ort) -> None:
    """``onnxruntime.preload_dlls()`` (ORT >= 1.21: CUDA and cuDNN from the nvidia-* wheels), its
    per-library complaints swallowed: the provider library's load below names what is missing."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with contextlib.suppress(Exception):
            preload()


PROBE_IR_VERSION = runtime.PROBE_IR_VERSION


def probe_model() -> bytes:
    """A one-node graph, y = x + x on a float [2, 3], at an IR version every ORT >= 1.20 reads."""
    import onnx

    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "x"], ["y"])],
        "cuda_probe",
        [vi("x", onnx.TensorProto.FLOAT, [2, 3])],
        [vi("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, PROBE_IR_VERSION)
    return model.SerializeToString()


def _cuda_probe_session(ort):
    """``probe_model()`` in a session asked for the CUDA provider alone."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the outcome is reported below, in one line
    return ort.InferenceSession(probe_model(), options, providers=[runtime.CUDA])


def cuda_ep_status(ort=None, load_library=ctypes.CDLL) -> dict:
    """Whether ONNX Runtime's CUDA provider really runs here: ``{"state": "working" | "not working"
    | "not available", "missing": the missing shared library or None, "line": one line to print}``.
    ``ort`` and ``load_library`` replace ``onnxruntime`` and ``ctypes.CDLL`` (for tests)."""
    import numpy as np

    if ort is None:
        import onnxruntime as ort
    if runtime.CUDA not in ort.get_available_providers():
        return {"state": "not available", "missing": None, "line": CUDA_NOT_AVAILABLE}

    def broken(why: str, missing: str | None = None) -> dict:
        return {"state": "not working", "missing": missing, "line": f"CUDA EP: not working: {why}"}

    _preload_quietly(ort)
    library = Path(ort.__file__).parent / "capi" / CUDA_PROVIDER_LIBRARY
    try:
        load_library(str(library))  # the loader names the first dependency it cannot find
    except OSError as exc:
        missing = missing_library(str(exc))
        if missing:
            return broken(
                f"{missing} is missing (needed by {CUDA_PROVIDER_LIBRARY}; install the nvidia-* wheel "
                "that has it, or put the folder that has it on LD_LIBRARY_PATH)",
                missing,
            )
        return broken(f"{CUDA_PROVIDER_LIBRARY} does not load: {str(exc).splitlines()[0]}")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    try:
        session = _cuda_probe_session(ort)
        used = session.get_providers()[0]
        y = session.run(None, {"x": x})[0] if used == runtime.CUDA else None
    except Exception as exc:  # ORT raises its own types (Fail, RuntimeException, ...)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return broken(f"a test session failed: {text}", missing_library(str(exc)))
    if used != runtime.CUDA:
        return broken(f"a test session asked for {runtime.CUDA} alone ran on {used}")
    if not np.array_equal(np.asarray(y), x + x):
        return broken("a test session on the CUDA provider computed x + x wrong")
    return {"state": "working", "missing": None, "line": f"CUDA EP: working (a test session ran on {runtime.CUDA})"}


def _module_version(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # an installed but broken module raises anything
        return {"version": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"version": getattr(module, "__version__", None), "path": getattr(module, "__file__", None)}


def doctor(dists: dict[str, str] | None = None, *, dependents: list[str] | None = None, cuda=None) -> dict:
    """The report ``shareport doctor`` prints; ``dists``, ``dependents`` (``onnxruntime_dependents()``)
    and ``cuda`` (a ``cuda_ep_status`` stand-in) replace what this machine has (for tests).
    ``clashes`` non-empty means the command exits non-zero; ``fix`` is then the one command to run."""
    dists = installed_distributions() if dists is None else dists
    clash = clashes(dists)
    report = {
        "torch": _module_version("torch"),
        "transformers": _module_version("transformers"),
        "onnxruntime": _module_version("onnxruntime"),
        "onnxruntime_genai": _module_version("onnxruntime_genai"),
        "distributions": dists,
        "warnings": list(clash),
        "clashes": clash,
        "fix": fix_command(dists) if clash else None,
        "notes": [],
    }
    if clash:
        others = onnxruntime_dependents() if dependents is None else dependents
        if others:
            report["warnings"].append(
                f"{', '.join(others)} require(s) the CPU wheel 'onnxruntime' by name: after the "
                "fix pip check names them, though they run on onnxruntime-gpu's package"
            )
    ort = report["onnxruntime"]
    if ort["version"] is not None:
        import onnxruntime

        ort["providers_listed"] = list(onnxruntime.get_available_providers())
        ort["providers_working"] = list(runtime.providers())
        if runtime.provider_note():
            report["notes"].append(runtime.provider_note())
        ort["cuda_ep"] = (cuda or cuda_ep_status)()
        ort["multi_lora"] = hasattr(onnxruntime, "AdapterFormat") and hasattr(onnxruntime, "LoraAdapter")
        if not ort["multi_lora"]:
            report["warnings"].append(
                f"onnxruntime {ort['version']} has no multi-LoRA API (AdapterFormat): "
                "adapter-mode exports need onnxruntime-gpu >= 1.20"
            )
    else:
        ort["cuda_ep"] = {
            "state": "not available",
            "missing": None,
            "line": "CUDA EP: not available (onnxruntime does not import)",
        }
        report["warnings"].append(f"onnxruntime does not import ({ort['error']}): pip install onnxruntime-gpu")
    if report["onnxruntime_genai"]["version"] is None and not any(n in dists for n in GENAI_DISTRIBUTIONS):
        report["notes"].append(
            "onnxruntime-genai is not installed: 'shareport generate' uses ONNX Runtime's "
            "loop (pip install 'shareport[genai]' adds it)"
        )
    return report
