"""``genai_config.json``: what onnxruntime-genai needs to open an exported decoder folder.

onnxruntime-genai (``og.Model(folder)``) reads the graph's layout from this file, not from the
graph: model type, head counts and size, layer count, context length, special tokens, the
input and output names, and the search defaults. shareport's with-past graphs use Optimum's
names (``past_key_values.%d.key`` -> ``present.%d.key``), so the file is filled from the model's
``config.json`` and the graph's signature (kv heads and head size as measured on a forward pass).

Two choices are forced by these graphs:

- ``past_present_share_buffer`` is false: with true, genai hands the graph a cache buffer of the
  full context length and the graph's Concat over the past fails;
- a graph without past cannot be driven by genai (it runs, silently wrong after the first
  token), so exports without ``--with-past`` get no file, and say why.

``model.type``: genai accepts a fixed set of names and some select a model with another cache
layout (its "gpt2"); a family not known to run these graphs gets "decoder", genai's generic
decoder-only model, which is what they need.

Special tokens: genai masks the positions holding ``pad_token_id`` (a batch of prompts of
different lengths is padded with it) and stops at ``eos_token_id``, so both must be the ids the
tokenizer really uses. Each of bos/eos/pad comes from ``config.json``, else
``generation_config.json``, else the tokenizer's special tokens; with no pad anywhere the eos is
the pad (as transformers' ``generate`` does), and the export says so. Without any eos the file
would stop nowhere, so a with-past export of such a base is refused before it starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ShareportError
from .signature import Signature

FILE_NAME = "genai_config.json"
# model types onnxruntime-genai 0.18 accepts for a plain Optimum-style decoder graph; not "gpt2",
# whose genai model expects another cache layout ("Model input was not found") where "decoder" runs
KNOWN_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo", "nemotron", "smollm3"}
)
GENERIC_TYPE = "decoder"
NO_PAST = (
    f"no {FILE_NAME}: onnxruntime-genai needs past_key_values inputs (export with --with-past); "
    "a graph without them runs wrong after the first token"
)
NOT_DECODER = f"no {FILE_NAME}: not a decoder"
TOKENS = ("bos", "eos", "pad")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _token(value):
    """A special token id as genai takes it: an int, or a list for several eos ids."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else list(value)
    return value


def _valid_id(value) -> bool:
    ids = value if isinstance(value, (list, tuple)) else [value]
    return bool(ids) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos: int | list[int]
    eos: int | list[int]
    pad: int
    note: str = ""  # what was filled in for lack of a source (empty when every id was found)


def resolve_tokens(configs, tokenizer=lambda: None, where: str = "the model") -> SpecialTokens:
    """bos/eos/pad from ``configs`` ([(file name, dict)], first found wins), else ``tokenizer()``
    ({"bos": id or None, ...}, called only when needed); pad falls back to eos, bos to eos."""
    found, loaded = {}, []
    for token in TOKENS:
        key = f"{token}_token_id"
        for name, data in configs:
            value = data.get(key)
            if value is None:
                continue
            if not _valid_id(value):
                raise ShareportError(f"{name}: {key} must be a token id or a list of them (got {value!r})")
            found[token] = _token(value)
            break
        else:
            if not loaded:
                loaded.append(tokenizer() or {})
            if loaded[0].get(token) is not None:
                found[token] = int(loaded[0][token])
    sources = ", ".join(Path(name).name for name, _ in configs) + " or the tokenizer"
    if "eos" not in found:
        raise ShareportError(
            f"{where}: no eos token id in {sources}; onnxruntime-genai's {FILE_NAME} needs one "
            "(set eos_token_id in config.json, or export without --with-past)"
        )
    first_eos = found["eos"][0] if isinstance(found["eos"], list) else found["eos"]
    notes = [
        f"{token}_token_id = eos {first_eos} (none in {sources})" for token in ("pad", "bos") if token not in found
    ]
    if isinstance(found.get("pad"), list):
        found["pad"] = found["pad"][0]
    return SpecialTokens(found.get("bos", first_eos), found["eos"], found.get("pad", first_eos), "; ".join(notes))


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_ids(folder: Path) -> dict | None:
    """The folder's tokenizer's bos/eos/pad ids (None where it has none), or None without a loadable tokenizer."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # transformers raises many types; a folder it cannot read has no ids to give
        return None
    return {token: getattr(tok, f"{token}_token_id", None) for token in TOKENS}


def special_tokens(folder: str | Path) -> SpecialTokens:
    """bos/eos/pad for the model in ``folder``: config.json, generation_config.json, then the tokenizer."""
    folder = Path(folder)
    configs = [(name, read_json_object(folder / name)) for name in CONFIG_FILES]
    return resolve_tokens([(str(folder / n), d) for n, d in configs], lambda: _tokenizer_ids(folder), str(folder))


def genai_config(
    config: dict, sig: Signature, graph_name: str = "model.onnx", tokens: SpecialTokens | None = None
) -> dict:
    """The ``genai_config.json`` content for a with-past decoder graph of a model with ``config``
    (special tokens: ``tokens``, else the ids in ``config``)."""
    if not (sig.decoder and sig.with_past):
        raise ValueError("genai_config needs a with-past decoder signature")
    model_type = config.get("model_type") if config.get("model_type") in KNOWN_TYPES else GENERIC_TYPE
    heads = int(_first(config, "num_attention_heads", "n_head", default=sig.kv_heads))
    hidden = int(_first(config, "hidden_size", "n_embd", default=heads * sig.head_dim))
    context = int(_first(config, "max_position_embeddings", "n_positions", "n_ctx", default=2048))
    tokens = tokens or resolve_tokens([("config.json", config)])
    decoder = {
        "filename": graph_name,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},  # CPU; add {"cuda": {}} for GPU
        "head_size": sig.head_dim,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": sig.kv_heads,
        "num_hidden_layers": sig.num_layers,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    search = {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": context,
        "min_length": 0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
        "early_stopping": True,
        "past_present_share_buffer": False,  # true makes genai pass a full-length cache: Concat fails
    }
    model = {
        "type": model_type,
        "context_length": context,
        "vocab_size": sig.vocab_size or int(config["vocab_size"]),
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
        "pad_token_id": tokens.pad,
        "decoder": decoder,
    }
    return {"model": model, "search": search}


def write_genai_config(folder: str | Path, sig: Signature, tokens: SpecialTokens | None = None) -> str:
    """Write ``genai_config.json`` next to the graph (from the folder's ``config.json``, special tokens as
    :func:`special_tokens` finds them unless given); return a one-line note."""
    folder = Path(folder)
    if not sig.decoder:
        return NOT_DECODER
    if not sig.with_past:
        return NO_PAST
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokens = tokens or special_tokens(folder)
    data = genai_config(config, sig, tokens=tokens)
    (folder / FILE_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    filled = f"; {tokens.note}" if tokens.note else ""
    return f"wrote {FILE_NAME} (onnxruntime-genai, model type '{data['model']['type']}'){filled}"
