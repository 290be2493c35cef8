"""Recovery of a quantized adapter (``convert --quantize``, ``fleet --quantize``) publishes integers again,
stored as the start was, and never an adapter worse than the start on the held-out split as stored."""

import pytest
import torch

from shareport.files.adapters import load_adapter
from shareport.files.tensorfile import read_header
from shareport.train.jobs import recovery_job
from shareport.train.recipe import Recipe, run
from shareport.train.stored import stored_as_start
from tests.train.test_fleet_finetune import RANKS, finetune, setup  # noqa: F401  (setup: a module-scoped fixture)

QMAX = {8: 127, 4: 7}


def _integer_tensors(folder) -> dict[str, str]:
    """Stored dtype of every tensor in the folder's own weights file."""
    return {k: v["dtype"] for k, v in read_header(folder / "adapter_model.safetensors").items()}


def _check_stored_as(start, published) -> None:
    """``published`` holds the start's quantized tensors as integers with the start's settings, its float
    values exactly their dequantization (what reading gives, and what was scored)."""
    assert sorted(published.quantized) == sorted(start.quantized)
    for name, record in published.quantized.items():
        old = start.quantized[name]
        assert (record.bits, record.axis, record.group_size) == (old.bits, old.axis, old.group_size)
        assert record.values.dtype == torch.int8 and int(record.values.abs().max()) <= QMAX[record.bits]
        assert torch.equal(published.tensors[name], record.dequantize())


def test_a_quantized_start_recovers_into_integers_of_the_same_scheme(setup, tmp_path, cli):  # noqa: F811
    start_dir = tmp_path / "int8"
    r = cli("convert", setup / "alpha", "--to", "lora", "--budget", 0.3, "--quantize", "int8", "-o", start_dir)
    assert r.exit_code == 0, r.output
    out = tmp_path / "recovered"
    report = finetune(cli, setup, start_dir, setup / "alpha", out)
    assert report["stored"]["quantized"] and report["after"]["kl"] < report["before"]["kl"]
    start, published = load_adapter(start_dir), load_adapter(out)
    _check_stored_as(start, published)
    assert any(not torch.equal(published.tensors[n], start.tensors[n]) for n in start.quantized)
    stored = _integer_tensors(out)
    assert stored == _integer_tensors(start_dir)  # the same tensors, the same dtypes: the same bytes
    assert (out / "adapter_model.safetensors").stat().st_size == (
        start_dir / "adapter_model.safetensors"
    ).stat().st_size
    # the float figures trained, the integers scored: both reported, and the written one is the second
    assert report["stored"]["float_after"]["kl"] != report["after"]["kl"]


def test_a_quantized_fleet_member_keeps_its_basis_and_stores_its_cores_as_integers(setup, tmp_path, cli):  # noqa: F811
    fleet = tmp_path / "fleet"
    r = cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "shareab", "--rank", 2, "--quantize", "int8")
    assert r.exit_code == 0, r.output
    shared = (fleet / "shared.safetensors").read_bytes()
    out = fleet / "beta-recovered"
    report = finetune(cli, setup, fleet / "beta", setup / "beta", out)
    start, published = load_adapter(fleet / "beta"), load_adapter(out)
    assert (fleet / "shared.safetensors").read_bytes() == shared
    _check_stored_as(start, published)
    for name in start.config["fleet"]["names"]:  # the frozen basis: the start's integers exactly
        assert torch.equal(published.quantized[name].values, start.quantized[name].values)
    assert _integer_tensors(out) == _integer_tensors(fleet / "beta")
    assert report["stored"]["quantized"] and report["after"]["kl"] < report["before"]["kl"]
    own = sorted(set(start.quantized) - set(start.config["fleet"]["names"]))  # its cores: trained, stored again
    assert own and all(not torch.equal(published.quantized[n].values, start.quantized[n].values) for n in own)


def test_the_start_is_published_unless_the_stored_adapter_beats_it(monkeypatch):
    start, trained = object(), object()
    scored = []

    def score(adapter):
        scored.append(adapter)
        return value

    value = 1.0
    assert stored_as_start(trained, start, kept_start=True, score=score, start_score=2.0) == (start, False)
    assert scored == []  # nothing beat the start in float: it is published without a look
    monkeypatch.setattr("shareport.train.stored.quantized_like", lambda t, s: ("stored", t))
    for value, wins in ((1.0, True), (2.0, False), (3.0, False)):  # a tie keeps the start
        published, requantized = stored_as_start(trained, start, kept_start=False, score=score, start_score=2.0)
        assert requantized == wins and published == (("stored", trained) if wins else start)
    assert scored == [("stored", trained)] * 3


def test_a_resumed_run_of_a_quantized_start_publishes_what_the_uninterrupted_one_does(setup, tmp_path, cli):  # noqa: F811
    """The checkpoint holds float values; the start as given (integers) still decides how it is written."""
    start_dir = tmp_path / "int8"
    r = cli("convert", setup / "alpha", "--to", "lora", "--budget", 0.3, "--quantize", "int8", "-o", start_dir)
    assert r.exit_code == 0, r.output

    def job(folder, resume=False):
        return recovery_job(
            start_dir,
            setup / "base",
            setup / "alpha",
            data_path=setup / "train.txt",
            max_length=24,
            checkpoint_dir=folder / "ckpt",
            resume=resume,
        )

    recipe = Recipe(steps=12, lr=5e-3, batch_size=4, checkpoint_every=5)
    (tmp_path / "whole").mkdir()
    whole, whole_report = run(job(tmp_path / "whole"), recipe)
    (tmp_path / "cut").mkdir()

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(job(tmp_path / "cut"), recipe, after_step=interrupt)
    resumed, resumed_report = run(job(tmp_path / "cut", resume=True), recipe)
    _check_stored_as(load_adapter(start_dir), resumed)
    assert resumed_report["stored"] == whole_report["stored"] and whole_report["stored"]["quantized"]
    for name, record in whole.quantized.items():
        assert torch.equal(resumed.quantized[name].values, record.values), name
        assert torch.equal(resumed.quantized[name].scales, record.scales), name
