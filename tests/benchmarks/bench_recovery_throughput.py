"""Recovery throughput before and after the throughput changes, same machine, one run (not collected by pytest).

    python3 -m tests.benchmarks.bench_recovery_throughput [--steps 30] [--rounds 3]

A Llama-shaped base from a config (hidden 256, 4 layers, 4 heads, vocab 4000, ~5M parameters, random
weights), a PEFT LoRA (r=8 on q, k, v, o) converted to ShareA, distilled toward the LoRA with
batch 8, examples of 16 to 128 tokens (max_length 128). "before": the loop as it was
(``old_loop.py``: foreach AdamW, loss and token count read back every step); "after": the library's
(fused AdamW, read back every ``SYNC_EVERY`` steps); "after+pack": "after" with ``pack=True`` (``--pack``:
several examples per row, so fewer padded positions). The three alternate ``--rounds`` times on
one job (the base loaded once); tokens/s (real tokens, padding not counted) is the median of each
(``--profile``: the top ops of a 2-step run, evaluations included). Also prints the run's own MFU
fields (None on a CPU: no peak in the table). Last lines: ``pack_over_after`` and
``after_over_before``. bf16 weights and autocast apply on CUDA only; SDPA attention is
transformers' default for these models already.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import torch

from tests.benchmarks.genai_common import llama, make_base_and_lora

VOCAB = 4000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile a 2-step run: the top ops by CPU time")
    args = parser.parse_args()

    from shareport import flows
    from shareport.train.data import save_tokenized
    from shareport.train.jobs import recovery_job
    from shareport.train.recipe import Recipe, run

    tmp = Path(tempfile.mkdtemp(prefix="shareport-throughput-"))
    base, lora = make_base_and_lora(
        tmp, lambda: llama(vocab=VOCAB, hidden=256, layers=4, heads=4, intermediate=688, context=256)
    )
    gen = torch.Generator().manual_seed(0)
    rows = 8 * (args.steps + 4)
    # lengths 16..128, as text lines of varied length tokenize: what packing (--pack) is for
    lengths = torch.randint(16, 129, (rows,), generator=gen).tolist()
    save_tokenized(tmp / "data", [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths])
    flows.convert(str(lora), "sharea", str(tmp / "sharea"), progress=False)
    job = recovery_job(tmp / "sharea", base, lora, data_path=tmp / "data", max_length=128, eval_fraction=0.02)
    job.progress = False
    from tests.benchmarks.old_loop import old_loop

    variants = {
        "before": ({}, old_loop),
        "after": ({}, contextlib.nullcontext),
        "after+pack": (dict(pack=True), contextlib.nullcontext),
    }
    rates = {name: [] for name in variants}
    last = {}
    for _ in range(args.rounds):
        for name, (knobs, loop) in variants.items():
            with loop():
                _, report = run(job, Recipe(steps=args.steps, lr=1e-3, batch_size=8, **knobs))
            rates[name].append(report["timings"]["tokens_per_second"])
            last[name] = report["timings"]
    print(
        f"threads {torch.get_num_threads()}, device {last['after']['device_name']}, "
        f"{last['after']['flops_per_token'] / 6:,.0f} base parameters, {args.steps} steps x 8 examples of 16-128 tokens"
    )
    for name in variants:
        t = last[name]
        print(
            f"{name:<7} tokens/s median {statistics.median(rates[name]):>9,.0f}  (rounds: "
            f"{', '.join(f'{r:,.0f}' for r in rates[name])})  achieved {t['achieved_flops'] / 1e9:.1f} GFLOP/s"
            f"  MFU {t['mfu']}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(job, Recipe(steps=2, lr=1e-3, batch_size=8))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"pack_over_after: {statistics.median(rates['after+pack']) / statistics.median(rates['after']):.3f}")
    print(f"after_over_before: {statistics.median(rates['after']) / statistics.median(rates['before']):.3f}")


if __name__ == "__main__":
    main()
