"""export warns, at export time, when the base gives the folder no tokenizer (generate would fail later)."""

import json
import shutil

import pytest

from shareport.errors import ShareportError
from shareport.export.generate import load_tokenizer
from tests.onnx_cases import make_case
from tests.tiny import TARGETS, tiny_llama


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base, lora = make_case(root, lambda: tiny_llama(layers=1), r=2, lora_alpha=4, target_modules=TARGETS["llama"])
    return base, lora


def _generate_can_tokenize(folder) -> bool:
    """The reference: what ``shareport generate`` does with the exported folder's tokenizer files."""
    try:
        load_tokenizer(folder)
    except ShareportError as exc:
        assert "no tokenizer files" in str(exc)
        return False
    return True


def test_a_base_without_tokenizer_files_is_exported_with_a_warning(case, cli, tmp_path):
    base, lora = case
    out = tmp_path / "out"
    result = cli("export", lora, "--base", base, "-o", out, "--no-verify", "--json")
    assert result.exit_code == 0, result.output  # not refused: an app may tokenize text itself
    assert not _generate_can_tokenize(out)
    (warning,) = json.loads(result.stdout)["warnings"]
    assert str(base) in warning and "no tokenizer" in warning and "shareport generate" in warning
    assert "export again" in warning
    assert f"warning: {warning}" in result.stderr
    text = cli("export", lora, "--base", base, "-o", tmp_path / "text", "--no-verify")
    assert text.exit_code == 0 and f"warning: {warning}" in text.stderr


def test_a_base_with_a_tokenizer_gives_no_warning(case, cli, tmp_path):
    from shareport.demo.assets import build_tokenizer

    base, lora = case
    shutil.copytree(base, tmp_path / "base")
    build_tokenizer(["a small corpus for a tokenizer"] * 4, vocab_size=300).save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    result = cli("export", lora, "--base", tmp_path / "base", "-o", out, "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    assert _generate_can_tokenize(out)
    assert json.loads(result.stdout)["warnings"] == [] and "warning" not in result.stderr
