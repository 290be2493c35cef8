"""Two CPU processes (gloo, launched by torchrun; Accelerate picks them up) match one process
with the same global batch. Marked `distributed`: it starts two interpreters (~30-60 s)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shareport.files.adapters import load_adapter
from tests.training_helpers import recovery_setup

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_run(tmp_path, cli) -> list:
    """A tiny recovery with ASLoRA merges, run in this process into ``tmp_path/one``; returns its
    arguments (without ``-o``) for the multi-process runs to repeat."""
    paths = recovery_setup(tmp_path, layers=2, lines=60)
    args = [
        "finetune",
        paths["shared"],
        "--base",
        paths["base"],
        "--teacher",
        paths["lora"],
        "--data",
        paths["text"],
        "--steps",
        6,
        "--lr",
        3e-3,
        "--batch-size",
        4,
        "--max-length",
        24,
        "--merges",
        1,
        "--merge-start",
        2,
        "--merge-every",
        2,
    ]
    one = cli(*args, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.output
    return args


@pytest.mark.distributed
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, cli):
    args = one_process_run(tmp_path, cli)

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "shareport",
        *map(str, args),
        "-o",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    report_one = json.loads((tmp_path / "one" / "training_report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert report_two["processes"] == 2 and report_one["processes"] == 1
    merges = [[(e["step"], e["kind"], e["kept"], e["merged"]) for e in r["merges"]] for r in (report_one, report_two)]
    assert merges[0] == merges[1] and len(merges[0]) == 2
    a, b = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    assert a.sites == b.sites
    for name in a.used_tensor_names():
        torch.testing.assert_close(b.tensors[name], a.tensors[name], atol=1e-5, rtol=1e-4)
    assert report_two["after"]["kl"] == pytest.approx(report_one["after"]["kl"], rel=1e-4)
