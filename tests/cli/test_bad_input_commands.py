"""The bad-adapter table of ``test_bad_input`` against the commands that also take a base model, data
or a graph: finetune (the adapter as student, and as teacher), export, verify, export-adapter, and
train --resume (a checkpoint folder holds the adapter; the native cases, which rewrite the whole
folder, are left out there). Each: one ``Error:`` line naming the folder,
a non-zero exit, nothing written, every input unchanged."""

import json
import shutil
from types import SimpleNamespace

import pytest

from shareport.export.exporter import ExportOptions, export
from shareport.train.checkpoint import FORMAT, STATE_JSON
from tests.cli.test_bad_input import CASES, check_refused, good_adapter  # noqa: F401 (a fixture)
from tests.tiny import tiny_llama
from tests.training_helpers import save_base, write_text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, good_adapter):  # noqa: F811
    root = tmp_path_factory.mktemp("inputs")
    base = save_base(tiny_llama(layers=2), root / "base")
    text = write_text(root / "train.txt", 20)
    graph = export(good_adapter, base, root / "graph", ExportOptions(mode="adapter"), progress=False, verify=False).path
    # a checkpoint folder around the good adapter (train --resume reads its adapter after the state)
    checkpoint = root / "checkpoint"
    shutil.copytree(good_adapter, checkpoint)
    (checkpoint / STATE_JSON).write_text(json.dumps({"format": FORMAT}))
    return SimpleNamespace(root=root, base=base, text=text, graph=graph, good=good_adapter, checkpoint=checkpoint)


COMMANDS = {
    "finetune": lambda i: (
        lambda bad, out: [
            "finetune",
            bad,
            "--base",
            i.base,
            "--teacher",
            i.good,
            "--data",
            i.text,
            "-o",
            out,
            "--steps",
            1,
        ]
    ),
    "finetune-teacher": lambda i: (
        lambda bad, out: [
            "finetune",
            i.good,
            "--base",
            i.base,
            "--teacher",
            bad,
            "--data",
            i.text,
            "-o",
            out,
            "--steps",
            1,
        ]
    ),
    "export": lambda i: lambda bad, out: ["export", bad, "--base", i.base, "--onnx", out],
    "verify": lambda i: lambda bad, out: ["verify", i.graph, "--base", i.base, "--adapter", bad],
    "export-adapter": lambda i: (
        lambda bad, out: ["export-adapter", bad, "--graph", i.graph, "-o", f"{out}.onnx_adapter"]
    ),
    "train-resume": lambda i: (
        lambda bad, out: [
            "train",
            "--form",
            "lora",
            "--base",
            i.base,
            "--data",
            i.text,
            "--target",
            "q_proj,v_proj",
            "--rank",
            2,
            "--steps",
            1,
            "--resume",
            "--checkpoint-dir",
            bad,
            "-o",
            out,
        ]
    ),
}
# the native cases rewrite the whole folder, dropping the checkpoint's state file
PAIRS = [
    (name, command)
    for command in sorted(COMMANDS)
    for name in sorted(CASES)
    if not (command == "train-resume" and name.startswith("native:"))
]


@pytest.mark.parametrize("name, command", PAIRS)
def test_bad_adapter_is_refused_by_every_command(name, command, inputs, tmp_path, cli):
    good = inputs.checkpoint if command == "train-resume" else inputs.good
    watched = (inputs.root, inputs.good)  # base, data, graph, checkpoint; the good adapter
    check_refused(name, COMMANDS[command](inputs), good, tmp_path, cli, watched, progress=True)
