"""The throughput fields of training_timings.json: FLOPs per token and MFU from the device's peak."""

import pytest
import torch

from shareport.train.accel import peak_flops
from shareport.train.recipe import matmul_parameters, throughput
from tests.tiny import tiny_gpt2, tiny_llama


def test_flops_per_token_and_mfu():
    cpu = throughput(1_000, teacher=True, tokens=500, seconds=2.0, device=torch.device("cpu"))
    # student forward 2N + input-gradient backward 2N + teacher forward 2N
    assert cpu["flops_per_token"] == 6_000 and cpu["achieved_flops"] == pytest.approx(6_000 * 500 / 2.0)
    assert cpu["peak_flops"] is None and cpu["mfu"] is None and cpu["device_name"] == "cpu"
    assert (
        throughput(1_000, teacher=False, tokens=1, seconds=1.0, device=torch.device("cpu"))["flops_per_token"] == 4_000
    )


def test_peak_table_matches_the_card_name():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None


def test_flop_parameters_are_the_matmul_weights_from_the_config():
    """Counted from the config's sizes (an independent reference), not from the modules."""
    model = tiny_llama(layers=2)
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size  # q, o; k, v; gate, up, down
    assert matmul_parameters(model) == c.num_hidden_layers * per_layer + c.vocab_size * h  # + the head
    assert matmul_parameters(model) < sum(p.numel() for p in model.parameters())  # embeddings are no FLOPs
    gpt2 = tiny_gpt2(layers=2)  # Conv1D layers: qkv (h x 3h), proj, fc (h x 4h), proj; the head is tied
    g = gpt2.config
    assert (
        matmul_parameters(gpt2)
        == g.n_layer * (3 * g.n_embd**2 + g.n_embd**2 + 8 * g.n_embd**2) + g.vocab_size * g.n_embd
    )
