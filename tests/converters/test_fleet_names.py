"""Fleet member names: shortest distinct path suffixes, NAME=PATH, and the names refused (one line,
nothing written). The inputs are real PEFT LoRAs (tests/converters/test_fleet.py's)."""

import json
import shutil

import pytest

from shareport.errors import ShareportError
from shareport.files.fleet import member_names
from tests.converters.test_fleet import assert_refused, dirs, loras  # noqa: F401  (loras: the module-scoped fixture)


@pytest.mark.parametrize(
    "paths, names",
    [
        (["/r/a/run1/lora", "/r/a/run2/lora"], ["run1", "run2"]),  # the shared trailing 'lora' is dropped
        (["/r/x/alpha", "/r/y/alpha", "/r/y/beta"], ["x-alpha", "y-alpha", "beta"]),  # as deep as needed, each
        (["/r/x/lora", "/r/y/lora", "/r/z/final"], ["x-lora", "y-lora", "final"]),  # 'lora' is not everyone's
        (["/r/one"], ["one"]),
    ],
)
def test_names_are_the_shortest_distinct_path_suffixes(paths, names):
    assert [n for n, _ in member_names(paths)] == names


def _layout(loras, root, relative):  # noqa: F811
    """The fleet's LoRAs copied to ``root/<relative[i]>``."""
    out = []
    for source, rel in zip(dirs(loras), relative):
        shutil.copytree(source, root / rel)
        out.append(root / rel)
    return out


def test_runs_laid_out_as_run_lora_get_the_run_names_and_explicit_names_win(loras, tmp_path, cli):  # noqa: F811
    inputs = _layout(loras, tmp_path / "runs", ["run1/lora", "run2/lora", "run3/lora"])
    r = cli("fleet", *inputs, "-o", tmp_path / "fleet", "--json")
    assert r.exit_code == 0, r.output
    assert [m["name"] for m in json.loads(r.stdout)["members"]] == ["run1", "run2", "run3"]
    assert {p.name for p in (tmp_path / "fleet").iterdir() if p.is_dir()} == {"run1", "run2", "run3"}
    r = cli("fleet", f"first={inputs[0]}", inputs[1], inputs[2], "-o", tmp_path / "named", "--json")
    assert r.exit_code == 0, r.output
    assert [m["name"] for m in json.loads(r.stdout)["members"]] == ["first", "run2", "run3"]
    config = json.loads((tmp_path / "named" / "first" / "adapter_config.json").read_text())
    assert config["shareport"]["fleet"]["shared"] == "../shared.safetensors"


def test_bad_names_are_one_line_and_write_nothing(loras, tmp_path, cli):  # noqa: F811
    a, b, c = dirs(loras)
    spaced = _layout(loras, tmp_path / "odd", ["my lora", "b", "c"])[0]
    # two inputs whose shortest distinct suffixes join to one name: a/b-c and a-b/c both need two folders
    clash = _layout(loras, tmp_path / "clash", ["a/b-c", "a-b/c", "z/b-c"])
    shutil.copytree(a, tmp_path / "clash" / "w" / "c")
    cases = [
        ((f"x={a}", f"x={b}"), "x=", "'x' is given twice"),
        ((f"beta={a}", b, c), "beta", "would name two members"),
        ((*clash, tmp_path / "clash" / "w" / "c"), "a-b-c", "would name two members"),
        ((spaced, b, c), "my lora", "not a valid member name"),
        ((f".hidden={a}", b), ".hidden", "not a valid member name"),
        ((f"shared.safetensors={a}", b), "shared.safetensors", "the fleet folder uses itself"),
        ((f"x={tmp_path / 'nowhere'}", b), "nowhere", "does not exist"),
        ((a, b, "--calibration", tmp_path / "d.txt"), "--calibration", "needs --base"),
    ]
    assert_refused(cli, tmp_path / "out", cases)


def test_invalid_name_is_refused_by_the_library_too():
    with pytest.raises(ShareportError, match="not a valid member name"):
        member_names(["a/b=/r/x", "/r/y"])
