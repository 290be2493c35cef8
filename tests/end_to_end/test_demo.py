"""`shareport demo`, the README's main job: every step runs, recovery helps, ONNX verifies."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest


def test_demo_runs_end_to_end(tmp_path, cli):
    r = cli("demo", "--out", tmp_path / "demo", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{") :])
    convert, finetune = report["convert"], report["finetune"]
    assert convert["form"] == "aslora" and convert["ratio"] <= 0.25
    assert any(1 < len(k["groups"]) < k["sites"] for k in convert["kinds"]), "ASLoRA should group some layers"
    # recovery by distillation must bring the student closer to the teacher LoRA
    assert finetune["after"]["kl"] < 0.5 * finetune["before"]["kl"]
    for mode in ("folded", "adapter"):
        verify = report[f"export_{mode}"]["verify"]
        assert verify["ok"] and max(row["max_abs"] for row in verify["rows"]) <= 1e-4
        assert report[f"export_{mode}"]["latency_ms"] > 0
    for name in ("lora", "aslora", "aslora-recovered", "onnx-folded", "onnx-adapter"):
        assert (tmp_path / "demo" / name).is_dir()


def test_the_demo_folder_the_readme_suggests_is_ignored_by_git():
    """`shareport demo -o shareport-demo` in a clone leaves nothing for `git status` to list."""
    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "shareport-demo/lora/adapter_config.json"], cwd=root)
    assert result.returncode == 0


def test_the_demo_adapters_record_a_base_path_that_exists(tmp_path, monkeypatch):
    """The steps run in a temporary folder renamed at the end: the adapters must not record it."""
    from shareport.demo import run
    from shareport.files.adapters import load_adapter

    build = run.build_base
    monkeypatch.setattr(run, "build_base", lambda out, lines, **_: build(out, lines[:200], 2, 32, pretrain_steps=2))
    monkeypatch.setattr(run, "TRAIN_STEPS", 2)
    monkeypatch.setattr(run, "RECOVER_STEPS", 2)
    out = tmp_path / "demo"
    run.run_demo(out, export=False)
    for name in ("lora", "aslora", "aslora-recovered"):
        recorded = load_adapter(out / name).base_model
        assert recorded and (Path(recorded) / "config.json").is_file(), (name, recorded)
        assert Path(recorded).resolve() == (out / "base").resolve()
    leftovers = [p for p in out.rglob("*.json") if ".tmp-" in p.read_text(encoding="utf-8")]
    assert not leftovers
