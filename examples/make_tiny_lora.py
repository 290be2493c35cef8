"""Build a tiny Llama base model and a real PEFT LoRA on it, with no downloads.

Shows: the folder layout shareport reads. The base model goes to OUT/base (a transformers
folder) and the adapter to OUT/lora (a PEFT LoRA folder, B randomised so the update is not
zero, as after training).

    python examples/make_tiny_lora.py /tmp/shareport-example
    shareport inspect /tmp/shareport-example/lora
"""

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: str) -> None:
    out = Path(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    base.save_pretrained(out / "base")
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(lora.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    lora.save_pretrained(out / "lora")
    print(f"wrote {out / 'base'} and {out / 'lora'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "shareport-example")
