"""The output rules of ``shareport/files/atomic.py`` one function at a time, without a command around them.

Written against the surviving mutants of a mutation run (tests/mutation/mutation.sh atomic): each
refusal is checked by its message (the one line the user reads names the path and the problem), each
publish by what lands on disk (files, modes, leftovers), each failure by what is left (nothing new).
The reference for a mode is the POSIX rule itself, 0o777/0o666 less the umask, computed here.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shareport.errors import ShareportError
from shareport.files import atomic
from shareport.files.atomic import (
    MARKER_NAME,
    MARKER_TEXT,
    atomic_dir,
    atomic_file,
    check_output,
    check_output_file,
    current_umask,
    remove_stale_temporaries,
    written_by_shareport,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask():
    """Run with a given umask; the previous one is restored after the test."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _owner_bits_access(path, mode) -> bool:
    """``os.access`` as a non-root owner sees it: only the owner's permission bits count."""
    bits = stat.S_IMODE(os.stat(path).st_mode)
    wanted = (
        (stat.S_IRUSR if mode & os.R_OK else 0)
        | (stat.S_IWUSR if mode & os.W_OK else 0)
        | (stat.S_IXUSR if mode & os.X_OK else 0)
    )
    return bits & wanted == wanted


# ------------------------------------------------------------------------------------------- ownership


def test_what_overwrite_may_replace(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert written_by_shareport(empty)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER_NAME).write_text(MARKER_TEXT)
    (ours / "x.bin").write_bytes(b"1")
    assert written_by_shareport(ours)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert not written_by_shareport(users)
    fake = tmp_path / "fake"  # a folder named like the marker is not the marker
    (fake / MARKER_NAME).mkdir(parents=True)
    assert not written_by_shareport(fake)


# ------------------------------------------------------------------------------------------ check_output


def test_check_output_returns_the_resolved_path_of_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output("new", overwrite=False) == tmp_path.resolve() / "new"
    assert check_output(Path("sub/../new2"), overwrite=False) == tmp_path.resolve() / "new2"


@pytest.mark.parametrize("where", ["same", "inside the input", "around the input"])
def test_check_output_refuses_an_output_overlapping_an_input(tmp_path, where):
    inp = tmp_path / "box" / "in"
    (inp / "deeper").mkdir(parents=True)
    out = {"same": inp, "inside the input": inp / "deeper" / "out", "around the input": tmp_path / "box"}[where]
    with pytest.raises(ShareportError, match=rf"^output '{out}' overlaps the input '{inp.resolve()}'; choose"):
        check_output(out, overwrite=True, inputs=[tmp_path / "other", inp])


def test_check_output_a_sibling_with_a_common_prefix_is_no_overlap(tmp_path):
    (tmp_path / "model").mkdir()
    assert check_output(tmp_path / "model-out", False, inputs=[tmp_path / "model"]) == tmp_path / "model-out"
    assert check_output(tmp_path / "mod", False, inputs=[tmp_path / "model"]) == tmp_path / "mod"


def test_check_output_refusals_name_the_folder_and_the_problem(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(ShareportError, match=rf"^output '{link}' is a symbolic link; give a real path$"):
        check_output(link, overwrite=True)

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER_NAME).write_text(MARKER_TEXT)
    with pytest.raises(ShareportError, match=rf"^output '{ours}' already exists; pass --overwrite to replace it$"):
        check_output(ours, overwrite=False)
    assert check_output(ours, overwrite=True) == ours

    afile = tmp_path / "afile"
    afile.write_text("x")
    for overwrite in (True, False):  # without the flag, the refusal it would meet; not a hint to pass it
        with pytest.raises(
            ShareportError, match=rf"^output '{afile}' exists and is not a folder; choose another name$"
        ):
            check_output(afile, overwrite=overwrite)

    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(
        ShareportError,
        match=rf"^output '{users}' is a folder shareport did not write \(no "
        rf"{MARKER_NAME} file\) and is not empty; --overwrite replaces only "
        "shareport's own outputs: choose another folder$",
    ):
        check_output(users, overwrite=True)
    with pytest.raises(ShareportError, match="shareport did not write"):
        check_output(users, overwrite=False)

    missing = tmp_path / "nowhere" / "out"
    assert check_output(missing, overwrite=False) == missing and not missing.parent.exists()  # made at publication
    through = afile / "below" / "out"
    with pytest.raises(ShareportError, match=rf"^cannot write '{through}': '{afile}' is a file, not a folder$"):
        check_output(through, overwrite=False)


@pytest.mark.parametrize("parent_mode", [0o500, 0o600])  # not writable / not searchable
def test_check_output_needs_a_writable_searchable_parent(tmp_path, monkeypatch, parent_mode):
    monkeypatch.setattr(atomic.os, "access", _owner_bits_access)  # root passes os.access whatever the bits
    parent = tmp_path / "parent"
    parent.mkdir()
    parent.chmod(parent_mode)
    try:
        with pytest.raises(
            ShareportError,
            match=rf"^cannot write '{parent / 'out'}': folder '{parent}' is not "
            "writable$",
        ):
            check_output(parent / "out", overwrite=False)
        with pytest.raises(ShareportError, match="is not writable"):
            check_output_file(parent / "out.png", overwrite=False)
    finally:
        parent.chmod(0o700)
    assert check_output(parent / "out", overwrite=False) == parent / "out"


# ------------------------------------------------------------------------------------- check_output_file


def test_check_output_file_refusals_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ShareportError, match=rf"^figure '{tmp_path}' is a folder; give a file name$"):
        check_output_file(tmp_path, overwrite=True, what="figure")
    target = tmp_path / "real.png"
    target.write_bytes(b"png")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    with pytest.raises(ShareportError, match=rf"^output '{link}' is a symbolic link; give a real path$"):
        check_output_file(link, overwrite=True, owned=lambda p: True)
    with pytest.raises(ShareportError, match=rf"^output '{target}' already exists; pass --overwrite to replace it$"):
        check_output_file(target, overwrite=False, owned=lambda p: True)
    refused = (
        rf"^output '{target}' is a file shareport did not write; --overwrite replaces only shareport's own "
        "outputs: choose another name$"
    )
    with pytest.raises(ShareportError, match=refused):
        check_output_file(target, overwrite=True)  # no owned(): nothing existing is replaced
    with pytest.raises(ShareportError, match=refused):
        check_output_file(target, overwrite=False)  # not "pass --overwrite": that would be refused too
    asked = []
    with pytest.raises(ShareportError, match=refused):
        check_output_file(target, overwrite=True, owned=lambda p: asked.append(p) or False)
    assert asked == [target]
    assert check_output_file(str(target), overwrite=True, owned=lambda p: True) == target
    missing = tmp_path / "nowhere" / "out.png"
    assert check_output_file(missing, overwrite=False) == missing and not missing.parent.exists()
    through = target / "out.png"
    with pytest.raises(ShareportError, match=rf"^cannot write '{through}': '{target}' is a file, not a folder$"):
        check_output_file(through, overwrite=False)


@pytest.mark.parametrize("publish", ["dir", "file"])
def test_missing_parents_are_made_on_publication_and_removed_on_failure(tmp_path, publish):
    opened = {"dir": lambda out: atomic_dir(out), "file": lambda out: atomic_file(out)}[publish]
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with opened(out):
            assert out.parent.is_dir()
            raise RuntimeError("the work failed")
    assert list((tmp_path / "kept").iterdir()) == []
    with opened(out) as tmp:
        if publish == "file":
            tmp.write_text("done")
    assert out.exists() and _mode(out.parent) == 0o777 & ~current_umask()
    assert _leftovers(out.parent) == []  # no temporary left beside it


def test_check_output_file_refuses_a_file_inside_an_input(tmp_path):
    inp = tmp_path / "in"
    (inp / "deeper").mkdir(parents=True)
    for out in (inp / "a.onnx_adapter", inp / "deeper" / "a.onnx_adapter"):
        with pytest.raises(
            ShareportError,
            match=rf"^adapter '{out}' is inside the input '{inp}'; choose another "
            "output$",
        ):
            check_output_file(out, overwrite=False, inputs=[tmp_path / "other", inp], what="adapter")
    beside = tmp_path / "in.onnx_adapter"
    assert check_output_file(beside, overwrite=False, inputs=[inp]) == beside


# ------------------------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_publishes_the_marker_and_the_files_with_the_umask(tmp_path, umask):
    umask(0o027)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        (tmp / "c.json").write_text("{}")
        os.chmod(tmp / "c.json", 0o600)
        assert not out.exists()
    assert (out / MARKER_NAME).read_text(encoding="utf-8") == MARKER_TEXT
    assert (out / "sub" / "w.bin").read_bytes() == b"w"
    assert _mode(out) == _mode(out / "sub") == 0o777 & ~0o027
    assert _mode(out / "c.json") == _mode(out / "sub" / "w.bin") == _mode(out / MARKER_NAME) == 0o666 & ~0o027
    assert _leftovers(tmp_path) == []


def test_atomic_dir_leaves_a_symlinks_target_alone(tmp_path, umask):
    umask(0o022)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "link").symlink_to(outside)
    assert _mode(outside) == 0o600  # chmod would follow the link
    assert (tmp_path / "out" / "link").is_symlink()


def test_atomic_dir_fsyncs_every_file_before_publishing(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        (tmp / "a.txt").write_text("a")
    assert sorted(Path(p).relative_to(tmp).as_posix() for p in synced) == sorted([MARKER_NAME, "a.txt", "sub/w.bin"])


def test_atomic_dir_replaces_an_own_output_and_leaves_nothing_aside(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER_NAME, "new.txt"])
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:  # the new folder into place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(ShareportError, match=rf"^cannot write '{out}': No space left on device$"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert _leftovers(tmp_path) == []
    aside = calls[0][1]  # moved aside beside the target (a rename across file systems would fail)
    assert calls[0][0] == out and aside.parent == tmp_path and aside.name.startswith(".out.old-")
    assert calls[2] == (aside, out)


def test_atomic_dir_error_inside_removes_the_temporary_and_propagates(tmp_path):
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"h")
            raise KeyError("boom")
    with pytest.raises(ShareportError, match=rf"^cannot write '{tmp_path / 'out2'}': Permission denied$"):
        with atomic_dir(tmp_path / "out2"):
            raise PermissionError(13, "Permission denied")
    with pytest.raises(ShareportError, match=rf"^cannot write '{tmp_path / 'out3'}': plain$"):
        with atomic_dir(tmp_path / "out3"):
            raise OSError("plain")  # no strerror: the exception's text
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_mkdtemp_failure_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(ShareportError, match=rf"^cannot write '{tmp_path / 'out'}': Read-only file system$"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_stale_temporaries_of_dead_writers_are_removed_only(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    odd = tmp_path / ".out.tmp-notapid-abc"
    other = tmp_path / f".other.tmp-{dead}-abc"
    for folder in (stale, live, odd, other):
        (folder / "x").mkdir(parents=True)
    a_file = tmp_path / f".out.tmp-{dead}-file"
    a_file.write_text("not a folder")
    remove_stale_temporaries(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, odd.name, other.name, a_file.name])
    with atomic_dir(tmp_path / "other"):  # publishing cleans its own name's stale folders first
        assert not other.exists()


def _undeletable(calls):
    """shutil.rmtree as it behaves on a folder it cannot delete (a read-only mount, a busy file)."""

    def rmtree(path, ignore_errors=False, **kwargs):
        calls.append(Path(path))
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    return rmtree


def test_a_stale_folder_that_cannot_be_deleted_does_not_stop_the_publish(tmp_path, monkeypatch):
    stale = tmp_path / f".out.tmp-{_dead_pid()}-abc"
    stale.mkdir()
    calls = []
    monkeypatch.setattr(atomic.shutil, "rmtree", _undeletable(calls))
    remove_stale_temporaries(tmp_path / "out")
    assert calls == [stale]


def test_an_old_output_that_cannot_be_deleted_does_not_fail_the_publish(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    calls = []
    monkeypatch.setattr(atomic.shutil, "rmtree", _undeletable(calls))
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").read_text() == "new"
    assert [p.name.startswith(".out.old-") for p in calls] == [True]


def test_stale_folder_names_with_more_dashes(tmp_path):
    """The pid is the field right after '.tmp-', whatever follows it."""
    stale = tmp_path / f".out.tmp-{_dead_pid()}-ab-cd"
    stale.mkdir()
    remove_stale_temporaries(tmp_path / "out")
    assert not stale.exists()


def test_asking_whether_a_writer_lives_does_not_signal_it():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
            "signal.signal(signal.SIGINT, signal.SIG_DFL); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        assert atomic._alive(child.pid)
        try:
            child.wait(timeout=0.3)
        except subprocess.TimeoutExpired:
            pass
        assert child.poll() is None, "the writer was signalled"
    finally:
        child.kill()
        child.wait()


def test_a_writer_we_may_not_signal_counts_as_alive(monkeypatch):
    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "kill", denied)
    assert atomic._alive(12345)


def test_alive_tells_a_running_process_from_an_exited_one():
    assert atomic._alive(os.getpid())
    assert not atomic._alive(_dead_pid())


# ------------------------------------------------------------------------------------------ atomic_file


def test_atomic_file_publishes_with_the_umask_and_leaves_nothing_else(tmp_path, umask):
    umask(0o077)
    out = tmp_path / "fig.png"
    with atomic_file(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".fig.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
        assert not out.exists()
    assert out.read_bytes() == b"png" and _mode(out) == 0o666 & ~0o077
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    umask(0o002)
    with atomic_file(out, overwrite=True, owned=lambda p: True) as tmp:
        tmp.write_bytes(b"png2")
    assert out.read_bytes() == b"png2" and _mode(out) == 0o664


def test_atomic_file_failure_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "a.onnx_adapter"
    with pytest.raises(ValueError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(ShareportError, match=rf"^cannot write '{out}': No space left on device$"):
        with atomic_file(out, what="adapter") as tmp:
            tmp.write_bytes(b"whole")
    assert list(tmp_path.iterdir()) == []


def test_current_umask_reads_without_changing_it(umask):
    for mask in (0o077, 0o002, 0o022):
        umask(mask)
        assert current_umask() == mask
        assert os.umask(mask) == mask  # still set
