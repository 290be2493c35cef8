"""Serving a fleet in onnxruntime-genai against serving N separate LoRAs (issue 29, item 7).

Not collected by pytest. Run: ``OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_fleet_serving
[--sizes 8 50] [--rounds 3] [--switches 100] [--threads 1]
[--form shareab --budget 0.125] [--hidden 256 --layers 4 --heads 4 --intermediate 688 --rank 8]``
(about 3 minutes on 2 shared cores).

A Llama-shaped base from a config (random weights, vocab 2000) with a byte-level BPE tokenizer that
genai's ``og.Tokenizer`` reads (a word-level one it refuses), and max(sizes) real PEFT LoRAs (r=8 on
q, k, v, o, alpha 16, random factors from seeds 100, 101, ...: no training). Two ways to serve them:

- **fleet**: per N, ``flows.fleet`` of the first N LoRAs (``--form shareab --budget 0.125``), then one
  ``--with-past --mode adapter`` export of member ``m00``, which writes every member's
  ``<member>.onnx_adapter`` (cores only; the shared basis is baked into the graph);
- **separate**: one ``--with-past --mode adapter`` export of LoRA 0 on the base, and
  ``flows.export_adapter`` of every other LoRA against that graph: what a user serving N LoRAs in
  genai does.

Each (N, way) is measured in a fresh Python process (so the resident-memory growth of one is not
hidden by memory the other freed), the ways alternating within each of ``--rounds`` rounds so that
machine load hits both alike; the table has the medians over rounds. In each process: ``og.Model``
with ``--threads`` intra-op threads (``GenaiDecoder``'s config overlay), then every adapter file is
loaded into one ``og.Adapters`` (each ``load`` timed), VmRSS / RssAnon read from
``/proc/self/status`` before and after; then ``--switches`` requests, each a new generator whose
active adapter is set with ``set_active_adapter`` (timed, wall) before it appends the prompt and
takes its first new token (prefill, timed) and one decode step (timed). The requests go a, a, b, b,
c, c, ... over the N adapters, so every other request switches to another adapter than the previous
request's and the next one repeats it: the first token after a switch is also paired with that next
request's ("its extra"). Model times are the calling thread's CPU time (with 1 intra-op thread ORT
runs every kernel on it: the work without the time the process sat preempted); wall is in the ratios.

Correctness first, so no speed is reported for wrong outputs: for 2 fleet members per N (swapped in
through their own files) and 2 separate LoRAs, genai's greedy tokens (the prompt encoded by genai's
own ``og.Tokenizer``) must equal PyTorch's (the member attached with shareport's surgery, as
``verify`` attaches it; the LoRA with PEFT), and the two adapters' tokens must differ from each other
and from the base model's.

Measured (2026-12-07, 2 shared cores, results in docs/results.md): switching is a pointer swap in
genai, 3 us whichever the way, against 22-25 us to load one separate LoRA file from the page cache
(the target "switching members costs less than loading a separate LoRA" is met, 0.12-0.15); what
the fleet changes is what N adapters hold: 0.15 / 0.13 of the bytes (shared basis included) and of
the resident-memory growth at N = 8 / 50, loading in 0.53-0.78 of the time, with the same first-token
and decode-step CPU time within the noise (ratios 0.86-1.04 over two runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shareport import flows
from shareport.cli.table import format_table
from shareport.export.exporter import ExportOptions
from tests.benchmarks.genai_common import LORA_TARGETS, GenaiDecoder, add_llama_arguments, llama_from_args

ROOT = Path(__file__).resolve().parents[2]  # the --worker processes run here, as python3 -m

PROMPT_TEXT = "Serve many adapters of one base model from a single exported graph."
NEW_TOKENS = 12  # greedy tokens compared with PyTorch
VOCAB = 2000
WAYS = ("fleet", "separate")


def rss_kib() -> dict[str, int]:
    """This process's VmRSS and its anonymous / file-backed parts, KiB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


# --- the worker: one (N, way) in a fresh process ---


def measure(folder: Path, files: list[str], threads: int, switches: int, prompt: list[int]) -> dict:
    """Load every file into one og.Adapters, then serve ``switches`` requests a, a, b, b, ...: see the module doc."""
    before_model = rss_kib()
    decoder = GenaiDecoder(folder, threads)
    og, model = decoder.og, decoder.model
    before = rss_kib()
    adapters = og.Adapters(model)
    names, load_s = [], []
    for i, path in enumerate(files):
        names.append(f"a{i}")
        start = time.perf_counter()
        adapters.load(path, names[-1])
        load_s.append(time.perf_counter() - start)
    after = rss_kib()
    ids = np.asarray([prompt], np.int32)
    requests = []  # per request: set_active_adapter wall s, then (wall s, thread CPU s) of the first token and of a step
    for k in range(-2, switches):  # the first two requests warm up
        name = names[(k // 2) % len(names)]  # k even: another adapter than the previous request's; k odd: the same
        params = og.GeneratorParams(model)
        total = len(prompt) + 2
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.set_active_adapter(adapters, name)
        t1, c1 = time.perf_counter(), time.thread_time()
        generator.append_tokens(ids)  # the prefill: the first run with the adapter
        generator.generate_next_token()
        t2, c2 = time.perf_counter(), time.thread_time()
        generator.generate_next_token()
        t3, c3 = time.perf_counter(), time.thread_time()
        del generator
        if k >= 0:
            requests.append((t1 - t0, t2 - t1, c2 - c1, t3 - t2, c3 - c2))
    served = rss_kib()
    out = {
        "model_rss_mib": (before["VmRSS"] - before_model["VmRSS"]) / 1024,
        "load_s": sum(load_s),
        "load_ms_median": statistics.median(load_s) * 1000,
        "load_ms_first": load_s[0] * 1000,
        **{f"growth_{k}_mib": (after[k] - before[k]) / 1024 for k in after},
        **{f"served_{k}_mib": (served[k] - before[k]) / 1024 for k in after},
        "file_bytes": sum(os.path.getsize(p) for p in files),
    }
    switched, same = requests[0::2], requests[1::2]
    for kind, values in (("switch", switched), ("same", same)):
        for i, what in enumerate(("set_ms", "first_token_ms", "first_token_cpu_ms", "step_ms", "step_cpu_ms")):
            out[f"{kind}_{what}"] = statistics.median(v[i] for v in values) * 1000
    # paired: each switching request against the next one (same adapter, one request later)
    out["switch_extra_cpu_ms"] = statistics.median(a[2] - b[2] for a, b in zip(switched, same)) * 1000
    return out


def run_worker(folder: Path, files: list[str], args, prompt: list[int]) -> dict:
    spec = json.dumps(
        {"folder": str(folder), "files": files, "threads": args.threads, "switches": args.switches, "prompt": prompt}
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_fleet_serving", "--worker", spec],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    if done.returncode != 0:
        raise SystemExit(f"worker failed on {folder}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- building the models, adapters and exports ---


def save_bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (the GPT-2 / Llama-3 kind genai's tokenizer reads; a word-level one
    it refuses) trained on a few standard-library docstrings: <pad> 0, <s> 1, </s> 2, under VOCAB ids."""
    import argparse as docs1
    import inspect
    import json as docs2

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getdoc(m) for m in (docs1, docs2, inspect)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        folder
    )


def build(tmp: Path, args) -> dict:
    from tests.tiny import make_peft_adapter

    def base_model():
        return llama_from_args(args, VOCAB)

    base = tmp / "base"
    base_model().save_pretrained(base)
    save_bpe_tokenizer(base)
    loras = []
    for i in range(max(args.sizes)):
        loras.append(tmp / "loras" / f"lora{i:02d}")
        make_peft_adapter(
            base_model(), loras[-1], seed=100 + i, r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS
        )
    options = ExportOptions(mode="adapter", with_past=True)
    started = time.perf_counter()
    separate = tmp / "separate"
    flows.export(str(loras[0]), str(base), str(separate), options, verify=False, progress=False)
    separate_files = [str(separate / "adapter.onnx_adapter")] + [
        flows.export_adapter(str(lora), str(separate), str(separate / f"{lora.name}.onnx_adapter"))["output"]
        for lora in loras[1:]
    ]
    ways = {}
    for n in args.sizes:
        fleet_dir, graph = tmp / f"fleet{n}", tmp / f"fleet{n}-onnx"
        report = flows.fleet(
            [f"m{i:02d}={lora}" for i, lora in enumerate(loras[:n])], str(fleet_dir), form=args.form, budget=args.budget
        )
        summary = flows.export(str(fleet_dir / "m00"), str(base), str(graph), options, verify=False, progress=False)
        files = [row["file"] for row in summary["fleet_members"]]
        assert len(files) == n, summary["fleet_members"]
        errors = [m["relative_error"] for m in report["members"]]
        ways[n] = {
            "fleet": (graph, files, fleet_dir),
            "separate": (separate, separate_files[:n], None),
            "fleet_report": report,
            "errors": errors,
        }
    print(
        f"built {max(args.sizes)} LoRAs, {len(args.sizes)} fleets and their exports in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return {"base": base, "loras": loras, "ways": ways}


# --- correctness: genai greedy against PyTorch ---


def torch_member_tokens(base: Path, member: Path, prompt: list[int], steps: int, eos: int = 2) -> list[int]:
    """PyTorch greedy with a fleet member attached by shareport's surgery (as ``verify`` attaches it)."""
    import torch
    from transformers import GenerationConfig

    from shareport.files.adapters import load_adapter
    from shareport.model import attach, load_base_model

    model = load_base_model(base)
    attach(model, load_adapter(member))
    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt) :].tolist()


def check_tokens(built: dict, args) -> tuple[list[int], list[str]]:
    """Genai's prompt ids, and one line per adapter checked; raises when genai and PyTorch disagree."""
    import onnxruntime_genai as og

    from tests.export.test_genai import _og_tokens, torch_tokens

    base, lines = built["base"], []
    for n, way in built["ways"].items():
        for kind in WAYS:
            graph, files, fleet_dir = way[kind]
            model = og.Model(str(graph))
            prompt = [int(t) for t in og.Tokenizer(model).encode(PROMPT_TEXT)]
            if kind == "separate" and n != min(built["ways"]):
                continue  # the same graph and files for every N: checked once
            adapters = og.Adapters(model)
            picks = [1, n - 1]
            got = {}
            for i in picks:
                adapters.load(files[i], f"a{i}")
                got[i] = _og_tokens(graph, (model, adapters), f"a{i}", prompt, NEW_TOKENS)
                if kind == "fleet":
                    want = torch_member_tokens(base, fleet_dir / f"m{i:02d}", prompt, NEW_TOKENS)
                else:
                    want = torch_tokens(base, built["loras"][i], prompt, NEW_TOKENS)
                if got[i] != want:
                    raise SystemExit(f"N={n} {kind} adapter {i}: genai {got[i]} != PyTorch {want}")
            want_base = torch_tokens(base, None, prompt, NEW_TOKENS)
            if got[picks[0]] == got[picks[1]] or want_base in got.values():
                raise SystemExit(
                    f"N={n} {kind}: adapters {picks} give the same tokens as each other or the base "
                    f"({got}, base {want_base}): the check would not see a wrong switch"
                )
            lines.append(
                f"N={n} {kind}: adapters {picks} in genai = PyTorch ({got[picks[0]][:6]}..., "
                f"{got[picks[1]][:6]}...; base {want_base[:6]}...)"
            )
    return prompt, lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switches", type=int, default=100, help="requests per process (a, a, b, b, ...)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--form", default="shareab")
    parser.add_argument("--budget", type=float, default=0.125)
    add_llama_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(
            json.dumps(measure(Path(spec["folder"]), spec["files"], spec["threads"], spec["switches"], spec["prompt"]))
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-fleet-serving-") as tmp:
        built = build(Path(tmp), args)
        prompt, lines = check_tokens(built, args)
        built["prompt"] = prompt
        print("\n".join(lines), flush=True)
        results = {(n, kind): [] for n in args.sizes for kind in WAYS}
        for r in range(args.rounds):
            for n in args.sizes:
                for kind in WAYS if r % 2 == 0 else WAYS[::-1]:
                    graph, files, _ = built["ways"][n][kind]
                    results[n, kind].append(run_worker(graph, files, args, prompt))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        graph_bytes = {
            (n, kind): (built["ways"][n][kind][0] / "model.onnx").stat().st_size
            + sum(p.stat().st_size for p in built["ways"][n][kind][0].glob("model.onnx.data"))
            for n in args.sizes
            for kind in WAYS
        }
        report(args, built, results, graph_bytes)


def report(args, built: dict, results: dict, graph_bytes: dict) -> None:
    """The table and the ratios; bytes held = the adapter files plus, for the fleet, what its graph
    holds more than the plain one (the shared basis, stored once)."""

    def med(n, kind, key):
        return statistics.median(r[key] for r in results[n, kind])

    def held(n, kind):
        return med(n, kind, "file_bytes") + graph_bytes[n, kind] - graph_bytes[n, "separate"]

    print(
        f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}; LoRAs r={args.rank} on "
        f"q,k,v,o; fleet --form {args.form} --budget {args.budget}; onnxruntime-genai "
        f"{__import__('onnxruntime_genai').__version__} on cpu, {args.threads} intra-op thread(s), fp32, prompt "
        f"{len(built['prompt'])} tokens, {args.switches} requests per process, {args.rounds} rounds (medians)"
    )
    rows = []
    for n in args.sizes:
        errors = built["ways"][n]["errors"]
        print(
            f"N={n} fleet member relative errors: min {min(errors):.3f}, mean {statistics.fmean(errors):.3f}, "
            f"max {max(errors):.3f}"
        )
        for kind in WAYS:
            rows.append(
                (
                    n,
                    kind,
                    f"{med(n, kind, 'file_bytes'):,.0f}",
                    f"{held(n, kind):,.0f}",
                    round(med(n, kind, "load_s") * 1000, 3),
                    round(med(n, kind, "load_ms_median"), 4),
                    round(med(n, kind, "growth_VmRSS_mib"), 2),
                    round(med(n, kind, "growth_RssAnon_mib"), 2),
                    round(med(n, kind, "served_VmRSS_mib"), 2),
                    round(med(n, kind, "switch_set_ms"), 4),
                    round(med(n, kind, "same_set_ms"), 4),
                    round(med(n, kind, "switch_first_token_cpu_ms"), 3),
                    round(med(n, kind, "switch_extra_cpu_ms") * 1000, 1),
                    round(med(n, kind, "switch_step_cpu_ms"), 3),
                )
            )
    print(
        format_table(
            [
                "N",
                "way",
                "adapter file bytes",
                "+ shared basis",
                "load ms (all N)",
                "load ms/adapter",
                "RSS growth MiB",
                "of it anon",
                "RSS after serving",
                "switch ms",
                "same ms",
                "first token CPU ms after switch",
                "its extra us",
                "decode step CPU ms",
            ],
            rows,
        )
    )
    for n in args.sizes:

        def ratio(key, n=n):
            return med(n, "fleet", key) / med(n, "separate", key)

        switch = med(n, "fleet", "switch_set_ms")
        load = med(n, "separate", "load_ms_median")
        print(
            f"N={n} fleet/separate: file bytes {ratio('file_bytes'):.3f} (with the shared basis "
            f"{held(n, 'fleet') / held(n, 'separate'):.3f}), load {ratio('load_s'):.3f}, RSS growth "
            f"{ratio('growth_VmRSS_mib'):.3f} (after serving {ratio('served_VmRSS_mib'):.3f}), switch "
            f"{ratio('switch_set_ms'):.3f}, first token after switch {ratio('switch_first_token_cpu_ms'):.3f} CPU "
            f"({ratio('switch_first_token_ms'):.3f} wall), decode step {ratio('switch_step_cpu_ms'):.3f} CPU "
            f"({ratio('switch_step_ms'):.3f} wall)"
        )
        print(
            f"N={n} target: switching members (set_active_adapter) {switch * 1000:.1f} us against loading one "
            f"separate LoRA file {load * 1000:.1f} us: {'met' if switch < load else 'MISSED'} "
            f"(switch_over_lora_load {switch / load:.3f}); the first token after a switch, paired with the next "
            f"request's (same adapter): {med(n, 'fleet', 'switch_extra_cpu_ms') * 1000:+.1f} us CPU (fleet), "
            f"{med(n, 'separate', 'switch_extra_cpu_ms') * 1000:+.1f} us (separate)"
        )


if __name__ == "__main__":
    main()
