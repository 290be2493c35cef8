"""A decoder end to end: PEFT LoRA on a tiny Llama -> ASLoRA -> fidelity of the logits.

Shows, on a tiny Llama built from a config (random base weights, no downloads):

1. a PEFT LoRA (r=8 on every attention and MLP projection) trained for a short while on a
   synthetic next-token rule (each token is followed by its image under a fixed permutation),
   so that its factors are trained rather than random;
2. that shareport's ``attach`` reproduces PEFT's logits;
3. the conversion to ASLoRA (the default plan, and parameter budgets of 50% and 25%) with the
   per-kind conversion report (rank, groups of layers, relative error, retained energy);
4. fidelity to the LoRA before recovery: mean KL(LoRA || converted) per token, top-1 agreement,
   and accuracy on the rule; the base model without adapter gives the scale of "no adapter";
5. fidelity after recovery (`shareport finetune`, distillation toward the LoRA on the training
   sequences, no labels) and in ONNX Runtime (`shareport export --mode adapter`, the recovered
   adapter active). ``--skip recover export`` leaves those steps out.

    python examples/tiny_llama_decoder.py --out /tmp/tiny-llama
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_steps as steps  # noqa: E402

from shareport.files.adapters import load_adapter  # noqa: E402
from shareport.model import attach, load_base_model  # noqa: E402
from shareport.train.data import save_tokenized  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


@dataclasses.dataclass(frozen=True)
class Settings:
    layers: int
    train_steps: int
    batch_size: int
    seq_len: int
    n_eval: int  # held-out sequences for fidelity
    recover_steps: int
    lr: float = 3e-3
    # a wider init than Llama's 0.02 gives a random base confident (non-flat) next-token
    # distributions, so the KL between adapters measures something
    init_std: float = 0.1
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    threads: int = 2  # fixed, because a different thread count may change float sums
    plans: tuple = (("default", None), ("budget 50%", 0.5), ("budget 25%", 0.25))


FULL = Settings(layers=8, train_steps=300, batch_size=16, seq_len=32, n_eval=64, recover_steps=100)
FAST = Settings(
    layers=4,
    train_steps=40,
    batch_size=8,
    seq_len=24,
    n_eval=16,
    recover_steps=20,
    lr=5e-3,
    plans=(("default", None), ("budget 50%", 0.5)),
)


# ------------------------------------------------------------------------------ model and data
def build_base(settings: Settings, out: Path) -> Path:
    """A tiny random Llama saved as a transformers folder (shareport commands load folders)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=settings.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=settings.init_std,
    )
    LlamaForCausalLM(config).save_pretrained(str(out / "base"))
    return out / "base"


def rule_sequences(n: int, settings: Settings, seed: int) -> torch.Tensor:
    """Sequences where each token is followed by ``PERMUTATION[token]`` (a fixed random rule)."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.empty(n, settings.seq_len, dtype=torch.long)
    seqs[:, 0] = torch.randint(VOCAB, (n,), generator=gen)
    for t in range(1, settings.seq_len):
        seqs[:, t] = perm[seqs[:, t - 1]]
    return seqs


def train_lora(base_dir: Path, settings: Settings):
    """A PEFT LoRA trained on the rule with next-token cross-entropy."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=TARGETS
    )
    model = get_peft_model(load_base_model(base_dir, "CAUSAL_LM"), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    data = rule_sequences(settings.train_steps * settings.batch_size, settings, seed=settings.seed + 1)
    for batch in data.split(settings.batch_size):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def attached_logits(base_model, adapter, ids: torch.Tensor) -> torch.Tensor:
    handle = attach(base_model, adapter)
    try:
        return logits_of(base_model, ids)
    finally:
        handle.detach()


# ------------------------------------------------------------------------------------ fidelity
def fidelity(reference: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """How close ``logits`` are to the LoRA's ``reference``, per next-token position.

    kl: mean KL(reference || logits) in nats; top1: share of positions with the same argmax;
    rule_accuracy: share of positions predicting the rule's next token.
    """
    ref_logp, logp = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    pred = logits.argmax(-1)
    return {
        "kl": float(kl.mean()),
        "top1": float((pred == reference.argmax(-1)).float().mean()),
        "rule_accuracy": float((pred[:, :-1] == ids[:, 1:]).float().mean()),
    }


def kind_rows(report) -> list[dict]:
    """The conversion report per kind, as shown to the user."""
    return [
        {
            "kind": k.kind,
            "rank": k.rank,
            "groups": k.groups,
            "relative_error": k.relative_error,
            "retained_energy": k.retained_energy,
            "parameters": k.parameters_after,
        }
        for k in report.kinds
    ]


def evaluate_plan(label: str, budget: float | None, lora, ctx) -> dict:
    """Convert to ASLoRA with one plan; fidelity before recovery, after it, and in ONNX Runtime."""
    name = label.replace(" ", "-").replace("%", "")
    converted, report, folder = steps.convert(lora, "aslora", budget, ctx["out"] / "adapters" / f"aslora-{name}")
    row = {
        "plan": label,
        "parameters": converted.num_parameters(),
        "ratio": report.ratio,
        "kinds": kind_rows(report),
        "converted": fidelity(ctx["reference"], attached_logits(ctx["model"], converted, ctx["ids"]), ctx["ids"]),
        "recovered": None,
        "onnx": None,
    }
    work = ctx["out"] / "work" / name
    settings = ctx["settings"]
    recipe = steps.Recipe(settings.recover_steps, settings.lr, settings.batch_size, settings.seq_len, settings.seed)
    recovered = steps.run_step(
        "recover",
        ctx["skip"],
        steps.recover,
        folder,
        ctx["lora_dir"],
        ctx["base_dir"],
        ctx["data_dir"],
        work / "recovered",
        recipe,
    )
    if recovered is not None:
        folder = recovered[0]
        logits = attached_logits(ctx["model"], load_adapter(folder), ctx["ids"])
        row["recovered"] = fidelity(ctx["reference"], logits, ctx["ids"])
    onnx = steps.run_step(
        "export",
        ctx["skip"],
        steps.onnx_logits,
        folder,
        ctx["base_dir"],
        work / "onnx",
        {"input_ids": ctx["ids"]},
        settings.threads,
    )
    if onnx is not None:
        row["onnx"] = fidelity(ctx["reference"], onnx.logits, ctx["ids"])
    return row


# ------------------------------------------------------------------------------------- report
def tables(results: dict) -> str:
    def fid(f):
        return ["skipped"] * 3 if f is None else [f"{f['kl']:.4f}", f"{f['top1']:.3f}", f"{f['rule_accuracy']:.3f}"]

    header = ["adapter", "factor params", "KL to LoRA", "top-1 agreement", "rule accuracy", "recovered KL", "ONNX KL"]
    lora_row = ["lora (shareport attach)", results["lora"]["parameters"], *fid(results["lora"]["attached"]), "-", "-"]
    base_row = ["base, no adapter", 0, *fid(results["base"]), "-", "-"]
    rows = [base_row, lora_row]
    for r in results["plans"]:
        rows.append(
            [
                f"aslora, {r['plan']}",
                f"{r['parameters']} ({r['ratio']:.1%})",
                *fid(r["converted"]),
                steps.cell(r["recovered"] and r["recovered"]["kl"], "{:.4f}"),
                steps.cell(r["onnx"] and r["onnx"]["kl"], "{:.4f}"),
            ]
        )
    kinds_header = ["plan", "kind", "rank", "groups of layers", "rel. error", "retained energy"]
    kinds = [
        [
            r["plan"],
            k["kind"],
            k["rank"],
            " ".join(str(g) for g in k["groups"]),
            f"{k['relative_error']:.3f}",
            f"{k['retained_energy']:.3f}",
        ]
        for r in results["plans"]
        for k in r["kinds"]
    ]
    return steps.markdown_table(header, rows) + "\n\nConversion report:\n\n" + steps.markdown_table(kinds_header, kinds)


def run(settings: Settings, out: Path, skip: set[str]) -> dict:
    torch.set_num_threads(settings.threads)
    base_dir = build_base(settings, out)
    peft_model = train_lora(base_dir, settings)
    lora_dir = out / "lora"
    peft_model.save_pretrained(str(lora_dir))
    lora = load_adapter(lora_dir)

    ids = rule_sequences(settings.n_eval, settings, seed=settings.seed + 2)  # held out: another seed
    reference = logits_of(peft_model, ids)
    model = load_base_model(base_dir, "CAUSAL_LM")
    base_logits = logits_of(model, ids)
    attached = attached_logits(model, lora, ids)
    diff = float((attached - reference).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"attach differs from PEFT: max logit difference {diff:.2e}")

    # unlabelled inputs for distillation: the LoRA's training sequences, already token ids (the
    # tiny base has no tokenizer), in the tokenized folder format the commands read
    train_ids = rule_sequences(settings.train_steps * settings.batch_size, settings, seed=settings.seed + 1)
    (out / "work").mkdir(parents=True, exist_ok=True)
    data_dir = save_tokenized(out / "work" / "distill_inputs", train_ids.tolist(), overwrite=True)
    ctx = dict(
        out=out,
        model=model,
        ids=ids,
        reference=reference,
        skip=skip,
        lora_dir=lora_dir,
        base_dir=base_dir,
        data_dir=data_dir,
        settings=settings,
    )
    return {
        "settings": dataclasses.asdict(settings),
        "skipped": sorted(skip),
        "base": fidelity(reference, base_logits, ids),
        "lora": {
            "attached": fidelity(reference, attached, ids),
            "max_logit_diff_vs_peft": diff,
            "parameters": lora.num_parameters(),
        },
        "plans": [evaluate_plan(label, budget, lora, ctx) for label, budget in settings.plans],
    }


def main(argv=None) -> dict:
    return steps.run_example(argv, __doc__, "tiny-llama-example", ("recover", "export"), run, tables, FULL, FAST)


if __name__ == "__main__":
    main()
