"""`shareport convert` end to end: real PEFT adapters in, PEFT and native adapters out."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from shareport.adapter import Adapter
from shareport.convert import convert_adapter
from shareport.files.adapters import load_adapter
from tests.tiny import TARGETS, make_peft_adapter, tiny_gpt2, tiny_llama


def _merged_deltas(peft_model, base, fan_in_fan_out=False):
    base_params = dict(base.named_parameters())
    merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    out = {}
    for name, w in merged.items():
        if name.endswith(".weight") and name in base_params and not torch.equal(w, base_params[name]):
            d = w - base_params[name]
            out[name[: -len(".weight")]] = d.T if fan_in_fan_out else d
    return out


@pytest.mark.parametrize("form", ["sharea", "shareb", "shareab", "aslora"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_form_expanded_to_peft_has_same_updates(form, family, tmp_path, cli):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    fifo = family == "gpt2"
    make_peft_adapter(build(), tmp_path / "lora", r=4, lora_alpha=8, target_modules=TARGETS[family],
                      fan_in_fan_out=fifo)
    r = cli("convert", tmp_path / "lora", "--to", form, "--rank", 3, "-o", tmp_path / "shared", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    shared = load_adapter(tmp_path / "shared")
    assert shared.form == form and report["parameters_after"] == shared.num_parameters()
    r = cli("convert", tmp_path / "shared", "--to", "lora", "-o", tmp_path / "expanded")
    assert r.exit_code == 0, r.output
    peft_model = PeftModel.from_pretrained(build(), str(tmp_path / "expanded")).eval()
    deltas = _merged_deltas(peft_model, build(), fifo)
    assert sorted(deltas) == sorted(shared.sites)
    for path, delta in deltas.items():
        torch.testing.assert_close(delta, shared.update(path), atol=1e-5, rtol=1e-4)


def test_reported_error_matches_updates(tmp_path, cli):
    make_peft_adapter(tiny_llama(layers=4), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    lora = load_adapter(tmp_path / "lora")
    shared, report = convert_adapter(lora, "aslora", rank=2, groups=2, grouping="adjacent")
    for kr in report.kinds:
        sites = lora.kinds()[kr.kind]
        err = sum(float((lora.update(s.path, torch.float64) - shared.update(s.path, torch.float64)).square().sum())
                  for s in sites)
        energy = sum(float(lora.update(s.path, torch.float64).square().sum()) for s in sites)
        assert kr.relative_error == pytest.approx((err / energy) ** 0.5, rel=1e-5)
        assert len(kr.groups) == 2 and all(g == list(range(g[0], g[-1] + 1)) for g in kr.groups)


def test_sharelora_checkpoint_converts_losslessly(tmp_path, cli):
    """ShareLoRA saves through PEFT, cloning its one A into every layer."""
    peft_model = make_peft_adapter(tiny_llama(layers=4), tmp_path / "tmp", r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for kind in ("q_proj", "v_proj"):
            a = [m for n, m in peft_model.named_modules() if n.endswith(kind)]
            for m in a[1:]:
                m.lora_A["default"].weight.copy_(a[0].lora_A["default"].weight)
    peft_model.save_pretrained(str(tmp_path / "sharelora"))
    r = cli("convert", tmp_path / "sharelora", "--to", "sharea", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert all(k["already_shared"] and k["relative_error"] < 1e-6 for k in report["kinds"])
    assert "yes" in cli("convert", tmp_path / "sharelora", "--to", "sharea", "-o", tmp_path / "o2").output


def test_roberta_base_parameter_counts():
    """reference.md: RoBERTa-base, r=8, q and v, 12 layers."""
    gen = torch.Generator().manual_seed(0)
    factors = {
        f"roberta.encoder.layer.{i}.attention.self.{k}": (
            torch.randn(8, 768, generator=gen), torch.randn(768, 8, generator=gen), 2.0)
        for i in range(12) for k in ("query", "value")
    }
    lora = Adapter.from_factors(factors)
    assert lora.num_parameters() == 294_912
    assert convert_adapter(lora, "sharea")[0].num_parameters() == 159_744
    assert convert_adapter(lora, "shareab")[0].num_parameters() == 24_576
    aslora, report = convert_adapter(lora, "aslora", groups=5)  # 7 merges per projection
    assert aslora.num_parameters() == 73_728
    assert convert_adapter(lora, "aslora")[0].num_parameters() <= 0.25 * 294_912  # the default budget


@pytest.mark.parametrize("args, words", [
    (["--to", "sharea", "--rank", "0"], "--rank must be at least 1"),
    (["--to", "sharea", "--rank", "2", "--energy", "0.9"], "at most one of"),
    (["--to", "sharea", "--energy", "1.5"], "--energy must be"),
    (["--to", "sharea", "--groups", "2"], "--groups applies to --to aslora"),
    (["--to", "sharea", "--grouping", "adjacent"], "--grouping applies to --to aslora"),
    (["--to", "aslora", "--budget", "0.00001"], "budget"),
])
def test_bad_options_write_nothing(args, words, tmp_path, cli):
    make_peft_adapter(tiny_llama(layers=2), tmp_path / "lora", r=2, target_modules=["q_proj"])
    r = cli("convert", tmp_path / "lora", *args, "-o", tmp_path / "out")
    assert r.exit_code != 0 and words in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_convert_refuses_existing_output_and_is_deterministic(tmp_path, cli):
    make_peft_adapter(tiny_llama(layers=3), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    assert cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "a").exit_code == 0
    assert cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "b").exit_code == 0
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    r = cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "a")
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "lora" / "inside")
    assert r.exit_code != 0 and "overlaps the input" in r.output
