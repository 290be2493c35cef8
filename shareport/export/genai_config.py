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
"""

from __future__ import annotations

import json
from pathlib import Path

from .signature import Signature

FILE_NAME = "genai_config.json"
# model types onnxruntime-genai 0.18 accepts for a plain Optimum-style decoder graph; not "gpt2",
# whose genai model expects another cache layout ("Model input was not found") where "decoder" runs
KNOWN_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo",
                         "nemotron", "smollm3"})
GENERIC_TYPE = "decoder"
NO_PAST = (f"no {FILE_NAME}: onnxruntime-genai needs past_key_values inputs (export with --with-past); "
           "a graph without them runs wrong after the first token")
NOT_DECODER = f"no {FILE_NAME}: not a decoder"


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


def genai_config(config: dict, sig: Signature, graph_name: str = "model.onnx") -> dict:
    """The ``genai_config.json`` content for a with-past decoder graph of a model with ``config``."""
    if not (sig.decoder and sig.with_past):
        raise ValueError("genai_config needs a with-past decoder signature")
    model_type = config.get("model_type") if config.get("model_type") in KNOWN_TYPES else GENERIC_TYPE
    heads = int(_first(config, "num_attention_heads", "n_head", default=sig.kv_heads))
    hidden = int(_first(config, "hidden_size", "n_embd", default=heads * sig.head_dim))
    context = int(_first(config, "max_position_embeddings", "n_positions", "n_ctx", default=2048))
    eos = _token(_first(config, "eos_token_id", default=0))
    first_eos = eos[0] if isinstance(eos, list) else eos
    bos = _token(_first(config, "bos_token_id", default=first_eos))
    pad = _token(_first(config, "pad_token_id", default=first_eos))
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
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        "past_present_share_buffer": False,  # true makes genai pass a full-length cache: Concat fails
    }
    model = {"type": model_type, "context_length": context, "vocab_size": sig.vocab_size or int(config["vocab_size"]),
             "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "decoder": decoder}
    return {"model": model, "search": search}


def write_genai_config(folder: str | Path, sig: Signature) -> str:
    """Write ``genai_config.json`` next to the graph (from the folder's ``config.json``); return a one-line note."""
    folder = Path(folder)
    if not sig.decoder:
        return NOT_DECODER
    if not sig.with_past:
        return NO_PAST
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    data = genai_config(config, sig)
    (folder / FILE_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return f"wrote {FILE_NAME} (onnxruntime-genai, model type '{data['model']['type']}')"
