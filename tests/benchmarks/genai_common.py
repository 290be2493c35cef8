"""Shared by ``bench_genai_decode.py`` and ``bench_gpu.py``: a Llama-shaped base built from a config,
a real PEFT LoRA on it, with-past exports folded and in adapter mode, and onnxruntime-genai greedy
decode timing with pinned threads and a chosen provider. Not collected by pytest."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from shareport import flows
from shareport.export import graph_file
from shareport.export.exporter import ExportOptions
from tests.tiny import make_peft_adapter

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_config(
    vocab: int, hidden: int, layers: int, heads: int, intermediate: int, context: int, kv_heads: int | None = None
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama(vocab: int, hidden: int, layers: int, heads: int, intermediate: int, context: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab, hidden, layers, heads, intermediate, context)).eval()


def add_llama_arguments(
    parser, hidden: int = 256, layers: int = 4, heads: int = 4, intermediate: int = 688, rank: int = 8
) -> None:
    """``--hidden --layers --heads --intermediate --rank``: the benchmark model's shape and the LoRA rank."""
    for name, default in (
        ("hidden", hidden),
        ("layers", layers),
        ("heads", heads),
        ("intermediate", intermediate),
        ("rank", rank),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)


def llama_from_args(args, vocab: int, context: int = 128):
    """``llama`` of the shape ``add_llama_arguments`` read."""
    return llama(
        vocab=vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        context=context,
    )


def make_base_and_lora(folder: Path, build, r: int = 8) -> tuple[Path, Path]:
    """``folder/base`` (from ``build()``) and ``folder/lora`` (a PEFT LoRA, r on q,k,v,o, alpha 2r)."""
    base, lora = folder / "base", folder / "lora"
    build().save_pretrained(base)
    make_peft_adapter(build(), lora, seed=1, r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS)
    return base, lora


def export_both(folder: Path, base: Path, lora: Path, with_past: bool, dtype: str = "fp32") -> dict[str, Path]:
    """Folded and adapter-mode exports of ``lora`` on ``base``: {"folded": dir, "adapter": dir}."""
    out = {}
    for mode in ("folded", "adapter"):
        out[mode] = folder / f"{mode}-{dtype}{'-past' if with_past else ''}"
        flows.export(
            str(lora),
            str(base),
            str(out[mode]),
            ExportOptions(mode=mode, with_past=with_past, dtype=dtype),
            verify=False,
            progress=False,
        )
    return out


class GenaiDecoder:
    """One ``og.Model`` on an exported with-past folder, intra-op threads pinned through a config
    overlay (``session_options.intra_op_num_threads``) and the provider chosen (``cpu`` or ``cuda``);
    in adapter mode the folder's own ``.onnx_adapter`` is loaded and made active per generator."""

    def __init__(self, folder: Path, threads: int, provider: str = "cpu", adapter: bool = False):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
                    }
                }
            )
        )
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        self.model = og.Model(config)
        self.adapters = None
        if adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(folder / graph_file.ADAPTER_NAME), "lora")

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[float], list[int]]:
        """Greedy: (prefill seconds, wall seconds of each decode step, this thread's CPU seconds of
        each step, new tokens); eos is held off by min_length. With one intra-op thread ORT runs
        every kernel on the calling thread, so the CPU time is the step's own work, without the
        time the process sat preempted on a shared machine."""
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "lora")
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], np.int32))  # prefill, and the first token's logits
        prefill = time.perf_counter() - start
        steps, cpu = [], []
        while not generator.is_done():
            start, start_cpu = time.perf_counter(), time.thread_time()
            generator.generate_next_token()
            cpu.append(time.thread_time() - start_cpu)
            steps.append(time.perf_counter() - start)
        tokens = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
        del generator
        return prefill, steps, cpu, tokens


def interleaved_decode(decoders: dict, prompt: list[int], new_tokens: int, rounds: int, pause: float = 0.05) -> dict:
    """Round-robin over ``decoders`` (one warm-up each first); per name the median prefill ms, the
    median over rounds of each round's median step (ms/token: robust to a step preempted on a
    loaded machine), the median over rounds of each round's mean step, the same median of the
    calling thread's CPU time per step (``cpu_ms_per_token``; the whole step's work only with one
    intra-op thread), and the greedy tokens."""
    tokens = {name: dec.decode(prompt, new_tokens)[3] for name, dec in decoders.items()}
    prefill = {name: [] for name in decoders}
    per_token = {name: [] for name in decoders}
    mean_token = {name: [] for name in decoders}
    cpu_token = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, dec in decoders.items():
            time.sleep(pause)  # let the previous engine's spinning pool threads settle
            pre, steps, cpu, _ = dec.decode(prompt, new_tokens)
            prefill[name].append(pre * 1000)
            per_token[name].append(statistics.median(steps) * 1000)
            mean_token[name].append(statistics.fmean(steps) * 1000)
            cpu_token[name].append(statistics.median(cpu) * 1000)
    return {
        name: {
            "prefill_ms": statistics.median(prefill[name]),
            "median_ms_per_token": statistics.median(per_token[name]),
            "mean_ms_per_token": statistics.median(mean_token[name]),
            "cpu_ms_per_token": statistics.median(cpu_token[name]),
            "tokens": tokens[name],
        }
        for name in decoders
    }
