"""GPU benchmark: recovery throughput and MFU, ORT CUDA latency and genai CUDA decode, folded vs adapter.

Not collected by pytest. Run: ``python3 -m tests.benchmarks.bench_gpu [--steps N]
[--size 1b|134m] [--seq 512] [--batch 16] [--profile] [--skip-onnx]``. Without a CUDA device
(``torch.cuda.is_available()`` false and ONNX Runtime's CUDA provider not working) it prints why and
exits 0 without measuring.

(a) Recovery. A Llama-shaped base from a config, random weights in bf16, built on the GPU: ``1b`` is
  TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000). A real
  PEFT LoRA (r=16 on the 7 kinds q,k,v,o,gate,up,down) converted to ShareA and distilled toward the LoRA
  by ``shareport.train.recipe.run`` (what ``shareport finetune`` runs), batch 16 x seq 512, bf16
  autocast. Rows:
  - the card's measured bf16 matmul rate (8192^3), beside the datasheet's dense peak the MFU uses;
  - tokens/s and MFU of recovery in steady state (steps 10 to ``--steps``), the library's loop
    (fused AdamW, a host sync every 10 steps), the loop before the throughput work (``old_loop.py``)
    and the library's with ``compile="inductor"`` (``--compile``: the blocks through torch.compile),
    alternated ``--rounds`` times, medians;
  - the ceiling: the same base alone (no adapter, no loss), one no-grad forward (the teacher's) plus
    one forward and input-gradient backward (the student's), timed the same way; recovery's share of
    that ceiling says what the adapter, the distillation loss and the loop cost on top of the model.
  MFU = 6 * N * tokens / seconds / peak, N = the base's matmul weights
  (``recipe.matmul_parameters``: embeddings excluded, head included; attention scores left out).
  ``--profile``: the top CUDA kernels of a 4-step run and the share of the wall time the GPU was busy.
(b) ONNX Runtime on the CUDA provider, fp16 exports without past of a 134M Llama (LoRA r=8 on
  q,k,v,o), folded vs adapter mode (adapter active through ``RunOptions``), batch 1 and 8 x seq 128
  and 512, interleaved, medians. Needs onnxruntime-gpu.
(c) onnxruntime-genai greedy decode on the ``cuda`` provider, fp16 ``--with-past`` exports, 64 new
  tokens after a 16-token prompt, batch 1, interleaved rounds, median ms/token. Needs
  onnxruntime-genai-cuda.

(d) ``--cuda-ep``: ONNX Runtime's CUDA provider itself (run after tests/benchmarks/carry/ installed
  onnxruntime-gpu on the device), instead of (a)-(c): with-past exports of a Llama (``--ep-size``,
  LoRA r=8 on q,k,v,o), folded and adapter mode, fp32 and fp16, each verified against PyTorch on the
  CUDA provider (``shareport verify``'s checks; the four exports run in ``--export-jobs`` processes at
  once, the LoRA factors drawn with std 0.02); then greedy decode of the fp16 pair with the KV cache
  kept on the GPU through IO binding, median ms/token, interleaved rounds: folded; adapter with its
  tensors bound once as GPU OrtValues; adapter with its tensors bound from host arrays at every
  step (a host-to-device copy per step, the control); adapter through ``RunOptions`` (the
  ``LoraAdapter`` path ``shareport`` itself uses). ``--dry-run`` runs (d) on the CPU provider with a
  tiny model and few tokens: the same code paths, no timing worth reading.

Prints one table; the last line is the recovery MFU of the fastest loop, the key figure of the scale issue's
target (>= 40% on a >= 1B base at sequence 512).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shareport.cli.table import format_table
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions
from shareport.flows import export as flows_export
from shareport.train.accel import peak_flops
from tests.benchmarks.genai_common import llama_config

SIZES = {  # llama_config arguments
    "1b": dict(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, context=2048),
    "134m": dict(vocab=32000, hidden=768, layers=12, heads=12, intermediate=2048, context=1024),
    "tiny": dict(vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=256),  # --smoke
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only for --smoke
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = [(batch, seq) for batch in (1, 8) for seq in (128, 512)]
PROMPT = [5 + 7 * i for i in range(16)]
NEW_TOKENS = 64


def build_on_gpu(folder: Path, size: str, r: int, kinds: list[str]) -> tuple[Path, Path]:
    """``folder/base`` (random bf16 weights, built on the GPU: seconds, not minutes, for 1B) and
    ``folder/lora`` (a PEFT LoRA on ``kinds``, alpha 2r, factors drawn with std 0.02 so that the
    update is a few percent of the base's weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base, lora = folder / "base", folder / "lora"
    torch.manual_seed(0)
    with DEVICE:
        model = LlamaForCausalLM(llama_config(**SIZES[size])).to(torch.bfloat16).eval()
    model.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=kinds))
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, device=DEVICE) * 0.02)
    peft_model.save_pretrained(lora)
    del model, peft_model
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return base, lora


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of ``fn()`` with the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def matmul_rate() -> float:
    """The card's bf16 matmul FLOP/s on an 8192^3 product of random data."""
    n = 8192 if DEVICE.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (cuda_ms(lambda: a @ b, 10) / 1000)


def ceiling(model, batch: int, seq: int, vocab: int, repeats: int = 8) -> tuple[float, float]:
    """(ms of one no-grad forward, ms of one forward + input-gradient backward) of the bare base,
    under bf16 autocast: one recovery step's model work, without adapter, loss or loop."""
    ids = torch.randint(3, vocab, (batch, seq), device=DEVICE)
    embed = model.get_input_embeddings()

    def forward():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            model(input_ids=ids, use_cache=False).logits.float()

    def forward_backward():
        x = embed(ids).detach().requires_grad_()  # gradients flow to the input only, as for a frozen base
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(inputs_embeds=x, use_cache=False).logits.float()
        logits.logsumexp(-1).mean().backward()

    return cuda_ms(forward, repeats), cuda_ms(forward_backward, repeats)


def recovery(tmp: Path, args) -> tuple[list[tuple], float | None]:
    from shareport import flows
    from shareport.train.data import save_tokenized
    from shareport.train.jobs import recovery_job
    from shareport.train.recipe import Recipe, matmul_parameters, run

    size = SIZES[args.size]
    base, lora = build_on_gpu(tmp, args.size, 16, KINDS)
    gen = torch.Generator().manual_seed(0)
    rows_needed = args.batch * (args.steps + 4) + 64  # + the held-out split
    save_tokenized(tmp / "data", torch.randint(3, size["vocab"], (rows_needed, args.seq), generator=gen).tolist())
    flows.convert(str(lora), "sharea", str(tmp / "sharea"), progress=False)
    job = recovery_job(
        tmp / "sharea", base, lora, data_path=tmp / "data", max_length=args.seq, eval_fraction=64 / rows_needed
    )
    job.progress = False
    n = matmul_parameters(job.model)
    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (--smoke)"
    peak = peak_flops(card)
    tokens_per_step = args.batch * args.seq

    rows = [
        ("a", "card", "name", card),
        ("a", "card", "datasheet dense bf16 TFLOP/s (MFU's peak)", round(peak / 1e12) if peak else "not in table"),
        ("a", "card", "measured bf16 matmul 8192^3 TFLOP/s", round(matmul_rate() / 1e12)),
        ("a", "base", "matmul parameters N (M)", round(n / 1e6, 1)),
    ]
    run(job, Recipe(steps=3, lr=1e-4, batch_size=args.batch))  # warm-up: kernels chosen, allocator grown
    from tests.benchmarks.old_loop import old_loop

    variants = {"fast": ({}, contextlib.nullcontext), "before": ({}, old_loop)}
    if not args.no_compile:
        variants["fast+compile"] = (dict(compile="inductor"), contextlib.nullcontext)
    rates = {name: [] for name in variants}
    reports, first = {}, {}
    for _ in range(args.rounds):
        for name, (knobs, loop) in variants.items():
            stamps = {}
            start = time.perf_counter()
            with loop():
                _, report = run(
                    job,
                    Recipe(steps=args.steps, lr=1e-4, batch_size=args.batch, **knobs),
                    after_step=lambda t: stamps.__setitem__(t, time.perf_counter()),
                )
            # steady state: between two steps at which the loop synchronises (every 10th in the fast
            # loop, every step in the old one), so the first steps (and any compiling) are left out
            lo, hi = 10, args.steps
            rates[name].append(tokens_per_step * (hi - lo) / (stamps[hi] - stamps[lo]))
            first.setdefault(name, stamps[lo] - start)
            reports[name] = report
    case = f"recover {args.size} b{args.batch} x s{args.seq}, bf16"
    mfu = {}
    for name in variants:
        tps = statistics.median(rates[name])
        mfu[name] = 6 * n * tps / peak if peak else None
        rows.append(("a", f"{case}, {name}", "tokens/s (steady, median)", round(tps)))
        rows.append(("a", f"{case}, {name}", "ms/step", round(tokens_per_step / tps * 1000, 1)))
        rows.append(("a", f"{case}, {name}", "MFU", f"{mfu[name]:.1%}" if mfu[name] is not None else "n/a"))
        rows.append(
            ("a", f"{case}, {name}", "s to step 10 (first round: evaluation, compiling)", round(first[name], 1))
        )
        rows.append(
            (
                "a",
                f"{case}, {name}",
                "held-out KL before -> after",
                f"{reports[name]['before']['kl']:.4g} -> {reports[name]['after']['kl']:.4g}",
            )
        )
    if "fast+compile" in variants:
        from torch._dynamo.utils import counters

        rows.append(("a", "compile", "graphs compiled (all rounds)", counters["stats"]["unique_graphs"]))
    timings = reports["fast"]["timings"]
    rows.append(
        (
            "a",
            "report field",
            "training_timings mfu (fast, whole run)",
            f"{timings['mfu']:.1%}" if timings["mfu"] else "n/a",
        )
    )

    t_fwd, t_fwd_bwd = ceiling(job.model, args.batch, args.seq, size["vocab"])
    ceiling_step = t_fwd + t_fwd_bwd
    rows.append(("a", "base alone", "ms: no-grad forward / forward+input backward", f"{t_fwd:.1f} / {t_fwd_bwd:.1f}"))
    if peak:
        rows.append(
            (
                "a",
                "base alone",
                "MFU of one step's model work (the ceiling)",
                f"{6 * n * tokens_per_step / (ceiling_step / 1000) / peak:.1%}",
            )
        )
    for name in variants:
        step_ms = tokens_per_step / statistics.median(rates[name]) * 1000
        rows.append(("a", "base alone", f"recovery step ({name}) / ceiling step", round(step_ms / ceiling_step, 3)))

    if args.profile:
        profile_steps(job, args.batch)
    best = max(variants, key=lambda name: statistics.median(rates[name]))
    rows.append(("a", "best loop", "variant", best))
    return rows, mfu[best]


def profile_steps(job, batch: int) -> None:
    """The top CUDA kernels of a 4-step run, and how busy the GPU was (kernel time / wall time)."""
    from torch.profiler import ProfilerActivity, profile

    from shareport.train.recipe import Recipe, run

    cuda = DEVICE.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        sync()
        start = time.perf_counter()
        run(job, Recipe(steps=4, lr=1e-4, batch_size=batch))
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    print(events.table(sort_by="self_device_time_total", row_limit=18))
    print(f"profile: 4 steps + 2 evaluations, wall {wall:.3f} s, GPU kernels {busy:.3f} s ({busy / wall:.0%} busy)")


def ort_latency(tmp: Path, base: Path, lora: Path, repeats: int) -> tuple[list[tuple], list[float]]:
    from shareport.export.ort_adapter import read_onnx_adapter
    from shareport.export.signature import make_inputs, signature_for
    from tests.benchmarks.genai_common import export_both, llama

    folders = export_both(tmp, base, lora, with_past=False, dtype="fp16")
    sessions = {mode: runtime.session(folder / graph_file.GRAPH_NAME) for mode, folder in folders.items()}
    lora_arrays = runtime.load_lora(read_onnx_adapter(folders["adapter"] / graph_file.ADAPTER_NAME))
    sig = signature_for(llama(**SIZES["134m"]), with_past=False)
    rows, ratios = [], []
    for batch, seq in SHAPES:
        feeds = {n: t.numpy() for n, t in make_inputs(sig, batch, seq, vocab=SIZES["134m"]["vocab"]).items()}
        engines = {
            "ORT folded": lambda: runtime.run(sessions["folded"], feeds),
            "ORT adapter (active)": lambda: runtime.run(sessions["adapter"], feeds, lora_arrays),
        }
        times = {name: [] for name in engines}
        for fn in engines.values():  # warm-up: kernels, allocator
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


def genai_decode(tmp: Path, base: Path, lora: Path, rounds: int) -> tuple[list[tuple], float]:
    from tests.benchmarks.genai_common import GenaiDecoder, export_both, interleaved_decode

    folders = export_both(tmp, base, lora, with_past=True, dtype="fp16")
    decoders = {
        "genai folded": GenaiDecoder(folders["folded"], threads=1, provider="cuda"),
        "genai adapter (active)": GenaiDecoder(folders["adapter"], threads=1, provider="cuda", adapter=True),
    }
    stats = interleaved_decode(decoders, PROMPT, NEW_TOKENS, rounds)
    case = f"fp16 batch 1, prompt {len(PROMPT)} + {NEW_TOKENS}"
    rows = [("c", case, f"{name} median ms/token", round(s["median_ms_per_token"], 3)) for name, s in stats.items()]
    ratio = stats["genai adapter (active)"]["median_ms_per_token"] / stats["genai folded"]["median_ms_per_token"]
    rows.append(("c", case, "adapter / folded", round(ratio, 3)))
    return rows, ratio


def onnx_sections(tmp: Path, args, ort_cuda: bool) -> tuple[list[tuple], list[float]]:
    from tests.benchmarks.genai_common import llama, make_base_and_lora

    rows, ratios = [], []
    try:
        import onnxruntime_genai as og

        genai_cuda = og.is_cuda_available()
        genai_note = "onnxruntime-genai has no CUDA here"
    except ImportError:
        genai_cuda, genai_note = False, "onnxruntime-genai is not installed"
    if not ort_cuda and not genai_cuda:
        return [
            ("b", "ORT", "skipped", runtime.provider_note() or "no CUDA provider"),
            ("c", "genai", "skipped", genai_note),
        ], []
    base, lora = make_base_and_lora(tmp / "onnx", lambda: llama(**SIZES["134m"]), r=8)
    if ort_cuda:
        ort_rows, ratios = ort_latency(tmp / "onnx", base, lora, args.repeats)
        rows += ort_rows
    else:
        rows.append(("b", "ORT", "skipped", runtime.provider_note() or "no CUDA provider"))
    if genai_cuda:
        genai_rows, genai_ratio = genai_decode(tmp / "onnx", base, lora, args.rounds_decode)
        rows += genai_rows
        ratios.append(genai_ratio)
    else:
        rows.append(("c", "genai", "skipped", genai_note))
    return rows, ratios


def ep_session(path: Path, provider: str):
    """A session on ``provider`` alone; refuses one that silently fell back to another."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise SystemExit(f"bench_gpu: a session asked for {provider} alone runs on {sess.get_providers()[0]}")
    return sess


def bound_decoder(sess, adapter: dict | None, how: str, *, device: str):
    """A greedy decode function over ``sess`` with the KV cache kept on ``device`` through IO binding.
    ``how`` says how the adapter reaches the graph: "none" (folded, or the adapter graph's empty
    defaults), "bound once" (GPU OrtValues made here, bound every step without a copy), "copied"
    (host OrtValues bound every step: ORT copies them to the device at every run) or "run options"
    (an ``ort.LoraAdapter`` made active through RunOptions). The decode function returns (ms of each
    step after the prefill, greedy tokens, the prefill's last logits)."""
    import numpy as np
    import onnxruntime as ort

    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    past = [n for n in inputs if n.startswith("past_key_values.")]
    dtype = np.float16 if inputs[past[0]].type == "tensor(float16)" else np.float32
    _, kv_heads, _, head_dim = inputs[past[0]].shape
    # the adapter's inputs are overridable initializers, which bind_cpu_input cannot name (it looks
    # them up among the required inputs): both variants bind OrtValues, on the device or on the host
    on_device = {n: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in (adapter or {}).items()}
    on_host = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in (adapter or {}).items()}
    options, lora = None, None
    if how == "run options":  # ORT 1.31 was seen to ignore this under run_with_iobinding (CPU EP): a row says
        lora = runtime.load_lora(adapter)  # held by the closure: RunOptions may not keep it alive
        options = ort.RunOptions()
        options.add_active_adapter(lora)

    def decode(prompt: list[int], new_tokens: int):
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype)
        cache = {n: ort.OrtValue.ortvalue_from_numpy(empty, device, 0) for n in past}
        ids, length, tokens, steps = list(prompt), 0, [], []
        binding = sess.io_binding()
        for _ in range(new_tokens):
            start = time.perf_counter()
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            step = np.asarray([ids], np.int64)
            binding.bind_cpu_input("input_ids", step)
            binding.bind_cpu_input("attention_mask", np.ones((1, length + step.shape[1]), np.int64))
            binding.bind_cpu_input("position_ids", np.arange(length, length + step.shape[1], dtype=np.int64)[None])
            for name in past:
                binding.bind_ortvalue_input(name, cache[name])
            if how == "bound once":
                for name, value in on_device.items():
                    binding.bind_ortvalue_input(name, value)
            elif how == "copied":
                for name, value in on_host.items():
                    binding.bind_ortvalue_input(name, value)
            binding.bind_output(outputs[0], "cpu")  # the logits: greedy needs them on the host
            for name in outputs[1:]:
                binding.bind_output(name, device)
            sess.run_with_iobinding(binding, options if lora is not None else None)
            values = binding.get_outputs()
            logits = values[0].numpy()[0, -1]  # on the host: the step has finished
            token = int(logits.argmax())
            steps.append((time.perf_counter() - start) * 1000)
            cache = {name.replace("present.", "past_key_values."): v for name, v in zip(outputs[1:], values[1:])}
            length += step.shape[1]
            ids = [token]
            tokens.append(token)
            if len(tokens) == 1:
                first = logits.astype(np.float64)
        return steps[1:], tokens, first  # steps[0] is the prefill

    return decode


def export_one(job: tuple) -> Path:
    """One with-past export (a worker process of section (d)): ``(folder, base, lora, mode, dtype, workers)``."""
    folder, base, lora, mode, dtype, workers = job
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    out = folder / f"{mode}-{dtype}-past"
    flows_export(
        str(lora),
        str(base),
        str(out),
        ExportOptions(mode=mode, with_past=True, dtype=dtype),
        verify=False,
        progress=False,
    )
    return out


def cuda_ep_bench(tmp: Path, args) -> tuple[list[tuple], float | None]:
    """Section (d): verify folded and adapter exports fp32/fp16 on the CUDA provider (the CPU one with
    ``--dry-run``), then decode latency folded vs adapter bound once vs copied each step vs RunOptions."""
    from peft import LoraConfig, get_peft_model

    from shareport.export import doctor
    from shareport.export.ort_adapter import read_onnx_adapter
    from shareport.export.verify import verify as verify_graph
    from tests.benchmarks.genai_common import LORA_TARGETS, llama
    from tests.tiny import randomize_lora

    provider, device = (runtime.CPU, "cpu") if args.dry_run else (runtime.CUDA, "cuda")
    rows = [("d", "onnxruntime", "CUDA EP", doctor.cuda_ep_status()["line"])]
    if provider == runtime.CUDA and runtime.CUDA not in runtime.providers():
        # runtime's own probe can refuse a working CUDA provider (its probe graph's IR version, say):
        # verify goes through runtime.session, so use the provider this section was asked for
        rows.append(
            (
                "d",
                "onnxruntime",
                "runtime.providers() said",
                f"{runtime.providers()} ({runtime.provider_note()}); overridden",
            )
        )
        runtime._selection = lambda: ((runtime.CUDA, runtime.CPU), "")
    size = {k: v for k, v in SIZES[args.ep_size].items() if k != "kv_heads"}
    base, lora = tmp / "ep" / "base", tmp / "ep" / "lora"
    llama(**size).save_pretrained(base)
    peft_model = get_peft_model(llama(**size), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    # std 0.02, as build_on_gpu: the update stays a few percent of the base's weights. The tests'
    # default (0.2) makes a 12-layer base's activations blow up, and fp32 misses verify's atol there.
    randomize_lora(peft_model, seed=1, std=0.02)
    peft_model.save_pretrained(lora)
    jobs = [(mode, dtype) for dtype in ("fp32", "fp16") for mode in ("folded", "adapter")]
    start = time.perf_counter()
    # the exports are mostly single-threaded tracing: one process each (spawned: torch and fork mix badly)
    workers = max(1, min(len(jobs), args.export_jobs))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        exports = dict(
            zip(jobs, pool.map(export_one, [(tmp / "ep", base, lora, mode, dtype, workers) for mode, dtype in jobs]))
        )
    rows.append(
        (
            "d",
            f"export {args.ep_size} with past",
            f"s for {len(jobs)} exports, {workers} processes",
            round(time.perf_counter() - start, 1),
        )
    )
    for dtype in ("fp32", "fp16"):
        for mode in ("folded", "adapter"):
            report = verify_graph(exports[mode, dtype], base, lora)
            worst = max(report.rows, key=lambda r: r.max_abs / r.limit)
            top1 = min((r.top1 for r in report.rows if r.top1 is not None), default=None)
            rows.append(
                (
                    "d",
                    f"verify {mode} {dtype}",
                    f"on {report.device}: ok / worst max_abs (limit) / min top1",
                    f"{report.ok} / {worst.max_abs:.3g} ({worst.limit:.3g}, {worst.check} {worst.case} {worst.output}) / {top1}",
                )
            )
    adapter = read_onnx_adapter(exports["adapter", "fp16"] / graph_file.ADAPTER_NAME)
    sessions = {
        "folded": ep_session(exports["folded", "fp16"] / graph_file.GRAPH_NAME, provider),
        "adapter": ep_session(exports["adapter", "fp16"] / graph_file.GRAPH_NAME, provider),
    }
    decoders = {"folded": bound_decoder(sessions["folded"], None, "none", device=device)}
    for how in ("bound once", "copied", "run options"):
        decoders[f"adapter, {how}"] = bound_decoder(sessions["adapter"], adapter, how, device=device)
    new_tokens = 8 if args.dry_run else NEW_TOKENS
    warm = {name: decode(PROMPT, new_tokens) for name, decode in decoders.items()}  # warm-up, tokens, logits
    tokens = {name: w[1] for name, w in warm.items()}
    # the adapter graph without the adapter: the distance an ignored binding would show
    bare = bound_decoder(sessions["adapter"], None, "none", device=device)(PROMPT, 1)[2]
    per_round = {name: [] for name in decoders}
    for _ in range(2 if args.dry_run else args.rounds_decode):
        for name, decode in decoders.items():
            per_round[name].append(statistics.median(decode(PROMPT, new_tokens)[0]))
    case = f"fp16 {args.ep_size} batch 1, prompt {len(PROMPT)} + {new_tokens}, KV on {device}"
    medians = {name: statistics.median(ms) for name, ms in per_round.items()}
    for name, ms in medians.items():
        rows.append(("d", case, f"{name} median ms/token", round(ms, 3)))
    for name in decoders:
        if name != "folded":
            rows.append(("d", case, f"{name} / folded", round(medians[name] / medians["folded"], 3)))
    rows.append(
        ("d", case, "copied / bound once", round(medians["adapter, copied"] / medians["adapter, bound once"], 3))
    )
    for name in list(decoders)[1:]:
        rows.append(
            ("d", case, f"prefill logits max |{name} - folded|", f"{abs(warm[name][2] - warm['folded'][2]).max():.3g}")
        )
    rows.append(
        (
            "d",
            case,
            "prefill logits max |adapter graph, no adapter - folded|",
            f"{abs(bare - warm['folded'][2]).max():.3g}",
        )
    )
    same = tokens["adapter, copied"] == tokens["adapter, bound once"]
    agree = sum(a == b for a, b in zip(tokens["folded"], tokens["adapter, bound once"])) / new_tokens
    rows.append(("d", case, "bound once and copied: same greedy tokens / folded agrees on", f"{same} / {agree:.0%}"))
    gap = lambda name: abs(warm[name][2] - warm["adapter, bound once"][2]).max()  # noqa: E731
    rows.append(
        (
            "d",
            case,
            "RunOptions adapter honoured under run_with_iobinding",
            bool(gap("adapter, run options") < 0.1 * abs(bare - warm["adapter, bound once"][2]).max()),
        )
    )
    return rows, medians["adapter, bound once"] / medians["folded"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="the recovery base (a)")
    parser.add_argument(
        "--steps", type=int, default=30, help="recovery steps per timed run (steady state: 10 to the last)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the --compile variant")
    parser.add_argument("--rounds", type=int, default=2, help="timed recovery runs per loop variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a 4-step run")
    parser.add_argument("--repeats", type=int, default=20, help="ORT runs per engine and shape (b)")
    parser.add_argument("--rounds-decode", type=int, default=10, help="genai decode rounds per engine (c)")
    parser.add_argument("--skip-onnx", action="store_true", help="measure (a) only")
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU: (a) only, tiny base")
    parser.add_argument(
        "--cuda-ep", action="store_true", help="(d) only: verify and IO-bound decode on the CUDA provider"
    )
    parser.add_argument("--ep-size", choices=sorted(SIZES), default="134m", help="the base of (d)")
    parser.add_argument(
        "--dry-run", action="store_true", help="(d) on the CPU provider, tiny base: the code paths only"
    )
    parser.add_argument("--export-jobs", type=int, default=4, help="(d): exports run in this many processes at once")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.skip_onnx, args.seq, args.batch, args.steps, args.rounds = "tiny", True, 32, 4, 12, 1
    if args.dry_run:
        args.cuda_ep, args.ep_size, args.export_jobs = True, "tiny", min(args.export_jobs, 2)
    if args.cuda_ep:
        from shareport.export import doctor

        status = doctor.cuda_ep_status()
        if status["state"] != "working" and not args.dry_run:
            print(f"bench_gpu --cuda-ep: {status['line']}; nothing measured.")
            return
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            rows, ratio = cuda_ep_bench(Path(tmp), args)
        print(format_table(["section", "case", "measure", "value"], rows))
        print(f"adapter_bound_over_folded_{'cpu_dry_run' if args.dry_run else 'cuda_ep'} {ratio:.3f}")
        return

    torch_cuda, ort_cuda = torch.cuda.is_available(), runtime.device_name() == "cuda"
    if not torch_cuda and not ort_cuda and not args.smoke:
        note = runtime.provider_note()
        print(
            "bench_gpu: no CUDA device here (torch.cuda.is_available() is False and ONNX Runtime's "
            f"CUDA provider does not work{': ' + note if note else ''}); nothing measured."
        )
        return

    rows, ratios, mfu = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        if torch_cuda or args.smoke:
            recovery_rows, mfu = recovery(tmp, args)
            rows += recovery_rows
        else:
            rows.append(("a", "recover", "skipped", "torch sees no CUDA device"))
        if not args.skip_onnx:
            onnx_rows, ratios = onnx_sections(tmp, args, ort_cuda)
            rows += onnx_rows

    print(format_table(["section", "case", "measure", "value"], rows))
    if ratios:
        print(f"adapter_over_folded_gpu {max(ratios):.3f}")
    print(f"recovery_mfu {mfu:.3f}" if mfu is not None else "recovery_mfu n/a")


if __name__ == "__main__":
    main()
