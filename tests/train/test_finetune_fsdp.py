"""Recovery under FSDP: two CPU processes (gloo, launched by torchrun with ACCELERATE_USE_FSDP=true, or by
`accelerate launch --config_file examples/fsdp.yaml`, which sets it) shard the frozen base (FSDP2) and train
the replicated adapter; the result equals one process's within 1e-5, and a run resumed from its
checkpoint under FSDP ends there too. Marked `distributed`: it starts two pairs of interpreters."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from shareport.files.adapters import load_adapter
from tests.train.test_finetune_distributed import REPO, _free_port, one_process_run


def _launch(args, cwd, launcher):
    """torchrun with the FSDP switch set by hand, or `accelerate launch` with the example config."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        env["ACCELERATE_USE_FSDP"] = "true"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "examples" / "fsdp.yaml"),
            "--mixed_precision",
            "no",
            "--main_process_port",
        ]
    cmd += [str(_free_port()), "-m", "shareport", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same(one, other):
    a, b = load_adapter(one), load_adapter(other)
    assert a.sites == b.sites
    for name in a.used_tensor_names():
        torch.testing.assert_close(b.tensors[name], a.tensors[name], atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_fsdp_two_processes_match_one_and_resume(tmp_path, cli):
    args = one_process_run(tmp_path, cli)

    checkpoints = tmp_path / "ckpt"
    _launch(
        [*args, "-o", tmp_path / "fsdp", "--checkpoint-every", 3, "--checkpoint-dir", checkpoints], tmp_path, "torchrun"
    )
    report_one = json.loads((tmp_path / "one" / "training_report.json").read_text())
    report = json.loads((tmp_path / "fsdp" / "training_report.json").read_text())
    assert report["processes"] == 2 and "fsdp" not in report_one
    # the base is sharded: this process holds part of it (dim-0 shards, the first one rounded up)
    held, whole = report["fsdp"]["base_parameter_bytes_here"], report["fsdp"]["base_parameter_bytes"]
    assert whole == 4 * sum(t.numel() for t in _base_tensors(tmp_path / "base")) and whole / 2 <= held < whole
    assert [(e["step"], e["kind"], e["kept"], e["merged"]) for e in report["merges"]] == [
        (e["step"], e["kind"], e["kept"], e["merged"]) for e in report_one["merges"]
    ]
    _assert_same(tmp_path / "one", tmp_path / "fsdp")
    assert report["after"]["kl"] == pytest.approx(report_one["after"]["kl"], rel=1e-4)

    # resumed from the step-3 checkpoint under FSDP, started the documented way
    _launch([*args, "-o", tmp_path / "resumed", "--checkpoint-dir", checkpoints, "--resume"], tmp_path, "accelerate")
    assert json.loads((tmp_path / "resumed" / "training_report.json").read_text())["processes"] == 2
    _assert_same(tmp_path / "one", tmp_path / "resumed")


def _base_tensors(base):
    from safetensors.torch import load_file

    return list(load_file(base / "model.safetensors").values())


def test_example_fsdp_config_asks_for_fsdp2():
    config = yaml.safe_load((REPO / "examples" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
