"""Fleets of real PEFT LoRAs on a tiny Llama: in-memory members, the fleet folder, the command."""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from peft import PeftModel

from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter
from shareport.files.tensorfile import read_header
from shareport.fleet import build_fleet
from tests.tiny import make_peft_adapter, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"alpha": 4, "beta": 2, "gamma": 3}  # a fleet's LoRAs may differ in rank


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for seed, (name, r) in enumerate(RANKS.items()):
        make_peft_adapter(tiny_llama(), root / name, seed=seed + 1, r=r, lora_alpha=2 * r, target_modules=TARGETS)
    return root


def dirs(root):
    return [root / name for name in RANKS]


def dense_stack_error(adapters, kind, k):
    """Dense reference for sharea: tail of the singular values of every member's stacked dW of ``kind``."""
    dws = [a.update(s.path, torch.float64) for a in adapters for s in a.kinds()[kind]]
    return float(torch.linalg.svdvals(torch.cat(dws, dim=0))[k:].square().sum())


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_members_reproduce_the_fleet_math_and_share_the_basis(loras, form):
    adapters = [load_adapter(d) for d in dirs(loras)]
    fleet = build_fleet(adapters, list(RANKS), form, rank=3)
    for original, member, rep in zip(adapters, fleet.members, fleet.report.members):
        err = energy = 0.0
        for path in original.sites:
            dw, approx = original.update(path, torch.float64), member.update(path, torch.float64)
            err += float((dw - approx).square().sum())
            energy += float(dw.square().sum())
            site = member.sites[path]
            assert site.a == f"{site.kind}.fleet_A" and torch.equal(member.tensors[site.a], fleet.shared[site.a])
        assert rep.relative_error == pytest.approx((err / energy) ** 0.5, rel=1e-4)
        assert rep.lora_parameters == original.num_parameters()
        assert member.provenance["source_parameters"] == original.num_parameters()
    if form == "sharea":
        for kind in adapters[0].kinds():
            info = fleet.report.kinds[kind]
            err = sum(
                m.kind_errors[kind] ** 2
                * sum(float(a.update(s.path, torch.float64).square().sum()) for s in a.kinds()[kind])
                for m, a in zip(fleet.report.members, adapters)
            )
            assert err == pytest.approx(dense_stack_error(adapters, kind, 3), rel=1e-4)
            assert info["ranks"] == [0, 3]
    else:
        for member in fleet.members:
            for b_name, (u_name, core_name) in member.config["fleet"]["products"].items():
                assert member.tensors[core_name].shape == (3, 3)
                torch.testing.assert_close(
                    member.tensors[b_name].double(), fleet.shared[u_name].double() @ member.tensors[core_name].double()
                )


def test_budget_is_a_fraction_of_the_fleets_lora_parameters(loras):
    adapters = [load_adapter(d) for d in dirs(loras)]
    total = sum(a.num_parameters() for a in adapters)
    for form in ("sharea", "shareab"):
        report = build_fleet(adapters, list(RANKS), form, budget=0.3).report
        assert report.parameters <= 0.3 * total
        assert report.lora_parameters == total
        assert report.parameters == report.shared_parameters + sum(m.parameters for m in report.members)
    small = build_fleet(adapters, list(RANKS), "sharea", budget=0.2).report
    large = build_fleet(adapters, list(RANKS), "sharea", budget=0.6).report
    assert sum(m.relative_error for m in large.members) < sum(m.relative_error for m in small.members)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_fleet_folder_members_load_alone_and_expand_exactly(loras, form, tmp_path, cli):
    out = tmp_path / "fleet"
    r = cli("fleet", *dirs(loras), "-o", out, "--form", form, "--rank", 3, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == [
        ".shareport",
        "alpha",
        "beta",
        "fleet_report.json",
        "gamma",
        "shared.safetensors",
    ]
    digest = sha(out / "shared.safetensors")
    in_memory = build_fleet([load_adapter(d) for d in dirs(loras)], list(RANKS), form, rank=3)
    for name, expected in zip(RANKS, in_memory.members):
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["shareport"]["fleet"]["shared"] == "../shared.safetensors"
        assert config["shareport"]["fleet"]["sha256"] == digest
        member = load_adapter(out / name)
        assert member.max_update_diff(expected) == 0.0
        stored = set(
            json.loads(
                (out / name / "adapter_model.safetensors").read_bytes()[8:][
                    : int.from_bytes((out / name / "adapter_model.safetensors").read_bytes()[:8], "little")
                ]
            )
        )
        assert not any(n.endswith("fleet_A") or n.endswith("fleet_U") for n in stored)  # shared: not in the member
        # convert --to lora: the exact expansion, as PEFT reads it
        r = cli("convert", out / name, "--to", "lora", "-o", tmp_path / f"{name}-lora")
        assert r.exit_code == 0, r.output
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / f"{name}-lora")).eval()
        merged = peft_model.merge_and_unload().state_dict()
        base = tiny_llama().state_dict()
        for path in member.sites:
            delta = merged[f"{path}.weight"] - base[f"{path}.weight"]
            torch.testing.assert_close(delta, member.update(path), atol=1e-5, rtol=1e-4)
        r = cli("inspect", out / name, "--json")
        assert r.exit_code == 0, r.output
        # inspect names the membership; the counts against the tensors the two files hold
        fleet_info = json.loads(r.stdout)["fleet"]
        own = {k: v for k, v in read_header(out / name / "adapter_model.safetensors").items() if "/" not in k}
        shared = read_header(out / "shared.safetensors")
        shared_names = member.config["fleet"]["names"]  # (in memory: the pool names the shared file holds)
        assert fleet_info["own_parameters"] == sum(math.prod(v["shape"]) for v in own.values())
        assert fleet_info["shared_parameters"] == sum(math.prod(shared[n]["shape"]) for n in shared_names)
        assert fleet_info["form"] == form and os.path.samefile(fleet_info["shared_file"], out / "shared.safetensors")
    assert data["members"][0]["bytes"] < data["members"][0]["lora_bytes"]
    assert data["bytes"] == sum(m["bytes"] for m in data["members"]) + data["shared_bytes"]


def test_moving_the_fleet_keeps_it_valid_and_output_is_byte_identical(loras, tmp_path, cli):
    for out in (tmp_path / "one", tmp_path / "two"):
        assert cli("fleet", *dirs(loras), "-o", out, "--budget", 0.3).exit_code == 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    before = load_adapter(tmp_path / "one" / "beta")
    shutil.move(tmp_path / "one", tmp_path / "elsewhere")
    assert load_adapter(tmp_path / "elsewhere" / "beta").max_update_diff(before) == 0.0


def test_missing_or_changed_shared_file_is_refused_naming_the_member(loras, tmp_path, cli):
    out = tmp_path / "fleet"
    assert cli("fleet", *dirs(loras), "-o", out, "--form", "sharea", "--rank", 2).exit_code == 0
    shared = out / "shared.safetensors"
    data = bytearray(shared.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor value
    shared.write_bytes(bytes(data))
    with pytest.raises(ShareportError, match=r"gamma.*shared file \.\./shared\.safetensors was changed"):
        load_adapter(out / "gamma")
    r = cli("inspect", out / "gamma")
    assert r.exit_code == 1 and "gamma" in r.output and "changed" in r.output
    shared.unlink()
    r = cli("convert", out / "alpha", "--to", "lora", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "alpha" in r.output and "missing" in r.output
    r = cli("fleet", out / "alpha", out / "beta", "-o", tmp_path / "y")
    assert r.exit_code == 1 and "alpha" in r.output and "missing" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_fleets_are_refused_naming_the_adapter_and_write_nothing(loras, tmp_path, cli):
    other_sites = tmp_path / "other_sites"
    make_peft_adapter(tiny_llama(), other_sites, seed=9, r=2, target_modules=["q_proj", "v_proj"])
    other_shape = tmp_path / "other_shape"
    make_peft_adapter(tiny_llama(seed=0).__class__(_wider_config()), other_shape, seed=9, r=2, target_modules=TARGETS)
    other_base = tmp_path / "other_base"
    shutil.copytree(loras / "beta", other_base)
    config = json.loads((other_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (other_base / "adapter_config.json").write_text(json.dumps(config))
    copy = tmp_path / "copy"
    shutil.copytree(loras / "beta", copy)
    a, b = loras / "alpha", loras / "beta"
    cases = [
        ((a, other_sites), "other_sites", "other modules"),
        ((a, other_shape), "other_shape", "update shape"),
        ((a, other_base), "other_base", "base model"),
        ((a, b, a), "alpha", "given twice"),
        ((a, b, copy), "copy", "same weights"),
        ((a,), "", "at least two"),
    ]
    assert_refused(cli, tmp_path / "out", cases)


def assert_refused(cli, out, cases):
    """Each case (fleet arguments, a word naming the culprit, the words of the problem): exit 1, one line
    naming both, nothing written."""
    for inputs, name, words in cases:
        r = cli("fleet", *inputs, "-o", out)
        assert r.exit_code == 1, (inputs, r.output)
        line = r.output.strip()
        assert "\n" not in line and name in line and words in line, line
        assert "None" not in line, line  # an adapter without a recorded base is said so, not as Python's None
        assert not out.exists()


def _wider_config():
    config = tiny_llama().config
    config.intermediate_size = 56
    return config
