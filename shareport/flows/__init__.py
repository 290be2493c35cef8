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

from ..export.exporter import ExportOptions
from ..train.jobs import TrainingOptions
from .adapters import convert, default_convert_output, inspect
from .fleets import fleet, fleet_add
from .onnx import doctor, export, export_adapter, generate, verify
from .training import default_recover_output, frontier, recover, train

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
