"""The demo's built-in material: a small corpus, a tokenizer trained on it, a small Llama.

Everything is generated in code from fixed seeds, so ``shareport demo`` needs no download and
gives the same bytes on every machine. The corpus is a few thousand sentences from a small
grammar with real regularities (agreement, fixed phrases), so a LoRA has something to learn.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SUBJECTS = ["the engineer", "the model", "a small adapter", "the compiler", "my colleague", "the runtime",
            "the old server", "a careful reviewer", "the graph", "the tokenizer", "our team", "the student"]
VERBS = ["exports", "compresses", "verifies", "merges", "loads", "trains", "shares", "measures", "folds",
         "inspects", "converts", "recovers"]
OBJECTS = ["the weights", "every layer", "a shared matrix", "the low rank factors", "two adapters",
           "the attention heads", "a quantised graph", "the update", "its own output", "the test set"]
ENDINGS = ["before lunch", "on the cpu", "without a gpu", "in one pass", "with great care", "every night",
           "for the release", "in a few seconds", "after the merge", "as expected"]
CONNECTORS = ["and then", "because", "while", "so that", "although"]


def corpus(sentences: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic lines of text: one or two clauses from the grammar above."""
    rng = random.Random(seed)

    def clause() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"

    lines = []
    for _ in range(sentences):
        text = clause()
        if rng.random() < 0.4:
            text += f" {rng.choice(CONNECTORS)} {clause()}"
        lines.append(text[0].upper() + text[1:] + ".")
    return lines


def build_tokenizer(lines: list[str], vocab_size: int = 384):
    """A byte-level BPE trained on ``lines``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_base(out: str | Path, lines: list[str], layers: int = 6, hidden: int = 128, seed: int = 0) -> Path:
    """Write a small random-weight Llama and its tokenizer to ``out`` (a transformers folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(lines)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
