"""A fleet of classifier LoRAs whose heads differ (PEFT modules_to_save): in adapter mode the head is a
graph input too, every member's .onnx_adapter holds its own head, and each file run in ONNX Runtime
gives what PEFT gives for that member's LoRA; a member whose head cannot fit refuses the export."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from shareport.export import runtime
from shareport.export.ort_adapter import read_onnx_adapter, write_onnx_adapter
from shareport.export.verify import FP32_ATOL
from tests.onnx_cases import classifier_feeds, peft_logits
from tests.tiny import TARGETS, make_peft_adapter, tiny_bert
from tests.training_helpers import save_base

MEMBERS = ("alpha", "beta", "gamma")
HEAD = ("classifier.bias", "classifier.weight")  # the graph inputs a BERT classifier's head becomes


def _lora(folder, seed: int, labels: int = 3, head: bool = True):
    """A real PEFT LoRA on the tiny BERT classifier, its head drawn apart from the others' (or none)."""
    from shareport.files.adapters import load_adapter, save_adapter

    peft_model = make_peft_adapter(
        tiny_bert(num_labels=labels),
        folder,
        seed=seed,
        r=2,
        lora_alpha=4,
        target_modules=TARGETS["bert"],
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    # PEFT copies the base's head; a trained one has moved away from it, each its own way
    carried = peft_model.base_model.model.classifier.modules_to_save.default
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for param in (carried.weight, carried.bias):
            param.copy_(torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(str(folder))
    if not head:  # PEFT always saves a SEQ_CLS head; a LoRA saved without one (e.g. by other tools) has none
        adapter = load_adapter(folder)
        adapter.extra_tensors = {}
        shutil.rmtree(folder)
        save_adapter(adapter, folder, as_peft=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-heads")
    save_base(tiny_bert(num_labels=3), root / "base")
    for seed, name in enumerate(MEMBERS, start=1):
        _lora(root / name, seed)
    return root


EXACT = 3 * 3 * 2  # a kind's shared A spans every rank-2 A of its 3 layers in 3 members: the members are their LoRAs


def _fleet(cli, root, out, *names, rank=EXACT):
    r = cli("fleet", *(root / n for n in names), "-o", out, "--form", "sharea", "--rank", rank)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    from click.testing import CliRunner

    from shareport.cli.main import main

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    root = tmp_path_factory.mktemp("fleet-heads-export")
    fleet = _fleet(cli, setup, root / "fleet", *MEMBERS)
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", root / "onnx", "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    return fleet, root / "onnx", json.loads(r.stdout)


_feeds, _peft_logits = classifier_feeds, peft_logits


def test_every_member_file_in_ort_gives_its_peft_output(setup, exported):
    _, onnx_dir, data = exported
    report = data["verify"]
    assert report["ok"], report
    assert {f"member {n}" for n in MEMBERS} <= {row["check"] for row in report["rows"]}
    assert not any("not checked" in note for note in report["notes"])
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    assert set(HEAD) <= {i.name for i in proto.graph.input}
    sess, feeds = runtime.session(onnx_dir / "model.onnx"), _feeds()
    wants = {name: _peft_logits(setup / "base", setup / name, feeds) for name in MEMBERS}
    assert np.abs(wants["alpha"] - wants["beta"]).max() > 0.5  # the heads really differ
    for name in MEMBERS:
        arrays = read_onnx_adapter(onnx_dir / f"{name}.onnx_adapter")
        assert set(HEAD) <= set(arrays)
        got = runtime.run(sess, feeds, runtime.load_lora(arrays))[0]
        assert np.abs(got - wants[name]).max() <= FP32_ATOL, name
    # no adapter active: the defaults are the exported member's head (LoRA off), not the base's
    plain = runtime.run(sess, feeds)[0]
    assert not np.allclose(plain, wants["beta"], atol=0.1) and plain.shape == wants["alpha"].shape


def _export_adapter_as_shipped(cli, member, graph, path) -> dict[str, np.ndarray]:
    """``export-adapter`` of a member gives the very tensors (its head included) of the file export wrote."""
    r = cli("export-adapter", member, "--graph", graph, "-o", path)
    assert r.exit_code == 0, r.output
    mine, shipped = read_onnx_adapter(path), read_onnx_adapter(graph / f"{member.name}.onnx_adapter")
    assert set(HEAD) <= set(mine) and mine.keys() == shipped.keys()
    assert all(np.array_equal(mine[n], shipped[n]) for n in mine)
    return shipped


def test_verify_with_another_member_and_export_adapter_carry_its_head(setup, exported, cli, tmp_path):
    fleet, onnx_dir, _ = exported
    r = cli("verify", onnx_dir, "--base", setup / "base", "--adapter", fleet / "gamma", "--json")
    assert r.exit_code == 0, r.output
    shipped = _export_adapter_as_shipped(cli, fleet / "gamma", onnx_dir, tmp_path / "gamma.onnx_adapter")
    # a file without the head the graph takes is refused, with one line
    write_onnx_adapter({n: a for n, a in shipped.items() if n not in HEAD}, tmp_path / "headless.onnx_adapter")
    r = cli(
        "export-adapter", tmp_path / "headless.onnx_adapter", "--graph", onnx_dir, "-o", tmp_path / "x.onnx_adapter"
    )
    assert r.exit_code == 1 and "classifier" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_folded_export_bakes_the_exported_members_head(setup, exported, cli, tmp_path):
    fleet, _, _ = exported
    out = tmp_path / "folded"
    r = cli("export", fleet / "beta", "--base", setup / "base", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verify"]["ok"]
    assert not set(HEAD) & {i.name for i in onnx.load(str(out / "model.onnx")).graph.input}
    feeds = _feeds()
    got = runtime.run(runtime.session(out / "model.onnx"), feeds)[0]
    assert np.abs(got - _peft_logits(setup / "base", setup / "beta", feeds)).max() <= FP32_ATOL


def test_identical_heads_keep_the_baked_graph(setup, cli, tmp_path):
    """Members that carry the same head: no head inputs, member files hold cores only."""
    from shareport.files.adapters import load_adapter, save_adapter

    same = load_adapter(setup / "beta")
    same.extra_tensors = dict(load_adapter(setup / "alpha").extra_tensors)
    save_adapter(same, tmp_path / "beta", as_peft=True)
    (tmp_path / "alpha").symlink_to(setup / "alpha")
    fleet = _fleet(cli, tmp_path, tmp_path / "fleet", "alpha", "beta")
    out = tmp_path / "onnx"
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", out, "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verify"]["ok"]
    proto = onnx.load(str(out / "model.onnx"))
    assert not set(HEAD) & {i.name for i in proto.graph.input}
    carried = json.loads(proto.metadata_props[0].value)["carried"]
    assert "inputs" not in carried and sorted(carried["baked"]) == sorted(HEAD)  # baked, and recorded as such
    assert not set(HEAD) & set(read_onnx_adapter(out / "beta.onnx_adapter"))


@pytest.mark.parametrize(
    "odd, why",
    [
        (dict(labels=4), "of shape (4,), the exported member's is (3,)"),  # another number of classes
        (dict(head=False), "lacks the carried tensor"),  # no head at all
    ],
)
def test_a_member_whose_head_cannot_fit_refuses_the_export(setup, cli, tmp_path, odd, why):
    _lora(tmp_path / "odd", seed=9, **odd)
    (tmp_path / "alpha").symlink_to(setup / "alpha")
    fleet = _fleet(cli, tmp_path, tmp_path / "fleet", "alpha", "odd")
    out = tmp_path / "onnx"
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", out, "--mode", "adapter")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "fleet member 'odd'" in r.output and str(fleet / "odd") in r.output and why in r.output
    assert not out.exists()


def test_embedded_olive_named_graph_keeps_the_heads_parameter_names(setup, exported, cli, tmp_path):
    fleet, _, _ = exported
    out = tmp_path / "onnx"
    r = cli(
        "export",
        fleet / "beta",
        "--base",
        setup / "base",
        "-o",
        out,
        "--mode",
        "adapter",
        "--embed-adapter",
        "--adapter-names",
        "olive",
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["verify"]
    assert report["ok"] and {"embedded default", "no adapter", "member gamma"} <= {
        row["check"] for row in report["rows"]
    }
    inputs = {i.name for i in onnx.load(str(out / "model.onnx")).graph.input}
    assert set(HEAD) <= inputs and all(n.endswith("lora_B.weight") for n in inputs - set(HEAD) - set(_feeds()))
    _export_adapter_as_shipped(cli, fleet / "gamma", out, tmp_path / "gamma.onnx_adapter")


def test_a_graph_that_bakes_one_head_fails_verify_for_the_others(setup, exported, cli, tmp_path, monkeypatch):
    """A graph exported before heads could swap (simulated): verify runs every member's file and fails
    those whose head differs, instead of skipping them."""
    from shareport.export import exporter

    fleet, _, _ = exported
    monkeypatch.setattr(exporter, "fleet_needs_inputs", lambda *args: False)
    out = tmp_path / "onnx"
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", out, "--mode", "adapter", "--no-verify")
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--base", setup / "base", "--adapter", fleet / "alpha", "--json")
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert r.exit_code != 0 and not report["ok"]
    failed = {row["check"] for row in report["rows"] if not row["ok"]}
    assert failed == {"member beta", "member gamma"}
    assert sum("export it again" in note for note in report["notes"]) == 2
