"""``shareport demo``: the whole job on built-in material, in a couple of minutes on a CPU.

1. build a small Llama and a BPE tokenizer, pretrained briefly on a general corpus
   (no downloads, fixed seeds);
2. train a real LoRA that adapts it to a domain corpus (``shareport train --form lora``);
3. convert it to ASLoRA (``shareport convert --to aslora``);
4. recover the ASLoRA by distillation toward the LoRA (``shareport finetune``);
5. export ONNX graphs, folded and adapter-preserving, and verify them against PyTorch
   (``shareport export``, which verifies by default).

Each step is the one library call its command makes (``shareport.flows``), so the demo
exercises exactly what a user runs; progress bars go to stderr and the reports are
collected into one table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .. import flows
from ..export.exporter import ExportOptions
from ..files.atomic import atomic_dir
from ..plots import has_matplotlib
from ..train.jobs import TrainingOptions
from .assets import build_base, corpus

# Sized to finish in about two minutes on two CPU cores.
TRAIN_STEPS = 50
RECOVER_STEPS = 60
BATCH, LENGTH = 8, 32
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
RANK = 8


def _recipe(steps: int) -> TrainingOptions:
    # Not finetune's defaults (300 steps at lr 3e-3): the demo trains its LoRA and recovers in 50-60 steps
    # to stay quick, and so short a run does more at a larger lr. The README's worked example recovers
    # with the defaults.
    return TrainingOptions(steps=steps, lr=1e-2, batch_size=BATCH, max_length=LENGTH)


def step(title: str) -> None:
    click.echo(f"== {title}", err=True)


def run_demo(out: Path, export: bool = True, overwrite: bool = False) -> dict:
    """Run every step into ``out`` with the output rules of every command: the folder appears
    complete at the end (or not at all), and an existing one is replaced only with
    ``overwrite`` and only if shareport wrote it. Returns the collected reports."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shareport's own bars say what is happening
    with atomic_dir(out, overwrite=overwrite) as tmp:
        reports = _steps(tmp, export)
        record_final_paths(tmp, Path(out).resolve())
    # the steps ran in the temporary folder that became ``out``: report the final paths
    return json.loads(json.dumps(reports).replace(str(tmp), str(Path(out).resolve())))


def record_final_paths(tmp: Path, final: Path) -> None:
    """The steps wrote in the temporary folder, recording paths under ``tmp`` (the adapters' base,
    their reports' inputs), which are gone once ``tmp`` is renamed to ``final``: record the paths
    under ``final`` instead (what ``inspect`` shows and converted adapters carry on)."""
    old, new = (json.dumps(str(p))[1:-1] for p in (tmp, final))  # as JSON spells them
    for path in sorted(tmp.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        fixed = re.sub(re.escape(old) + r'(?=["/\\])', lambda _: new, text)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")


def _steps(out: Path, export: bool) -> dict:
    data = out / "domain.txt"
    data.write_text("\n".join(corpus(domain=True, seed=1)) + "\n", encoding="utf-8")
    base = out / "base"
    step("building a small Llama and a tokenizer, pretrained briefly on a general corpus")
    build_base(base, corpus(), layers=8, hidden=64)
    reports: dict = {}
    step("training a LoRA that adapts it to a domain corpus")
    reports["train"] = flows.train(
        "lora", str(base), TARGETS, RANK, str(data), str(out / "lora"), alpha=2.0 * RANK, options=_recipe(TRAIN_STEPS)
    )
    step("converting the LoRA to ASLoRA")
    figure = str(out / "aslora.png") if has_matplotlib() else None
    reports["convert"] = flows.convert(str(out / "lora"), "aslora", str(out / "aslora"), plot=figure, progress=False)
    step("recovering the ASLoRA by distillation toward the LoRA")
    reports["finetune"] = flows.recover(
        str(out / "aslora"),
        str(base),
        str(out / "lora"),
        str(data),
        str(out / "aslora-recovered"),
        options=_recipe(RECOVER_STEPS),
    )
    if export:
        for mode in ("folded", "adapter"):
            step(f"exporting ONNX ({mode}) and verifying it against PyTorch")
            reports[f"export_{mode}"] = flows.export(
                str(out / "aslora-recovered"), str(base), str(out / f"onnx-{mode}"), ExportOptions(mode=mode)
            )
            reports[f"export_{mode}"]["latency_ms"] = ort_latency_ms(out / f"onnx-{mode}")
    return reports


def ort_latency_ms(graph_dir: Path, batch: int = 1, seq: int = 32, rounds: int = 10) -> float:
    """Median forward time of an exported graph in ONNX Runtime, its own adapter active."""
    import statistics
    import time

    from ..export import graph_file, runtime
    from ..export.ort_adapter import read_onnx_adapter
    from ..export.signature import Signature, make_inputs

    proto = graph_file.load_proto(graph_dir)
    sig = Signature.from_dict(graph_file.read_info(proto, graph_dir)["signature"])
    feeds = {k: v.numpy() for k, v in make_inputs(sig, batch, seq).items()}
    adapter_file = Path(graph_dir) / graph_file.ADAPTER_NAME
    lora = runtime.load_lora(read_onnx_adapter(adapter_file)) if adapter_file.exists() else None
    sess = runtime.session(Path(graph_dir) / graph_file.GRAPH_NAME)
    runtime.run(sess, feeds, lora)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runtime.run(sess, feeds, lora)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def summary_rows(reports: dict) -> list[tuple[str, str]]:
    conv, ft = reports["convert"], reports["finetune"]
    before, after = ft["before"], ft["after"]
    rows = [
        ("LoRA parameters", f"{conv['parameters_before']:,}"),
        ("ASLoRA parameters", f"{conv['parameters_after']:,} ({conv['ratio']:.1%} of the LoRA)"),
        ("ASLoRA groups per kind", ", ".join(f"{k['kind']}={len(k['groups'])}" for k in conv["kinds"])),
        (
            "relative error of the projection",
            ", ".join(f"{k['kind']}={k['relative_error']:.3f}" for k in conv["kinds"]),
        ),
        ("KL to the LoRA: converted -> recovered", f"{before['kl']:.4g} -> {after['kl']:.4g}"),
        ("top-1 agreement: converted -> recovered", f"{before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}"),
    ]
    for mode in ("folded", "adapter"):
        rep = reports.get(f"export_{mode}")
        if rep:
            worst = max(r["max_abs"] for r in rep["verify"]["rows"])
            verdict = "within" if rep["verify"]["ok"] else "ABOVE"
            rows.append((f"ONNX {mode}: max |ORT - PyTorch|", f"{worst:.2e} ({verdict} {rep['verify']['tolerance']})"))
            rows.append((f"ONNX {mode}: ORT latency, batch 1 x 32 tokens", f"{rep['latency_ms']:.2f} ms"))
    return rows
