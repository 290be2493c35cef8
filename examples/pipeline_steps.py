"""The pipeline steps the examples share: convert (exists), recover/export/scratch (hooks).

`convert` calls the library. The other steps belong to commands still being written
(`shareport finetune`, `shareport train --form`, `shareport export`/`verify`); each is one
clearly marked function below that raises :class:`StepUnavailable` until it is wired. Each takes
and returns *folders*, the currency of the CLI, so wiring one is a `subprocess.run` of the new
command plus reading its output back. An example runs a missing step only if the user did not
``--skip`` it, so a default run fails loudly instead of reporting a step it never ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shareport.adapter import Adapter
from shareport.convert import ConversionReport, convert_adapter
from shareport.formats import save_adapter

OPTIONAL_STEPS = ("recover", "export", "scratch")
SKIPPED = "skipped"


class StepUnavailable(RuntimeError):
    """A pipeline step whose shareport command has not landed yet."""

    def __init__(self, step: str, command: str):
        super().__init__(f"step '{step}' needs {command} (not available yet); "
                         f"rerun with --skip {step} to leave it out")
        self.step = step


def convert(lora: Adapter, form: str, budget: float | None, out_dir: Path) -> tuple[Adapter, ConversionReport, Path]:
    """Convert to ``form`` within ``budget`` times the LoRA's parameters (None: shareport's
    default plan); save it in the native format."""
    converted, report = convert_adapter(lora, form, budget=budget)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = save_adapter(converted, out_dir, overwrite=True)
    return converted, report, folder


# ---------------------------------------------------------------------------------- hooks
# Wire these when the commands land; the callers already evaluate whatever folder they return.

def recover(converted_dir: Path, teacher_dir: Path, base_dir: Path, data_file: Path, out_dir: Path,
            steps: int) -> Path:
    """HOOK: `shareport finetune`, recovery by distillation of the converted adapter toward the
    original LoRA (``teacher_dir``) on the unlabelled inputs in ``data_file``, ``steps`` steps.
    Returns the recovered adapter's folder."""
    raise StepUnavailable("recover", "shareport finetune")


def train_from_scratch(form: str, budget: float, base_dir: Path, data_file: Path, out_dir: Path,
                       steps: int) -> Path:
    """HOOK: `shareport train --form FORM`, a ShareLoRA/ASLoRA adapter trained from scratch on the
    labelled ``data_file`` with the same parameter budget. Returns the adapter's folder."""
    raise StepUnavailable("scratch", "shareport train --form")


def onnx_logits(adapter_dir: Path, base_dir: Path, work_dir: Path, inputs: dict) -> "object":
    """HOOK: `shareport export` (+ `verify`) of base + adapter to ONNX, then the logits ONNX
    Runtime gives for ``inputs`` (name -> int64 tensor, as the model's forward takes them).
    Returns a float tensor shaped like the PyTorch logits."""
    raise StepUnavailable("export", "shareport export")


def run_step(step: str, skip: set[str], fn, *args):
    """``fn(*args)`` unless the user skipped ``step``; then None."""
    if step in skip:
        return None
    return fn(*args)


def write_json(data: dict, path: Path) -> None:
    """Deterministic JSON (sorted keys), so that a rerun's file can be compared byte for byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value, fmt: str = "{:.3f}") -> str:
    """A table cell: a number formatted, or 'skipped' for a step that did not run."""
    return SKIPPED if value is None else fmt.format(value)


def run_example(argv, doc: str, default_out: str, skippable: tuple[str, ...], run, render, full, fast) -> dict:
    """The examples' common command line: parse, ``run(settings, out, skip)``, write, print.

    ``--fast`` picks the ``fast`` settings (for tests); ``--skip`` leaves out hook steps.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(default_out), help="folder for results and adapters")
    parser.add_argument("--fast", action="store_true", help="short run, for tests")
    parser.add_argument("--skip", nargs="*", default=[], choices=skippable,
                        help="leave out steps whose shareport command has not landed yet")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = run(fast if args.fast else full, args.out, set(args.skip))
    write_json(results, args.out / "results.json")  # no timings inside: a rerun is identical
    print(render(results))
    print(f"\nwrote {args.out / 'results.json'} in {time.monotonic() - started:.0f} s")
    return results
