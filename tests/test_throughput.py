"""The throughput fields of training_timings.json: FLOPs per token and MFU from the device's peak."""

import pytest
import torch

from shareport.train.accel import peak_flops
from shareport.train.recipe import throughput


def test_flops_per_token_and_mfu():
    cpu = throughput(1_000, teacher=True, tokens=500, seconds=2.0, device=torch.device("cpu"))
    # student forward 2N + input-gradient backward 2N + teacher forward 2N
    assert cpu["flops_per_token"] == 6_000 and cpu["achieved_flops"] == pytest.approx(6_000 * 500 / 2.0)
    assert cpu["peak_flops"] is None and cpu["mfu"] is None and cpu["device_name"] == "cpu"
    assert throughput(1_000, teacher=False, tokens=1, seconds=1.0, device=torch.device("cpu"))["flops_per_token"] == 4_000


def test_peak_table_matches_the_card_name():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
