"""onnxruntime-genai greedy decode on CPU: folded export vs adapter mode with the adapter active.

Not collected by pytest. Run: ``PYTHONPATH=$PWD python3 tests/benchmarks/bench_genai_decode.py
[--threads N] [--rounds N]``.

A Llama-shaped model from a config (hidden 256, 4 layers, 4 heads, vocab 2000, random weights)
with a real PEFT LoRA (r=8 on q, k, v, o), exported ``--with-past`` folded and ``--mode adapter``.
Both folders run through ``og.Model`` with intra-op threads pinned by a config overlay
(``session_options.intra_op_num_threads``); the adapter-mode one loads its ``.onnx_adapter`` into
``og.Adapters`` and makes it active per generator. Each round decodes 64 new tokens after a
16-token prompt, batch 1, folded and adapter back to back, so machine noise hits both alike.
ms/token is the median over rounds of each round's median step (robust to steps preempted on a
shared machine; the mean step is shown beside it). The last line is the ratio of median
ms/token, adapter over folded (target: <= 1.05).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shareport.cli.table import format_table  # noqa: E402
from tests.benchmarks.genai_common import GenaiDecoder, export_both, interleaved_decode, llama, make_base_and_lora  # noqa: E402

PROMPT = [5 + 7 * i for i in range(16)]
NEW_TOKENS = 64
VOCAB = 2000


def bench_model():
    return llama(vocab=VOCAB, hidden=256, layers=4, heads=4, intermediate=688, context=128)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-genai-") as tmp:
        tmp = Path(tmp)
        base, lora = make_base_and_lora(tmp, bench_model, r=8)
        folders = export_both(tmp, base, lora, with_past=True)
        n_params = sum(p.numel() for p in bench_model().parameters())
        decoders = {"genai folded": GenaiDecoder(folders["folded"], args.threads),
                    "genai adapter mode (active)": GenaiDecoder(folders["adapter"], args.threads, adapter=True)}
        stats = interleaved_decode(decoders, PROMPT, NEW_TOKENS, args.rounds)

    folded = stats["genai folded"]["median_ms_per_token"]
    rows = [(name, round(s["prefill_ms"], 2), round(s["median_ms_per_token"], 3), round(s["mean_ms_per_token"], 3),
             round(s["median_ms_per_token"] / folded, 3)) for name, s in stats.items()]
    print(f"Llama-shaped, {n_params / 1e6:.1f}M parameters, LoRA r=8 on q,k,v,o, fp32, batch 1, "
          f"prompt {len(PROMPT)} + {NEW_TOKENS} new tokens, onnxruntime-genai on cpu, "
          f"{args.threads} intra-op threads, {args.rounds} rounds")
    print(format_table(["engine", "median prefill ms", "median ms/token", "mean ms/token", "median / folded"], rows))
    same = stats["genai adapter mode (active)"]["tokens"] == stats["genai folded"]["tokens"]
    print(f"adapter mode's greedy tokens equal folded's (adapter really active): {same}")
    print(f"adapter_over_folded_decode {stats['genai adapter mode (active)']['median_ms_per_token'] / folded:.3f}")


if __name__ == "__main__":
    main()
