"""What each command does, as one library call: folders in -> folders out -> a report.

Every guarantee lives here or below, so a Python user gets the same as the CLI: outputs are
checked before the work starts, written atomically and never over an input; exports are
verified before they are published; provenance is recorded; under several processes only
the main one writes. Each function returns the report the CLI prints (``--json`` prints it
as is).

    inspect   adapter folder -> summary
    convert   LoRA folder -> shared (or plain) adapter folder [+ figure]
    fleet     N LoRA folders of one base -> fleet folder (shared basis once + one member folder each)
    fleet_add fleet folder + one more LoRA -> the fleet folder grown by one member (bases grown if needed)
    recover   shared adapter + teacher LoRA + base + data -> recovered adapter folder
    train     base + data -> new adapter folder
    export    adapter + base -> verified ONNX folder
    verify    ONNX folder + base + adapter -> comparison report
    export_adapter  adapter + ONNX folder -> .onnx_adapter file
    generate  ONNX folder (+ .onnx_adapter files) + prompt -> greedy text per adapter
    doctor    this machine's runtimes -> report
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names for type checkers and the architecture test's import graph; loaded lazily below
    from ..export.exporter import ExportOptions
    from ..train.jobs import TrainingOptions
    from .adapters import convert, default_convert_output, inspect
    from .fleets import fleet, fleet_add
    from .onnx import doctor, export, export_adapter, generate, verify
    from .training import default_recover_output, frontier, recover, train

# name -> the module that holds it; each is imported on first use, so a command loads only its own
# room (convert does not pay for onnx, ~0.5 s, and a refused input is reported sooner)
_WHERE = {
    "inspect": ".adapters",
    "convert": ".adapters",
    "default_convert_output": ".adapters",
    "recover": ".training",
    "train": ".training",
    "frontier": ".training",
    "default_recover_output": ".training",
    "export": ".onnx",
    "verify": ".onnx",
    "export_adapter": ".onnx",
    "generate": ".onnx",
    "doctor": ".onnx",
    "fleet": ".fleets",
    "fleet_add": ".fleets",
    "ExportOptions": "..export.exporter",
    "TrainingOptions": "..train.jobs",
}
_ROOMS = ("adapters", "training", "onnx", "fleets")
__all__ = [
    "ExportOptions",
    "TrainingOptions",
    "convert",
    "default_convert_output",
    "default_recover_output",
    "doctor",
    "export",
    "export_adapter",
    "fleet",
    "fleet_add",
    "frontier",
    "generate",
    "inspect",
    "recover",
    "train",
    "verify",
]


def __getattr__(name: str):
    if name in _ROOMS:
        return importlib.import_module(f".{name}", __name__)
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, *_ROOMS])
