"""``convert --to auto``: with data it ranks the forms by the model's outputs; without, it says it ranked
by weights only (issue 26, deliverable 0).

The reference for "the model's outputs" is computed here with plain torch: each form written by its
own ``convert --to FORM`` with the same calibration, attached to the base, and the KL of its
next-token distributions to the LoRA's (through PEFT's own model) on the very examples calibration
draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shareport import convert as convert_module
from shareport import flows
from shareport.convert import WEIGHTS_ONLY_WARNING
from shareport.files import load_adapter
from shareport.model import attach, load_base_model
from shareport.train.data import collate, load_data, sample_examples
from tests.training_helpers import recovery_setup

BUDGET = 0.3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("auto"), layers=3, rank=8, lines=40)


def _kl_to_lora(paths, adapter_dir) -> float:
    """Mean KL(LoRA || adapter) per non-padded position, LoRA outputs from PEFT."""
    from peft import PeftModel

    data = sample_examples(load_data(paths["text"], paths["base"], 128), 128)
    batch = collate(data, list(range(len(data))), 0)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_base_model(paths["base"]), str(paths["lora"])).eval()
        teacher = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        model = load_base_model(paths["base"])
        attach(model, load_adapter(adapter_dir), dtype=torch.float32)
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    log_t, log_s = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def test_with_data_auto_ranks_the_forms_by_the_models_outputs(setup, tmp_path, monkeypatch):
    # the three forms with exact calibrated solvers (seconds each); the alternating ShareA/ASLoRA
    # solvers take minutes on this model and rank through the same code
    monkeypatch.setattr(convert_module, "AUTO_FORMS", ("lora", "shareb", "shareab"))
    common = dict(budget=BUDGET, calibration=str(setup["text"]), base=str(setup["base"]), progress=False)
    report = flows.convert(str(setup["lora"]), "auto", str(tmp_path / "auto"), **common)
    assert report["ranked_by"].startswith("the model's outputs")
    assert WEIGHTS_ONLY_WARNING not in report["warnings"]
    reference = {}
    for form in convert_module.AUTO_FORMS:
        try:
            flows.convert(str(setup["lora"]), form, str(tmp_path / form), **common)
        except Exception:  # a budget below the form's minimum: auto refuses it too
            continue
        reference[form] = _kl_to_lora(setup, tmp_path / form)
    measured = {c["form"]: c["error"] for c in report["candidates"] if "refused" not in c}
    assert set(measured) == set(reference)
    for form, kl in reference.items():
        assert measured[form] == pytest.approx(kl, rel=1e-3, abs=1e-9), form
    assert report["winner"] == min(reference, key=reference.get)
    # and it is what a weights-only ranking would not always pick: the record says how it was chosen
    history = load_adapter(tmp_path / "auto").provenance["history"][-1]
    assert history["ranked_by"] == report["ranked_by"]


def test_without_data_auto_says_it_ranked_by_weights_only(setup, tmp_path, cli):
    result = cli("convert", setup["lora"], "--to", "auto", "--budget", BUDGET, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "ranks first by weights" in result.output
    assert "--calibration DATA --base BASE" in result.output  # the warning (stderr, mixed in by the runner)
