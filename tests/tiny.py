"""Tiny transformers models built from configs, and real PEFT adapters on them.

Every test model comes from a config (no downloads) with a fixed seed. PEFT initialises B to
zero, which would make every update vanish, so ``make_peft_adapter`` fills A and B with seeded
random values: the adapter then changes the model's outputs, as a trained one would.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64


def _tiny_decoder(config_class, model_class, layers: int, seed: int):
    """Llama-style decoders (Llama, Qwen2) share their config fields."""
    torch.manual_seed(seed)
    cfg = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return model_class(cfg).eval()


def tiny_llama(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_decoder(LlamaConfig, LlamaForCausalLM, layers, seed)


def tiny_qwen2(layers: int = 2, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_decoder(Qwen2Config, Qwen2ForCausalLM, layers, seed)


def tiny_gpt2(layers: int = 3, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 3, seed: int = 0, num_labels: int | None = None):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels or 2,
    )
    model = BertForSequenceClassification(cfg) if num_labels else BertModel(cfg)
    return model.eval()


# target modules per family, covering several kinds (including same-leaf, different-parent ones)
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
}


def randomize_lora(peft_model, seed: int = 0, std: float = 0.2) -> None:
    """Give every LoRA factor seeded random values (PEFT's own init leaves B at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_peft_adapter(model, folder: str | Path, seed: int = 0, **lora_kwargs):
    """Wrap ``model`` with a PEFT LoRA, randomise it, save it to ``folder``; return the PEFT model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    randomize_lora(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    return peft_model


def input_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def wide_llama_with_lora(base_dir: str | Path, lora_dir: str | Path) -> None:
    """A 1-layer Llama with 512-wide layers (saved to ``base_dir``) and a seeded r=8 PEFT LoRA on
    q/k/v/o (``lora_dir``): wide enough that per-tensor file overhead does not hide an adapter
    file's data bytes (the quantized-ONNX size test and benchmark)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=768,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(base_dir)
    torch.manual_seed(0)
    make_peft_adapter(
        LlamaForCausalLM(config).eval(),
        lora_dir,
        seed=2,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
