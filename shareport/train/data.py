"""Training data: read a text file, a JSON-lines file or a tokenized folder; split; batch.

Every source becomes a list of token sequences (and, when the data has them, integer labels):

- a text file (any name but ``*.jsonl``): one example per non-empty line;
- a ``.jsonl`` file: one JSON object per line with a ``text`` string and an optional ``label``
  (all lines or none): a class index, or a class name (all names or all indices). Names become
  indices through the base config's ``label2id`` when it names its labels (not transformers'
  default ``LABEL_0``...), else through the sorted names of the file (:func:`label_ids`); an
  evaluation file takes the training file's mapping, and a name it lacks is an error;
- a tokenized folder: ``tokens.safetensors`` with a 1-D ``input_ids`` (every example's ids,
  concatenated), a 1-D ``lengths`` (one entry per example) and optionally a 1-D ``labels``.
  :func:`save_tokenized` writes one. No tokenizer is needed to read it.

Text is tokenized with the tokenizer saved beside the base model, truncated to ``max_length``.
The held-out split and the batch order are pure functions of fixed seeds and the step number,
so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..errors import ShareportError
from ..files.atomic import atomic_dir
from ..files.tensorfile import load_tensors, save_tensors

TOKENS_NAME = "tokens.safetensors"
# The held-out split must not move when --seed changes, so runs with different seeds are
# evaluated on the same examples.
SPLIT_SEED = 20240611
# Examples drawn for calibration (sample_examples): fixed, so the same data gives the same statistics.
SAMPLE_SEED = 0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclasses.dataclass
class TokenData:
    """Token sequences (no padding) and optional labels, one per example."""

    sequences: list[list[int]]
    labels: list[int] | None
    source: str
    label_ids: dict[str, int] | None = None  # class name -> index, when the file's labels are names
    label_ids_from: str | None = None  # where that mapping came from

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, indices: list[int]) -> "TokenData":
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return dataclasses.replace(self, sequences=[self.sequences[i] for i in indices], labels=labels)


def load_tokenizer(base_dir: str | os.PathLike):
    """The tokenizer saved with the base model; a clear error when there is none."""
    from transformers import AutoTokenizer

    base_dir = Path(base_dir)
    if not any((base_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ShareportError(
            f"{base_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
            "save the tokenizer with the base model or pass a tokenized data folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:
        raise ShareportError(f"{base_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None


def label_ids(base_dir: str | os.PathLike, names) -> tuple[dict[str, int], str]:
    """(class name -> index, where it came from): the base config's ``label2id`` when it names its
    labels, else the sorted ``names``."""
    from ..model.base import read_base_config

    label2id = getattr(read_base_config(base_dir), "label2id", None) or {}
    if label2id and any(str(name) != f"LABEL_{index}" for name, index in label2id.items()):
        return {str(name): int(index) for name, index in label2id.items()}, f"{Path(base_dir) / 'config.json'} label2id"
    return {name: index for index, name in enumerate(sorted(set(names)))}, "the sorted label names of the data"


def _name_labels(path: Path, names: list[str], lines: list[int], base_dir, given) -> tuple[list[int], dict, str]:
    """The class names of ``path`` as indices, through ``given`` (mapping, source) or :func:`label_ids`."""
    mapping, source = given or label_ids(base_dir, names)
    for name, line in zip(names, lines):
        if name not in mapping:
            known = ", ".join(repr(n) for n in sorted(mapping, key=mapping.get))
            raise ShareportError(f"{path}:{line}: label {name!r} is not one of the labels of {source} ({known})")
    return [mapping[name] for name in names], mapping, source


def load_data(
    path: str | os.PathLike,
    base_dir: str | os.PathLike,
    max_length: int,
    label_mapping: tuple[dict[str, int], str] | None = None,
) -> TokenData:
    """Read any supported source; tokenize text with the base model's tokenizer. Class-name labels
    become indices through ``label_mapping`` ((name -> index, its source), e.g. the training data's),
    else through :func:`label_ids`."""
    path = Path(path)
    if max_length < 2:
        raise ShareportError(f"--max-length must be at least 2, got {max_length}")
    if path.is_dir():
        if not (path / TOKENS_NAME).is_file():
            raise ShareportError(
                f"{path}: a folder without {TOKENS_NAME}: give a text file (one example a line), "
                "a .jsonl with 'text', or a folder written by shareport.train.data.save_tokenized"
            )
        data = _read_tokenized(path, max_length)
    elif not path.is_file():
        raise ShareportError(f"{path}: data file not found")
    else:
        texts, labels, lines = _read_jsonl(path) if path.suffix == ".jsonl" else (_read_lines(path), None, [])
        if not texts:
            raise ShareportError(f"{path}: no examples (the file has no non-empty text)")
        mapping = source = None
        if labels is not None and isinstance(labels[0], str):
            labels, mapping, source = _name_labels(path, labels, lines, base_dir, label_mapping)
        data = TokenData(_tokenize(load_tokenizer(base_dir), texts, max_length), labels, str(path), mapping, source)
    if any(len(s) == 0 for s in data.sequences):
        raise ShareportError(f"{path}: an example has no tokens after tokenization")
    return data


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ShareportError(f"{path}: not a UTF-8 text file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_jsonl(path: Path) -> tuple[list[str], list[int] | list[str] | None, list[int]]:
    """(texts, labels: all indices, all names or None, each example's line number)."""
    texts, labels, lines = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShareportError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ShareportError(f"{path}:{number}: expected an object with a non-empty 'text' string")
        label = row.get("label")
        index = isinstance(label, int) and not isinstance(label, bool) and label >= 0
        if label is not None and not index and not (isinstance(label, str) and label.strip()):
            raise ShareportError(
                f"{path}:{number}: 'label' must be a non-negative integer or a class name, got {label!r}"
            )
        first = labels[0] if labels else None
        if label is not None and first is not None and isinstance(first, str) != isinstance(label, str):
            raise ShareportError(
                f"{path}:{number}: 'label' is {label!r}, but line {lines[0]} gives "
                f"{first!r}: use class names or integers, not both"
            )
        texts.append(row["text"])
        labels.append(label)
        lines.append(number)
    has_label = [lab is not None for lab in labels]
    if any(has_label) and not all(has_label):
        missing = has_label.index(False) + 1
        raise ShareportError(f"{path}: some examples have a 'label' and some do not (e.g. example {missing})")
    return texts, (labels if labels and all(has_label) else None), lines


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def _read_tokenized(folder: Path, max_length: int) -> TokenData:
    tensors = load_tensors(folder / TOKENS_NAME)
    ids, lengths, labels = tensors.get("input_ids"), tensors.get("lengths"), tensors.get("labels")
    where = folder / TOKENS_NAME
    if ids is None or lengths is None or ids.dim() != 1 or lengths.dim() != 1:
        raise ShareportError(f"{where}: expected 1-D tensors 'input_ids' and 'lengths'")
    if ids.is_floating_point() or lengths.is_floating_point():
        raise ShareportError(f"{where}: 'input_ids' and 'lengths' must be integer tensors")
    if len(lengths) == 0:
        raise ShareportError(f"{where}: no examples")
    if (lengths < 0).any() or int(lengths.sum()) != len(ids):
        raise ShareportError(f"{where}: 'lengths' must be non-negative and sum to the number of input_ids")
    if labels is not None and (labels.shape != lengths.shape or labels.is_floating_point()):
        raise ShareportError(f"{where}: 'labels' must be an integer tensor with one entry per example")
    # Long tokenized examples are cut like long text, so --max-length means the same for all sources.
    sequences = [chunk.tolist()[:max_length] for chunk in torch.split(ids.long(), lengths.tolist())]
    return TokenData(sequences, labels.tolist() if labels is not None else None, str(folder))


def save_tokenized(
    folder: str | os.PathLike, sequences: list[list[int]], labels: list[int] | None = None, overwrite: bool = False
) -> Path:
    """Write a tokenized data folder (the format :func:`load_data` reads)."""
    tensors = {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int64),
        "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.int64),
    }
    if labels is not None:
        tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_tensors(tensors, tmp / TOKENS_NAME)
    return Path(folder)


def split_heldout(data: TokenData, fraction: float) -> tuple[TokenData, TokenData]:
    """(train, held-out): a fixed pseudo-random ``fraction`` of the examples, at least one each."""
    if not 0 < fraction < 1:
        raise ShareportError(f"--eval-fraction must be between 0 and 1, got {fraction}")
    if len(data) < 2:
        raise ShareportError(
            f"{data.source}: need at least 2 examples (one to train on, one held out), got {len(data)}"
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_eval = min(len(data) - 1, max(1, round(len(data) * fraction)))
    return data.subset(sorted(order[n_eval:])), data.subset(sorted(order[:n_eval]))


def sample_examples(data: TokenData, count: int) -> TokenData:
    """``count`` examples drawn without replacement with a fixed seed, kept in file order (all of them
    when ``count >= len(data)``, so a large count reads the whole file in order).

    Not the first ``count``: data files are often sorted (by label, by source), and the first few
    hundred examples of a label-sorted file are two or three classes; statistics from them describe
    those classes only (issue 19: on a 12-class file sorted by label, the first 256 of 1,349 texts
    covered 3 classes and calibrated truncation came out 2x worse than plain).
    """
    if count >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SAMPLE_SEED)).tolist()
    return data.subset(sorted(order[:count]))


# batches per run of the stream that ``BatchOrder`` sorts by length (see there): at 16, batches of 8 on
# docstrings hold 96% real tokens (57% shuffled; 92% at 8, 86% at 4), and a run spans 16 steps
LENGTH_GROUP_BATCHES = 16
GROUP_ORDER_SEED = 7_777_777  # apart from the epochs' seeds (seed * 1_000_003 + epoch)


class BatchOrder:
    """The examples of global batch ``step``: epochs of seeded shuffles, read as one stream.

    Batch ``t`` holds stream positions ``t*B .. t*B+B-1``; position ``p`` is example
    ``perm_e[p % n]`` of epoch ``e = p // n``. Nothing depends on earlier batches, so resuming
    at step t needs only t (the data position) and the seed.

    With ``lengths`` (each example's token count; ``--group-by-length``), every run of
    ``LENGTH_GROUP_BATCHES`` batches (at most an epoch's) of that stream is sorted by length and cut
    into batches again, which are taken in a seeded order: the same examples in the same run of steps,
    but each batch holds examples of similar length, so padding each to its longest costs little
    (transformers' ``group_by_length`` sorts mega-batches the same way). Measured (docs/results.md):
    on docstrings a batch of 8 is 57% real tokens shuffled and 96% grouped, a step about 0.7x the time;
    but batches of one length are less varied than shuffled ones, and recovery ends further from the
    teacher on a causal LM (KL 12-40% higher; a classifier's showed no clear difference), so it is an option.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        if batch_size < 1:
            raise ShareportError(f"--batch-size must be at least 1, got {batch_size}")
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        self.n, self.batch_size, self.seed, self.lengths = num_examples, batch_size, seed, lengths
        # batches per sorted run: at most an epoch's, so that a run holds an example at most twice (where it
        # crosses from one epoch into the next; _copies_apart keeps the two copies in different batches)
        self.group = max(1, min(LENGTH_GROUP_BATCHES, num_examples // batch_size))
        self._perms: dict[int, list[int]] = {}
        self._run_batches: tuple[int, list[list[int]]] | None = None  # (run, its batches in order), the last read

    @classmethod
    def of(cls, data: TokenData, batch_size: int, seed: int, *, by_length: bool) -> "BatchOrder":
        """The order of ``data``'s examples, grouped by their lengths when ``by_length``."""
        lengths = [len(sequence) for sequence in data.sequences] if by_length else None
        return cls(len(data), batch_size, seed, lengths=lengths)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}  # keep one epoch cached
        return self._perms[epoch]

    def _shuffled(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]

    def batch(self, step: int) -> list[int]:
        if self.lengths is None:
            return self._shuffled(step)
        run, slot = divmod(step, self.group)
        if self._run_batches is None or self._run_batches[0] != run:
            first = run * self.group
            examples = [i for t in range(first, first + self.group) for i in self._shuffled(t)]
            # longest first; ties keep the stream's order, so the result is the same on every machine
            ranked = sorted(range(len(examples)), key=lambda k: (-self.lengths[examples[k]], k))
            size = self.batch_size
            batches = _copies_apart(
                [[examples[k] for k in ranked[b * size : (b + 1) * size]] for b in range(self.group)]
            )
            # the run's batches in a seeded order, so that length does not follow the step
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + GROUP_ORDER_SEED + run)
            self._run_batches = (run, [batches[b] for b in torch.randperm(self.group, generator=gen).tolist()])
        return self._run_batches[1][slot]

    def position(self, step: int) -> dict:
        """Where the stream stands before global batch ``step`` (recorded in checkpoints)."""
        consumed = step * self.batch_size
        return {"examples_consumed": consumed, "epoch": consumed // self.n, "offset_in_epoch": consumed % self.n}


def _copies_apart(batches: list[list[int]]) -> list[list[int]]:
    """The batches with no example twice in one. A run that crosses an epoch boundary holds some examples
    twice, and sorting by length puts the two copies side by side; each second copy is swapped with an
    example of the nearest batch (the most similar lengths) that holds neither. Deterministic."""
    for b, batch in enumerate(batches):
        for j in range(len(batch)):
            if batch[j] not in batch[:j]:
                continue
            nearest_first = sorted(range(len(batches)), key=lambda c: (abs(c - b), c))[1:]  # [0] is b itself
            for other in (batches[c] for c in nearest_first if batch[j] not in batches[c]):
                k = next((k for k, i in enumerate(other) if i not in batch), None)
                if k is not None:
                    batch[j], other[k] = other[k], batch[j]
                    break
    return batches


def collate(data: TokenData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and, with labels, ``labels``."""
    seqs = [data.sequences[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if data.labels is not None:
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return batch


def collate_packed(data: TokenData, indices: list[int], pad_id: int, width: int = 0) -> dict[str, torch.Tensor]:
    """The same examples as :func:`collate`, packed several to a row (``--pack``, causal LMs).

    Each example goes to the first row with room for it; rows are ``width`` wide (the data's
    max_length), or as wide as the longest example if that is wider, so no example is split; the
    rest of a row is padding. Keys:
    ``input_ids`` (rows, width); ``position_ids``: 0, 1, ... from each example's start, which is how
    transformers tells the examples of a row apart (with no attention mask and no cache it masks
    attention block-diagonally, so no example sees another); the padding tail counts from 0 too,
    a segment of its own that no example attends to; ``loss_mask``: 1 on the examples' tokens;
    ``segments``: each token's example (its index in ``indices``), -1 on padding, so that the
    next-token loss skips the step from one example into the next.
    """
    seqs = [data.sequences[i] for i in indices]
    width = max(width, *(len(s) for s in seqs))
    rows: list[list[int]] = []  # the examples (positions in seqs) of each row
    room: list[int] = []
    for k, seq in enumerate(seqs):
        row = next((r for r, free in enumerate(room) if free >= len(seq)), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(k)
        room[row] -= len(seq)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            n = len(seqs[k])
            ids[r, at : at + n] = torch.tensor(seqs[k], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            loss_mask[r, at : at + n] = 1
            segments[r, at : at + n] = k
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "loss_mask": loss_mask, "segments": segments}


def counted_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which positions hold example tokens (1) rather than padding (0), packed or not."""
    return batch["loss_mask"] if "loss_mask" in batch else batch["attention_mask"]


def pad_token_id(model_config) -> int:
    """The id used for padding: the model config's pad (else end-of-sequence) id, else 0.

    Padded positions are masked out of attention and of every loss, so the value only has to
    be a valid id.
    """
    for candidate in (getattr(model_config, "pad_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0
