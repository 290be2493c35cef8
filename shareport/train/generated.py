"""Recovery data for a user who has none: texts sampled from the teacher (``finetune --generate N``).

Sequence-level distillation (Kim & Rush, 2016): the student learns the teacher's distribution on
the teacher's own samples, the inputs where the two must agree for generation to match. Each text
starts at the base's beginning-of-sequence token and is sampled token by token from base + LoRA up
to ``max_length`` tokens or its end-of-sequence token, at temperature 1 from the nucleus of top-p
0.9 (Holtzman et al., 2020): the smallest set of next tokens holding 90% of the probability. Pure
sampling (top-p 1) draws from the unreliable tail too, and a text that took one such token goes on
from a prefix no real text has; the student then learns the teacher where it will never be used.
Measured on two causal LMs (the demo's, and a wider one pretrained 10x longer), 1000 texts at top-p
0.9 removed 69-89% and 84-91% of the start's held-out KL, pure sampling 62-87% and 80-90%: 0.9 beat
pure sampling on all eight starts, and on the demo 0.95, 0.8 and 0.7 were level or behind on three of
four (docs/results.md). The global RNG is seeded for the sampling and restored after, so the same
seed gives the same texts and training's own randomness is untouched.
"""

from __future__ import annotations

import torch

from ..errors import ShareportError
from ..model.base import is_causal_lm
from .data import TokenData, load_tokenizer, pad_token_id
from .teacher import Teacher

CHUNK = 32  # texts sampled together
SAMPLING_TEMPERATURE = 1.0  # the teacher's distribution as it is (a benchmark may patch it to compare)
SAMPLING_TOP_P = 0.9  # the nucleus sampled from (module docstring; a benchmark may patch it to compare)


def _token_ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in (value or []) if isinstance(v, int)]


MIN_TEXTS = 2  # one to train on, one held out to pick the best step on


def check_generate(count: int | None, max_length: int | None = None) -> None:
    """Before anything is loaded: a count and a length that can make recovery data."""
    if count is None:
        return
    if count < MIN_TEXTS:
        raise ShareportError(
            f"--generate must be at least {MIN_TEXTS} texts (one to train on, one held out), got {count}"
        )
    if max_length is not None and max_length < 2:
        raise ShareportError(f"--max-length must be at least 2 to generate texts, got {max_length}")


def generate_data(
    model, teacher: Teacher, *, count: int, max_length: int, seed: int, where: str, progress: bool = True
) -> TokenData:
    """``count`` token sequences sampled from ``model`` with the teacher's adapter active. ``progress``:
    this process may show the sampling bar (under several processes, only the local main one does, as
    with the training bar)."""
    check_generate(count, max_length)
    if not is_causal_lm(model):
        raise ShareportError(
            f"{where}: --generate samples texts from a causal LM; this base loads as "
            f"{type(model).__name__} (give --data instead)"
        )
    starts = _token_ids(getattr(model.config, "bos_token_id", None))
    if not starts:
        raise ShareportError(
            f"{where}: --generate starts each text at the beginning-of-sequence token, and "
            "config.json sets no bos_token_id (give --data instead)"
        )
    from tqdm.auto import tqdm

    ends = set(_token_ids(getattr(model.config, "eos_token_id", None)))
    device = next(model.parameters()).device
    # shown on a terminal only (disable=None), as every shareport bar: sampling can take a while
    bar = tqdm(
        total=count,
        desc="sampling texts from the teacher",
        unit="text",
        dynamic_ncols=True,
        disable=None if progress else True,
    )
    saved = torch.get_rng_state()
    sequences: list[list[int]] = []
    torch.manual_seed(seed)
    try:
        with torch.no_grad(), teacher.active(model):
            for first in range(0, count, CHUNK):
                rows = min(CHUNK, count - first)
                prompt = torch.full((rows, 1), starts[0], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=SAMPLING_TEMPERATURE,
                    top_k=0,
                    top_p=SAMPLING_TOP_P,
                    max_new_tokens=max_length - 1,
                    pad_token_id=pad_token_id(model.config),
                    eos_token_id=sorted(ends) or None,
                )
                sequences += [_until_end(row, ends) for row in out.tolist()]
                bar.update(rows)
    finally:
        bar.close()
        torch.set_rng_state(saved)
    return TokenData(sequences, None, f"{count} texts sampled from the teacher (top-p {SAMPLING_TOP_P:g}, seed {seed})")


def start_note(base_dir, bos_token_id) -> str | None:
    """A note for a base whose tokenizer does not begin an encoded text with the beginning-of-sequence
    token (GPT-2's and Qwen2's do not, Llama's does): the texts the LoRA was trained on then never started
    where the samples start, and their first tokens may be unlike the data's (the demo's model, before its
    tokenizer began texts with ``<s>``, sampled mid-word fragments there). None when it does, or when
    there is no tokenizer to ask."""
    try:
        tokenizer = load_tokenizer(base_dir)
    except ShareportError:
        return None
    starts = _token_ids(bos_token_id)[:1]  # generate_data starts at the first
    if not starts or tokenizer("a", add_special_tokens=True)["input_ids"][:1] == starts:
        return None
    name = tokenizer.convert_ids_to_tokens(starts[0])
    return (
        f"the samples start at {name!r}, and {base_dir}'s tokenizer does not put it in front of a text: a LoRA "
        "trained on texts it encoded never saw one start there, and the samples' first tokens may be unlike "
        "your data's (--data recovers more)"
    )


def _until_end(row: list[int], ends: set[int]) -> list[int]:
    """The sampled tokens up to and including the first end-of-sequence token (generate pads after it)."""
    for i, token in enumerate(row[1:], start=1):
        if token in ends:
            return row[: i + 1]
    return row
