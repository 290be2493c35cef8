"""The tiny-Llama decoder example in --fast mode (fidelity, a byte-identical rerun) and the topics
data that the examples ship."""

from tests.examples_runner import EXAMPLES, load_example, run_example


def _without_onnx(results: dict) -> dict:
    return {**results, "skipped": None, "plans": [{**plan, "onnx": None} for plan in results["plans"]]}


def test_decoder_fidelity_and_deterministic_rerun(tmp_path):
    first = run_example("tiny_llama_decoder", tmp_path / "a", [])
    # the rerun leaves out the ONNX step (export bytes are checked for determinism in
    # test_hardening_models.py): everything before it must come out the same, to the last bit
    second = run_example("tiny_llama_decoder", tmp_path / "b", ["--skip", "export"])
    assert second["skipped"] == ["export"] and all(plan["onnx"] is None for plan in second["plans"])
    assert _without_onnx(second) == _without_onnx(first)

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


def test_topics_data_is_reproduced_byte_for_byte_and_splits_are_disjoint():
    topics = load_example("data/make_topics")
    train, test = topics.make_splits()
    assert topics.to_jsonl(train) == (EXAMPLES / "data" / "topics_train.jsonl").read_text(encoding="utf-8")
    assert topics.to_jsonl(test) == (EXAMPLES / "data" / "topics_test.jsonl").read_text(encoding="utf-8")
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["label"] for r in train} == set(topics.LABELS)
