"""No command deletes or overwrites what it did not write (issue: `demo --out` clobbered a
user's folder; `convert -o BASE --overwrite` deleted a model folder).

For every command that writes: a folder holding a user's file survives the command with and
without --overwrite, byte for byte; a base-model folder given as the output is refused; and an
output that shareport did write is really replaced with --overwrite (new bytes, not the old)."""

import hashlib
import json
from pathlib import Path

import pytest

from shareport.files.atomic import MARKER_NAME
from tests.training_helpers import recovery_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("clobber"), layers=2, lines=40)


def _tree(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _user_folder(root: Path) -> Path:
    folder = root / "mine"
    (folder / "lora").mkdir(parents=True)
    (folder / "notes.txt").write_text("my own notes\n")
    (folder / "lora" / "keep.bin").write_bytes(b"\x00user data")
    return folder


def _commands(s, out):
    return {
        "convert": ["convert", s["lora"], "--to", "sharea", "-o", out],
        "convert --to lora": ["convert", s["shared"], "--to", "lora", "-o", out],
        "finetune": [
            "finetune",
            s["shared"],
            "--base",
            s["base"],
            "--teacher",
            s["lora"],
            "--data",
            s["text"],
            "--steps",
            1,
            "--batch-size",
            2,
            "--max-length",
            16,
            "-o",
            out,
        ],
        "train": [
            "train",
            "--form",
            "sharea",
            "--base",
            s["base"],
            "--data",
            s["text"],
            "--target",
            "q_proj",
            "--rank",
            2,
            "--steps",
            1,
            "--batch-size",
            2,
            "--max-length",
            16,
            "-o",
            out,
        ],
        "export": ["export", s["lora"], "--base", s["base"], "--onnx", out, "--no-verify"],
    }


@pytest.mark.parametrize("command", ["convert", "convert --to lora", "finetune", "train", "export"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_survives_every_command(command, overwrite, setup, tmp_path, cli):
    folder = _user_folder(tmp_path)
    before = _tree(folder)
    args = _commands(setup, folder)[command] + (["--overwrite"] if overwrite else [])
    r = cli(*args)
    assert r.exit_code != 0
    assert _tree(folder) == before
    assert str(folder) in r.output and len(r.output.strip().splitlines()[-1:]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_a_model_folder_given_as_output_is_refused_even_with_overwrite(setup, tmp_path, cli):
    base = setup["base"]
    before = _tree(base)
    r = cli("convert", setup["lora"], "--to", "sharea", "-o", base, "--overwrite")
    assert r.exit_code != 0 and "shareport did not write" in r.output
    assert _tree(base) == before


def test_overwrite_really_replaces_a_shareport_output(setup, tmp_path, cli):
    out = tmp_path / "out"
    assert cli("convert", setup["lora"], "--to", "sharea", "-o", out).exit_code == 0
    assert (out / MARKER_NAME).is_file()
    first = _tree(out)
    r = cli("convert", setup["lora"], "--to", "aslora", "-o", out)
    assert r.exit_code != 0 and "--overwrite" in r.output and _tree(out) == first
    assert cli("convert", setup["lora"], "--to", "aslora", "-o", out, "--overwrite").exit_code == 0
    assert _tree(out) != first
    assert json.loads((out / "adapter_config.json").read_text())["shareport"]["form"] == "aslora"


def test_an_empty_folder_may_be_the_output(setup, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    assert cli("convert", setup["lora"], "--to", "sharea", "-o", tmp_path / "empty", "--overwrite").exit_code == 0
    assert (tmp_path / "empty" / "adapter_config.json").is_file()


def test_single_file_outputs_replace_only_their_own_kind(setup, tmp_path, cli):
    """--plot and export-adapter write one file: a user's file of that name survives --overwrite."""
    pytest.importorskip("matplotlib")
    mine = tmp_path / "figure.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    r = cli("inspect", setup["lora"], "--plot", mine, "--overwrite")
    assert r.exit_code != 0 and "did not write" in r.output and mine.read_bytes().endswith(b"not ours")
    ours = tmp_path / "ours.png"
    assert cli("inspect", setup["lora"], "--plot", ours).exit_code == 0
    first = ours.read_bytes()
    assert cli("inspect", setup["shared"], "--plot", ours, "--overwrite").exit_code == 0
    assert ours.read_bytes() != first


def test_demo_follows_the_output_rules(tmp_path, cli):
    """The demo into a folder holding a user's file: refused with and without --overwrite, nothing touched."""
    folder = _user_folder(tmp_path)
    before = _tree(folder)
    for extra in ([], ["--overwrite"]):
        r = cli("demo", "-o", folder, "--no-export", *extra)
        assert r.exit_code != 0 and str(folder) in r.output
        assert _tree(folder) == before
