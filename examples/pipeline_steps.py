"""The pipeline steps the examples share: convert, recover, train from scratch, ONNX logits.

`convert` calls the converter on in-memory adapters. The others call the library functions
behind the commands (``shareport.flows``: ``recover``, ``train``, ``export``), the same one call
each CLI command makes, so the examples get every guarantee the CLI gives (atomic outputs,
verification before publishing). Each takes and returns *folders*; the callers evaluate
whatever folder a step returns. ``--skip`` leaves out the slow steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from shareport import flows
from shareport.adapter import Adapter
from shareport.convert import ConversionReport, convert_adapter
from shareport.export.exporter import ExportOptions
from shareport.files import save_adapter

OPTIONAL_STEPS = ("recover", "export", "scratch")
SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training schedule: what ``shareport finetune``/``train`` are given besides the folders
    (the examples' own training loops take one too)."""

    steps: int
    lr: float
    batch_size: int
    max_length: int = 64
    seed: int = 0

    def options(self, **merging) -> flows.TrainingOptions:
        return flows.TrainingOptions(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            **merging,
        )


def convert(lora: Adapter, form: str, budget: float | None, out_dir: Path) -> tuple[Adapter, ConversionReport, Path]:
    """Convert to ``form`` within ``budget`` times the LoRA's parameters (None: shareport's
    default plan); save it in the native format."""
    converted, report = convert_adapter(lora, form, budget=budget)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = save_adapter(converted, out_dir, overwrite=True)
    return converted, report, folder


def recover(
    converted_dir: Path, teacher_dir: Path, base_dir: Path, data: Path, out_dir: Path, recipe: Recipe
) -> tuple[Path, dict]:
    """`shareport finetune`: distil the converted adapter toward the original LoRA (``teacher_dir``)
    on the unlabelled inputs in ``data``. Returns the recovered folder and the command's report."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = flows.recover(
        str(converted_dir),
        str(base_dir),
        str(teacher_dir),
        str(data),
        str(out_dir),
        options=recipe.options(),
        overwrite=True,
    )
    return out_dir, report


def train_from_scratch(
    form: str,
    base_dir: Path,
    data: Path,
    out_dir: Path,
    targets: list[str],
    rank: int,
    alpha: float,
    recipe: Recipe,
    groups: int | None = None,
) -> tuple[Path, dict]:
    """`shareport train --form FORM`: a new adapter (ShareLoRA init) trained on the labelled
    ``data``; ASLoRA merges B's down to ``groups`` per kind on its schedule."""
    merging = {"groups": groups} if form == "aslora" else {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = flows.train(
        form,
        str(base_dir),
        targets,
        rank,
        str(data),
        str(out_dir),
        alpha=alpha,
        options=recipe.options(**merging),
        overwrite=True,
    )
    return out_dir, report


@dataclasses.dataclass
class OnnxRun:
    """What ONNX Runtime computed, and how `shareport export`'s own verification went."""

    logits: torch.Tensor
    verified: bool
    verify_max_abs: float


def onnx_logits(
    adapter_dir: Path,
    base_dir: Path,
    graph_dir: Path,
    inputs: dict[str, torch.Tensor],
    threads: int,
    batch_size: int = 64,
) -> OnnxRun:
    """`shareport export --mode adapter` of base + adapter (verified against PyTorch by the
    command), then the logits ONNX Runtime gives for ``inputs`` with the exported adapter active.

    ``inputs`` are what the PyTorch model's forward takes (``input_ids``, optionally
    ``attention_mask``); the graph's other inputs are filled as the model would default them.
    """
    from shareport.export import graph_file, runtime
    from shareport.export.ort_adapter import read_onnx_adapter

    graph_dir.parent.mkdir(parents=True, exist_ok=True)
    report = flows.export(
        str(adapter_dir), str(base_dir), str(graph_dir), ExportOptions(mode="adapter"), overwrite=True
    )
    lora = runtime.load_lora(read_onnx_adapter(graph_dir / graph_file.ADAPTER_NAME))
    sess = runtime.session(graph_dir / graph_file.GRAPH_NAME, threads=threads)
    names = [
        i.name for i in sess.get_inputs() if i.name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    ]
    rows = inputs["input_ids"].shape[0]
    chunks = []
    for start in range(0, rows, batch_size):
        feeds = graph_feeds({k: v[start : start + batch_size] for k, v in inputs.items()}, names)
        chunks.append(torch.from_numpy(runtime.run(sess, feeds, lora)[0]))
    worst = max(r["max_abs"] for r in report["verify"]["rows"])
    return OnnxRun(torch.cat(chunks), bool(report["verify"]["ok"]), worst)


def graph_feeds(inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """int64 feeds for the graph's ``names``: given ones as they are, a missing mask all ones,
    token types zero and positions 0..n-1 (what the PyTorch forward assumes when they are left out)."""
    ids = inputs["input_ids"]
    defaults = {
        "attention_mask": lambda: torch.ones_like(ids),
        "token_type_ids": lambda: torch.zeros_like(ids),
        "position_ids": lambda: torch.arange(ids.shape[1]).expand_as(ids),
    }
    return {n: (inputs[n] if n in inputs else defaults[n]()).long().numpy() for n in names}


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

    ``--fast`` picks the ``fast`` settings (for tests); ``--skip`` leaves out optional steps.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(default_out), help="folder for results and adapters")
    parser.add_argument("--fast", action="store_true", help="short run, for tests")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=skippable, help="leave out slow steps (their columns read 'skipped')"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads [the settings' own, 2, with which the README's numbers were made; "
        "another count may change float sums in the last digits]",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    settings = fast if args.fast else full
    if args.threads is not None:
        settings = dataclasses.replace(settings, threads=args.threads)
    results = run(settings, args.out, set(args.skip))
    write_json(results, args.out / "results.json")  # no timings inside: a rerun is identical
    print(render(results))
    print(f"\nwrote {args.out / 'results.json'} in {time.monotonic() - started:.0f} s")
    return results
