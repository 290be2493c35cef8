"""Output safety: symlinks, unwritable folders, a full disk, and SIGKILL at a random point
leave either no output or the previous complete output, never a partial one."""

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shareport.adapter import Adapter
from shareport.files.adapters import load_adapter, save_adapter

ROOT = Path(__file__).resolve().parents[2]


def _adapter(layers=4, n=64, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Adapter.from_factors(
        {
            f"model.layers.{i}.self_attn.{k}": (torch.randn(r, n, generator=gen), torch.randn(n, r, generator=gen), 2.0)
            for i in range(layers)
            for k in ("q_proj", "v_proj")
        }
    )


@pytest.fixture
def lora(tmp_path):
    save_adapter(_adapter(), tmp_path / "lora", as_peft=True)
    return tmp_path / "lora"


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_symlinked_output_is_refused(lora, tmp_path, cli):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "link", "--overwrite")
    assert r.exit_code != 0 and "symbolic link" in r.output
    assert list((tmp_path / "real").iterdir()) == []


def test_missing_parents_are_made(lora, tmp_path, cli):
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "no" / "such" / "out")
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "no" / "such" / "out").form == "sharea"
    r = cli(
        "convert", lora, "--to", "sharea", "-o", tmp_path / "no" / "else" / "out", "--plot", tmp_path / "figs" / "a.png"
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "no" / "else" / "out").is_dir()


def test_parents_made_for_an_output_that_fails_are_removed(lora, tmp_path, cli, monkeypatch):
    import shareport.files.tensorfile

    monkeypatch.setattr(
        shareport.files.tensorfile,
        "save_file",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    (tmp_path / "kept").mkdir()
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "kept" / "new" / "deeper" / "out")
    assert r.exit_code != 0 and "No space left on device" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "lora"] and not any((tmp_path / "kept").iterdir())


def test_a_file_on_the_output_path_is_refused_before_the_work(lora, tmp_path, cli):
    (tmp_path / "afile").write_text("mine\n")
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "afile" / "sub" / "out")
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: cannot write '{tmp_path / 'afile' / 'sub' / 'out'}': '{tmp_path / 'afile'}' is a file, not a folder"
    )
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_unwritable_output_folder(lora, tmp_path, cli, monkeypatch):
    # root ignores permission bits, so make the folder refuse writes the way the OS would
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    before = _tree(tmp_path)
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "out")
    assert r.exit_code != 0 and "Permission denied" in r.output and len(r.output.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_full_disk_leaves_nothing(lora, tmp_path, cli, monkeypatch):
    import shareport.files.tensorfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shareport.files.tensorfile, "save_file", full)
    r = cli("convert", lora, "--to", "aslora", "-o", tmp_path / "out")
    assert r.exit_code != 0 and "No space left on device" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_failed_overwrite_keeps_previous_output(lora, tmp_path, cli, monkeypatch):
    assert cli("convert", lora, "--to", "sharea", "-o", tmp_path / "out").exit_code == 0
    before = _tree(tmp_path / "out")
    import shareport.files.tensorfile

    monkeypatch.setattr(
        shareport.files.tensorfile,
        "save_file",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    r = cli("convert", lora, "--to", "aslora", "-o", tmp_path / "out", "--overwrite")
    assert r.exit_code != 0
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "out"]


def test_sigkill_leaves_no_or_previous_complete_output(tmp_path):
    """Kill `shareport convert` at random points; the output is absent, the old one, or the new one."""
    save_adapter(_adapter(layers=8, n=256, r=8, seed=1), tmp_path / "lora", as_peft=True)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "shareport",
        "convert",
        str(tmp_path / "lora"),
        "--to",
        "aslora",
        "--grouping",
        "adjacent",
        "-o",
        str(out),
        "--overwrite",
        "--json",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    full_run = time.perf_counter() - start
    complete = _tree(out)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * full_run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _tree(out) == complete  # same input, same bytes: old and new outputs are identical
        load_adapter(out)
    shutil_leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a killed run's temporary folder is removed by the next run for the same output
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], shutil_leftovers


@pytest.fixture
def umask():
    """Set the process umask for one test (put back after)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(mask, folder_mode, file_mode, lora, tmp_path, cli, umask):
    umask(mask)
    out = tmp_path / "shared"
    assert cli("convert", lora, "--to", "sharea", "-o", out, "--plot", tmp_path / "fig.png").exit_code == 0
    assert out.stat().st_mode & 0o777 == folder_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {file_mode}
    assert (tmp_path / "fig.png").stat().st_mode & 0o777 == file_mode
