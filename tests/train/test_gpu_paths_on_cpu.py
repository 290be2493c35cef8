"""Branches that normally run only on a GPU, exercised on the CPU: bf16 autocast through the
training recipe, a half-precision base under an fp32 adapter, CUDA RNG states in checkpoints,
and ONNX Runtime provider selection with a stubbed runtime whose probe reports CUDA."""

import json

import pytest
import torch
from torch import nn

from shareport import flows
from shareport.export import runtime
from shareport.model.surgery import LoRALinear
from shareport.train import checkpoint
from shareport.train.jobs import TrainingOptions
from tests.training_helpers import cpu_accelerator, recovery_setup


# ---------------------------------------------------------------------------------------- LoRALinear dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_an_fp32_adapter(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    a, b = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(8, 4))
    x = torch.randn(3, 16)
    want = base(x) + (x @ a.T) @ b.T * 0.5  # all fp32
    layer = LoRALinear(base.to(dtype), a, b, 0.5)
    got = layer(x.to(dtype))
    assert got.dtype == dtype and a.dtype == torch.float32  # computed in the input's dtype, parameters untouched
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    got.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast no cast: autocast picks the dtype
        torch.testing.assert_close(layer(x.to(dtype)).float(), want, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------- bf16 recipe
def test_recovery_under_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    """What a CUDA machine gets (bf16 base, fp32 adapter, autocast), with the CPU's bf16 autocast."""
    paths = recovery_setup(tmp_path, layers=2, rank=4, shared_rank=1, lines=40)
    seen = {"autocast": set()}
    real_run = flows.training.run

    def spy_run(job, recipe, after_step=None):
        seen["base dtypes"] = {p.dtype for p in job.model.parameters()}
        job.model.register_forward_pre_hook(lambda m, a: seen["autocast"].add(torch.is_autocast_enabled("cpu")))
        return real_run(job, recipe, after_step)

    monkeypatch.setattr(flows.training, "run", spy_run)
    out = tmp_path / "out"
    with cpu_accelerator(monkeypatch, "bf16"):
        report = flows.recover(
            str(paths["shared"]),
            str(paths["base"]),
            str(paths["lora"]),
            str(paths["text"]),
            str(out),
            options=TrainingOptions(steps=15, batch_size=4, max_length=24),
        )
    assert report["mixed_precision"] == "bf16" and report["device"] == "cpu"
    assert seen["base dtypes"] == {torch.bfloat16} and seen["autocast"] == {True}, seen
    assert report["after"]["kl"] < report["before"]["kl"]
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["mixed_precision"] == "bf16"
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


# ---------------------------------------------------------------------------------------- RNG states
class FakeCuda:
    """torch.cuda's RNG calls for ``count`` devices, kept in memory."""

    def __init__(self, count: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.states = [torch.randint(0, 256, (16,), generator=gen, dtype=torch.uint8) for _ in range(count)]
        self.restored = None

    def install(self, monkeypatch, count=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states) if count is None else count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "restored", list(states)))


def _round_trip(tmp_path):
    """Save a checkpoint with the current RNG states, draw, load it and restore: the same draws again."""
    from shareport.adapter import Adapter

    adapter = Adapter.from_factors({"model.layers.0.self_attn.q_proj": (torch.ones(2, 4), torch.ones(4, 2), 1.0)})
    torch.manual_seed(123)
    checkpoint.save_checkpoint(tmp_path / "ckpt", adapter, {"step": 1}, {})
    first = torch.rand(5)
    _, state, tensors = checkpoint.load_checkpoint(tmp_path / "ckpt")
    checkpoint.restore_rng(tensors)
    assert torch.equal(torch.rand(5), first)
    return tensors


def test_cpu_rng_round_trip_through_a_checkpoint(tmp_path):
    tensors = _round_trip(tmp_path)
    assert "rng/torch_cpu" in tensors


def test_cuda_rng_states_are_saved_and_restored(tmp_path, monkeypatch):
    cuda = FakeCuda(2, seed=5)
    cuda.install(monkeypatch)
    tensors = _round_trip(tmp_path)
    assert sorted(k for k in tensors if k.startswith("rng/cuda/")) == ["rng/cuda/0", "rng/cuda/1"]
    assert cuda.restored is not None and all(torch.equal(a, b) for a, b in zip(cuda.restored, cuda.states))
    assert len(cuda.restored) == 2


def test_cuda_rng_states_of_another_device_count_are_not_restored(tmp_path, monkeypatch):
    cuda = FakeCuda(2, seed=5)
    cuda.install(monkeypatch)
    tensors = {**checkpoint.rng_tensors()}
    cuda.install(monkeypatch, count=1)  # resumed on a machine with one GPU
    checkpoint.restore_rng(tensors)
    assert cuda.restored is None


# ---------------------------------------------------------------------------------------- ORT providers
class FakeOrt:
    """Just what runtime.providers/session call; ``probe`` is what the probe session reports."""

    def __init__(self, available, probe):
        self.available, self.probe, self.sessions = available, probe, []
        outer = self

        class Session:
            def __init__(self, model, options=None, providers=None):
                outer.sessions.append(providers)
                if outer.probe == "raise":
                    raise RuntimeError("CUDA library not found")
                self._providers = list(outer.probe)

            def get_providers(self):
                return self._providers

        self.InferenceSession = Session
        self.SessionOptions = lambda: type("Options", (), {})()

    def get_available_providers(self):
        return list(self.available)


@pytest.mark.parametrize(
    "available, probe, chosen",
    [
        ([runtime.CUDA, runtime.CPU], [runtime.CUDA, runtime.CPU], (runtime.CUDA, runtime.CPU)),  # CUDA really works
        ([runtime.CUDA, runtime.CPU], [runtime.CPU], (runtime.CPU,)),  # listed, but the session fell back to CPU
        ([runtime.CUDA, runtime.CPU], "raise", (runtime.CPU,)),  # listed, session creation fails
        ([runtime.CPU], [runtime.CPU], (runtime.CPU,)),  # CPU-only build: no probe at all
    ],
)
def test_provider_selection_trusts_only_a_probe_that_ran_on_cuda(available, probe, chosen, monkeypatch, tmp_path):
    fake = FakeOrt(available, probe)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", fake)
    runtime._selection.cache_clear()
    try:
        assert runtime.providers() == chosen
        assert runtime.device_name() == ("cuda" if runtime.CUDA in chosen else "cpu")
        assert fake.sessions == ([] if runtime.CUDA not in available else [[runtime.CUDA, runtime.CPU]])
        if probe != "raise":
            runtime.session(tmp_path / "model.onnx")
            assert fake.sessions[-1] == list(chosen)  # real sessions ask for what the probe found
    finally:
        runtime._selection.cache_clear()
