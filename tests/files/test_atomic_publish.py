"""Publishing an output replaces the previous one by renaming, never by deleting and copying.

A profiler hook looks at the target after every Python and C call made while the output is
published (the exit of ``atomic_dir``/``atomic_file``): a reader (or a crash) at any of those
points must find the previous complete output, the new complete output or, for a folder, none
(a non-empty folder cannot be renamed over another, so it is moved aside first) - never a
partial folder or file. Deleting the target and copying the new one in shows partial states.
"""

import hashlib
import sys
from pathlib import Path

from shareport.files.atomic import MARKER_NAME, atomic_dir, atomic_file

OLD = {"config.json": b'{"old": 1}', "weights.bin": bytes(range(200)) * 50, "sub/notes.txt": b"old notes"}
NEW = {
    "config.json": b'{"new": 22}',
    "weights.bin": bytes(range(100)) * 80,
    "extra.txt": b"only new",
    "sub/other.txt": b"new notes",
    "sub/more.txt": b"more",
}


def _state(target: Path):
    if not target.exists():
        return None
    if target.is_file():
        return hashlib.sha256(target.read_bytes()).hexdigest()
    return {
        p.relative_to(target).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(target.rglob("*"))
        if p.is_file()
    }


def _write(folder: Path, files: dict) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


class Watch:
    """Record the target's state after every call while installed as the profiler."""

    def __init__(self, target: Path):
        self.target, self.states, self.calls = target, [], 0

    def __call__(self, frame, event, arg):
        if event in ("return", "c_return", "c_exception"):
            self.calls += 1
            self.states.append(_state(self.target))


def _publish_watched(target: Path, context, files: dict) -> Watch:
    watch = Watch(target)
    try:
        with context as tmp:
            if isinstance(files, dict):
                _write(tmp, files)
            else:
                tmp.write_bytes(files)
            sys.setprofile(watch)  # from here on, only the publishing step runs
    finally:
        sys.setprofile(None)
    return watch


def test_folder_publish_never_shows_a_partial_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        _write(tmp, OLD)
    old = _state(target)
    watch = _publish_watched(target, atomic_dir(target, overwrite=True), NEW)
    new = _state(target)
    assert old != new and set(new) == set(NEW) | {MARKER_NAME}
    assert watch.calls > 5, "the publish step was not observed"
    partial = [s for s in watch.states if s not in (None, old, new)]
    assert not partial, f"a reader saw a partial output: {partial[0]}"
    assert watch.states[-1] == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary or set-aside folders were left"


def test_file_publish_is_one_rename(tmp_path):
    target = tmp_path / "adapter.onnx_adapter"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"old" * 1000)
    old = _state(target)
    watch = _publish_watched(target, atomic_file(target, overwrite=True, owned=lambda path: True), b"new content" * 500)
    new = _state(target)
    assert old != new and watch.calls > 2
    assert all(s in (old, new) for s in watch.states), "the file was missing or partial while it was replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
