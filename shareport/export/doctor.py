"""``shareport doctor``: which runtimes this machine has, and whether they can work together.

The ONNX Runtime wheels ``onnxruntime`` and ``onnxruntime-gpu`` both install the same
``onnxruntime/`` package; installed together, the one installed last overwrites the other's
files and pip's record of either no longer matches the disk (a later uninstall of one breaks
the other). ``onnxruntime-genai`` requires ``onnxruntime`` (the CPU wheel), so a plain
``pip install onnxruntime-genai`` next to ``onnxruntime-gpu`` makes exactly that clash; installed
with ``--no-deps`` it runs on onnxruntime-gpu's library. doctor lists what is installed, which
providers ORT lists and which really run (``runtime.providers``), and one warning per clash.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata

from . import runtime

# distributions that install the "onnxruntime" package, and those that install "onnxruntime_genai"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")
FIX = {
    "onnxruntime": "pip uninstall -y {dists} && pip install onnxruntime-gpu",
    "onnxruntime_genai": "pip uninstall -y {dists} && pip install --no-deps onnxruntime-genai",
}


def installed_distributions(names=ORT_DISTRIBUTIONS + GENAI_DISTRIBUTIONS) -> dict[str, str]:
    """name -> version for the distributions among ``names`` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def clashes(dists: dict[str, str]) -> list[str]:
    """One warning line per package that two installed distributions both provide."""
    warnings = []
    for package, group in (("onnxruntime", ORT_DISTRIBUTIONS), ("onnxruntime_genai", GENAI_DISTRIBUTIONS)):
        owners = [n for n in group if n in dists]
        if len(owners) > 1:
            listed = " and ".join(f"{n} {dists[n]}" for n in owners)
            warnings.append(f"{listed} are installed together and both own the '{package}/' package: the one "
                            f"installed last overwrote the other (fix: {FIX[package].format(dists=' '.join(owners))})")
    return warnings


def _module_version(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # an installed but broken module raises anything
        return {"version": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"version": getattr(module, "__version__", None), "path": getattr(module, "__file__", None)}


def doctor(dists: dict[str, str] | None = None) -> dict:
    """The report ``shareport doctor`` prints; ``dists`` replaces the installed list (for tests)."""
    dists = installed_distributions() if dists is None else dists
    report = {
        "torch": _module_version("torch"),
        "transformers": _module_version("transformers"),
        "onnxruntime": _module_version("onnxruntime"),
        "onnxruntime_genai": _module_version("onnxruntime_genai"),
        "distributions": dists,
        "warnings": clashes(dists),
        "notes": [],
    }
    ort = report["onnxruntime"]
    if ort["version"] is not None:
        import onnxruntime

        ort["providers_listed"] = list(onnxruntime.get_available_providers())
        ort["providers_working"] = list(runtime.providers())
        if runtime.provider_note():
            report["notes"].append(runtime.provider_note())
        ort["multi_lora"] = hasattr(onnxruntime, "AdapterFormat") and hasattr(onnxruntime, "LoraAdapter")
        if not ort["multi_lora"]:
            report["warnings"].append(f"onnxruntime {ort['version']} has no multi-LoRA API (AdapterFormat): "
                                      "adapter-mode exports need onnxruntime-gpu >= 1.20")
    else:
        report["warnings"].append(f"onnxruntime does not import ({ort['error']}): pip install onnxruntime-gpu")
    if report["onnxruntime_genai"]["version"] is None and not any(n in dists for n in GENAI_DISTRIBUTIONS):
        report["notes"].append("onnxruntime-genai is not installed: 'shareport generate' uses ONNX Runtime's "
                               "loop (pip install 'shareport[genai]' adds it)")
    return report
