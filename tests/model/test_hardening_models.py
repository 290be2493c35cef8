"""Commands that take a base model (export, verify, finetune): bad inputs fail cleanly, exports
are byte-deterministic, and SIGKILL leaves no output or the previous complete one."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shareport.files.adapters import load_adapter, save_adapter
from tests.tiny import make_peft_adapter, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama base with a tokenizer, a LoRA on it, a text file, a GPT-2 base (no tokenizer),
    tokenized data that needs none, and a second LoRA of the same structure (other values)."""
    from shareport.demo.assets import build_tokenizer, corpus
    from shareport.train.data import save_tokenized

    root = tmp_path_factory.mktemp("hard")
    lines = corpus(200)
    tokenizer = build_tokenizer(lines, vocab_size=300)
    base = tiny_llama(layers=2)
    base.resize_token_embeddings(len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    make_peft_adapter(
        tiny_llama(layers=2).__class__(base.config),
        root / "lora",
        r=2,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    make_peft_adapter(
        tiny_llama(layers=2).__class__(base.config),
        root / "lora2",
        seed=7,
        r=2,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    tiny_gpt2(layers=2).save_pretrained(root / "gpt2")
    save_tokenized(root / "tokens", [[1, 5 + i, 9, 12] for i in range(8)])
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root


def _renamed_site(src, dst):
    adapter = load_adapter(src)
    path = sorted(adapter.sites)[0]
    factors = {
        p.replace("q_proj", "qq_proj"): (adapter.tensors[s.a], adapter.tensors[s.b], s.scale)
        for p, s in adapter.sites.items()
    }
    from shareport.adapter import Adapter

    save_adapter(Adapter.from_factors(factors), dst, as_peft=True)
    return path


BAD = {
    # name -> (command builder, words in the error)
    "export: site missing from base": (
        lambda r, o: ["export", r / "renamed", "--base", r / "base", "--onnx", o],
        "no module",
    ),
    "export: base of another architecture": (
        lambda r, o: ["export", r / "lora", "--base", r / "gpt2", "--onnx", o],
        "no module",
    ),
    "export: base folder without config": (
        lambda r, o: ["export", r / "lora", "--base", r / "lora", "--onnx", o],
        "config.json",
    ),
    "finetune: teacher of another structure": (
        lambda r, o: [
            "finetune",
            r / "lora",
            "--base",
            r / "base",
            "--teacher",
            r / "renamed",
            "--data",
            r / "text.txt",
            "-o",
            o,
            "--steps",
            1,
        ],
        "adapt different modules",
    ),
    "finetune: missing data file": (
        lambda r, o: [
            "finetune",
            r / "lora",
            "--base",
            r / "base",
            "--teacher",
            r / "lora",
            "--data",
            r / "nope.txt",
            "-o",
            o,
            "--steps",
            1,
        ],
        "nope.txt",
    ),
    # tokenized data: the GPT-2 base has no tokenizer, and the architecture check must be what fails
    "finetune: base of another architecture": (
        lambda r, o: [
            "finetune",
            r / "lora",
            "--base",
            r / "gpt2",
            "--teacher",
            r / "lora",
            "--data",
            r / "tokens",
            "-o",
            o,
            "--steps",
            1,
        ],
        "no module 'model.layers.0.self_attn.q_proj'",
    ),
    "verify: not an exported folder": (
        lambda r, o: ["verify", r / "lora", "--base", r / "base", "--adapter", r / "lora"],
        "model.onnx",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_model_inputs_fail_cleanly(name, setup, tmp_path, cli):
    if not (setup / "renamed").exists():
        _renamed_site(setup / "lora", setup / "renamed")
    build, words = BAD[name]
    before = _tree(setup)
    r = cli(*build(setup, tmp_path / "out"))
    assert r.exit_code != 0
    # progress displays share the captured stream; the error itself is one line
    lines = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and words and words in lines[0], r.output
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert _tree(setup) == before, "an input was modified"


def test_export_is_byte_deterministic(setup, tmp_path, cli):
    for name in ("a", "b"):
        r = cli(
            "export",
            setup / "lora",
            "--base",
            setup / "base",
            "--onnx",
            tmp_path / name,
            "--mode",
            "adapter",
            "--no-verify",
        )
        assert r.exit_code == 0, r.output
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_sigkill_export_leaves_previous_complete_output(setup, tmp_path):
    """Kill an export that replaces a previous one with different content at a random point: the
    output is then the previous complete one, the new complete one, or absent, never a mix. (One
    kill: every point of the publish step itself is checked in-process by test_atomic_publish.py;
    this checks that export writes only through it.)"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cmd(adapter, out):
        return [
            sys.executable,
            "-m",
            "shareport",
            "export",
            str(setup / adapter),
            "--base",
            str(setup / "base"),
            "--onnx",
            str(out),
            "--mode",
            "adapter",
            "--embed-adapter",
            "--no-verify",
            "--overwrite",
        ]

    out = tmp_path / "onnx"
    subprocess.run(cmd("lora", out), env=env, check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run(cmd("lora2", tmp_path / "new"), env=env, check=True, capture_output=True)
    full = time.perf_counter() - start
    old, new = _tree(out), _tree(tmp_path / "new")
    assert old != new and old.keys() == new.keys()
    proc = subprocess.Popen(cmd("lora2", out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(0).uniform(0.4, 1.0) * full)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _tree(out) if out.exists() else None
    assert state in (old, new, None), "a killed export left a partial output"


def test_sigkill_finetune_then_resume_matches_uninterrupted(setup, tmp_path):
    """Kill a checkpointing finetune once its first checkpoint exists; --resume finishes it with
    exactly the adapter of an uninterrupted run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    shutil.copytree(setup / "lora", tmp_path / "student")

    def cmd(out, *extra):
        return [
            sys.executable,
            "-m",
            "shareport",
            "finetune",
            str(tmp_path / "student"),
            "--base",
            str(setup / "base"),
            "--teacher",
            str(setup / "lora"),
            "--data",
            str(setup / "text.txt"),
            "-o",
            str(out),
            "--steps",
            "30",
            "--batch-size",
            "4",
            "--max-length",
            "16",
            "--checkpoint-every",
            "3",
            *extra,
        ]

    subprocess.run(cmd(tmp_path / "whole"), env=env, check=True, capture_output=True)
    checkpoint = tmp_path / "killed.checkpoint"
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the run ended"
    assert not (tmp_path / "killed").exists(), "a killed run published its output"
    subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, check=True, capture_output=True)
    name = "adapter_model.safetensors"
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
