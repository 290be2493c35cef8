"""Peak memory of `convert` on a LLaMA-7B-shaped LoRA, whole job and per kind (not collected by pytest).

    python3 -m tests.benchmarks.bench_convert_memory [--layers 32] [--rank 16] \
        [--dtype fp32|fp16] [--forms sharea,aslora,lora] [--estimate-70b]

Writes a PEFT LoRA (bench_convert.py's shapes and factors: 7 kinds, q/k/v/o 4096x4096,
gate/up 11008x4096, down 4096x11008; fp32 as PEFT stores trained adapters, or fp16) to a temp
folder and runs ``shareport.flows.convert`` on it in a fresh subprocess per form (the code the CLI
runs: read, digest, convert, write). The child reads its peak resident set (VmHWM, anonymous and
file-backed pages alike) after importing torch and shareport (the baseline) and at the end, and
resets the peak before each kind (``/proc/self/clear_refs`` 5), so the per-kind peaks above what
was resident when the kind began are measured too. Prints peak above baseline / adapter size per
form, and with ``--estimate-70b`` the estimate for a 70B-shaped LoRA (80 layers, r=64, hidden 8192,
intermediate 28672, k/v 1024 wide) from the measured per-kind figures: each kind's extra peak
scales with the kind's bytes (factor measured here), on top of what was resident before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks import bench_convert
from tests.benchmarks.bench_convert import ROOT, SHAPES, make_lora

SHAPES_70B = {
    "self_attn.q_proj": (8192, 8192),
    "self_attn.k_proj": (1024, 8192),
    "self_attn.v_proj": (1024, 8192),
    "self_attn.o_proj": (8192, 8192),
    "mlp.gate_proj": (28672, 8192),
    "mlp.up_proj": (28672, 8192),
    "mlp.down_proj": (8192, 28672),
}

CHILD = r"""
import json, sys
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0
def reset_peak():
    with open('/proc/self/clear_refs', 'w') as fh:
        fh.write('5')
import torch, converters, shareport.flows  # the interpreter's baseline
torch.set_num_threads(1)
src, dst, form = sys.argv[1:4]
reset_peak()
base = status('VmHWM')
kinds, current, phases = [], {}, []
def tick(name):  # called after each kind is converted: its peak, above what was resident at its start
    global current
    peak = status('VmHWM')
    phases.append(peak - base)  # before the first kind: reading and checking the input
    if current:
        kinds.append({'kind': name, 'start': current['start'] - base, 'peak': peak - base})
    reset_peak()
    current = {'start': status('VmRSS')}
import shareport.flows as flows
class Progress:  # flows.convert's progress hook: the same per-kind callback the CLI's bar uses
    def __init__(self, total, enabled):
        pass
    def __enter__(self):
        tick(None)
        return tick
    def __exit__(self, *exc):
        return False
flows.adapters._kind_progress = Progress
options = {'aslora': {'rank': 16}, 'lora': {'rank': 8}}.get(form, {})
data = flows.convert(src, form, dst, progress=False, **options)
phases.append(status('VmHWM') - base)  # after the last kind: writing the output
print(json.dumps({'peak': max(phases), 'load': phases[0], 'save': phases[-1], 'kinds': kinds}))
"""


def run_child(src: Path, dst: Path, form: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), form],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def kind_bytes(shapes: dict, layers: int, rank: int, itemsize: int) -> dict:
    return {k: layers * rank * (n_out + n_in) * itemsize for k, (n_out, n_in) in shapes.items()}


def estimate(result: dict, size: int, layers: int, rank: int, itemsize: int) -> tuple[float, float]:
    """(peak bytes, peak / adapter bytes) for the 70B shape: per kind, what was resident at its start
    (scaled by the adapter's size) plus its extra peak (scaled by the kind's size)."""
    here = kind_bytes(SHAPES, layers, rank, itemsize)
    there = kind_bytes(SHAPES_70B, 80, 64, itemsize)
    big = sum(there.values())
    worst = 0.0
    for k in result["kinds"]:
        start = k["start"] / size * big
        extra = (k["peak"] - k["start"]) / here[k["kind"]] * there[k["kind"]]
        worst = max(worst, start + extra)
    return worst, worst / big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--forms", default="sharea,aslora,lora")
    parser.add_argument("--estimate-70b", action="store_true")
    parser.add_argument(
        "--shape",
        choices=("7b", "70b"),
        default="7b",
        help="70b: the 70B shapes (use with --layers 80 --rank 64 to run the real size)",
    )
    args = parser.parse_args()
    shapes = SHAPES if args.shape == "7b" else SHAPES_70B
    bench_convert.SHAPES = shapes  # make_lora's shapes
    import torch

    from shareport.adapter import Adapter
    from shareport.files.adapters import load_adapter, save_adapter

    work = Path(tempfile.mkdtemp(prefix="shareport-mem-"))
    src = work / "input"
    make_lora(src, args.layers, args.rank)
    if args.dtype == "fp16":
        adapter = load_adapter(src)
        half = {
            p: (adapter.tensors[s.a].half(), adapter.tensors[s.b].half(), s.scale) for p, s in adapter.sites.items()
        }
        save_adapter(Adapter.from_factors(half, task_type="CAUSAL_LM"), src, as_peft=True, overwrite=True)
        del adapter, half
    size = (src / "adapter_model.safetensors").stat().st_size
    itemsize = 4 if args.dtype == "fp32" else 2
    print(
        f"LoRA ({args.shape} shapes): {args.layers} layers, r={args.rank}, {args.dtype}, {size / 2**20:.1f} MiB, torch threads 1"
    )
    print(
        f"{'form':<8}{'peak MiB':>10}{'peak/size':>11}{'read/size':>11}{'write/size':>12}"
        f"{'worst kind (extra/kind bytes)':>32}"
    )
    results = {}
    for form in args.forms.split(","):
        res = run_child(src, work / form, form)
        here = kind_bytes(shapes, args.layers, args.rank, itemsize)
        worst = max(res["kinds"], key=lambda k: (k["peak"] - k["start"]) / here[k["kind"]])
        factor = (worst["peak"] - worst["start"]) / here[worst["kind"]]
        print(
            f"{form:<8}{res['peak'] / 2**20:>10.1f}{res['peak'] / size:>11.2f}{res['load'] / size:>11.2f}"
            f"{res['save'] / size:>12.2f}{worst['kind']:>24} {factor:>6.2f}"
        )
        results[form] = res
    print(f"peak_over_size: {max(r['peak'] for r in results.values()) / size:.2f}")
    if args.estimate_70b:
        for form, res in results.items():
            peak, ratio = estimate(res, size, args.layers, args.rank, itemsize)
            big = sum(kind_bytes(SHAPES_70B, 80, 64, itemsize).values())
            print(
                f"70B-shaped ({form}, 80 layers, r=64, {args.dtype}, {big / 2**30:.2f} GiB): estimated peak "
                f"{peak / 2**30:.2f} GiB above baseline ({ratio:.2f}x the adapter)"
            )
    del torch


if __name__ == "__main__":
    main()
