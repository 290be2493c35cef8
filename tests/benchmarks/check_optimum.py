"""Hugging Face Optimum on shareport's decoder exports: does ``ORTModelForCausalLM`` load them and
generate PEFT's greedy tokens?

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.check_optimum [--out /tmp/check-optimum]
        [--venv /tmp/optimum-venv] [--spec "optimum[onnxruntime]"]

Not collected by pytest (Optimum pins other transformers versions than the project's). In the
project's environment it builds a tiny Llama (2 layers) with a word-level tokenizer and a real
PEFT LoRA (r=4, alpha 8, q/k/v/o), exports it with shareport in six variants (folded, adapter
mode with the usual empty adapter inputs, adapter mode with ``embed_adapter``; each with and
without past; verified against PyTorch) and computes PEFT's greedy tokens with
``generate(**tok(texts))``: each of two prompts of different lengths alone, and both as a batch
padded on the side the exported tokenizer names and on the left. Then it makes a venv at
``--venv`` (``--system-site-packages``, so the CPU torch is reused; pip puts Optimum's own
transformers and onnxruntime in the venv, ahead of the project's), installs ``--spec`` there (the
newest versions pip resolves; the venv is kept between runs, as are the exports under ``--out``)
and runs this file in it with ``--child``: per folder ``ORTModelForCausalLM.from_pretrained(folder)``
(and, where that fails, with ``use_cache=False``) and the same ``generate`` calls. Prints the
versions, the tokens and one table: variant, loads?, tokens equal?, notes; exits 1 if a variant
does not give the tokens it should alone and in the left-padded batch.

Expected, not failures: a graph without past loads only with ``use_cache=False`` (Optimum's
argument defaults to true and overrides config.json and generation_config.json); adapter mode
without ``embed_adapter`` gives the base model's tokens (Optimum feeds only the graph's required
inputs, so the adapter inputs keep their empty defaults, and it cannot pass ``adapter.onnx_adapter``);
the right-padded batch may differ from PEFT's after the pads (transformers warns that a decoder
needs left padding), which the notes show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = ["w5 w9 w17 w33 w40", "w7 w3"]  # each alone, then both as one batch (different lengths)
NEW = 10
# name -> (ExportOptions fields, the reference its tokens should equal)
VARIANTS = {
    "folded+past": (dict(mode="folded", with_past=True), "lora"),
    "folded": (dict(mode="folded"), "lora"),
    "adapter+past": (dict(mode="adapter", with_past=True), "base"),
    "adapter": (dict(mode="adapter"), "base"),
    "adapter+embed+past": (dict(mode="adapter", with_past=True, embed_adapter=True), "lora"),
    "adapter+embed": (dict(mode="adapter", embed_adapter=True), "lora"),
}
PACKAGES = ["optimum", "optimum-onnx", "transformers", "onnxruntime", "tokenizers", "huggingface-hub", "torch"]


def generate_all(model, tok) -> dict:
    """Greedy tokens (new ones only): each prompt alone, and both as one batch padded on the side the
    tokenizer names (``batch``) and on the left (``batch_left``, what batched decoding needs)."""
    import torch

    def new_tokens(texts, side):
        tok.padding_side = side
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
        return ids[:, enc["input_ids"].shape[1] :].tolist()

    side = tok.padding_side
    out = {"padding_side": side, "alone": [new_tokens([p], side)[0] for p in PROMPTS]}
    out["batch"] = new_tokens(PROMPTS, side)
    out["batch_left"] = new_tokens(PROMPTS, "left")
    tok.padding_side = side
    return out


def child(folders: list[str]) -> None:
    """In the Optimum venv: load each folder with ORTModelForCausalLM and generate; one JSON line."""
    from importlib.metadata import version

    from transformers import AutoTokenizer

    result = {"versions": {}, "runs": {}}
    for name in PACKAGES:
        try:
            result["versions"][name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            result["versions"][name] = None
    from optimum.onnxruntime import ORTModelForCausalLM

    for folder in folders:
        run = {}
        tok = AutoTokenizer.from_pretrained(folder)
        # as users call it first; Optimum's from_pretrained defaults to use_cache=True whatever the files say
        for kwargs in ({}, {"use_cache": False}):
            try:
                model = ORTModelForCausalLM.from_pretrained(folder, **kwargs)
                run.update(loaded=True, kwargs=kwargs, can_use_cache=bool(getattr(model, "can_use_cache", False)))
                run.update(generate_all(model, tok))
                run.pop("error", None)
                break
            except Exception as exc:  # noqa: BLE001 - what Optimum says is the result
                text = str(exc).strip()
                run.setdefault("errors", []).append(
                    f"{kwargs}: {type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
                )
                run["error"] = run["errors"][-1]
        result["runs"][Path(folder).name] = run
    print("RESULT " + json.dumps(result))


def peft_reference(base: Path, lora: Path | None, tok_folder: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    if lora is not None:
        model = PeftModel.from_pretrained(model, str(lora)).eval()
    return generate_all(model, AutoTokenizer.from_pretrained(str(tok_folder)))


def build(out: Path) -> tuple[dict, dict[str, Path]]:
    """The case, the exports and PEFT's tokens (kept under ``out``: a rerun reuses them)."""
    from shareport.export.exporter import ExportOptions, export
    from tests.export.test_genai import save_word_tokenizer
    from tests.onnx_cases import make_case
    from tests.tiny import TARGETS, tiny_llama

    base, lora = out / "base", out / "lora"
    if not (lora / "adapter_config.json").is_file():
        base, lora = make_case(out, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=TARGETS["llama"])
        save_word_tokenizer(base)
    folders = {}
    for name, (options, _) in VARIANTS.items():
        folder = out / "exports" / name
        if not (folder / "model.onnx").is_file():
            export(lora, base, folder, options=ExportOptions(**options), progress=False, verify=True)
        folders[name] = folder
    ref_file = out / "peft.json"
    if not ref_file.is_file():
        tok_folder = folders["folded"]  # the exported tokenizer: what Optimum's users tokenize with
        ref_file.write_text(
            json.dumps({"lora": peft_reference(base, lora, tok_folder), "base": peft_reference(base, None, tok_folder)})
        )
    return json.loads(ref_file.read_text()), folders


def make_venv(venv: Path, spec: str) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
    return python


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def table(refs: dict, runs: dict) -> tuple[list[list[str]], list[str]]:
    """One row per variant. It works when each prompt alone and the left-padded batch give the
    tokens it should (PEFT's, or the base model's for adapter mode without the adapter embedded),
    loaded as ``from_pretrained(folder)`` or, for a graph without past, with ``use_cache=False``."""
    rows, failed = [], []
    for name, (_, want) in VARIANTS.items():
        run = runs.get(name, {"error": "not run"})
        if "error" in run:
            rows.append([name, "no", "-", " / ".join(run.get("errors", [run["error"]]))])
            failed.append(name)
            continue
        ref = refs[want]
        alone, left = run["alone"] == ref["alone"], run["batch_left"] == ref["alone"]
        same_side = run["batch"] == ref["batch"]  # PEFT given the same padded batch
        loads = "yes" if not run["kwargs"] else "with use_cache=False"
        notes = []
        if run["kwargs"]:
            notes.append("plain from_pretrained: " + run["errors"][0].split(": ", 2)[-1][:60] + "...")
        if want == "base":
            notes.append("base model's tokens: adapter inputs keep their empty defaults")
        if not (alone and left):
            other = "base" if want == "lora" else "lora"
            if run["alone"] == refs[other]["alone"]:
                notes.append(f"gives the {other} model's tokens")
            failed.append(name)
        if not same_side:
            notes.append(
                f"{run['padding_side']}-padded batch differs from PEFT's on the same batch at "
                f"{sum(a != b for x, y in zip(run['batch'], ref['batch']) for a, b in zip(x, y))} of "
                f"{NEW * len(PROMPTS)} tokens"
            )
        rows.append(
            [
                name,
                loads,
                f"alone {yes(alone)}, left batch {yes(left)}, {run['padding_side']} batch {yes(same_side)}",
                "; ".join(notes),
            ]
        )
    return rows, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/check-optimum")
    parser.add_argument("--venv", default="/tmp/optimum-venv")
    parser.add_argument("--spec", default="optimum[onnxruntime]", help="what pip installs in the venv")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    refs, folders = build(out)
    python = make_venv(Path(args.venv), args.spec)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's packages, not the project's
    proc = subprocess.run(
        [str(python), __file__, "--child", *map(str, folders.values())], env=env, capture_output=True, text=True
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        print(f"the Optimum child failed (exit {proc.returncode})")
        return 1
    result = json.loads(line[len("RESULT ") :])
    print("versions (venv): " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"prompts: {PROMPTS}, each alone and as a batch; {NEW} new tokens, greedy")
    for who, key in (("PEFT (LoRA)", "lora"), ("base model", "base")):
        ref = refs[key]
        print(
            f"{who}: alone {ref['alone']}, {ref['padding_side']}-padded batch {ref['batch']}, "
            f"left-padded batch {ref['batch_left']}"
        )
    rows, failed = table(refs, result["runs"])
    header = ["variant", "loads?", "tokens equal?", "notes"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, ["-" * w for w in widths] + ["-----"], *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)) + " | " + r[3])
    for name, run in result["runs"].items():
        if "alone" in run:
            print(
                f"{name}: alone {run['alone']}, {run['padding_side']}-padded batch {run['batch']}, "
                f"left-padded batch {run['batch_left']}"
            )
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
