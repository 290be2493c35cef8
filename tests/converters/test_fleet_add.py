"""fleet-add: a new PEFT LoRA projected onto a built fleet, the basis grown only when its error asks,
the other members' updates bit-identical, scored against dense least squares on the stored bases."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shareport.files.adapters import load_adapter
from tests.tiny import make_peft_adapter, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"alpha": 4, "beta": 2, "gamma": 3}
NEW_RANK = 3


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for seed, (name, r) in enumerate({**RANKS, "delta": NEW_RANK}.items()):
        make_peft_adapter(tiny_llama(), root / name, seed=seed + 1, r=r, lora_alpha=2 * r, target_modules=TARGETS)
    make_peft_adapter(tiny_llama(), root / "fewer", seed=9, r=2, target_modules=["q_proj", "v_proj"])
    # alpha's twin: its B's scaled, so its updates span alpha's spaces (and its relative error is alpha's)
    shutil.copytree(root / "alpha", root / "twin")
    weights = root / "twin" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    shutil.copytree(root / "delta", root / "other-base")
    config = json.loads((root / "other-base" / "adapter_config.json").read_text())
    (root / "other-base" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "x/y"}))
    return root


@pytest.fixture(scope="module")
def fleets(loras, tmp_path_factory, cli_module):
    root = tmp_path_factory.mktemp("fleets")
    for form in ("sharea", "shareab"):
        r = cli_module("fleet", *(loras / n for n in RANKS), "-o", root / form, "--form", form, "--rank", 3)
        assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def cli_module():
    from click.testing import CliRunner

    from shareport.cli.main import main

    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree(folder):
    """Every file under ``folder`` -> its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dense_projection_error(lora, member):
    """Relative error of the dense least squares of the LoRA's every dW on the member's stored bases:
    ``U U^T dW V^T V`` (U = identity for sharea), the bases read from the member's own pool."""
    err = energy = 0.0
    for path, site in member.sites.items():
        dw = lora.update(path, torch.float64)
        v = member.tensors[site.a].double()
        products = member.config["fleet"]["products"]
        u = member.tensors[products[site.b][0]].double() if site.b in products else None
        best = (dw if u is None else u @ (u.T @ dw)) @ v.T @ v
        err += float((dw - best).square().sum())
        energy += float(dw.square().sum())
    return (err / energy) ** 0.5


def dense_error(lora, member):
    err = sum(
        float((lora.update(p, torch.float64) - member.update(p, torch.float64)).square().sum()) for p in lora.sites
    )
    return (err / sum(float(lora.update(p, torch.float64).square().sum()) for p in lora.sites)) ** 0.5


def grow(cli, fleet, new, *args):
    r = cli("fleet-add", fleet, new, *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_within_the_worst_error_the_fleet_keeps_its_bytes(loras, fleets, form, tmp_path, cli):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleets / form, fleet)
    before = tree(fleet)
    data = grow(cli, fleet, loras / "twin")
    worst = max(m["relative_error"] for m in data["members"][:-1])
    added = data["added"]
    assert added["rule"] == "the worst existing member's relative error" and added["target"] == worst
    assert added["grown"] == {}
    assert added["relative_error"] == pytest.approx(data["members"][0]["relative_error"], rel=1e-5)  # alpha's
    after = tree(fleet)
    assert {k: v for k, v in after.items() if not k.startswith("twin/") and k != "fleet_report.json"} == {
        k: v for k, v in before.items() if k != "fleet_report.json"
    }
    assert data["rewritten"] == ["twin/", "fleet_report.json"]
    # the comparison with each LoRA alone described the fleet as built: dropped, not left stale
    assert "alone" in json.loads((fleets / form / "fleet_report.json").read_text())
    assert "alone" not in data and not [w for w in data["warnings"] if w.startswith("each LoRA truncated alone")]
    member, lora = load_adapter(fleet / "twin"), load_adapter(loras / "twin")
    assert added["relative_error"] == pytest.approx(dense_error(lora, member), rel=1e-5)
    assert dense_error(lora, member) == pytest.approx(dense_projection_error(lora, member), rel=1e-5)
    assert [m["name"] for m in data["members"]] == [*RANKS, "twin"]
    assert json.loads((fleet / "fleet_report.json").read_text())["additions"][0]["member"] == "twin"


def test_over_the_worst_error_the_basis_grows_to_it(loras, fleets, tmp_path, cli):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleets / "sharea", fleet)
    data = grow(cli, fleet, loras / "delta")
    worst = max(m["relative_error"] for m in data["members"][:-1])
    added = data["added"]
    assert added["error_before"] > worst >= added["relative_error"] and added["grown"]
    member, lora = load_adapter(fleet / "delta"), load_adapter(loras / "delta")
    assert added["relative_error"] == pytest.approx(dense_error(lora, member), rel=1e-5)


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_a_grown_basis_pads_the_others_so_their_updates_are_bit_identical(loras, fleets, form, tmp_path, cli):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleets / form, fleet)
    old = {n: load_adapter(fleet / n) for n in RANKS}
    old_report = json.loads((fleet / "fleet_report.json").read_text())
    data = grow(cli, fleet, f"new={loras / 'delta'}", "--max-error", 0.3)
    added = data["added"]
    assert added["error_before"] > 0.3 >= added["relative_error"] and added["grown"]
    assert data["rewritten"] == ["new/", "shared.safetensors", *(f"{n}/" for n in RANKS), "fleet_report.json"]
    for name, before in old.items():
        after = load_adapter(fleet / name)
        assert all(torch.equal(before.update(p), after.update(p)) for p in before.sites), name
        reported = next(m for m in data["members"] if m["name"] == name)
        was = next(m for m in old_report["members"] if m["name"] == name)
        assert reported["relative_error"] == was["relative_error"]
    member, lora = load_adapter(fleet / "new"), load_adapter(loras / "delta")
    # the new member's cores are the dense least squares on the grown (stored) bases
    assert added["relative_error"] == pytest.approx(dense_error(lora, member), rel=1e-5)
    assert dense_error(lora, member) == pytest.approx(dense_projection_error(lora, member), rel=1e-5)
    for kind, (u_added, v_added) in added["grown"].items():
        assert data["kinds"][kind]["ranks"] == [3 + u_added if form == "shareab" else 0, 3 + v_added]
        assert u_added == 0 if form == "sharea" else u_added > 0
    assert data["parameters"] == data["shared_parameters"] + sum(m["parameters"] for m in data["members"])
    # the stored sizes are the files': a member's own tensors
    for m in data["members"]:
        header = (fleet / m["name"] / "adapter_model.safetensors").read_bytes()
        meta = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])
        assert m["parameters"] == sum(torch.Size(v["shape"]).numel() for k, v in meta.items() if k != "__metadata__")


def test_output_folder_leaves_the_fleet_as_it_was(loras, fleets, tmp_path, cli):
    before = tree(fleets / "shareab")
    data = grow(cli, fleets / "shareab", loras / "delta", "-o", tmp_path / "grown", "--max-error", 0.5)
    assert tree(fleets / "shareab") == before
    assert data["output"] == str(tmp_path / "grown") and load_adapter(tmp_path / "grown" / "delta")


def test_bad_input_is_one_line_and_writes_nothing(loras, fleets, tmp_path, cli):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleets / "sharea", fleet)
    changed = tmp_path / "changed"
    shutil.copytree(fleets / "sharea", changed)
    shared = changed / "shared.safetensors"
    raw = bytearray(shared.read_bytes())
    raw[-1] ^= 1  # one bit of a tensor: still a readable file, another sha256
    shared.write_bytes(bytes(raw))
    foreign = tmp_path / "foreign"
    shutil.copytree(fleets / "sharea", foreign)
    (foreign / "notes.txt").write_text("mine")
    cases = [
        ((fleet, f"alpha={loras / 'delta'}"), "already has a member 'alpha'"),
        ((fleet, loras / "other-base"), "base model 'x/y' differs"),
        ((fleet, loras / "fewer"), "adapts other modules"),
        ((changed, loras / "delta"), "was changed"),
        ((foreign, loras / "delta"), "holds 'notes.txt'"),
        ((fleet, loras / "delta", "--max-error", 1.5), "--max-error must be"),
        ((loras / "alpha", loras / "delta"), "not a fleet folder"),
    ]
    for args, message in cases:
        trees = {p: tree(p) for p in (fleet, changed, foreign)}
        r = cli("fleet-add", *args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.output)
        assert {p: tree(p) for p in trees} == trees
        assert sorted(p.name for p in tmp_path.iterdir()) == ["changed", "fleet", "foreign"]


def test_the_new_member_is_named_as_fleet_names_its_inputs(loras, tmp_path, cli):
    """Without NAME=, the new member takes the name ``fleet`` gives it among the fleet's inputs and itself
    (the reference: ``member_names`` over all of them), distinct from every member; NAME=PATH names it."""
    from shareport.files.fleet import member_names

    for run, source in {"run1": "alpha", "run2": "beta", "run4": "delta"}.items():
        shutil.copytree(loras / source, tmp_path / "a" / run / "lora")
    shutil.copytree(loras / "gamma", tmp_path / "b" / "run1" / "lora")
    shutil.copytree(loras / "twin", tmp_path / "b" / "run2" / "lora")
    inputs = [tmp_path / "a" / "run1" / "lora", tmp_path / "a" / "run2" / "lora"]
    fleet = tmp_path / "fleet"
    assert cli("fleet", *inputs, "-o", fleet, "--form", "sharea", "--rank", 3).exit_code == 0
    names = [m["name"] for m in json.loads((fleet / "fleet_report.json").read_text())["members"]]
    assert names == ["run1", "run2"]
    for new in (tmp_path / "a" / "run4" / "lora", tmp_path / "b" / "run1" / "lora"):  # run4; b-run1 (run1 is taken)
        expected = member_names([*map(str, inputs), str(new)])[-1][0]
        assert expected not in names and expected != "lora"  # "lora": the folder's name, as it was
        data = grow(cli, fleet, new)
        assert data["added"]["member"] == expected and (fleet / expected).is_dir()
        names.append(expected)
        inputs.append(new)
    data = grow(cli, fleet, f"mine={tmp_path / 'b' / 'run2' / 'lora'}")
    assert data["added"]["member"] == "mine" and [m["name"] for m in data["members"]] == [*names, "mine"]
