"""onnxruntime-genai greedy decode on CPU: folded export vs adapter mode with the adapter active.

Not collected by pytest. Run: ``python3 -m tests.benchmarks.bench_genai_decode
[--threads N] [--rounds N] [--hidden H --layers L --heads N --intermediate I --rank R]``.

A Llama-shaped model from a config (default hidden 256, 4 layers, 4 heads, intermediate 688,
vocab 2000, random weights) with a real PEFT LoRA (default r=8 on q, k, v, o), exported
``--with-past`` folded and ``--mode adapter``. Both folders run through ``og.Model`` with intra-op
threads pinned by a config overlay (``session_options.intra_op_num_threads``); the adapter-mode
one loads its ``.onnx_adapter`` into ``og.Adapters`` and makes it active per generator. Each
round decodes 64 new tokens after a 16-token prompt, batch 1, folded and adapter back to back, so
machine noise hits both alike. ms/token is the median over rounds of each round's median step
(robust to steps preempted on a shared machine; the mean step is shown beside it). CPU ms/token
is the same median of the calling thread's CPU time per step: with ``--threads 1`` ORT runs every
kernel on that thread, so it is the step's work without the time the process sat preempted (the
steadier number on a loaded machine). Then: the nodes one decode step runs in each graph as ORT
optimises it, and the extra CPU per token against a graph holding only the adapter's sites. The
last lines are the ratios, adapter over folded (target: <= 1.05).

What the adapter costs, and why (2 shared cores under load from other work, ``--threads 1``):
adapter mode runs exactly 3 more nodes per site (MatMul x@A_g, MatMul @B_g, Add), 48 for 16
sites, on top of 300; ORT fuses none of them and changes nothing else (same node counts per type
otherwise; the two genai configs are identical; og.Adapters hands ORT CPU-backed tensors, bound,
not copied). The extra has two parts: the adapter's own multiply-adds (its share of the
model's, 1.8% / 0.5% / 0.25% at hidden 256 / 1024 / 2048: the FLOP ratio) and a fixed cost of
the 48 nodes that does not grow with the model (a graph holding only the 16 sites measures
46-56 us/token at hidden 256-1024, about 1 us per node: kernel dispatch and a tiny GEMM's setup).
So the ratio falls with size toward the FLOP ratio:

    hidden   params   CPU ratio  wall ratio  FLOP ratio  extra CPU/token   folded CPU/token
    256       4.2M    1.032      1.026       1.018        84 us             2.60 ms
    1024     54.7M    1.006      0.972       1.005       136 us            23.5 ms
    2048    210.6M    0.994      0.988       1.0025      below the noise   78.0 ms

At hidden 256 the 84 us lies between the sites-only graph (46-50 us, their arithmetic included)
and that plus the FLOP share of the folded step (1.8% of 2.60 ms = 47 us); the noise allows no
finer split. Two more runs there gave CPU 1.032 (wall 1.013) and, with a scratch copy of the same
loop, 1.125. At hidden 2048 the greedy tokens of the two differ: random weights give near-tied
logits that fp32 rounding of folded vs unfolded weights can flip, so that line is no check of
the adapter there. The 1.30 measured before was ``--threads 2`` on the loaded 2-core machine,
where a step is mostly the thread pool waiting on preempted threads (17.6 ms/token at 2 threads
against 6.6 at 1 thread, same machine, same quarter hour) and the ratio swings with the load:
the default command measured 1.043 on rerun.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shareport.cli.table import format_table
from tests.benchmarks.genai_common import (
    GenaiDecoder,
    add_llama_arguments,
    export_both,
    interleaved_decode,
    llama_from_args,
    make_base_and_lora,
)

PROMPT = [5 + 7 * i for i in range(16)]
NEW_TOKENS = 64
VOCAB = 2000


def ort_node_counts(model_path: Path) -> collections.Counter:
    """Nodes by op type of the graph ORT runs (CPU, ORT_ENABLE_ALL, genai's default): one decode step runs each once."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(model_path.with_name("ort_optimized.onnx"))
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return collections.Counter(node.op_type for node in graph.node)


def site_chain_us(sites: int, hidden: int, rank: int, threads: int, reps: int = 2000) -> float:
    """CPU microseconds per run of a graph holding only ``sites`` adapter sites as the export has
    them for one decode token (x [1, 1, hidden] @ A [hidden, rank] @ B [rank, hidden], + an Add,
    A and B graph inputs), minus an empty graph's run: the adapter's cost with everything else removed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(n: int):
        nodes, inputs, prev = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, hidden])], "x"
        for i in range(n):
            inputs += [
                helper.make_tensor_value_info(f"A{i}", TensorProto.FLOAT, [hidden, rank]),
                helper.make_tensor_value_info(f"B{i}", TensorProto.FLOAT, [rank, hidden]),
            ]
            nodes += [
                helper.make_node("MatMul", ["x", f"A{i}"], [f"xa{i}"]),
                helper.make_node("MatMul", [f"xa{i}", f"B{i}"], [f"d{i}"]),
                helper.make_node("Add", [prev, f"d{i}"], [f"y{i}"]),
            ]
            prev = f"y{i}"
        nodes.append(helper.make_node("Identity", [prev], ["out"]))
        graph = helper.make_graph(
            nodes, "sites", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        values = {"x": rng.standard_normal((1, 1, hidden), dtype=np.float32)}
        for i in range(n):
            values[f"A{i}"] = rng.standard_normal((hidden, rank), dtype=np.float32)
            values[f"B{i}"] = rng.standard_normal((rank, hidden), dtype=np.float32)
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()}
        binding = sess.io_binding()  # bound once, as genai binds its OrtValues: no per-run conversion
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("out", "cpu")
        return sess, binding, values  # the values must outlive the binding

    runs = {n: session(n) for n in (0, sites)}
    cpu = {n: [] for n in runs}
    for rep in range(reps + 100):  # interleaved; the first 100 warm up
        for n, (sess, binding, _) in runs.items():
            start = time.thread_time()
            sess.run_with_iobinding(binding)
            if rep >= 100:
                cpu[n].append(time.thread_time() - start)
    return (statistics.median(cpu[sites]) - statistics.median(cpu[0])) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: a pool of 2 on a shared 2-core machine waits on preempted threads and swings the ratio)",
    )
    parser.add_argument("--rounds", type=int, default=40)
    add_llama_arguments(parser)
    args = parser.parse_args()

    def bench_model():
        return llama_from_args(args, VOCAB)

    with tempfile.TemporaryDirectory(prefix="bench-genai-") as tmp:
        tmp = Path(tmp)
        base, lora = make_base_and_lora(tmp, bench_model, r=args.rank)
        folders = export_both(tmp, base, lora, with_past=True)
        n_params = sum(p.numel() for p in bench_model().parameters())
        decoders = {
            "genai folded": GenaiDecoder(folders["folded"], args.threads),
            "genai adapter mode (active)": GenaiDecoder(folders["adapter"], args.threads, adapter=True),
        }
        stats = interleaved_decode(decoders, PROMPT, NEW_TOKENS, args.rounds)
        nodes = {mode: ort_node_counts(folder / "model.onnx") for mode, folder in folders.items()}
    sites = args.layers * 4  # q, k, v, o
    chain_us = site_chain_us(sites, args.hidden, args.rank, args.threads)

    folded = stats["genai folded"]["median_ms_per_token"]
    folded_cpu = stats["genai folded"]["cpu_ms_per_token"]
    rows = [
        (
            name,
            round(s["prefill_ms"], 2),
            round(s["median_ms_per_token"], 3),
            round(s["mean_ms_per_token"], 3),
            round(s["median_ms_per_token"] / folded, 3),
            round(s["cpu_ms_per_token"], 3),
            round(s["cpu_ms_per_token"] / folded_cpu, 3),
        )
        for name, s in stats.items()
    ]
    print(
        f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
        f"{args.intermediate}, {n_params / 1e6:.1f}M parameters, LoRA r={args.rank} on q,k,v,o, fp32, batch 1, "
        f"prompt {len(PROMPT)} + {NEW_TOKENS} new tokens, onnxruntime-genai on cpu, "
        f"{args.threads} intra-op threads, {args.rounds} rounds"
    )
    print(
        format_table(
            [
                "engine",
                "median prefill ms",
                "median ms/token",
                "mean ms/token",
                "median / folded",
                "CPU ms/token",
                "CPU / folded",
            ],
            rows,
        )
    )
    same = stats["genai adapter mode (active)"]["tokens"] == stats["genai folded"]["tokens"]
    print(f"adapter mode's greedy tokens equal folded's (adapter really active): {same}")
    adapter = stats["genai adapter mode (active)"]
    extra = nodes["adapter"] - nodes["folded"]
    print(
        f"nodes per decode step (ORT-optimized graph): folded {nodes['folded'].total()}, adapter "
        f"{nodes['adapter'].total()} (+{extra.total()}: {dict(sorted(extra.items()))}, {sites} sites; "
        f"removed: {dict(nodes['folded'] - nodes['adapter']) or 'none'})"
    )
    measured = (adapter["cpu_ms_per_token"] - folded_cpu) * 1000
    print(
        f"extra CPU per token: measured {measured:.0f} us; the {sites} sites alone in a graph of their own "
        f"{chain_us:.0f} us ({chain_us / max(extra.total(), 1):.2f} us per extra node)"
    )
    print(f"adapter_over_folded_decode {adapter['median_ms_per_token'] / folded:.3f}")
    if args.threads == 1:  # ORT then runs every kernel on the calling thread: its CPU time is the step's work
        print(f"adapter_over_folded_decode_cpu {adapter['cpu_ms_per_token'] / folded_cpu:.3f}")


if __name__ == "__main__":
    main()
