"""`shareport frontier`: every form x budget scored against the LoRA, the Pareto front, the
smallest point keeping --keep, resumable, and clean refusals."""

import json
import struct

import pytest
import torch

from shareport.convert import convert_adapter
from shareport.files import load_adapter
from shareport.model import attach, load_base_model
from shareport.train import frontier as frontier_module
from shareport.train.data import collate, load_data, pad_token_id, split_heldout
from shareport.train.frontier import Point, pareto, smallest_keeping
from shareport.train.jobs import recovery_job
from shareport.train.recipe import evaluate_adapter
from tests.training_helpers import recovery_setup

ARGS = ("--budgets", "0.25,0.5", "--forms", "lora,sharea", "--max-length", 16, "--batch-size", 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("frontier"), layers=2, lines=48)


def _frontier(setup, out, *extra) -> dict:
    """``shareport frontier`` of the fixture's LoRA into ``out`` with ``extra`` options, its --json output."""
    from click.testing import CliRunner

    from shareport.cli.main import main

    args = ("frontier", setup["lora"], "--base", setup["base"], "--data", setup["text"], *extra, "-o", out, "--json")
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{") :])


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("fr") / "out"
    return out, _frontier(setup, out, *ARGS, "--recover-steps", 2)


def _kl(setup, adapter) -> float:
    """KL(LoRA || adapter) per position on the held-out split, computed here from logits."""
    base = setup["base"]
    heldout = split_heldout(load_data(setup["text"], base, 16), 0.1)[1]
    model = load_base_model(base)
    batch = collate(heldout, list(range(len(heldout))), pad_token_id(model.config))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        handle = attach(model, load_adapter(setup["lora"]))
        teacher = model(**batch).logits[mask].log_softmax(-1)
        handle.detach()
        handle = attach(model, adapter)
        student = model(**batch).logits[mask].log_softmax(-1)
        handle.detach()
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_every_point_is_scored_and_the_converted_kl_is_independent(run, setup):
    out, data = run
    assert {(p["form"], p["budget"], p["recovered"]) for p in data["points"]} == {
        (f, b, r) for f in ("lora", "sharea") for b in (0.25, 0.5) for r in (False, True)
    }
    lora = load_adapter(setup["lora"])
    for p in data["points"]:
        assert p["parameters"] <= p["budget"] * lora.num_parameters() + 1
        if not p["recovered"] and p["budget"] == 0.25:
            converted, _ = convert_adapter(lora, p["form"], budget=0.25)
            assert p["kl"] == pytest.approx(_kl(setup, converted), rel=1e-3, abs=1e-7)
    recovered = {(p["form"], p["budget"]): p["kl"] for p in data["points"] if p["recovered"]}
    assert any(
        recovered[k] < p["kl"] for p in data["points"] if not p["recovered"] for k in [(p["form"], p["budget"])]
    ), "recovery should lower some KL"
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["points"] == data["points"]
    if data.get("plot"):
        assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")


def test_pareto_and_smallest_keeping_are_right():
    def pt(params, fid):
        return Point("sharea", 0.1, False, 0, params, params / 100, 0.0, None, None, None, fid, 0.0)

    points = [pt(10, 0.5), pt(20, 0.4), pt(20, 0.9), pt(30, 0.95), pt(40, 0.9), pt(5, 0.1)]
    front = pareto(points)
    assert [(p.parameters, p.fidelity) for p in front] == [(5, 0.1), (10, 0.5), (20, 0.9), (30, 0.95)]
    for p in points:  # every point off the front is dominated by a point on it
        if p not in front:
            assert any(q.parameters <= p.parameters and q.fidelity >= p.fidelity for q in front)
    assert (smallest_keeping(points, 0.9).parameters, smallest_keeping(points, 0.9).fidelity) == (20, 0.9)
    assert smallest_keeping(points, 0.99) is None


def _points_of(*pairs):
    return [
        Point("lora", 0.1, i % 2 == 1, 0, params, params / 100, 0.0, None, None, None, fid, 0.0)
        for i, (params, fid) in enumerate(pairs)
    ]


@pytest.mark.parametrize("order", [0, 1])
def test_pareto_never_holds_a_dominated_point_of_equal_size(order):
    """``--recover-steps`` makes two points of each size; the lower one of a pair can beat every
    smaller point and is still dominated (same size, lower fidelity). In either input order."""
    pairs = [(10, 0.5), (20, 0.8), (20, 0.9)]
    points = _points_of(*(pairs if order == 0 else pairs[::-1]))
    front = pareto(points)
    assert sorted((p.parameters, p.fidelity) for p in front) == [(10, 0.5), (20, 0.9)]
    for p in front:  # nothing on the front is dominated by any point, strictly in one of the two
        assert not any(
            (q.parameters <= p.parameters and q.fidelity > p.fidelity)
            or (q.parameters < p.parameters and q.fidelity >= p.fidelity)
            for q in points
        )


def test_smallest_keeping_prefers_the_higher_fidelity_among_equal_sizes():
    for pairs in ([(20, 0.95), (20, 0.99), (30, 1.0)], [(20, 0.99), (20, 0.95), (30, 1.0)]):
        chosen = smallest_keeping(_points_of(*pairs), 0.9)
        assert (chosen.parameters, chosen.fidelity) == (20, 0.99)


def test_fidelity_with_labels_is_relative_to_the_loras_accuracy():
    """A point at accuracy 0.80 against a LoRA at 0.87 keeps 0.92 of it: --keep 0.9 is met, 0.95 is not."""
    accuracy, fidelity = frontier_module._fidelity({"accuracy": {"student": 0.80}, "top1_agreement": 0.7}, 0.87)
    assert accuracy == 0.80 and fidelity == pytest.approx(0.80 / 0.87)
    point = Point("lora", 0.1, False, 0, 10, 0.1, 0.0, None, None, accuracy, fidelity, 0.0)
    assert smallest_keeping([point], 0.9) is point and smallest_keeping([point], 0.95) is None


def test_an_interrupted_runs_points_are_reused_and_a_finished_run_removes_its_cache(run, setup, cli, monkeypatch):
    """A finished run leaves no ``OUT.cache``; a run interrupted while writing its output (every point
    measured and cached) leaves it, and the rerun reads those points back instead of remeasuring."""
    from pathlib import Path

    import shareport.flows.training as training

    out, _ = run
    cache = Path(f"{out}.cache")
    assert not cache.exists()
    args = ("frontier", setup["lora"], "--base", setup["base"], "--data", setup["text"], *ARGS)
    args += ("--recover-steps", 2, "-o", out, "--overwrite", "--json")

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "atomic_dir", interrupted)
    assert cli(*args).exit_code != 0 and cache.is_dir()
    seconds = {p["seconds"] for f in cache.glob("*.json") for p in json.loads(f.read_text()) if isinstance(p, dict)}
    monkeypatch.undo()
    r = cli(*args)
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout[r.stdout.index("{") :])
    # seconds included: the points were read back, not remeasured
    assert {p["seconds"] for p in again["points"]} <= seconds and not cache.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0,0.5"], "--budgets"),
        (["--budgets", "1.6"], "--budgets"),
        (["--keep", "1.5"], "--keep"),
        (["--forms", "nope"], "unknown form"),
        (["--serving", "max-rank=0"], "--serving must be"),
        (["--serving", "uniformly"], "--serving must be"),
        (["--serving", "buckets=4,x"], "--rank-buckets must be positive integers"),
        (["--precisions", "int3"], "--precisions must be"),
        (["--precisions", "int8,fp8"], "--precisions must be"),
        (["--precisions", ""], "--precisions must be"),
        (["--precisions", "fp32"], "float32 is always scored"),
    ],
)
def test_bad_options_are_refused(extra, message, setup, tmp_path, cli):
    r = cli("frontier", setup["lora"], "--base", setup["base"], "--data", setup["text"], *extra, "-o", tmp_path / "o")
    assert r.exit_code == 1 and message in r.output and not (tmp_path / "o").exists()


def test_eval_rows_without_labels_and_a_foreign_base_are_refused(setup, tmp_path, cli):
    (tmp_path / "eval.jsonl").write_text('{"text": "no label here"}\n{"text": "nor here"}\n')
    r = cli(
        "frontier",
        setup["lora"],
        "--base",
        setup["base"],
        "--data",
        setup["text"],
        "--eval",
        tmp_path / "eval.jsonl",
        *ARGS,
        "-o",
        tmp_path / "o",
    )
    assert r.exit_code == 1 and "label" in r.output and str(tmp_path / "eval.jsonl") in r.output
    from tests.tiny import tiny_gpt2
    from tests.training_helpers import save_base

    save_base(tiny_gpt2(layers=2), tmp_path / "gpt2")
    r = cli(
        "frontier", setup["lora"], "--base", tmp_path / "gpt2", "--data", setup["text"], *ARGS, "-o", tmp_path / "o"
    )
    assert r.exit_code == 1 and str(tmp_path / "gpt2") in r.output
    assert not (tmp_path / "o").exists()


def test_serving_rules_add_their_own_points(setup, tmp_path, cli):
    """Each --serving rule adds a point per form and budget, planned as convert plans it under that rule."""
    r = cli(
        "frontier",
        setup["lora"],
        "--base",
        setup["base"],
        "--data",
        setup["text"],
        "--budgets",
        "0.5",
        "--forms",
        "lora,sharea",
        "--max-length",
        16,
        "--batch-size",
        4,
        "--serving",
        "uniform",
        "--serving",
        "max-rank=1",
        "-o",
        tmp_path / "out",
        "--json",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{") :])
    assert data["serving"] == ["uniform", "max-rank=1"]
    got = {(p["form"], p["serving"]): p for p in data["points"]}
    assert set(got) == {(f, s) for f in ("lora", "sharea") for s in (None, "uniform", "max-rank=1")}
    for (form, rule), point in got.items():
        flags = {None: [], "uniform": ["--uniform-rank"], "max-rank=1": ["--max-rank", "1"]}[rule]
        c = cli(
            "convert",
            setup["lora"],
            "--to",
            form,
            "--budget",
            "0.5",
            *flags,
            "-o",
            tmp_path / f"{form}-{rule}",
            "--json",
        )
        converted = json.loads(c.stdout[c.stdout.index("{") :])
        assert point["parameters"] == converted["parameters_after"]


def _stored_bytes(folder) -> int:
    """Bytes of every tensor in a written adapter, from its safetensors header's own offsets."""
    with open(folder / "adapter_model.safetensors", "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())


@pytest.fixture(scope="module")
def stored_run(setup, tmp_path_factory):
    """The frontier with --precisions (one repeated) and without, on the same inputs."""
    out = tmp_path_factory.mktemp("fb")
    args = ("--budgets", "0.5", "--forms", "lora,sharea", "--max-length", 16, "--batch-size", 4)
    return _frontier(setup, out / "stored", *args, "--precisions", "int8,fp16,int4,int8"), _frontier(
        setup, out / "plain", *args
    )


def test_precisions_give_the_bytes_and_fidelity_of_the_quantized_files(stored_run, setup, tmp_path, cli):
    """Each int8/int4 point's bytes are those of `convert --quantize`'s file (its header's offsets) and its
    scores are those of that file's adapter, evaluated here; fp32's bytes are the float conversion's file."""
    data, _ = stored_run
    assert data["precisions"] == ["int8", "fp16", "int4"]
    got = {(p["form"], p["precision"]): p for p in data["points"]}
    assert set(got) == {(f, q) for f in ("lora", "sharea") for q in ("fp32", "int8", "fp16", "int4")}
    lora = load_adapter(setup["lora"])
    assert data["lora_float32_bytes"] == 4 * lora.num_parameters()
    job = recovery_job(setup["lora"], setup["base"], setup["lora"], data_path=setup["text"], max_length=16)
    for form in ("lora", "sharea"):
        for precision in ("fp32", "int8", "int4"):
            folder = tmp_path / f"{form}-{precision}"
            flags = [] if precision == "fp32" else ["--quantize", precision]
            c = cli("convert", setup["lora"], "--to", form, "--budget", "0.5", *flags, "-o", folder, "--json")
            assert c.exit_code == 0, c.output
            point = got[(form, precision)]
            assert point["bytes"] == _stored_bytes(folder)
            metrics = evaluate_adapter(job, load_adapter(folder), 4)
            assert point["kl"] == pytest.approx(
                metrics["kl"], rel=1e-5, abs=1e-9
            )  # float32 sums in another batch order
            assert point["top1_agreement"] == metrics["top1_agreement"] == point["fidelity"]
        assert got[(form, "fp16")]["bytes"] == 2 * got[(form, "fp32")]["parameters"]
        assert got[(form, "int4")]["bytes"] < got[(form, "int8")]["bytes"] < got[(form, "fp16")]["bytes"]
    # the front and the choice are by bytes: no point on it is beaten by a smaller or equal one
    for p in data["pareto"]:
        assert not any(q["bytes"] <= p["bytes"] and q["fidelity"] > p["fidelity"] for q in data["points"])


def test_without_precisions_the_output_is_as_before(stored_run):
    """No precision or bytes key anywhere without the flag; its points are the flag's float32 points."""
    data, plain = stored_run
    assert "precisions" not in plain and "lora_float32_bytes" not in plain
    assert all(set(p) == set(Point.__dataclass_fields__) - {"precision", "bytes"} for p in plain["points"])

    def scores(p):
        return p["form"], p["parameters"], p["kl"], p["top1_agreement"], p["fidelity"]

    fp32 = [p for p in data["points"] if p["precision"] == "fp32"]
    assert sorted(map(scores, fp32)) == sorted(map(scores, plain["points"]))
