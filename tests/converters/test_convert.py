"""`shareport convert` end to end: real PEFT adapters in, PEFT and native adapters out."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from shareport.adapter import Adapter
from shareport.convert import convert_adapter
from shareport.errors import ShareportError
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
    make_peft_adapter(
        build(), tmp_path / "lora", r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=fifo
    )
    r = cli("convert", tmp_path / "lora", "--to", form, "--rank", 3, "-o", tmp_path / "shared", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # low-energy warnings go to stderr
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
        err = sum(
            float((lora.update(s.path, torch.float64) - shared.update(s.path, torch.float64)).square().sum())
            for s in sites
        )
        energy = sum(float(lora.update(s.path, torch.float64).square().sum()) for s in sites)
        assert kr.relative_error == pytest.approx((err / energy) ** 0.5, rel=1e-5)
        assert len(kr.groups) == 2 and all(g == list(range(g[0], g[-1] + 1)) for g in kr.groups)


def _clone_first_a(peft_model, kinds) -> None:
    """Copy each kind's first A into every layer, as a ShareLoRA checkpoint saved through PEFT has it."""
    with torch.no_grad():
        for kind in kinds:
            a = [m for n, m in peft_model.named_modules() if n.endswith(kind)]
            for m in a[1:]:
                m.lora_A["default"].weight.copy_(a[0].lora_A["default"].weight)


def test_sharelora_checkpoint_converts_losslessly(tmp_path, cli):
    """ShareLoRA saves through PEFT, cloning its one A into every layer."""
    peft_model = make_peft_adapter(tiny_llama(layers=4), tmp_path / "tmp", r=4, target_modules=["q_proj", "v_proj"])
    _clone_first_a(peft_model, ("q_proj", "v_proj"))
    peft_model.save_pretrained(str(tmp_path / "sharelora"))
    r = cli("convert", tmp_path / "sharelora", "--to", "sharea", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert all(k["already_shared"] and k["relative_error"] < 1e-6 for k in report["kinds"])
    assert "yes" in cli("convert", tmp_path / "sharelora", "--to", "sharea", "-o", tmp_path / "o2").output


def test_roberta_base_parameter_counts():
    """reference.md: RoBERTa-base, r=8, q and v, 12 layers."""
    gen = torch.Generator().manual_seed(0)
    factors = {
        f"roberta.encoder.layer.{i}.attention.self.{k}": (
            torch.randn(8, 768, generator=gen),
            torch.randn(768, 8, generator=gen),
            2.0,
        )
        for i in range(12)
        for k in ("query", "value")
    }
    lora = Adapter.from_factors(factors)
    assert lora.num_parameters() == 294_912
    assert convert_adapter(lora, "sharea")[0].num_parameters() == 159_744
    assert convert_adapter(lora, "shareab")[0].num_parameters() == 24_576
    aslora, report = convert_adapter(lora, "aslora", groups=5)  # 7 merges per projection
    assert aslora.num_parameters() == 73_728
    assert convert_adapter(lora, "aslora")[0].num_parameters() <= 0.25 * 294_912  # the default budget


@pytest.mark.parametrize(
    "args, words",
    [
        (["--to", "sharea", "--rank", "0"], "--rank must be at least 1"),
        (["--to", "sharea", "--rank", "2", "--energy", "0.9"], "at most one of"),
        (["--to", "sharea", "--energy", "1.5"], "--energy must be"),
        (["--to", "sharea", "--groups", "2"], "--groups applies to --to aslora"),
        (["--to", "sharea", "--grouping", "adjacent"], "--grouping applies to --to aslora"),
        (["--to", "aslora", "--budget", "0.00001"], "budget"),
        (["--to", "auto"], "--to auto needs --budget"),
        (["--to", "auto", "--rank", "2"], "--to auto needs --budget"),
        (["--to", "auto", "--budget", "0.5", "--groups", "2"], "--groups applies to --to aslora"),
        (["--to", "lora", "--budget", "0.001"], "does not pay for rank 1 at any site"),
        (["--to", "aslora", "--groups", "3"], "--groups 3 is more than the 2 layers of self_attn.q_proj"),
        (
            ["--to", "aslora", "--groups", "3", "--rank", "1"],
            "--groups 3 is more than the 2 layers of self_attn.q_proj",
        ),
    ],
)
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


# ---------------------------------------------------------------- --to lora: truncation


def _dense_error(lora: Adapter, other: Adapter) -> tuple[float, float]:
    """(sum ||dW - dW'||^2, sum ||dW||^2) from dense updates; a site ``other`` lacks applies none."""
    error = energy = 0.0
    for path in lora.sites:
        dw = lora.update(path, torch.float64)
        dw2 = other.update(path, torch.float64) if path in other.sites else torch.zeros_like(dw)
        error += float((dw - dw2).square().sum())
        energy += float(dw.square().sum())
    return error, energy


@pytest.mark.parametrize("size", [("--rank", 4), ("--energy", 0.8)])
def test_truncated_lora_equals_peft_convert_to_lora(size, tmp_path, cli):
    """Our written PEFT folder against PEFT 0.21's own truncation of the same LoRA, same ranks."""
    from peft import save_as_lora

    from tests.converters.test_converters_truncate import quiet_convert
    from tests.tiny import input_ids

    peft_model = make_peft_adapter(
        tiny_llama(layers=2, seed=3), tmp_path / "lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=5
    )
    r = cli("convert", tmp_path / "lora", "--to", "lora", *size, "-o", tmp_path / "cut", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ours = load_adapter(tmp_path / "cut")
    assert ours.form == "lora" and not (tmp_path / "cut" / "adapter_config.json").read_text().count("shareport")
    config, state = quiet_convert(peft_model, size[1])
    site_ranks = {path: k for kind in report["kinds"] for path, k in kind["site_ranks"].items()}
    for path in ours.sites:
        peft_a, peft_b = (
            state[f"base_model.model.{path}.lora_A.weight"],
            state[f"base_model.model.{path}.lora_B.weight"],
        )
        assert ours.rank(path) == site_ranks[path] == peft_a.shape[0]  # same rank per module
        torch.testing.assert_close(ours.update(path), peft_b @ peft_a * config.lora_alpha / config.r, atol=1e-5, rtol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_as_lora(tmp_path / "peft-cut", peft_model, rank=size[1])
    ids = input_ids(batch=2, seq=7)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(tiny_llama(layers=2, seed=3), str(tmp_path / "peft-cut")).eval()(ids).logits
        mine = PeftModel.from_pretrained(tiny_llama(layers=2, seed=3), str(tmp_path / "cut")).eval()(ids).logits
        base = tiny_llama(layers=2, seed=3)(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert float((mine - base).abs().max()) > 1e-2  # the adapter matters


def test_truncation_budget_is_kept_and_its_error_is_the_plans(tmp_path, cli):
    import math

    import converters
    from shareport.convert import kind_factors

    make_peft_adapter(tiny_llama(layers=3), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    lora = load_adapter(tmp_path / "lora")
    total = lora.num_parameters()  # q: 3 sites x 4 x (32 + 32), v: 3 x 4 x (16 + 32)
    for budget in (0.3, 0.6):
        cut, report = convert_adapter(lora, "lora", budget=budget)
        plan = converters.plan_truncation({k: kind_factors(lora, s) for k, s in lora.kinds().items()}, budget=budget)
        assert cut.num_parameters() == report.parameters_after == plan.params <= math.floor(budget * total)
        assert report.error == pytest.approx(plan.error, rel=1e-9)
        error, energy = _dense_error(lora, cut)
        assert report.error == pytest.approx(error, rel=1e-4)
        assert report.to_dict()["relative_error"] == pytest.approx((error / energy) ** 0.5, rel=1e-4)
        for kind in report.kinds:
            assert [cut.rank(p) for p in kind.site_ranks] == list(kind.site_ranks.values())
    # below rank 1 everywhere (6 sites x 48..64 = 336): the optimum drops sites, which are then not adapted
    r = cli("convert", tmp_path / "lora", "--to", "lora", "--budget", 150 / total, "-o", tmp_path / "small", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ranks = {p: k for kind in report["kinds"] for p, k in kind["site_ranks"].items()}
    kept = {p for p, k in ranks.items() if k > 0}
    assert 0 < len(kept) < len(ranks) and report["parameters_after"] <= 150
    written = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    small = load_adapter(tmp_path / "small")
    assert set(small.sites) == kept
    peft_model = PeftModel.from_pretrained(tiny_llama(layers=3), str(tmp_path / "small"))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == kept, written["target_modules"]
    assert report["warnings"] and "warning: " in r.stderr


# ---------------------------------------------------------------- --to auto


@pytest.mark.parametrize("shared_a", [False, True])
def test_auto_keeps_the_form_with_least_dense_error(shared_a, tmp_path, cli):
    """Each candidate expanded and compared densely with the LoRA; a ShareLoRA-like adapter
    (one A cloned into every layer) is where sharea, not truncation, must win."""
    peft_model = make_peft_adapter(tiny_llama(layers=3), tmp_path / "tmp", r=4, target_modules=["q_proj", "v_proj"])
    if shared_a:
        _clone_first_a(peft_model, ("q_proj", "v_proj"))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    lora = load_adapter(tmp_path / "lora")
    budget = 0.75
    dense = {}
    for form in ("lora", "sharea", "shareb", "shareab", "aslora"):
        converted, report = convert_adapter(lora, form, budget=budget)
        assert converted.num_parameters() <= budget * lora.num_parameters()
        dense[form] = (*_dense_error(lora, converted), converted.num_parameters())
    least = min(error for error, _, _ in dense.values())
    # errors within 1e-9 of the energy tie (lossless forms): the fewest parameters, then the first form
    best = min(
        (f for f, (error, energy, _) in dense.items() if error <= least + 1e-9 * energy), key=lambda f: dense[f][2]
    )
    r = cli("convert", tmp_path / "lora", "--to", "auto", "--budget", budget, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["winner"] == report["form"] == best == ("sharea" if shared_a else best)
    assert [c["form"] for c in report["candidates"]] == list(dense)
    for c in report["candidates"]:
        error, energy, _ = dense[c["form"]]
        assert c["relative_error"] == pytest.approx((error / energy) ** 0.5, rel=1e-4, abs=1e-6)
        assert c["winner"] == (c["form"] == best) and c["parameters"] <= budget * lora.num_parameters()
    written = load_adapter(tmp_path / "out")
    assert written.form == best and sorted(p.name for p in tmp_path.iterdir()) == ["lora", "out", "tmp"]
    assert best in cli("convert", tmp_path / "lora", "--to", "auto", "--budget", budget, "-o", tmp_path / "o2").stdout


def test_auto_among_exact_forms_keeps_the_fewest_parameters(tmp_path, cli):
    """A ShareLoRA-trained adapter at --budget 1.0: several forms are exact; ShareA, the smallest of them, wins."""
    peft_model = make_peft_adapter(tiny_llama(layers=4), tmp_path / "tmp", r=4, target_modules=["q_proj", "v_proj"])
    _clone_first_a(peft_model, ("q_proj", "v_proj"))
    peft_model.save_pretrained(str(tmp_path / "sharelora"))
    lora = load_adapter(tmp_path / "sharelora")
    sizes = {}
    for form in ("lora", "sharea", "shareb", "shareab", "aslora"):
        converted, _ = convert_adapter(lora, form, budget=1.0)
        error, energy = _dense_error(lora, converted)
        if error <= 1e-9 * energy:
            sizes[form] = converted.num_parameters()
    assert len(sizes) >= 2 and min(sizes, key=sizes.get) == "sharea"
    assert sizes["sharea"] < min(n for f, n in sizes.items() if f != "sharea")  # a larger exact form must lose
    r = cli("convert", tmp_path / "sharelora", "--to", "auto", "--budget", 1.0, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["winner"] == "sharea"
    assert load_adapter(tmp_path / "out").num_parameters() == sizes["sharea"]


# ---------------------------------------------------------------- sizes, defaults, warnings


def test_convert_and_inspect_state_one_size_through_recovery_and_reconversion(tmp_path, cli):
    from shareport.files.adapters import save_adapter
    from shareport.model.surgery import attach
    from shareport.train.recipe import with_provenance

    make_peft_adapter(tiny_llama(layers=4), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    source = load_adapter(tmp_path / "lora").num_parameters()

    def agree(folder, convert_json):
        info = json.loads(cli("inspect", folder, "--json").stdout)
        assert info["source_parameters"] == convert_json["source_parameters"] == source
        assert info["source_ratio"] == pytest.approx(convert_json["ratio"])
        assert convert_json["ratio"] == convert_json["parameters_after"] / source
        text = f"{convert_json['ratio']:.1%} of the source LoRA ({source:,} parameters)"
        assert text in cli("inspect", folder).stdout
        return text

    r = cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "as", "--json")
    text = agree(tmp_path / "as", json.loads(r.stdout))
    assert text in cli("convert", tmp_path / "lora", "--to", "aslora", "-o", tmp_path / "as2").stdout
    # recovery keeps the provenance: the trained adapter comes from Attached.to_adapter + with_provenance
    shared = load_adapter(tmp_path / "as")
    trained = with_provenance(attach(tiny_llama(layers=4), shared, trainable=True).to_adapter(), {"step": "finetune"})
    save_adapter(trained, tmp_path / "recovered")
    info = json.loads(cli("inspect", tmp_path / "recovered", "--json").stdout)
    assert info["source_parameters"] == source
    # re-converting measures against the original LoRA, not the intermediate; --budget too
    r = cli("convert", tmp_path / "recovered", "--to", "sharea", "--budget", 0.2, "-o", tmp_path / "again", "--json")
    again = json.loads(r.stdout)
    assert again["parameters_before"] == shared.num_parameters() and again["parameters_after"] <= 0.2 * source
    agree(tmp_path / "again", again)
    history = load_adapter(tmp_path / "again").provenance["history"]
    assert [h["step"] for h in history] == ["convert", "finetune", "convert"] and history[1] == {"step": "finetune"}


def test_default_aslora_is_the_planner_at_a_quarter():
    gen = torch.Generator().manual_seed(1)
    factors = {
        f"model.layers.{i}.self_attn.{k}": (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), 2.0)
        for i in range(4)
        for k in ("q_proj", "v_proj")
    }
    lora = Adapter.from_factors(factors)
    default, report = convert_adapter(lora, "aslora")
    planned, planned_report = convert_adapter(lora, "aslora", budget=0.25)
    assert default.identical(planned) and report.settings == planned_report.settings
    assert report.settings["budget"] == 0.25 and report.ratio <= 0.25
    # the old rule (rank = the LoRA's, then as many groups as fit) left one group: ShareAB
    assert any(len(k.groups) > 1 for k in report.kinds)


def test_kinds_under_half_their_energy_are_warned_about(tmp_path, cli):
    make_peft_adapter(tiny_llama(layers=4), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    lora = load_adapter(tmp_path / "lora")
    _, report = convert_adapter(lora, "shareab", budget=0.1)
    low = [k for k in report.kinds if k.retained_energy < 0.5]
    assert low and len(report.warnings) == len(low)
    for kind, line in zip(low, report.warnings):
        assert kind.kind in line and f"{kind.retained_energy:.1%}" in line and "--budget" in line
    r = cli("convert", tmp_path / "lora", "--to", "shareab", "--budget", 0.1, "-o", tmp_path / "out", "--json")
    assert json.loads(r.stdout)["warnings"] == report.warnings
    assert r.stderr.splitlines() == [f"warning: {w}" for w in report.warnings]
    assert convert_adapter(lora, "sharea", rank=16)[1].warnings == []  # lossless: nothing to say


@pytest.mark.parametrize(
    "to, size, hint",
    [
        ("aslora", {}, "try a --budget above the default 0.25"),  # no size option given: not "a larger --budget"
        ("sharea", {"rank": 1}, "try a larger --rank than 1"),
        ("sharea", {"energy": 0.3}, "try a larger --energy than 0.3"),
        ("shareab", {"budget": 0.1}, "try a larger --budget than 0.1"),
    ],
)
def test_low_energy_warning_names_the_option_that_set_the_size(to, size, hint):
    gen = torch.Generator().manual_seed(1)
    lora = Adapter.from_factors(
        {
            f"model.layers.{i}.self_attn.{k}": (
                torch.randn(4, 32, generator=gen),
                torch.randn(32, 4, generator=gen),
                2.0,
            )
            for i in range(4)
            for k in ("q_proj", "v_proj")
        }
    )
    _, report = convert_adapter(lora, to, **size)
    low = [k for k in report.kinds if k.retained_energy < 0.5]
    assert low and len(report.warnings) == len(low) and all(w.endswith(hint) for w in report.warnings)


def test_auto_lists_forms_the_budget_cannot_pay_for():
    gen = torch.Generator().manual_seed(2)
    lora = Adapter.from_factors(
        {
            f"model.layers.{i}.self_attn.q_proj": (
                torch.randn(4, 32, generator=gen),
                torch.randn(32, 4, generator=gen),
                1.0,
            )
            for i in range(4)
        }
    )
    # 71 parameters: rank 1 at one site (64) or shared (64); sharea/shareb need 160 at rank 1
    out, report = convert_adapter(lora, "auto", budget=71 / lora.num_parameters())
    refused = {c["form"] for c in report.candidates if "refused" in c}
    assert refused == {"sharea", "shareb"} and report.winner not in refused
    assert out.num_parameters() <= 71 and out.provenance["history"][-1]["chosen_by"] == "auto"
    with pytest.raises(ShareportError, match="too small for every form"):
        convert_adapter(lora, "auto", budget=10 / lora.num_parameters())
