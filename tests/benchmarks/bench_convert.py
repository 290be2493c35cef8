"""Convert a LLaMA-7B-shaped LoRA to every shared form; compare with load+save and a dense SVD.

Input: 32 layers, r=16, q/k/v/o (4096x4096), gate/up (11008x4096), down (4096x11008), random
factors, written as a PEFT LoRA. For each form the whole job (read, convert, write) runs in a
fresh subprocess, so its peak memory (VmHWM) above the interpreter's baseline can be read off.
One kind (q_proj) is also projected by a dense SVD of the stacked updates, the way per-module
tools do it, and the errors are compared. Last line: the speed-up over dense.

    python3 -m tests.benchmarks.bench_convert            # full size (the dense SVD takes minutes)
    python3 -m tests.benchmarks.bench_convert --layers 8 # smaller, for a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the -c children run here: this checkout's packages

SHAPES = {  # kind -> (n_out, n_in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def make_lora(folder: Path, layers: int, r: int) -> None:
    import torch

    from shareport.adapter import Adapter
    from shareport.files.adapters import save_adapter

    gen = torch.Generator().manual_seed(0)
    factors = {}
    for i in range(layers):
        for kind, (n_out, n_in) in SHAPES.items():
            # correlated across layers, as trained LoRAs are: a common part plus a per-layer part
            factors[f"model.layers.{i}.{kind}"] = (
                torch.randn(r, n_in, generator=gen) / n_in**0.5,
                torch.randn(n_out, r, generator=gen) / r**0.5,
                2.0,
            )
    save_adapter(Adapter.from_factors(factors, task_type="CAUSAL_LM"), folder, as_peft=True)


CHILD = r"""
import json, sys, time
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
    return 0
import torch, converters, shareport.files, shareport.convert  # the interpreter's baseline
base = hwm()
src, dst, form, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
adapter = shareport.files.load_adapter(src)
t1 = time.perf_counter()
if form != 'none':
    adapter, _ = shareport.convert.convert_adapter(adapter, form)
t2 = time.perf_counter()
shareport.files.save_adapter(adapter, dst)
t3 = time.perf_counter()
print(json.dumps({'load': t1 - t0, 'convert': t2 - t1, 'save': t3 - t2, 'total': t3 - t0,
                  'peak_above_baseline': hwm() - base}))
"""


def run_child(src: Path, dst: Path, form: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), form, str(threads)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_vs_factored(src: Path, kind: str, r: int) -> dict:
    """ShareA of one kind: the factored projection against a dense SVD of the stacked updates."""
    import torch

    import converters
    from shareport.convert import kind_factors
    from shareport.files.adapters import load_adapter

    adapter = load_adapter(src)
    As, Bts = kind_factors(adapter, adapter.kinds()[kind])
    t0 = time.perf_counter()
    result = converters.convert_kind("sharea", As, Bts, r)
    factored = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack = torch.cat([bt @ a for a, bt in zip(As, Bts)])  # (L*n_out, n_in), what dense tools build
    s = torch.linalg.svdvals(stack.double() if stack.shape[0] * stack.shape[1] < 2**28 else stack)
    s = s.double()
    dense_error = float((s[r:] ** 2).sum())
    dense = time.perf_counter() - t0
    return {"factored_s": factored, "dense_s": dense, "factored_error": result.error, "dense_error": dense_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every job (1: stable on a shared machine, where two "
        "threads with one busy core can run many times slower)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="shareport-bench-"))
    src = work / "lora"
    make_lora(src, args.layers, args.rank)
    size = (src / "adapter_model.safetensors").stat().st_size
    print(f"LoRA: {args.layers} layers, r={args.rank}, {size / 2**20:.0f} MiB; torch threads: {args.threads}")

    rows = [("load+save only", run_child(src, work / "plain", "none", args.threads))]
    for form in ("sharea", "shareb", "shareab", "aslora"):
        rows.append((form, run_child(src, work / form, form, args.threads)))
    print(f"{'job':<16}{'load s':>9}{'convert s':>11}{'save s':>9}{'total s':>9}{'x load+save':>13}{'peak/size':>11}")
    base_total = rows[0][1]["total"]
    for name, t in rows:
        print(
            f"{name:<16}{t['load']:>9.2f}{t['convert']:>11.2f}{t['save']:>9.2f}{t['total']:>9.2f}"
            f"{t['total'] / base_total:>13.2f}{t['peak_above_baseline'] / size:>11.2f}"
        )

    d = dense_vs_factored(src, "self_attn.q_proj", args.rank)
    print(f"\nShareA of self_attn.q_proj at rank {args.rank}:")
    print(f"{'method':<12}{'seconds':>10}{'error':>16}")
    print(f"{'factored':<12}{d['factored_s']:>10.3f}{d['factored_error']:>16.6g}")
    print(f"{'dense SVD':<12}{d['dense_s']:>10.3f}{d['dense_error']:>16.6g}")
    rel = abs(d["factored_error"] - d["dense_error"]) / max(d["dense_error"], 1e-30)
    print(f"relative error difference: {rel:.2e}")
    print(f"aslora_over_load_save: {rows[-1][1]['total'] / base_total:.2f}")
    print(f"speedup_over_dense: {d['dense_s'] / d['factored_s']:.0f}")


if __name__ == "__main__":
    main()
