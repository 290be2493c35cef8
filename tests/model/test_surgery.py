"""Attach and fold against PEFT; shared factors are one parameter with one summed gradient."""

import copy

import pytest
import torch

from shareport.adapter import Adapter, Site
from shareport.files.adapters import load_adapter
from shareport.model.surgery import attach, fold
from tests.tiny import TARGETS, input_ids, make_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama

MODELS = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"])),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=TARGETS["gpt2"], fan_in_fan_out=True)),
    "bert": (tiny_bert, dict(r=2, lora_alpha=4, target_modules=TARGETS["bert"], use_rslora=True)),
}


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family", sorted(MODELS))
def test_attach_and_fold_equal_peft(family, tmp_path):
    build, opts = MODELS[family]
    peft_model = make_peft_adapter(build(), tmp_path / "a", seed=3, **opts)
    adapter = load_adapter(tmp_path / "a")
    ids = input_ids(seed=4)
    ref = _out(peft_model, ids)

    model = build()
    handle = attach(model, adapter)
    assert (_out(model, ids) - ref).abs().max() <= 1e-5
    handle.set_enabled(False)
    assert (_out(model, ids) - _out(build(), ids)).abs().max() == 0
    handle.set_enabled(True)
    handle.detach()
    assert (_out(model, ids) - _out(build(), ids)).abs().max() == 0

    folded = fold(build(), adapter)
    assert (_out(folded, ids) - ref).abs().max() <= 1e-5


def _shared_a_adapter(model_adapter: Adapter) -> Adapter:
    """Tie every q_proj site to layer 0's A (a ShareA-shaped adapter, built by hand)."""
    sites = dict(model_adapter.sites)
    q = [s for s in sites.values() if s.kind == "self_attn.q_proj"]
    shared = q[0].a
    for s in q[1:]:
        sites[s.path] = Site(s.path, s.kind, s.layer, shared, s.b, s.scale)
    tensors = {n: t for n, t in model_adapter.tensors.items() if n in {x for s in sites.values() for x in (s.a, s.b)}}
    return model_adapter.with_sites(tensors, sites, "sharea")


def test_shared_factor_is_one_parameter_with_summed_gradient(tmp_path):
    make_peft_adapter(tiny_llama(), tmp_path / "a", r=2, target_modules=["q_proj", "v_proj"])
    adapter = _shared_a_adapter(load_adapter(tmp_path / "a"))
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    handle = attach(model, adapter, trainable=True)
    wrappers = [handle.wrappers[s.path] for s in adapter.kinds()["self_attn.q_proj"]]
    assert all(w.lora_A is wrappers[0].lora_A for w in wrappers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == adapter.num_parameters()

    ids = input_ids()
    model(input_ids=ids).logits.square().mean().backward()
    shared_grad = wrappers[0].lora_A.grad.clone()

    # reference: the same model with untied copies of A; the tied gradient is their sum
    untied = tiny_llama()
    for p in untied.parameters():
        p.requires_grad_(False)
    h2 = attach(untied, adapter.expand(), trainable=True)
    untied(input_ids=ids).logits.square().mean().backward()
    total = sum(h2.wrappers[s.path].lora_A.grad for s in adapter.kinds()["self_attn.q_proj"])
    torch.testing.assert_close(shared_grad, total, atol=1e-6, rtol=1e-5)


def test_attach_refuses_wrong_model(tmp_path):
    from shareport.errors import ShareportError

    make_peft_adapter(tiny_llama(), tmp_path / "a", r=2, target_modules=["q_proj"])
    adapter = load_adapter(tmp_path / "a")
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShareportError, match="no module"):
        attach(model, adapter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
