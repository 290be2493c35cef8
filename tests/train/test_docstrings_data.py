"""The frontier benchmark's task (stdlib docstrings by package) keeps its own rules: at least 10
classes, every class in both splits, no text in both splits, the same bytes on every build."""

import json

from tests.benchmarks import docstrings_data


def test_split_is_disjoint_deterministic_and_has_every_class(tmp_path):
    meta = docstrings_data.write(tmp_path / "a")
    again = docstrings_data.write(tmp_path / "b")
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    assert meta == again
    rows = {
        split: [json.loads(line) for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "test")
    }
    classes = docstrings_data.CLASSES
    assert len(classes) >= 10
    for split, split_rows in rows.items():
        assert {r["label"] for r in split_rows} == set(range(len(classes))), split
        assert all(classes[r["label"]] == r["name"] and r["source"].split(".")[0] == r["name"] for r in split_rows)
        assert all(docstrings_data.MIN_CHARS <= len(r["text"]) <= docstrings_data.MAX_CHARS for r in split_rows)
    train_texts, test_texts = {r["text"] for r in rows["train"]}, {r["text"] for r in rows["test"]}
    assert not train_texts & test_texts
    assert len(train_texts) == len(rows["train"]) and len(test_texts) == len(rows["test"])  # no repeats
    assert meta["train_examples"] == len(rows["train"]) and meta["test_examples"] == len(rows["test"])
