"""One vocabulary of flags: -o/--output everywhere in --help, old spellings still accepted."""

import pytest

from shareport.cli.main import main
from tests.tiny import make_peft_adapter, tiny_llama

# command, required arguments, the parameter -o fills, the spellings --help lists, hidden old spellings
COMMANDS = [
    ("convert", ["LORA", "--to", "sharea"], "out", ["-o", "--output"], ["--out"]),
    ("export", ["ADAPTER", "--base", "BASE"], "out_dir", ["-o", "--output", "--onnx"], []),
    ("export-adapter", ["ADAPTER", "--graph", "GRAPH"], "output", ["-o", "--output"], []),
    ("finetune", ["SHARED", "--base", "B", "--teacher", "T", "--data", "D"], "out", ["-o", "--output"], ["--out"]),
    (
        "train",
        ["--form", "lora", "--base", "B", "--target", "q_proj", "--rank", "2", "--data", "D"],
        "out",
        ["-o", "--output"],
        ["--out"],
    ),
    ("demo", [], "out", ["-o", "--output"], ["--out"]),
]


@pytest.mark.parametrize("name, args, param, shown, hidden", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_spelling_fills_the_output(name, args, param, shown, hidden):
    command = main.commands[name]
    for flag in shown + hidden:
        ctx = command.make_context(name, [*args, flag, "somewhere"])
        assert str(ctx.params[param]) == "somewhere", flag


@pytest.mark.parametrize("name, args, param, shown, hidden", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_lists_the_documented_spelling_only(name, args, param, shown, hidden, cli):
    text = cli(name, "--help").output
    line = next(line for line in text.splitlines() if line.strip().startswith("-o,"))
    assert line.split()[: len(shown)] == [f"{f}," for f in shown[:-1]] + [shown[-1]]
    for flag in hidden:
        assert f"{flag} " not in text and f"{flag}," not in text


def test_help_mentions_only_options_the_command_has(cli):
    for name in ("export", "export-adapter", "finetune", "train", "demo"):
        text = " ".join(cli(name, "--help").output.split())
        assert "--plot" not in text, name
        assert "train: required" not in text, name


def test_finetune_help_states_the_library_s_sampling_for_generate(cli):
    """The help says which nucleus --generate samples from (written out: the CLI does not import torch
    for --help); it must be the library's."""
    from shareport.train.generated import SAMPLING_TOP_P

    text = " ".join(cli("finetune", "--help").output.split())
    assert f"top-p {SAMPLING_TOP_P:g} nucleus" in text


@pytest.mark.parametrize("flag", ["-o", "--output", "--out"])
def test_convert_writes_with_every_spelling(flag, tmp_path, cli):
    make_peft_adapter(tiny_llama(layers=2), tmp_path / "lora", r=2, target_modules=["q_proj"])
    r = cli("convert", tmp_path / "lora", "--to", "sharea", flag, tmp_path / "shared")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "shared" / "adapter_config.json").is_file()


def test_commands_hide_the_libraries_harmless_deprecation_notices():
    import warnings

    import click
    from click.testing import CliRunner

    from shareport.cli.main import _Group

    @click.command("noisy")
    def noisy():
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else", FutureWarning)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert CliRunner().invoke(_Group(commands={"noisy": noisy}), ["noisy"]).exit_code == 0
    assert [str(w.message) for w in seen] == ["something else"]


# every folder parameter, given a file: (command, parameter, arguments with FILE in that parameter's place)
FILE_FOR_FOLDER = [
    ("inspect", "adapter_dir", ["FILE"]),
    ("convert", "lora_dir", ["FILE", "--to", "sharea", "-o", "o"]),
    ("convert", "base", ["lora", "--to", "sharea", "--base", "FILE", "-o", "o"]),
    ("fleet", "lora_dirs", ["lora", "FILE", "-o", "o"]),
    ("fleet", "base", ["a", "b", "--calibration", "d", "--base", "FILE", "-o", "o"]),
    ("fleet-add", "fleet_dir", ["FILE", "lora"]),
    ("fleet-add", "lora_dir", ["fleet", "FILE"]),
    ("export", "adapter_dir", ["FILE", "--base", "b", "-o", "o"]),
    ("export", "base_dir", ["a", "--base", "FILE", "-o", "o"]),
    ("export-adapter", "graph_dir", ["a", "--graph", "FILE", "-o", "o"]),
    ("verify", "graph_dir", ["FILE", "--base", "b", "--adapter", "a"]),
    ("verify", "base_dir", ["g", "--base", "FILE", "--adapter", "a"]),
    ("verify", "adapter_dir", ["g", "--base", "b", "--adapter", "FILE"]),
    ("generate", "graph_dir", ["FILE", "--prompt", "hi"]),
    ("train", "base_dir", ["--form", "sharea", "--base", "FILE", "--target", "q_proj", "--rank", "2", "--data", "d"]),
    ("demo", "out", ["-o", "FILE"]),
    ("finetune", "shared_dir", ["FILE", "--base", "b", "--teacher", "t", "--data", "d"]),
    ("finetune", "base_dir", ["s", "--base", "FILE", "--teacher", "t", "--data", "d"]),
    ("finetune", "teacher_dir", ["s", "--base", "b", "--teacher", "FILE", "--data", "d"]),
    ("frontier", "lora_dir", ["FILE", "--base", "b", "--data", "d", "-o", "o"]),
    ("frontier", "base_dir", ["l", "--base", "FILE", "--data", "d", "-o", "o"]),
]
NOT_YET: set = set()


def test_every_folder_parameter_is_listed_here():
    import click

    found = {
        (name, p.name)
        for name, command in main.commands.items()
        for p in command.params
        if isinstance(p.type, click.Path) and not p.type.file_okay
    }
    assert found - NOT_YET == {(name, param) for name, param, _ in FILE_FOR_FOLDER}


@pytest.mark.parametrize("name, param, args", FILE_FOR_FOLDER, ids=[f"{c[0]}-{c[1]}" for c in FILE_FOR_FOLDER])
def test_a_file_where_a_folder_belongs_is_one_error_line_like_a_missing_folder(
    name, param, args, tmp_path, cli, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a folder\n")
    result = cli(name, *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: FILE: a file, where ") and "needs a folder" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Usage" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


# one usage error per command (click's exit status 2) and what click says about it
USAGE_ERRORS = {
    "demo": (["demo", "--bogus"], "No such option '--bogus'"),
    "inspect": (["inspect"], "Missing argument 'ADAPTER_DIR'"),
    "convert": (["convert", "x", "--to", "bogus"], "Invalid value for '--to'"),
    "fleet": (["fleet", "a", "b", "--form", "bogus"], "Invalid value for '--form'"),
    "fleet-add": (["fleet-add", "a", "b", "--max-error", "x"], "Invalid value for '--max-error'"),
    "frontier": (["frontier", "a", "--recover-steps", "-1"], "Invalid value for '--recover-steps'"),
    "finetune": (["finetune", "a", "--merge-mode", "bogus"], "Invalid value for '--merge-mode'"),
    "train": (["train", "--form", "bogus"], "Invalid value for '--form'"),
    "export": (["export", "a", "--dtype", "fp8"], "Invalid value for '--dtype'"),
    "verify": (["verify", "a", "--atol", "x"], "Invalid value for '--atol'"),
    "export-adapter": (["export-adapter"], "Missing argument 'ADAPTER'"),
    "generate": (["generate", "a", "--engine", "bogus"], "Invalid value for '--engine'"),
    "doctor": (["doctor", "--bogus"], "No such option '--bogus'"),
}


def test_version_help_and_usage_errors_import_no_torch(tmp_path):
    """They used to take 4-5 s, importing torch, transformers and ONNX Runtime through every command module
    (the option choices and defaults of convert, export, train... came from modules that import torch)."""
    import json
    import subprocess
    import sys

    from shareport.cli.main import COMMANDS as LAZY_COMMANDS

    assert set(USAGE_ERRORS) == set(LAZY_COMMANDS)  # a new command gets a usage error here too
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    runs = [
        (["--version"], 0, "shareport, version"),
        (["--help"], 0, "Commands:"),
        (["convertt"], 2, "No such command 'convertt'"),
        (["inspect", str(afile)], 1, "needs a folder"),
        (["export-adapter", "a", "--graph", str(afile)], 1, "needs a folder"),
    ]
    for name in LAZY_COMMANDS:
        runs.append(([name, "--help"], 0, f"Usage: main {name} "))
        runs.append((USAGE_ERRORS[name][0], 2, USAGE_ERRORS[name][1]))
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from shareport.cli.main import main\n"
        "results = [(r.exit_code, r.output) for r in (CliRunner().invoke(main, args) for args in json.loads(sys.argv[1]))]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'numpy', 'converters') "
        "if m in sys.modules)\n"
        "print(json.dumps([results, heavy]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps([args for args, _, _ in runs])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    results, heavy = json.loads(out)
    for (args, code, says), (exit_code, output) in zip(runs, results, strict=True):
        assert (exit_code, says in output) == (code, True), (args, output)
    assert heavy == []


def test_the_torch_free_choices_match_the_libraries():
    """The CLI's choices and defaults come from torch-free modules; the values the ``converters`` package
    also defines (its package imports torch) must agree with it, and the library uses the same values."""
    import torch

    import converters
    from converters.grouping import GROUPINGS
    from shareport import forms
    from shareport.export.exporter import DTYPES

    assert forms.DEFAULT_ASLORA_BUDGET == converters.DEFAULT_ASLORA_BUDGET
    assert forms.FLEET_FORMS == converters.FLEET_FORMS
    assert set(forms.GROUPINGS) == set(GROUPINGS)
    assert forms.CALIBRATION_RIDGE == converters.DEFAULT_RIDGE
    assert DTYPES == {"fp32": torch.float32, "fp16": torch.float16}
    defaults = {p.name: p.default for p in main.commands["convert"].params}
    assert defaults["calibration_ridge"] == converters.DEFAULT_RIDGE


def test_the_group_help_lists_each_command_summary_as_click_would():
    from shareport.cli.main import COMMANDS, LazyCommands, short_help

    unloaded = LazyCommands(COMMANDS)
    for name in COMMANDS:
        assert short_help(unloaded, name, 60) == main.commands[name].get_short_help_str(60), name
    assert not unloaded.loaded  # summaries read from source, nothing imported


def test_the_two_form_registries_agree():
    """shareport/forms.py (names, metadata; torch-free) and converters/forms.py (the math) hold one row
    per form each: the same forms, with the same per-site and grouped ones."""
    import converters
    from shareport import forms

    assert set(forms.FORMS) == set(converters.FORMS)
    for name, info in forms.FORMS.items():
        row = converters.FORMS[name]
        assert (info.per_site, info.grouped) == (row.per_site, row.grouped), name
        assert info.default_budget in (None, converters.DEFAULT_ASLORA_BUDGET), name
    assert set(forms.TARGET_FORMS) == set(forms.FORMS) | {forms.AUTO}


def test_flows_loads_each_room_on_first_use():
    """``shareport.flows`` names every command call, each found in the module its lazy table says,
    and a convert-only process never imports the ONNX stack (measured: 1.9 -> 1.3 s for a refused input)."""
    import subprocess
    import sys

    from shareport import flows

    assert sorted(flows.__all__) == sorted(flows._WHERE)
    for name in flows.__all__:
        assert callable(getattr(flows, name)), name
    code = "import sys; from shareport import flows; flows.convert; print('onnx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_interrupt_before_any_checkpoint_says_when_the_first_would_come(tmp_path, capsys):
    from shareport.cli.training_options import resume_hint
    from shareport.train.jobs import TrainingOptions

    for every, words in ((20, "no checkpoint was saved (the first is saved at step 20)"), (0, "--checkpoint-every N")):
        with pytest.raises(SystemExit) as stopped:
            with resume_hint(str(tmp_path / "out"), TrainingOptions(checkpoint_every=every)):
                raise KeyboardInterrupt
        assert stopped.value.code == 130
        assert words in capsys.readouterr().err
