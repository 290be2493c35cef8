"""``shareport fleet`` with no --form: the form with the least error wins, checked against each form built
on its own and scored densely; the warning for members keeping under half their energy; calibrated
fleets (--calibration [NAME=]DATA --base) scored by each member's dense output error."""

import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from shareport.convert import convert_adapter
from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter
from shareport.fleet import against_alone, build_fleet, fleet_bases
from shareport.forms import CALIBRATION_MAX_LENGTH, CALIBRATION_RIDGE, CALIBRATION_SAMPLES, FLEET_FORMS
from shareport.train.data import load_data, sample_examples
from tests.converters.test_fleet import RANKS, TARGETS, dirs, loras  # noqa: F401  (loras: the module-scoped fixture)
from tests.tiny import make_peft_adapter, tiny_llama
from tests.train.test_fleet_finetune import setup  # noqa: F401  (a module-scoped fixture)
from tests.training_helpers import write_text


@pytest.fixture(scope="module")
def shared_a(tmp_path_factory):
    """Three real PEFT LoRAs whose A's are one per kind (layer 0's of the first): a common right basis,
    so ShareA's fleet is exact at a modest size and wins there."""
    root = tmp_path_factory.mktemp("shared_a")
    for seed, name in enumerate(RANKS):
        make_peft_adapter(tiny_llama(), root / name, seed=seed + 1, r=4, lora_alpha=8, target_modules=TARGETS)
    first = load_file(root / "alpha" / "adapter_model.safetensors")
    for name in RANKS:
        path = root / name / "adapter_model.safetensors"
        tensors = load_file(path)
        save_file(
            {
                k: first[re.sub(r"layers\.\d+\.", "layers.0.", k)].clone() if "lora_A" in k else v
                for k, v in tensors.items()
            },
            path,
        )
    return root


def dense_member_errors(originals, members):
    """Per member (sum_l ||dW - dW'||^2, sum_l ||dW||^2) from the dense updates."""
    out = []
    for original, member in zip(originals, members):
        err = energy = 0.0
        for path in original.sites:
            dw = original.update(path, torch.float64)
            err += float((dw - member.update(path, torch.float64)).square().sum())
            energy += float(dw.square().sum())
        out.append((err, energy))
    return out


@pytest.mark.parametrize(
    "which, budget, winner",
    [("loras", 0.3, "shareab"), ("shared_a", 0.3, "sharea"), ("shared_a", 0.6, "sharea"), ("loras", 0.125, "shareab")],
)
def test_default_form_has_the_lower_dense_error(which, budget, winner, request):
    adapters = [load_adapter(d) for d in dirs(request.getfixturevalue(which))]
    chosen = build_fleet(adapters, list(RANKS), budget=budget)
    dense = {}
    for form in FLEET_FORMS:  # each candidate built on its own, scored on the dense updates
        try:
            fleet = build_fleet(adapters, list(RANKS), form, budget=budget)
        except ShareportError:  # e.g. sharea's smallest setting above the budget
            continue
        errors = dense_member_errors(adapters, fleet.members)
        dense[form] = (sum(e for e, _ in errors), sum(w for _, w in errors))
    assert chosen.form == min(dense, key=lambda f: dense[f][0]) == winner
    by_form = {c["form"]: c for c in chosen.report.candidates}
    assert set(by_form) == set(FLEET_FORMS)
    for form, (err, energy) in dense.items():
        assert by_form[form]["relative_error"] == pytest.approx(math.sqrt(err / energy), rel=1e-4, abs=1e-6)
        assert by_form[form]["winner"] == (form == winner)
    assert chosen.report.ranked_by.startswith("weights")
    assert chosen.members[0].provenance["history"][-1]["chosen_by"] == "least error"


def test_rank_without_form_is_refused(loras, tmp_path, cli):  # noqa: F811
    r = cli("fleet", *dirs(loras), "-o", tmp_path / "out", "--rank", 2)
    assert r.exit_code == 1 and "--rank" in r.output and "--form" in r.output and "\n" not in r.output.strip()
    assert not (tmp_path / "out").exists()


def truncation_error(lora, truncated):
    """(sum_l ||dW - best rank-r_l approximation||^2, sum_l ||dW||^2) by dense SVD (Eckart-Young), at the
    ranks ``truncated`` kept per site (0 where it dropped the site)."""
    err = energy = 0.0
    for path in lora.sites:
        s = torch.linalg.svdvals(lora.update(path, torch.float64))
        rank = truncated.rank(path) if path in truncated.sites else 0
        err += float(s[rank:].square().sum())
        energy += float(s.square().sum())
    return err, energy


@pytest.mark.parametrize(
    "which, budget, alone_wins", [("loras", 0.3, True), ("loras", 0.6, True), ("shared_a", 0.3, False)]
)
def test_each_alone_is_compared_at_the_fleets_size_and_warned_about_where_it_keeps_more(
    which, budget, alone_wins, request
):
    """Unrelated LoRAs (own seeds) are better truncated alone at the fleet's size; LoRAs with one A are not."""
    adapters = [load_adapter(d) for d in dirs(request.getfixturevalue(which))]
    fleet = against_alone(build_fleet(adapters, list(RANKS), budget=budget), adapters)
    alone = fleet.report.alone
    share = fleet.report.parameters / fleet.report.lora_parameters
    assert alone["form"] == "lora" and share - 1e-4 < alone["budget"] <= share
    alone_err = fleet_err = total = parameters = 0.0
    for name, adapter, (member_err, member_energy) in zip(
        RANKS, adapters, dense_member_errors(adapters, fleet.members)
    ):
        truncated, _ = convert_adapter(adapter, "lora", budget=alone["budget"])
        assert truncated.num_parameters() <= alone["budget"] * adapter.num_parameters()
        err, energy = truncation_error(adapter, truncated)
        assert energy == pytest.approx(member_energy, rel=1e-9)
        assert alone["members"][name] == pytest.approx(math.sqrt(err / energy), rel=1e-4)
        alone_err, fleet_err, total = alone_err + err, fleet_err + member_err, total + energy
        parameters += truncated.num_parameters()
    assert alone["relative_error"] == pytest.approx(math.sqrt(alone_err / total), rel=1e-4)
    assert alone["parameters"] == parameters and alone["ratio"] <= share  # never more than the fleet
    assert (alone_err < fleet_err) == alone_wins
    warned = [w for w in fleet.report.warnings if w.startswith("each LoRA truncated alone")]
    assert len(warned) == int(alone_wins)
    if alone_wins:
        assert f"--to lora --budget {alone['budget']:g}`" in warned[0]
    sized = build_fleet(adapters, list(RANKS), "sharea", rank=2)
    assert against_alone(sized, adapters).report.alone is not None  # a rank too


def test_the_warned_command_reproduces_each_alone_and_quantize_is_carried(loras, tmp_path, cli):  # noqa: F811
    r = cli("fleet", *dirs(loras), "-o", tmp_path / "fleet", "--budget", 0.3, "--quantize", "int8", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    alone = data["alone"]
    (warning,) = [w for w in data["warnings"] if w.startswith("each LoRA truncated alone")]
    command = re.search(r"`shareport (convert LORA [^`]*)`", warning).group(1).split()
    assert command[-2:] == ["--quantize", "int8"] and f"warning: {warning}" in r.stderr
    without_quantize = command[2:-2]  # the float comparison: the same command without --quantize
    for name, folder in zip(RANKS, dirs(loras)):
        out = tmp_path / f"alone-{name}"
        r = cli("convert", folder, *without_quantize, "-o", out, "--json")
        assert r.exit_code == 0, r.output
        converted = load_adapter(out)
        err, energy = truncation_error(load_adapter(folder), converted)
        assert alone["members"][name] == pytest.approx(math.sqrt(err / energy), rel=1e-4)


@pytest.mark.parametrize("which, budget", [("loras", 0.125), ("shared_a", 0.6)])
def test_a_member_keeping_under_half_its_energy_is_warned_about(which, budget, request, tmp_path, cli):
    root = request.getfixturevalue(which)
    r = cli("fleet", *dirs(root), "-o", tmp_path / "fleet", "--budget", budget, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    members = [load_adapter(tmp_path / "fleet" / name) for name in RANKS]
    dense = dense_member_errors([load_adapter(d) for d in dirs(root)], members)
    low = [name for name, (err, energy) in zip(RANKS, dense) if err > 0.5 * energy]  # relative error > sqrt(1/2)
    warned = [name for name in RANKS if any(f"member {name} " in w for w in data["warnings"])]
    assert warned == low
    assert [line for line in r.stderr.splitlines() if line.startswith("warning: member")] == [
        f"warning: {w}" for w in data["warnings"] if w.startswith("member ")
    ]
    if which == "loras":
        assert low, "random LoRAs at 1/8 should lose more than half of some member's energy"
    else:
        assert not low
    text = cli("fleet", *dirs(root), "-o", tmp_path / "again", "--budget", budget)
    assert f"form: {data['form']}, the least error ranked by weights" in text.stdout


@pytest.fixture(scope="module")
def calibrated_setup(setup):  # noqa: F811
    """test_fleet_finetune's tiny Llama base, its three PEFT LoRAs and train.txt, plus a text of one member's own."""
    write_text(setup / "own.txt", 30, seed=1)
    return setup


def site_moments(root, lora_dir, text):
    """Dense per site input second moments X^T X / N of the calibration examples, with the LoRA attached
    through PEFT (one example at a time: no padding)."""
    model = PeftModel.from_pretrained(tiny_llama(), str(lora_dir)).eval()
    sequences = sample_examples(load_data(text, root / "base", CALIBRATION_MAX_LENGTH), CALIBRATION_SAMPLES).sequences
    inputs: dict[str, list] = {}
    handles = []
    for path in load_adapter(lora_dir).sites:

        def hook(module, args, path=path):
            inputs.setdefault(path, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

        handles.append(model.base_model.model.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for seq in sequences:
            model(input_ids=torch.tensor([list(seq)]))
    for handle in handles:
        handle.remove()
    return {path: torch.cat(xs).T @ torch.cat(xs) / torch.cat(xs).shape[0] for path, xs in inputs.items()}


def dense_calibrated(originals, members, moments, bases):
    """Per member (sum_l tr(E C~ E^T), the same for dW' = 0), C~ = C + lam tr(Q^T C Q)/p I: the damped
    output error (the ridge acts in the statistics' basis Q; every E here has its rows in span(Q))."""
    out = []
    for original, member, moment in zip(originals, members, moments):
        err = energy = 0.0
        for path, site in original.sites.items():
            q = bases[site.kind]
            c = moment[path]
            c = c + CALIBRATION_RIDGE * float(torch.trace(q.T @ c @ q)) / q.shape[1] * torch.eye(
                c.shape[0], dtype=c.dtype
            )
            dw = original.update(path, torch.float64)
            e = dw - member.update(path, torch.float64)
            err += float(torch.trace(e @ c @ e.T))
            energy += float(torch.trace(dw @ c @ dw.T))
        out.append((err, energy))
    return out


def test_calibrated_choice_uses_each_members_dense_output_error(calibrated_setup, tmp_path, cli):
    root = calibrated_setup
    lora_dirs = [root / name for name in RANKS]
    calibration = [
        "--calibration",
        f"alpha={root / 'own.txt'}",
        "--calibration",
        root / "train.txt",
        "--base",
        root / "base",
        "--budget",
        0.3,
    ]
    originals = [load_adapter(d) for d in lora_dirs]
    moments = [
        site_moments(root, d, root / ("own.txt" if name == "alpha" else "train.txt"))
        for name, d in zip(RANKS, lora_dirs)
    ]
    bases = fleet_bases(originals)
    dense, plain = {}, {}
    for form in FLEET_FORMS:
        r = cli("fleet", *lora_dirs, "-o", tmp_path / form, "--form", form, *calibration, "--json")
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        members = [load_adapter(tmp_path / form / name) for name in RANKS]
        errors = dense_calibrated(originals, members, moments, bases)
        for m, (err, energy) in zip(data["members"], errors):  # each member's own data, its own error
            assert m["relative_error"] == pytest.approx(math.sqrt(err / energy), rel=1e-3)
        dense[form] = (sum(e for e, _ in errors), sum(w for _, w in errors))
        # fitting to the outputs beats the plain fleet of the same form and size in that error
        assert (
            cli("fleet", *lora_dirs, "-o", tmp_path / f"plain-{form}", "--form", form, "--budget", 0.3).exit_code == 0
        )
        plain_members = [load_adapter(tmp_path / f"plain-{form}" / name) for name in RANKS]
        plain[form] = sum(e for e, _ in dense_calibrated(originals, plain_members, moments, bases))
        assert dense[form][0] < plain[form]
    r = cli("fleet", *lora_dirs, "-o", tmp_path / "auto", *calibration, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["form"] == min(dense, key=lambda f: dense[f][0])
    assert data["ranked_by"].startswith("outputs")
    for c in data["candidates"]:
        err, energy = dense[c["form"]]
        assert c["relative_error"] == pytest.approx(math.sqrt(err / energy), rel=1e-3)
    assert {n: m["data"] for n, m in data["calibration"]["members"].items()} == {
        "alpha": str(root / "own.txt"),
        "beta": str(root / "train.txt"),
        "gamma": str(root / "train.txt"),
    }
    report = json.loads((tmp_path / "auto" / "fleet_report.json").read_text())
    assert "seconds" not in report["calibration"]  # the written report: the same bytes for the same inputs
    assert "alone" not in report  # each-alone is compared in weights only: not a calibrated fleet's measure


def test_bad_calibration_arguments_are_one_line_and_write_nothing(calibrated_setup, tmp_path, cli):
    from tests.converters.test_fleet import assert_refused

    root = calibrated_setup
    lora_dirs = [root / name for name in RANKS]
    base = ("--base", root / "base")
    text = root / "train.txt"
    assert_refused(
        cli,
        tmp_path / "out",
        [
            ((*lora_dirs, "--calibration", text), "--calibration", "needs --base"),
            ((*lora_dirs, *base), "--base", "only used with --calibration"),
            ((*lora_dirs, "--calibration", f"delta={text}", "--calibration", text, *base), "delta", "no member"),
            ((*lora_dirs, "--calibration", f"alpha={text}", *base), "beta", "has no data"),
            ((*lora_dirs, "--calibration", text, "--calibration", root / "own.txt", *base), "own.txt", "second file"),
            ((*lora_dirs, "--calibration", root / "none.txt", *base), "none.txt", "not found"),
        ],
    )
