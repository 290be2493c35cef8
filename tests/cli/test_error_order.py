"""Errors name the file or folder they are about, and inputs are checked before outputs."""

import pytest

from shareport.files.folder import WEIGHTS_NAME
from tests.tiny import tiny_gpt2
from tests.training_helpers import recovery_setup, save_base


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    paths = recovery_setup(root, layers=2, lines=20)
    save_base(tiny_gpt2(layers=2), root / "gpt2")
    broken = root / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", WEIGHTS_NAME):
        data = (paths["shared"] / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name == WEIGHTS_NAME else data)
    paths.update(gpt2=root / "gpt2", broken=broken)
    return paths


def _one_error_line(r) -> str:
    lines = [line for line in r.output.strip().splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    return lines[0]


def test_a_truncated_input_is_reported_before_an_existing_output(setup, tmp_path, cli):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "x").write_text("user file")
    for args in (
        [
            "finetune",
            setup["broken"],
            "--base",
            setup["base"],
            "--teacher",
            setup["lora"],
            "--data",
            setup["text"],
            "-o",
            out,
        ],
        ["convert", setup["broken"], "--to", "sharea", "-o", out],
        ["export", setup["broken"], "--base", setup["base"], "--onnx", out],
    ):
        line = _one_error_line(cli(*args))
        assert str(setup["broken"]) in line and "already exists" not in line


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_a_base_of_another_architecture_is_named(command, setup, tmp_path, cli):
    args = {
        "export": ["export", setup["lora"], "--base", setup["gpt2"], "--onnx", tmp_path / "o"],
        "finetune": [
            "finetune",
            setup["shared"],
            "--base",
            setup["gpt2"],
            "--teacher",
            setup["lora"],
            "--data",
            setup["text"],
            "-o",
            tmp_path / "o",
        ],
    }[command]
    line = _one_error_line(cli(*args))
    assert str(setup["gpt2"]) in line and "has no module" in line
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2_and_input_errors_exit_1(setup, tmp_path, cli):
    assert cli("convert", setup["lora"], "--to", "nonsense").exit_code == 2
    assert cli("convert", setup["lora"]).exit_code == 2  # --to is required
    assert cli("convert", tmp_path / "missing", "--to", "sharea").exit_code == 1
