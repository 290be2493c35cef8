"""``shareport convert --calibration DATA --base BASE``: statistics, objectives, plain behaviour, bad input.

A tiny Llama base with a character tokenizer, a real PEFT LoRA (random factors) on q and v, and
text data (tests/training_helpers.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import converters
from converters.types import KindResult
from shareport import flows
from shareport.adapter import kind_factors
from shareport.convert import convert_adapter
from shareport.files import load_adapter, save_adapter
from shareport.measures import calibrated_error
from shareport.model import load_base_model
from shareport.model.calibration import collect_statistics
from shareport.train.data import load_data, sample_examples
from tests.tiny import tiny_llama
from tests.training_helpers import recovery_setup, save_base, write_text

SAMPLES = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    paths = recovery_setup(root, layers=3, rank=8, lines=40)
    return paths


def _statistics(paths, samples=SAMPLES):
    adapter = load_adapter(paths["lora"])
    sequences = sample_examples(load_data(paths["text"], paths["base"], 128), samples).sequences
    model = load_base_model(paths["base"], carried=adapter.extra_tensors)
    return adapter, sequences, collect_statistics(model, adapter, sequences, pad_id=0, batch_size=5)


def test_calibration_examples_are_drawn_across_a_label_sorted_file(setup, tmp_path):
    """A file sorted by label: the examples calibration runs come from every part of it (not the first
    N, which would be the first labels only), in file order, the same each time; all when N >= the file."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    # distinct texts in the tokenizer's alphabet: the label's letter, then the example's two letters
    rows = [
        {"text": f"{letters[label]} {letters[i % 26]}{letters[i // 26]}", "label": label}
        for label in range(10)
        for i in range(30)
    ]
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(path, setup["base"], 64)
    picked = sample_examples(data, 40)
    positions = [data.sequences.index(seq) for seq in picked.sequences]  # every text is distinct
    assert len(picked) == 40 and len(set(positions)) == 40 and positions == sorted(positions)
    assert picked.labels == [data.labels[i] for i in positions]
    assert len(set(picked.labels)) >= 8, "drawn from a few labels only"
    assert min(positions) < 30 and max(positions) >= 270
    assert sample_examples(data, 40).sequences == picked.sequences
    assert sample_examples(data, 300).sequences == data.sequences == sample_examples(data, 10_000).sequences


def test_statistics_match_peft_inputs(setup):
    """S_l from shareport's hooks (batched, padded) = PEFT's LoRA model's module inputs, one sequence
    at a time, projected by the kind's Q."""
    from peft import PeftModel

    adapter, sequences, stats = _statistics(setup)
    peft_model = PeftModel.from_pretrained(load_base_model(setup["base"]), str(setup["lora"])).eval()
    captured: dict[str, list[torch.Tensor]] = {path: [] for path in adapter.sites}
    handles = []
    for name, module in peft_model.named_modules():
        path = name.removeprefix("base_model.model.")
        if path in captured:
            handles.append(
                module.register_forward_pre_hook(
                    lambda mod, args, path=path: captured[path].append(args[0].reshape(-1, args[0].shape[-1]).clone())
                )
            )
    with torch.no_grad():
        for seq in sequences:
            peft_model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    tokens = sum(len(s) for s in sequences)
    for kind, sites in adapter.kinds().items():
        q = converters.calibration_basis(kind_factors(adapter, sites)[0])
        assert torch.equal(q, stats.bases[kind])
        for site in sites:
            x = torch.cat(captured[site.path]).double() @ q
            expected = x.T @ x / x.shape[0]
            assert stats.tokens[site.path] == tokens == x.shape[0]
            got = stats.statistics[site.path]
            assert float((got - expected).norm() / expected.norm()) < 1e-6, site.path


def _written_objective(source, written, stats, ridge) -> dict[str, float]:
    """Each kind's calibrated objective recomputed from a written adapter's factors."""
    out = {}
    for kind, sites in source.kinds().items():
        As, Bts = kind_factors(source, sites)
        a_list, b_list = [], []
        for s in sites:
            if s.path in written.sites:
                a, bt = written.factors(s.path, torch.float64)
            else:  # cut to rank 0 by a budget
                a, bt = (
                    torch.zeros(0, As[0].shape[1], dtype=torch.float64),
                    torch.zeros(Bts[0].shape[0], 0, dtype=torch.float64),
                )
            a_list.append(a)
            b_list.append(bt)
        n = len(sites)
        result = KindResult(
            "lora",
            a_list,
            b_list,
            list(range(n)),
            list(range(n)),
            1,
            [[i] for i in range(n)],
            0.0,
            0.0,
            torch.zeros(0),
            False,
        )
        q = converters.calibration_basis(As)
        out[kind] = converters.calibrated_objective(
            As, Bts, [stats.statistics[s.path] for s in sites], q, result, lam=ridge
        )
    return out


CALIBRATED = ["sharea", "shareb", "shareab", "aslora", "lora"]


@pytest.mark.parametrize("to", CALIBRATED)
def test_reported_objective_is_the_written_adapters(setup, tmp_path, to):
    adapter, _, stats = _statistics(setup)
    data = flows.convert(
        str(setup["lora"]),
        to,
        str(tmp_path / "out"),
        budget=0.25,
        calibration=str(setup["text"]),
        base=str(setup["base"]),
        calibration_samples=SAMPLES,
        progress=False,
    )
    written = load_adapter(tmp_path / "out")
    # a plain PEFT LoRA (--to lora) has no provenance: the report holds the same record
    recorded = written.provenance["history"][-1]["calibration"] if to != "lora" else data["calibration"]
    assert to == "lora" or {**recorded, "seconds": data["calibration"]["seconds"]} == data["calibration"]
    assert recorded["examples"] == len(load_data(setup["text"], setup["base"], 128)) > SAMPLES
    assert recorded["samples"] == SAMPLES and recorded["tokens"] == sum(stats.tokens.values()) // len(stats.tokens)
    assert recorded["ridge"] == converters.DEFAULT_RIDGE and recorded["data"] == str(setup["text"])
    recomputed = _written_objective(adapter, written, stats, converters.DEFAULT_RIDGE)
    for kind in data["kinds"]:
        assert kind["calibration"]["objective"] == pytest.approx(recomputed[kind["kind"]], rel=1e-5)
        assert recorded["kinds"][kind["kind"]]["objective"] == kind["calibration"]["objective"]
        assert kind["error"] == kind["calibration"]["objective"]  # the table reports the calibrated error


@pytest.mark.parametrize("to", CALIBRATED)
def test_calibrated_never_worse_than_plain_at_the_same_rank(setup, tmp_path, to):
    """Same rank: the calibrated objective is at most the plain projection's, and the reported plain
    objective is that of the adapter plain ``convert`` writes."""
    adapter, _, stats = _statistics(setup)
    options = dict(rank=2, groups=2 if to == "aslora" else None)
    data = flows.convert(
        str(setup["lora"]),
        to,
        str(tmp_path / "cal"),
        calibration=str(setup["text"]),
        base=str(setup["base"]),
        calibration_samples=SAMPLES,
        progress=False,
        **options,
    )
    flows.convert(str(setup["lora"]), to, str(tmp_path / "plain"), progress=False, **options)
    plain = _written_objective(adapter, load_adapter(tmp_path / "plain"), stats, converters.DEFAULT_RIDGE)
    for kind in data["kinds"]:
        c = kind["calibration"]
        assert c["objective"] <= c["plain_objective"] * (1 + 1e-9)
        assert c["plain_objective"] == pytest.approx(plain[kind["kind"]], rel=1e-5)
    assert sum(k["calibration"]["objective"] for k in data["kinds"]) < 0.9 * sum(plain.values())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "to,options",
    [("sharea", ["--rank", "3"]), ("aslora", []), ("lora", ["--budget", "0.3"]), ("auto", ["--budget", "0.25"])],
)
def test_without_calibration_nothing_changes(setup, tmp_path, cli, to, options):
    """No --calibration: the CLI writes exactly what the plain library call writes, with no trace of
    calibration in the provenance or the report."""
    result = cli("convert", setup["lora"], "--to", to, *options, "-o", tmp_path / "cli", "--json")
    assert result.exit_code == 0, result.output
    assert '"calibration"' not in result.output
    kwargs = {"rank": 3} if to == "sharea" else {"budget": float(options[1])} if options else {}
    from shareport.files import weights_sha256

    out, _ = convert_adapter(load_adapter(setup["lora"]), to, source_digest=weights_sha256(setup["lora"]), **kwargs)
    save_adapter(out, tmp_path / "lib", as_peft=out.form == "lora")
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "lib")
    assert (
        "calibration"
        not in json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
        .get("shareport", {})
        .get("provenance", {})
        .get("history", [{}])[-1]
    )


def _bad_base(root: Path, kind: str) -> Path:
    folder = root / f"base-{kind}"
    if kind == "short":  # two layers: the adapter's layer 2 is not there
        save_base(tiny_llama(2), folder)
    else:  # layer 1's input norm scaled by 1e30: attention overflows, layer 2 sees NaN
        model = tiny_llama(3)
        with torch.no_grad():
            model.model.layers[1].input_layernorm.weight.mul_(1e30)
            model.model.layers[1].self_attn.k_proj.weight.mul_(1e30)
        save_base(model, folder)
    return folder


def test_bad_calibration_input(setup, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    short = write_text(tmp_path / "short.txt", lines=1)
    short.write_text("a\n", encoding="utf-8")
    lora, text, base = setup["lora"], setup["text"], setup["base"]
    cases = [
        (["--calibration", empty, "--base", base], str(empty)),
        (["--calibration", short, "--base", base], str(short)),
        (["--calibration", text, "--base", _bad_base(tmp_path, "short")], "base-short"),
        (["--calibration", text], "--base"),
        (["--base", base], "--calibration"),
        (["--calibration", text, "--base", _bad_base(tmp_path, "inf")], "model.layers.2.self_attn"),
        (["--calibration", text, "--base", base, "--calibration-samples", "0"], "--calibration-samples"),
        (["--calibration", text, "--base", base, "--calibration-ridge", "-1"], "--calibration-ridge"),
        (["--calibration", tmp_path / "missing.txt", "--base", base], "missing.txt"),
        (["--calibration-samples", "5"], "--calibration-samples is only used with --calibration"),
        (["--calibration-ridge", "0.1"], "--calibration-ridge is only used with --calibration"),
        (["--calibration", text, "--base", base, "--calibration-max-length", "1"], "--calibration-max-length"),
        # one example drawn of the file's many: the fix is more samples, said before the model loads
        (
            ["--calibration", text, "--base", base, "--calibration-samples", "1", "--calibration-max-length", "8"],
            "raise --calibration-samples",
        ),
    ]
    for args, named in cases:
        out = tmp_path / "out"
        result = cli("convert", lora, "--to", "sharea", "--rank", "2", "-o", out, *args)
        assert result.exit_code != 0, (args, result.output)
        line = result.output.strip()
        assert "\n" not in line and named in line, (args, line)
        assert not out.exists()
    # the non-finite case names the site and the base
    result = cli(
        "convert",
        lora,
        "--to",
        "sharea",
        "--rank",
        "2",
        "-o",
        tmp_path / "out",
        "--calibration",
        text,
        "--base",
        tmp_path / "base-inf",
    )
    assert "non-finite" in result.output and "base-inf" in result.output


def test_auto_and_budget_rank_by_the_calibrated_objective(setup, tmp_path):
    """The library's --to auto with calibration statistics (and no other error measure; the command
    ranks by the model's outputs, tests/converters/test_auto_by_outputs.py): each candidate's error is that form's
    calibrated conversion at the budget, and the winner has the least; a calibrated --budget plan for
    lora is at least as good, in the calibrated objective, as the plain plan's ranks converted with
    calibration."""
    common = dict(calibration=str(setup["text"]), base=str(setup["base"]), calibration_samples=SAMPLES, progress=False)
    calibration = flows.adapters._calibration_statistics(
        load_adapter(setup["lora"]),
        str(setup["text"]),
        str(setup["base"]),
        SAMPLES,
        flows.adapters.CALIBRATION_MAX_LENGTH,
        converters.DEFAULT_RIDGE,
    )[0]
    _, auto = convert_adapter(load_adapter(setup["lora"]), "auto", budget=0.15, calibration=calibration)
    errors = {c["form"]: c["error"] for c in auto.candidates if "refused" not in c}
    assert auto.winner == min(errors, key=errors.get)
    assert auto.ranked_by == calibrated_error.describes
    for form in ("lora", "shareb", "sharea"):
        single = flows.convert(str(setup["lora"]), form, str(tmp_path / form), budget=0.15, **common)
        assert errors[form] == pytest.approx(sum(k["calibration"]["objective"] for k in single["kinds"]), rel=1e-9)
    adapter, _, stats = _statistics(setup)
    plain_plan = flows.convert(str(setup["lora"]), "lora", str(tmp_path / "plain"), budget=0.15, progress=False)
    total = 0.0
    for kind in plain_plan["kinds"]:
        sites = adapter.kinds()[kind["kind"]]
        As, Bts = kind_factors(adapter, sites)
        total += converters.convert_kind_calibrated(
            "lora", As, Bts, [stats.statistics[s.path] for s in sites], [kind["site_ranks"][s.path] for s in sites]
        ).objective
    assert errors["lora"] <= total * (1 + 1e-9)
