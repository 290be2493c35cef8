"""GPU benchmark: recovery throughput and MFU, ORT CUDA latency and genai CUDA decode, folded vs adapter.

Not collected by pytest. Run: ``PYTHONPATH=$PWD python3 tests/benchmarks/bench_gpu.py [--steps N]
[--repeats N] [--rounds N]``. Without a CUDA device (``torch.cuda.is_available()`` false and ONNX
Runtime's CUDA provider not working) it prints why and exits 0 without measuring.

One Llama-shaped base from a config (hidden 768, 12 layers, 12 heads, vocab 32000, ~134M
parameters, random weights) with a real PEFT LoRA (r=8 on q, k, v, o):

- (a) ``shareport.flows.recover`` of the LoRA converted to ShareA, distilled toward the LoRA,
  batch 16 x seq 256 (bf16 autocast where the card has it): tokens/s from the run's own timings
  and MFU = 6 * N * tokens / seconds / the card's dense bf16 peak (6N per token is the usual
  training estimate; the frozen base needs no weight gradients and the teacher adds a forward,
  so read it as an order of magnitude). Needs torch CUDA.
- (b) ONNX Runtime on the CUDA provider, fp16 exports without past, folded vs adapter mode
  (adapter active through ``RunOptions``), batch 1 and 8 x seq 128 and 512, interleaved, medians.
- (c) onnxruntime-genai greedy decode on the ``cuda`` provider, fp16 ``--with-past`` exports,
  64 new tokens after a 16-token prompt, batch 1, interleaved rounds, median ms/token.

It prints one table; the last line is the worst adapter/folded ratio of (b) and (c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shareport.cli.table import format_table  # noqa: E402
from shareport.export import graph_file, runtime  # noqa: E402
from shareport.train.accel import peak_flops  # noqa: E402
from tests.benchmarks.genai_common import GenaiDecoder, export_both, interleaved_decode, llama, make_base_and_lora  # noqa: E402

VOCAB = 32000
SHAPES = [(batch, seq) for batch in (1, 8) for seq in (128, 512)]
PROMPT = [5 + 7 * i for i in range(16)]
NEW_TOKENS = 64


def bench_model():
    return llama(vocab=VOCAB, hidden=768, layers=12, heads=12, intermediate=2048, context=1024)


def recovery(tmp: Path, base: Path, lora: Path, n_params: int, steps: int, card: str) -> list[tuple]:
    from shareport import flows
    from shareport.train.data import save_tokenized
    from shareport.train.jobs import TrainingOptions

    gen = torch.Generator().manual_seed(0)
    examples = 16 * (steps + 4)
    save_tokenized(tmp / "data", torch.randint(3, VOCAB, (examples, 256), generator=gen).tolist())
    shared = tmp / "sharea"
    flows.convert(str(lora), "sharea", str(shared), progress=False)
    options = TrainingOptions(steps=steps, batch_size=16, max_length=256, eval_fraction=0.05)
    report = flows.recover(str(shared), str(base), str(lora), str(tmp / "data"), str(tmp / "recovered"), options=options)
    timing = report["timings"]
    peak = peak_flops(card)
    mfu = 6 * n_params * timing["tokens"] / timing["seconds"] / peak if peak else None
    case = f"recover b16 x s256, {steps} steps, {report['mixed_precision']}"
    return [("a", case, "tokens/s", round(timing["tokens_per_second"])),
            ("a", case, f"MFU (peak {peak / 1e12:.0f} TFLOP/s)" if peak else "MFU (card not in table)",
             f"{mfu:.1%}" if mfu is not None else "n/a")]


def ort_latency(tmp: Path, base: Path, lora: Path, repeats: int) -> tuple[list[tuple], list[float]]:
    from shareport.export.ort_adapter import read_onnx_adapter
    from shareport.export.signature import make_inputs, signature_for

    folders = export_both(tmp, base, lora, with_past=False, dtype="fp16")
    sessions = {mode: runtime.session(folder / graph_file.GRAPH_NAME) for mode, folder in folders.items()}
    lora_arrays = runtime.load_lora(read_onnx_adapter(folders["adapter"] / graph_file.ADAPTER_NAME))
    sig = signature_for(bench_model(), with_past=False)
    rows, ratios = [], []
    for batch, seq in SHAPES:
        feeds = {n: t.numpy() for n, t in make_inputs(sig, batch, seq, vocab=VOCAB).items()}
        engines = {"ORT folded": lambda: runtime.run(sessions["folded"], feeds),
                   "ORT adapter (active)": lambda: runtime.run(sessions["adapter"], feeds, lora_arrays)}
        times = {name: [] for name in engines}
        for fn in engines.values():  # warm-up: CUDA graphs of kernels, allocator
            fn()
        for _ in range(repeats):
            for name, fn in engines.items():
                start = time.perf_counter()
                fn()  # outputs are copied to host numpy, so the run has finished when this returns
                times[name].append((time.perf_counter() - start) * 1000)
        medians = {name: statistics.median(t) for name, t in times.items()}
        ratio = medians["ORT adapter (active)"] / medians["ORT folded"]
        ratios.append(ratio)
        for name, ms in medians.items():
            rows.append(("b", f"fp16 batch {batch} x seq {seq}", f"{name} median ms", round(ms, 3)))
        rows.append(("b", f"fp16 batch {batch} x seq {seq}", "adapter / folded", round(ratio, 3)))
    return rows, ratios


def genai_decode(tmp: Path, base: Path, lora: Path, rounds: int, provider: str = "cuda") -> tuple[list[tuple], float]:
    folders = export_both(tmp, base, lora, with_past=True, dtype="fp16")
    decoders = {"genai folded": GenaiDecoder(folders["folded"], threads=1, provider=provider),
                "genai adapter (active)": GenaiDecoder(folders["adapter"], threads=1, provider=provider, adapter=True)}
    stats = interleaved_decode(decoders, PROMPT, NEW_TOKENS, rounds)
    case = f"fp16 batch 1, prompt {len(PROMPT)} + {NEW_TOKENS}"
    rows = [("c", case, f"{name} median ms/token", round(s["median_ms_per_token"], 3)) for name, s in stats.items()]
    ratio = stats["genai adapter (active)"]["median_ms_per_token"] / stats["genai folded"]["median_ms_per_token"]
    rows.append(("c", case, "adapter / folded", round(ratio, 3)))
    return rows, ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="recovery steps")
    parser.add_argument("--repeats", type=int, default=20, help="ORT runs per engine and shape")
    parser.add_argument("--rounds", type=int, default=10, help="genai decode rounds per engine")
    args = parser.parse_args()

    torch_cuda, ort_cuda = torch.cuda.is_available(), runtime.device_name() == "cuda"
    if not torch_cuda and not ort_cuda:
        note = runtime.provider_note()
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False and ONNX Runtime's "
              f"CUDA provider does not work{': ' + note if note else ''}); nothing measured.")
        return

    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        base, lora = make_base_and_lora(tmp, bench_model, r=8)
        n_params = sum(p.numel() for p in bench_model().parameters())
        if torch_cuda:
            rows += recovery(tmp, base, lora, n_params, args.steps, torch.cuda.get_device_name())
        else:
            rows.append(("a", "recover", "skipped", "torch sees no CUDA device"))
        if ort_cuda:
            ort_rows, ort_ratios = ort_latency(tmp, base, lora, args.repeats)
            rows += ort_rows
            ratios += ort_ratios
        else:
            rows.append(("b", "ORT", "skipped", runtime.provider_note() or "no CUDA provider"))
        import onnxruntime_genai as og

        if og.is_cuda_available():
            genai_rows, genai_ratio = genai_decode(tmp, base, lora, args.rounds)
            rows += genai_rows
            ratios.append(genai_ratio)
        else:
            rows.append(("c", "genai", "skipped", "onnxruntime-genai has no CUDA here"))

    card = torch.cuda.get_device_name() if torch_cuda else "CUDA (name unknown to torch)"
    print(f"Llama-shaped, {n_params / 1e6:.1f}M parameters, LoRA r=8 on q,k,v,o, on {card}")
    print(format_table(["section", "case", "measure", "value"], rows))
    if ratios:
        print(f"adapter_over_folded_gpu {max(ratios):.3f}")


if __name__ == "__main__":
    main()
