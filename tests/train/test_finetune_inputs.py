"""Data sources, the held-out split, encoders and classifiers, and one-line errors for bad input."""

import json

import pytest

from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter, save_adapter
from shareport.train.data import BatchOrder, load_data, save_tokenized, split_heldout
from tests.tiny import make_peft_adapter, tiny_bert, tiny_llama
from tests.training_helpers import (
    classifier_lora,
    finetune_args,
    recovery_setup,
    save_base,
    sharea_by_svd,
    write_text,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("inputs"), layers=2)


def test_text_jsonl_and_tokenized_folder_give_the_same_examples(setup, tmp_path):
    lines = ["the cat sat.", "a dog ran far.", "the sun."]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(lines)))
    text = load_data(tmp_path / "a.txt", setup["base"], max_length=8)
    jsonl = load_data(tmp_path / "a.jsonl", setup["base"], max_length=8)
    assert text.sequences == jsonl.sequences and text.labels is None and jsonl.labels == [0, 1, 0]
    assert max(len(s) for s in text.sequences) == 8  # truncated
    save_tokenized(tmp_path / "tok", jsonl.sequences, jsonl.labels)
    tokenized = load_data(tmp_path / "tok", tmp_path / "no-tokenizer-needed", max_length=8)
    assert tokenized.sequences == jsonl.sequences and tokenized.labels == jsonl.labels


def test_split_and_batch_order_are_deterministic(setup):
    data = load_data(setup["text"], setup["base"], max_length=16)
    train, heldout = split_heldout(data, 0.1)
    again = split_heldout(data, 0.1)
    assert train.sequences == again[0].sequences and len(heldout) == round(len(data) * 0.1)
    order = BatchOrder(len(train), 8, seed=3)
    assert order.batch(50) == BatchOrder(len(train), 8, seed=3).batch(50) != BatchOrder(len(train), 8, 4).batch(50)
    # one epoch covers every example once
    epoch = [i for step in range(len(train) // 8) for i in order.batch(step)]
    assert len(set(epoch)) == len(epoch)


def test_encoder_recovery_uses_hidden_state_mse(tmp_path, cli):
    base = save_base(tiny_bert(layers=2), tmp_path / "bert")
    make_peft_adapter(tiny_bert(layers=2), tmp_path / "lora", seed=2, r=4, target_modules=["query", "value"])
    save_adapter(sharea_by_svd(load_adapter(tmp_path / "lora"), 1), tmp_path / "shared")
    write_text(tmp_path / "t.txt", 40)
    result = cli(
        "finetune",
        tmp_path / "shared",
        "--base",
        base,
        "--teacher",
        tmp_path / "lora",
        "--data",
        tmp_path / "t.txt",
        "--steps",
        15,
        "--lr",
        5e-3,
        "--batch-size",
        4,
        "--max-length",
        16,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "shared-recovered" / "training_report.json").read_text())
    assert report["after"]["hidden_mse"] < report["before"]["hidden_mse"]
    assert "kl" not in report["after"]


def test_classifier_with_labels_reports_accuracy_and_uses_lm_loss(tmp_path, cli):
    base, _ = classifier_lora(tmp_path)
    save_adapter(sharea_by_svd(load_adapter(tmp_path / "lora"), 1), tmp_path / "shared")
    rows = [{"text": f"the {w} sat.", "label": i % 2} for i, w in enumerate(["cat", "dog", "bird", "sun"] * 5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    result = cli(
        "finetune",
        tmp_path / "shared",
        "--base",
        base,
        "--teacher",
        tmp_path / "lora",
        "--data",
        tmp_path / "d.jsonl",
        "--steps",
        4,
        "--batch-size",
        4,
        "--lm-loss",
        0.5,
        "--eval-fraction",
        0.2,
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    after = json.loads((out / "training_report.json").read_text())["after"]
    assert set(after) >= {"kl", "top1_agreement", "label_loss", "accuracy"}
    assert set(after["accuracy"]) == {"student", "teacher"}


def _named_rows(path, names):
    path.write_text(
        "\n".join(
            json.dumps({"text": f"the {w} sat.", "label": n})
            for w, n in zip(["cat", "dog", "bird", "sun", "sea"] * 4, names)
        )
    )
    return path


def test_class_name_labels_map_through_sorted_names_or_the_base_label2id(setup, tmp_path):
    names = ["sports", "cooking", "computing", "cooking"] * 2
    data = load_data(_named_rows(tmp_path / "d.jsonl", names), setup["base"], max_length=8)
    vocab = sorted(set(names))
    assert data.labels == [vocab.index(n) for n in names] and data.label_ids == {n: vocab.index(n) for n in vocab}
    model = tiny_bert(layers=1, num_labels=2)
    model.config.id2label, model.config.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}  # not sorted order
    base = save_base(model, tmp_path / "named")
    data = load_data(_named_rows(tmp_path / "pn.jsonl", ["neg", "pos", "neg"]), base, max_length=8)
    assert data.labels == [1, 0, 1] and data.label_ids == {"pos": 0, "neg": 1} and "label2id" in data.label_ids_from
    with pytest.raises(
        ShareportError, match=r"unknown.jsonl:2: label 'meh' is not one of the labels of .*'pos', 'neg'"
    ):
        load_data(_named_rows(tmp_path / "unknown.jsonl", ["pos", "meh"]), base, max_length=8)
    with pytest.raises(ShareportError, match=r"mixed.jsonl:2: 'label' is 1, but line 1 gives 'pos'"):
        load_data(_named_rows(tmp_path / "mixed.jsonl", ["pos", 1]), base, max_length=8)


def test_finetune_takes_class_name_labels_and_records_their_indices(tmp_path, cli):
    base, _ = classifier_lora(tmp_path, num_labels=3)
    save_adapter(sharea_by_svd(load_adapter(tmp_path / "lora"), 1), tmp_path / "shared")
    train = _named_rows(tmp_path / "train.jsonl", ["sports", "cooking", "computing"] * 6)
    args = [
        "finetune",
        tmp_path / "shared",
        "--base",
        base,
        "--teacher",
        tmp_path / "lora",
        "--data",
        train,
        "--steps",
        2,
        "--batch-size",
        4,
        "--eval-fraction",
        0.25,
    ]  # 4 held out: the least recovery takes
    result = cli(*args, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "training_report.json").read_text())
    assert report["inputs"]["label_ids"]["ids"] == {"computing": 0, "cooking": 1, "sports": 2}
    assert "accuracy" in report["after"]


def test_evaluation_file_takes_the_training_mapping_and_refuses_other_names(setup, tmp_path):
    from shareport.train.jobs import _data

    train = _named_rows(tmp_path / "train.jsonl", ["b", "c", "a"] * 3)
    _, heldout, _, inputs = _data(train, setup["base"], 8, 0.1, _named_rows(tmp_path / "eval.jsonl", ["c", "a"]))
    assert heldout.labels == [2, 0] and inputs["label_ids"]["ids"] == {"a": 0, "b": 1, "c": 2}  # not its own [1, 0]
    with pytest.raises(ShareportError, match=r"bad.jsonl:2: label 'd' is not one of the labels"):
        _data(train, setup["base"], 8, 0.1, _named_rows(tmp_path / "bad.jsonl", ["a", "d"]))
    with pytest.raises(ShareportError, match=r"ints.jsonl: its labels are class indices and .*train.jsonl's are class"):
        _data(train, setup["base"], 8, 0.1, _named_rows(tmp_path / "ints.jsonl", [0, 1]))


def _one_line_error(result, pattern):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and pattern in errors[0], result.output


def test_bad_inputs_fail_with_one_line(setup, tmp_path, cli):
    common = ["--base", setup["base"], "--teacher", setup["lora"], "--steps", 1]
    _one_line_error(
        cli("finetune", setup["shared"], *common, "--data", tmp_path / "missing.txt", "-o", tmp_path / "o1"),
        "data file not found",
    )
    (tmp_path / "empty.txt").write_text("\n  \n")
    _one_line_error(
        cli("finetune", setup["shared"], *common, "--data", tmp_path / "empty.txt", "-o", tmp_path / "o2"),
        "no examples",
    )
    bare = save_base(tiny_llama(layers=2), tmp_path / "bare", tokenizer=False)
    _one_line_error(
        cli(
            "finetune",
            setup["shared"],
            "--base",
            bare,
            "--teacher",
            setup["lora"],
            "--data",
            setup["text"],
            "-o",
            tmp_path / "o3",
        ),
        "no tokenizer",
    )
    make_peft_adapter(tiny_llama(layers=2), tmp_path / "other", r=2, target_modules=["q_proj"])
    _one_line_error(
        cli(
            "finetune",
            setup["shared"],
            "--base",
            setup["base"],
            "--teacher",
            tmp_path / "other",
            "--data",
            setup["text"],
            "-o",
            tmp_path / "o4",
        ),
        "teacher and student adapt different modules",
    )
    _one_line_error(
        cli("finetune", setup["shared"], *common, "--data", setup["text"], "-o", tmp_path / "o5", "--resume"),
        "no checkpoint",
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"nope": 1}\n')
    _one_line_error(
        cli("finetune", setup["shared"], *common, "--data", tmp_path / "bad.jsonl", "-o", tmp_path / "o6"),
        "bad.jsonl:2",
    )
    _one_line_error(
        cli("finetune", setup["lora"], *common, "--data", setup["text"], "-o", tmp_path / "o7", "--merges", 1),
        "one shared A per kind",
    )
    _one_line_error(
        cli(
            "finetune",
            setup["shared"],
            *common,
            "--data",
            setup["text"],
            "-o",
            tmp_path / "o8",
            "--merges",
            1,
            "--merge-start",
            5,
        ),
        "merge schedule ends at step 6",
    )
    (tmp_path / "not-tokens").mkdir()
    (tmp_path / "not-tokens" / "train.txt").write_text("hello\n")
    _one_line_error(
        cli("finetune", setup["shared"], *common, "--data", tmp_path / "not-tokens", "-o", tmp_path / "o9"),
        "not-tokens: a folder without tokens.safetensors: give a text file (one example a line), a "
        ".jsonl with 'text', or a folder written by shareport.train.data.save_tokenized",
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))


def test_resume_refuses_other_options(setup, tmp_path, cli):
    args = [
        *finetune_args(setup, tmp_path / "o"),
        "--batch-size",
        4,
        "--max-length",
        16,
        "--checkpoint-every",
        1,
        "--checkpoint-dir",
        tmp_path / "kept",
    ]  # a folder the user names outlives the run
    assert cli(*args, "--steps", 2).exit_code == 0
    _one_line_error(cli(*args, "--steps", 3, "--lr", 0.5, "--resume", "--overwrite"), "checkpoint was made with lr=")


def test_short_run_with_default_merge_schedule_merges_within_the_steps(tmp_path, cli):
    """6 layers, 5 merges per kind in 5 steps: the default T_s moves to 0 (it used to refuse)."""
    paths = recovery_setup(tmp_path, layers=6, lines=40)
    args = [
        "finetune",
        paths["shared"],
        "--base",
        paths["base"],
        "--teacher",
        paths["lora"],
        "--data",
        paths["text"],
        "--batch-size",
        2,
        "--max-length",
        16,
        "--merges",
        5,
    ]
    r = cli(*args, "-o", tmp_path / "o", "--steps", 5)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "o" / "training_report.json").read_text())
    assert sorted({e["step"] for e in report["merges"]}) == [1, 2, 3, 4, 5]
    assert set(report["groups"].values()) == {1}
    _one_line_error(cli(*args, "-o", tmp_path / "o2", "--steps", 4), "--steps 4 is too short for 5 merge(s) per kind")
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    "labels, words",
    [
        (["sports", "cooking", "computing", "music"] * 4, "label 'sports' (class 3 by the sorted label names"),
        ([0, 1, 2, 7] * 4, "label 7 is not a class of"),
    ],
)
def test_labels_past_the_classifiers_classes_are_refused_in_one_line(tmp_path, cli, labels, words):
    """A 3-class classifier with four label names (or an integer label 7): one Error line naming the
    data file and the base's class count, nothing written (it was a cross-entropy traceback, or with an
    integer an accuracy scored against a class the model cannot output)."""
    base, _ = classifier_lora(tmp_path, num_labels=3)
    save_adapter(sharea_by_svd(load_adapter(tmp_path / "lora"), 1), tmp_path / "shared")
    data = _named_rows(tmp_path / "d.jsonl", labels)
    out = tmp_path / "out"
    args = ["--base", base, "--teacher", tmp_path / "lora", "--data", data, "--steps", 2, "-o", out]
    result = cli("finetune", tmp_path / "shared", *args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0] and "has 3 (0..2)" in errors[0] and str(data) in errors[0]
    assert not out.exists()


def test_a_checkpoint_from_before_group_by_length_resumes_as_the_shuffled_run_it_was():
    """Checkpoints written before the recipe had ``group_by_length`` were shuffled runs: they resume
    without the option and are refused with it (one line naming the key)."""
    from shareport.train.checkpoint import check_same_recipe
    from shareport.train.recipe import Recipe

    current = Recipe(steps=8).fingerprint()
    saved = {k: v for k, v in current.items() if k != "group_by_length"}
    check_same_recipe(saved, current, "ckpt")  # no error
    grouped = Recipe(steps=8, group_by_length=True).fingerprint()
    with pytest.raises(ShareportError, match="checkpoint was made with group_by_length=False, this run has True"):
        check_same_recipe(saved, grouped, "ckpt")
    with pytest.raises(ShareportError, match="checkpoint was made with lr=None"):  # other keys: as before
        check_same_recipe({k: v for k, v in current.items() if k != "lr"}, current, "ckpt")
