"""PEFT LoRA in and out, and the native format, checked against real PEFT models."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from shareport.files.adapters import load_adapter, save_adapter
from shareport.files.folder import CONFIG_NAME, WEIGHTS_NAME
from tests.tiny import TARGETS, input_ids, make_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2

# (name, model builder, LoRA options): covers rank/alpha patterns, rsLoRA, fan_in_fan_out,
# layers_to_transform and modules_to_save.
CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"])),
    "llama-patterns": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS["llama"],
            rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
            alpha_pattern={"v_proj": 3, "down_proj": 5},
        ),
    ),
    "llama-rslora": (
        tiny_llama,
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    ),
    "qwen2": (tiny_qwen2, dict(r=4, lora_alpha=16, target_modules=TARGETS["qwen2"])),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=TARGETS["gpt2"], fan_in_fan_out=True)),
    "bert": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=TARGETS["bert"])),
    "bert-cls": (
        lambda: tiny_bert(num_labels=3),
        dict(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    ),
}


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    build, opts = CASES[request.param]
    peft_model = make_peft_adapter(build(), tmp_path / "lora", seed=1, **opts)
    return request.param, build, peft_model, tmp_path


def test_peft_roundtrip_gives_same_outputs(case):
    name, build, peft_model, tmp = case
    adapter = load_adapter(tmp / "lora")
    save_adapter(adapter, tmp / "written", as_peft=True)
    reloaded = PeftModel.from_pretrained(build(), str(tmp / "written")).eval()
    ids = input_ids()
    ref, out = _outputs(peft_model, ids), _outputs(reloaded, ids)
    assert (ref - _outputs(build(), ids)).abs().max() > 1e-4, "the adapter must change the outputs"
    assert (ref - out).abs().max() <= 1e-6


def test_native_roundtrip_is_identical(case):
    _, _, _, tmp = case
    adapter = load_adapter(tmp / "lora")
    save_adapter(adapter, tmp / "native")
    back = load_adapter(tmp / "native")
    assert back.identical(adapter)
    assert back.config.get("modules_to_save") == adapter.config.get("modules_to_save")


def test_site_updates_equal_peft_merged_minus_base(case):
    name, build, peft_model, tmp = case
    adapter = load_adapter(tmp / "lora")
    base = dict(build().named_parameters())
    merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    fan_in_fan_out = CASES[name][1].get("fan_in_fan_out", False)
    assert adapter.sites, "no sites read"
    for path in adapter.sites:
        delta = merged[f"{path}.weight"] - base[f"{path}.weight"]
        if fan_in_fan_out:
            delta = delta.T
        torch.testing.assert_close(adapter.update(path), delta, atol=1e-5, rtol=1e-4)


def test_layers_and_kinds_parsed(tmp_path):
    make_peft_adapter(tiny_gpt2(), tmp_path / "g", r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapter = load_adapter(tmp_path / "g")
    kinds = adapter.kinds()
    # attn.c_proj and mlp.c_proj share a leaf name but are different kinds
    assert sorted(kinds) == ["attn.c_attn", "attn.c_proj", "mlp.c_proj"]
    assert [s.layer for s in kinds["attn.c_attn"]] == [0, 1, 2]
    assert adapter.fan_in_fan_out


def test_pickled_adapter_needs_flag(tmp_path):
    make_peft_adapter(tiny_llama(layers=2), tmp_path / "a", r=2, target_modules=["q_proj"])
    src = load_adapter(tmp_path / "a")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    torch.save(state, tmp_path / "a" / "adapter_model.bin")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    from shareport.errors import ShareportError

    with pytest.raises(ShareportError, match="--allow-pickle"):
        load_adapter(tmp_path / "a")
    assert load_adapter(tmp_path / "a", allow_pickle=True).max_update_diff(src) == 0.0


def test_writes_are_deterministic_and_refuse_overwrite(tmp_path):
    make_peft_adapter(tiny_llama(layers=2), tmp_path / "a", r=2, target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(tmp_path / "a")
    for as_peft in (False, True):
        save_adapter(adapter, tmp_path / f"x{as_peft}", as_peft=as_peft)
        save_adapter(load_adapter(tmp_path / "a"), tmp_path / f"y{as_peft}", as_peft=as_peft)
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            assert (tmp_path / f"x{as_peft}" / f).read_bytes() == (tmp_path / f"y{as_peft}" / f).read_bytes()
    from shareport.errors import ShareportError

    with pytest.raises(ShareportError, match="--overwrite"):
        save_adapter(adapter, tmp_path / "xFalse")
    with pytest.raises(ShareportError, match="overlaps the input"):
        save_adapter(adapter, tmp_path / "a" / "out", inputs=[tmp_path / "a"])
    save_adapter(adapter, tmp_path / "xFalse", overwrite=True)
    assert json.loads((tmp_path / "xFalse" / CONFIG_NAME).read_text())["shareport"]["form"] == "lora"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
