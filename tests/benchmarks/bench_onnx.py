"""Forward latency: PyTorch eager vs ONNX Runtime folded vs ONNX Runtime adapter mode.

Not collected by pytest. Run: ``python3 -m tests.benchmarks.bench_onnx [--threads N] [--repeats N]``.

A Llama-like model (~33M parameters, random weights) with a LoRA (r=16 on q, k, v, o); batch 1
and 8 at sequence length 128, all engines in the same run and interleaved round by round, so
machine noise hits them alike. Median and minimum per engine are reported, with both ratios to
ORT folded; the last line uses the medians (the minimum of a bimodal engine, seen for ORT at
batch 1, flatters one side). The adapter-mode graph runs with the adapter active through
``RunOptions`` (the way a server swaps adapters). The last line is the worst adapter/folded
latency ratio over the batch sizes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shareport.cli.table import format_table  # noqa: E402
from shareport.export import graph_file, runtime  # noqa: E402
from shareport.export.exporter import ExportOptions, export  # noqa: E402
from shareport.export.ort_adapter import read_onnx_adapter  # noqa: E402
from shareport.export.signature import make_inputs, signature_for  # noqa: E402
from shareport.files.adapters import load_adapter  # noqa: E402
from shareport.model import attach, fold, load_base_model  # noqa: E402
from tests.tiny import make_peft_adapter  # noqa: E402

SEQ = 128
BATCHES = (1, 8)
ORT_PER_ROUND = 4


def bench_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def timed(fn) -> float:
    # ONNX Runtime's pool threads spin for a while after a run; without a pause the next
    # engine (torch, first in each round) would share the cores with them and look slow.
    time.sleep(0.05)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        tmp = Path(tmp)
        bench_model().save_pretrained(tmp / "base")
        make_peft_adapter(
            bench_model(),
            tmp / "lora",
            seed=1,
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        adapter = load_adapter(tmp / "lora")
        checks = []  # export verifies each graph before publishing it (against float64 PyTorch)
        for mode in ("folded", "adapter"):
            report = export(tmp / "lora", tmp / "base", tmp / mode, ExportOptions(mode=mode)).report
            worst = max(report.rows, key=lambda r: r.max_abs / r.limit)
            checks.append(
                f"verify {mode}: {'ok' if report.ok else 'FAIL'}, worst {worst.check} {worst.case}: ORT vs "
                f"float64 PyTorch {worst.max_abs:.2g}, allowed {worst.limit:.2g} (float32 PyTorch's own "
                f"error {worst.reference_error:.2g}); {report.tolerance}"
            )

        folded_torch = fold(load_base_model(tmp / "base"), adapter)
        attached_torch = load_base_model(tmp / "base")
        attach(attached_torch, adapter)
        n_params = sum(p.numel() for p in folded_torch.parameters())
        sig = signature_for(folded_torch, with_past=False)
        folded_ort = runtime.session(tmp / "folded" / graph_file.GRAPH_NAME, threads=args.threads)
        adapter_ort = runtime.session(tmp / "adapter" / graph_file.GRAPH_NAME, threads=args.threads)
        lora = runtime.load_lora(read_onnx_adapter(tmp / "adapter" / graph_file.ADAPTER_NAME))

        rows, ratios = [], []
        for batch in BATCHES:
            inputs = make_inputs(sig, batch, SEQ, vocab=8000)
            feeds = {n: t.numpy() for n, t in inputs.items()}

            def torch_run(model):
                with torch.no_grad():
                    model(**inputs, use_cache=False)

            torch_engines = {
                "torch eager (folded)": lambda: torch_run(folded_torch),
                "torch eager (LoRA attached)": lambda: torch_run(attached_torch),
            }
            ort_engines = {
                "ORT folded": lambda: runtime.run(folded_ort, feeds),
                "ORT adapter mode (active)": lambda: runtime.run(adapter_ort, feeds, lora),
            }
            times = {name: [] for name in (*torch_engines, *ort_engines)}
            for fn in (*torch_engines.values(), *ort_engines.values()):  # warm-up
                fn()
            for _ in range(args.repeats):
                for name, fn in torch_engines.items():
                    times[name].append(timed(fn))
                # ORT runs are cheap: more of them, folded and adapter back to back, so the
                # ratio the targets are about sees the same machine load on both sides
                for _ in range(ORT_PER_ROUND):
                    for name, fn in ort_engines.items():
                        times[name].append(timed(fn))
            best = {name: min(t) * 1000 for name, t in times.items()}
            medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
            for name in times:
                rows.append(
                    (
                        batch,
                        SEQ,
                        name,
                        round(medians[name], 1),
                        round(best[name], 1),
                        round(medians[name] / medians["ORT folded"], 2),
                        round(best[name] / best["ORT folded"], 2),
                    )
                )
            ratios.append(medians["ORT adapter mode (active)"] / medians["ORT folded"])

    print(
        f"Llama-like, {n_params / 1e6:.1f}M parameters, LoRA r=16 on q,k,v,o, fp32, "
        f"{args.threads} threads, ORT on {runtime.device_name()}, {args.repeats} rounds"
    )
    print(
        format_table(["batch", "seq", "engine", "median ms", "min ms", "median / ORT folded", "min / ORT folded"], rows)
    )
    print("\n".join(checks))
    print(f"adapter_over_folded: {max(ratios):.3f}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
