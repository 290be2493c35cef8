"""Fixtures for the training tests: a saved tiny base with a character tokenizer, text data,
and a deliberately lossy ShareA made by a dense SVD (tiny sizes make that cheap)."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from shareport.adapter import Adapter, Site
from tests.tiny import VOCAB

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as tiny_llama's config expects
CHARS = "abcdefghijklmnopqrstuvwxyz .,"
WORDS = (
    "the a cat dog sat on mat ran far and then slept near tree house bird sang loud quiet small big red "
    "blue old new day night sun moon"
).split()


def save_char_tokenizer(folder: str | Path, bos: bool = True) -> None:
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary; ``bos``: it begins
    every text with ``<s>`` (as Llama's does; GPT-2's does not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def save_base(model, folder: str | Path, tokenizer: bool = True) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if tokenizer:
        save_char_tokenizer(folder)
    return folder


def write_text(path: str | Path, lines: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(lines))
    Path(path).write_text(text + "\n", encoding="utf-8")
    return Path(path)


def sharea_by_svd(adapter: Adapter, rank: int) -> Adapter:
    """ShareA at ``rank``: per kind, A = top right singular vectors of the stacked updates, B_l = dW_l A^T."""
    tensors, sites = {}, {}
    for kind, kind_sites in adapter.kinds().items():
        stack = torch.cat([adapter.update(s.path, torch.float64) for s in kind_sites])
        a = torch.linalg.svd(stack, full_matrices=False).Vh[:rank]
        tensors[f"{kind}.lora_A"] = a.float()
        for s in kind_sites:
            tensors[f"{s.path}.lora_B"] = (adapter.update(s.path, torch.float64) @ a.T).float()
            sites[s.path] = Site(s.path, kind, s.layer, f"{kind}.lora_A", f"{s.path}.lora_B", 1.0)
    return adapter.with_sites(tensors, sites, "sharea")


def recovery_setup(root: str | Path, layers: int = 3, rank: int = 8, shared_rank: int = 2, lines: int = 120) -> dict:
    """A saved tiny Llama base (with tokenizer), a random-factor PEFT LoRA on q and v, its lossy
    ShareA at ``shared_rank`` (native format) and a text file; returns their paths."""
    from shareport.files.adapters import load_adapter, save_adapter
    from tests.tiny import make_peft_adapter, tiny_llama

    root = Path(root)
    paths = {"base": root / "base", "lora": root / "lora", "shared": root / "sharea", "text": root / "train.txt"}
    save_base(tiny_llama(layers), paths["base"])
    make_peft_adapter(
        tiny_llama(layers), paths["lora"], seed=1, r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]
    )
    save_adapter(sharea_by_svd(load_adapter(paths["lora"]), shared_rank), paths["shared"])
    write_text(paths["text"], lines)
    return paths


@contextlib.contextmanager
def cpu_accelerator(monkeypatch, mixed_precision: str):
    """Within the block, training runs on the CPU with ``mixed_precision`` ("no", "bf16") whatever the
    machine has: ``jobs.make_accelerator`` builds a fresh CPU Accelerator (its state is a singleton,
    which earlier tests may have set to CUDA or another precision), and the state is reset after so
    that later tests start from the default."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from shareport.train import jobs

    def make(merging):
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=True)

    monkeypatch.setattr(jobs, "make_accelerator", make)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def finetune_args(paths: dict, out) -> list:
    """``shareport finetune``'s arguments for a ``recovery_setup``: the ShareA toward its LoRA on the text, to ``out``."""
    return [
        "finetune",
        paths["shared"],
        "--base",
        paths["base"],
        "--teacher",
        paths["lora"],
        "--data",
        paths["text"],
        "-o",
        out,
    ]


def classifier_lora(root: str | Path, num_labels: int = 2) -> tuple[Path, Path]:
    """A saved 2-layer tiny BERT classifier (character tokenizer) and a PEFT SEQ_CLS LoRA (r=4 on
    query and value, seed 2) for it: (base folder, LoRA folder) under ``root``."""
    from tests.tiny import make_peft_adapter, tiny_bert

    root = Path(root)
    base = save_base(tiny_bert(layers=2, num_labels=num_labels), root / "cls")
    make_peft_adapter(
        tiny_bert(layers=2, num_labels=num_labels),
        root / "lora",
        seed=2,
        r=4,
        task_type="SEQ_CLS",
        target_modules=["query", "value"],
    )
    return base, root / "lora"
