"""Export of a fleet member: the shared basis is in the graph, each member's .onnx_adapter holds its cores."""

import json

import numpy as np
import onnx
import pytest

from shareport.export.ort_adapter import read_onnx_adapter
from shareport.files.adapters import load_adapter
from tests.tiny import make_peft_adapter, tiny_llama
from tests.training_helpers import save_base

RANKS = {"alpha": 4, "beta": 2, "gamma": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("fleet-export"))


def make_case(root):
    """A tiny base (``root/base``) and three LoRAs of it, ``root/<name>`` for each of ``RANKS``."""
    save_base(tiny_llama(layers=2), root / "base")
    for seed, (name, r) in enumerate(RANKS.items()):
        make_peft_adapter(
            tiny_llama(layers=2), root / name, seed=seed + 1, r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]
        )
    return root


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_one_graph_swaps_every_member_and_matches_pytorch(setup, form, tmp_path, cli):
    fleet = tmp_path / "fleet"
    assert cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", form, "--rank", 3).exit_code == 0
    out = tmp_path / "onnx"
    r = cli("export", fleet / "beta", "--base", setup / "base", "-o", out, "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    checks = {row["check"] for row in data["verify"]["rows"]}
    assert {"adapter active", "no adapter", "member alpha", "member beta", "member gamma"} <= checks
    assert data["verify"]["ok"]
    proto = onnx.load(str(out / "model.onnx"))
    inputs = {i.name for i in proto.graph.input}
    for name in RANKS:
        member = load_adapter(fleet / name)
        own = set(member.used_tensor_names()) - set(member.config["fleet"]["names"])
        arrays = read_onnx_adapter(out / f"{name}.onnx_adapter")
        if form == "sharea":
            assert set(arrays) == own  # the per-site B's only, no shared A
        else:
            cores = {core for _, core in member.config["fleet"]["products"].values()}
            assert set(arrays) == cores and all(a.shape == (3, 3) for a in arrays.values())
        assert set(arrays) <= inputs and not set(member.config["fleet"]["names"]) & inputs  # basis: not an input
        row = next(m for m in data["fleet_members"] if m["member"] == name)
        assert row["bytes"] < row["plain_lora_bytes"]
    # the shared basis is in the graph, as constant initializers: its values appear there
    shared = load_adapter(fleet / "alpha")
    basis = next(iter(n for n in shared.config["fleet"]["names"] if n.endswith("fleet_A")))
    want = shared.tensors[basis].numpy().T
    constants = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name not in inputs]
    assert any(c.shape == want.shape and np.array_equal(c, want) for c in constants)
    if form == "sharea":  # the verify command on another member swaps it in and checks every member too
        r = cli("verify", out, "--base", setup / "base", "--adapter", fleet / "gamma", "--json")
        assert r.exit_code == 0, r.output


def test_a_graph_of_one_fleet_refuses_a_member_of_another(setup, tmp_path, cli):
    one, two = tmp_path / "one", tmp_path / "two"
    rank = ("--form", "sharea", "--rank", 2)
    assert cli("fleet", setup / "alpha", setup / "beta", "-o", one, *rank).exit_code == 0
    assert cli("fleet", setup / "alpha", setup / "beta", setup / "gamma", "-o", two, *rank).exit_code == 0
    out = tmp_path / "onnx"
    assert (
        cli("export", one / "alpha", "--base", setup / "base", "-o", out, "--mode", "adapter", "--no-verify").exit_code
        == 0
    )
    r = cli("export-adapter", two / "alpha", "--graph", out, "-o", tmp_path / "x.onnx_adapter")
    assert r.exit_code == 1 and "not a member of the fleet" in r.output and str(two / "alpha") in r.output
    r = cli("verify", out, "--base", setup / "base", "--adapter", two / "beta")
    assert r.exit_code == 1 and "not a member of the fleet" in r.output
    r = cli("export-adapter", one / "beta", "--graph", out, "-o", tmp_path / "beta.onnx_adapter")
    assert r.exit_code == 0, r.output
    assert (
        read_onnx_adapter(tmp_path / "beta.onnx_adapter").keys() == read_onnx_adapter(out / "beta.onnx_adapter").keys()
    )
