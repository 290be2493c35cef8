"""What a model's graph takes and returns, and inputs of a given shape for it.

Names follow Optimum's ONNX export, so runtimes written for Optimum graphs work unchanged:

- decoders (``*ForCausalLM``, ``*LMHeadModel``): ``input_ids``, ``attention_mask``,
  ``position_ids``; with past also ``past_key_values.{i}.key/value``; out ``logits`` and,
  with past, ``present.{i}.key/value``;
- encoders: ``input_ids``, ``attention_mask`` and ``token_type_ids`` where the model has them;
  out ``logits`` for a model with a head, else ``last_hidden_state``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..errors import ShareportError
from ..model.base import is_causal_lm


@dataclasses.dataclass(frozen=True)
class Signature:
    decoder: bool
    with_past: bool
    model_inputs: tuple[str, ...]  # without past
    output: str  # "logits" or "last_hidden_state"
    num_layers: int = 0  # past/present layout, decoders only
    kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0

    @property
    def past_names(self) -> list[str]:
        if not self.with_past:
            return []
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [n.replace("past_key_values.", "present.") for n in self.past_names]

    @property
    def input_names(self) -> list[str]:
        return [*self.model_inputs, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return [self.output, *self.present_names]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Signature":
        data = dict(data, model_inputs=tuple(data["model_inputs"]))
        return cls(**data)


def signature_for(model, with_past: bool) -> Signature:
    """The graph signature of a transformers model."""
    config = model.config
    if not is_causal_lm(model):
        if with_past:
            raise ShareportError(f"--with-past needs a decoder (causal LM); {type(model).__name__} is an encoder")
        params = inspect.signature(model.forward).parameters
        inputs = ("input_ids", "attention_mask") + (("token_type_ids",) if "token_type_ids" in params else ())
        has_head = "For" in type(model).__name__  # BertForSequenceClassification, not BertModel
        return Signature(False, False, inputs, "logits" if has_head else "last_hidden_state")
    layers, kv_heads, head_dim = _cache_layout(model) if with_past else (0, 0, 0)
    return Signature(
        True,
        with_past,
        ("input_ids", "attention_mask", "position_ids"),
        "logits",
        layers,
        kv_heads,
        head_dim,
        int(config.vocab_size),
    )


def _cache_layout(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) read off one real forward pass: every family agrees on this."""
    param = next(model.parameters())
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 1, dtype=torch.long, device=param.device), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, dim = layers[0].keys.shape
    return len(layers), int(heads), int(dim)


def make_inputs(
    sig: Signature,
    batch: int,
    seq: int,
    past: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    vocab: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs of the given shape, in the graph's order: random tokens, full mask, random past."""
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab or sig.vocab_size or 64
    # avoid ids 0-2, which are pad/bos/eos in most configs
    out = {"input_ids": torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)}
    out["attention_mask"] = torch.ones(batch, past + seq, dtype=torch.long)
    if "position_ids" in sig.model_inputs:
        out["position_ids"] = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    if "token_type_ids" in sig.model_inputs:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    for name in sig.past_names:
        out[name] = (torch.randn(batch, sig.kv_heads, past, sig.head_dim, generator=gen) * 0.5).to(dtype)
    return out


def dynamic_axes(sig: Signature) -> dict[str, dict[int, str]]:
    """Symbolic dims of the model inputs, by name (batch, sequence, past, and the mask's total)."""
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in sig.model_inputs}
    if sig.with_past:
        axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
        for name in sig.past_names:
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    return axes
