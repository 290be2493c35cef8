"""The demo's built-in material: two small corpora, a tokenizer, a small pretrained Llama.

Everything is generated in code from fixed seeds, so ``shareport demo`` needs no download and
gives the same bytes on every machine. Sentences come from a small grammar with real
regularities. The base model is pretrained briefly on the *general* corpus; the LoRA then
adapts it to the *domain* corpus, whose sentences follow other habits (which subjects do
what, which phrases end a clause): a small domain adaptation, as LoRAs are used for.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SUBJECTS = [
    "the engineer",
    "the model",
    "a small adapter",
    "the compiler",
    "my colleague",
    "the runtime",
    "the old server",
    "a careful reviewer",
    "the graph",
    "the tokenizer",
    "our team",
    "the student",
]
VERBS = [
    "exports",
    "compresses",
    "verifies",
    "merges",
    "loads",
    "trains",
    "shares",
    "measures",
    "folds",
    "inspects",
    "converts",
    "recovers",
]
OBJECTS = [
    "the weights",
    "every layer",
    "a shared matrix",
    "the low rank factors",
    "two adapters",
    "the attention heads",
    "a quantised graph",
    "the update",
    "its own output",
    "the test set",
]
ENDINGS = [
    "before lunch",
    "on the cpu",
    "without a gpu",
    "in one pass",
    "with great care",
    "every night",
    "for the release",
    "in a few seconds",
    "after the merge",
    "as expected",
]
CONNECTORS = ["and then", "because", "while", "so that", "although"]


def corpus(sentences: int = 3000, seed: int = 0, domain: bool = False) -> list[str]:
    """Deterministic lines of text: one or two clauses from the grammar above.

    The general corpus draws every word uniformly. The domain corpus ties each subject to
    two verbs and each verb to two objects and one ending, so the next word is predictable
    from the previous one there, and a LoRA can learn it.
    """
    rng = random.Random(seed)
    pick = random.Random(1234)  # the domain's fixed habits
    verbs_of = {s: pick.sample(VERBS, 2) for s in SUBJECTS}
    objects_of = {v: pick.sample(OBJECTS, 2) for v in VERBS}
    ending_of = {o: pick.choice(ENDINGS) for o in OBJECTS}

    def clause() -> str:
        if not domain:
            return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
        subject = rng.choice(SUBJECTS)
        verb = rng.choice(verbs_of[subject])
        obj = rng.choice(objects_of[verb])
        return f"{subject} {verb} {obj} {ending_of[obj]}"

    lines = []
    for _ in range(sentences):
        text = clause()
        if rng.random() < 0.4:
            text += f" {rng.choice(CONNECTORS)} {clause()}"
        lines.append(text[0].upper() + text[1:] + ".")
    return lines


def build_tokenizer(lines: list[str], vocab_size: int = 384):
    """A byte-level BPE trained on ``lines``, wrapped as a transformers fast tokenizer.

    Like Llama's, it starts every text with ``<s>``: the models trained on it then learn how a text
    begins, so a text sampled from ``<s>`` (``finetune --generate``, a generation with an empty prompt)
    starts as the corpus does. Without it no text ever began there, and the samples were out of the
    training distribution from their first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def pretrain(model, tokenizer, lines: list[str], steps: int, batch: int = 16, length: int = 32, seed: int = 0) -> None:
    """A short full training of ``model`` on ``lines`` (next-token loss), so the base is not random."""
    gen = torch.Generator().manual_seed(seed)
    encoded = tokenizer(lines, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(lines), (batch,), generator=gen)
        labels = ids[rows].masked_fill(mask[rows] == 0, -100)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_base(
    out: str | Path, lines: list[str], layers: int = 6, hidden: int = 128, seed: int = 0, pretrain_steps: int = 150
) -> Path:
    """Write a small Llama, pretrained briefly on ``lines``, and its tokenizer to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(lines)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, lines, pretrain_steps, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
