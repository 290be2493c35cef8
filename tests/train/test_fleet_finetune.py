"""Recovery of a fleet member with the shared basis frozen: only its own cores train, toward its own LoRA."""

import json

import pytest
import torch

from shareport.files.adapters import load_adapter
from tests.tiny import make_peft_adapter, tiny_llama
from tests.training_helpers import save_base, write_text

RANKS = {"alpha": 4, "beta": 2, "gamma": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-recovery")
    save_base(tiny_llama(), root / "base")
    for seed, (name, r) in enumerate(RANKS.items()):
        make_peft_adapter(
            tiny_llama(), root / name, seed=seed + 1, r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]
        )
    write_text(root / "train.txt", 48)
    return root


def finetune(cli, root, member, teacher, out):
    r = cli(
        "finetune",
        member,
        "--base",
        root / "base",
        "--teacher",
        teacher,
        "--data",
        root / "train.txt",
        "-o",
        out,
        "--steps",
        12,
        "--lr",
        5e-3,
        "--batch-size",
        4,
        "--max-length",
        24,
        "--json",
    )
    assert r.exit_code == 0, r.output
    return json.loads((out / "training_report.json").read_text())


def test_sharea_member_trains_its_cores_only_and_stays_a_member(setup, tmp_path, cli):
    fleet = tmp_path / "fleet"
    assert cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "sharea", "--rank", 2).exit_code == 0
    shared_bytes = (fleet / "shared.safetensors").read_bytes()
    before = load_adapter(fleet / "beta")
    out = fleet / "beta-recovered"  # beside the member: the same relative reference holds
    report = finetune(cli, setup, fleet / "beta", setup / "beta", out)
    assert report["after"]["kl"] < report["before"]["kl"]
    assert (fleet / "shared.safetensors").read_bytes() == shared_bytes
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["shareport"]["fleet"]["shared"] == "../shared.safetensors"
    after = load_adapter(out)
    for name in before.config["fleet"]["names"]:
        assert torch.equal(after.tensors[name], before.tensors[name])
    own = sorted(set(before.used_tensor_names()) - set(before.config["fleet"]["names"]))
    assert own and all(not torch.equal(after.tensors[n], before.tensors[n]) for n in own)
    # an output elsewhere is still a member of the same shared file (a relative path from there)
    elsewhere = tmp_path / "elsewhere"
    finetune(cli, setup, fleet / "gamma", setup / "gamma", elsewhere)
    assert (
        json.loads((elsewhere / "adapter_config.json").read_text())["shareport"]["fleet"]["shared"]
        == "../fleet/shared.safetensors"
    )
    assert (fleet / "shared.safetensors").read_bytes() == shared_bytes


def test_two_sided_member_trains_only_its_cores_and_stays_a_member(setup, tmp_path, cli):
    fleet = tmp_path / "fleet"
    assert cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "shareab", "--rank", 2).exit_code == 0
    shared_bytes = (fleet / "shared.safetensors").read_bytes()
    before = load_adapter(fleet / "alpha")
    out = fleet / "alpha-recovered"
    report = finetune(cli, setup, fleet / "alpha", setup / "alpha", out)
    assert report["after"]["kl"] < report["before"]["kl"]
    assert (fleet / "shared.safetensors").read_bytes() == shared_bytes
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["shareport"]["fleet"]["sha256"] == before.config["fleet"]["sha256"]
    after = load_adapter(out)
    for b_name, (u_name, core_name) in after.config["fleet"]["products"].items():
        assert torch.equal(after.tensors[u_name], before.tensors[u_name])
        assert not torch.equal(after.tensors[core_name], before.tensors[core_name])  # its own cores trained
        assert after.tensors[core_name].shape == (2, 2)
        torch.testing.assert_close(
            after.tensors[b_name].double(),  # B is still U @ C: in span(U)
            after.tensors[u_name].double() @ after.tensors[core_name].double(),
        )
    for site in after.sites.values():
        assert torch.equal(after.tensors[site.a], before.tensors[site.a])
    stored = (out / "adapter_model.safetensors").stat().st_size
    assert stored == (fleet / "alpha" / "adapter_model.safetensors").stat().st_size  # cores only, as before
