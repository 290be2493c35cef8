"""Write an output folder all at once, or not at all, and never over what shareport did not write.

Everything is written into a hidden temporary folder beside the target and renamed into
place at the end, so an interrupted or failed run leaves either nothing or the previous
complete output. Inputs are never written to: the target may not be, contain, or sit inside
an input folder.

Folders missing above an output (``-o out/run1`` when ``out/`` does not exist) are made when
it is published, and removed again when it is not, so a failed run leaves nothing.

Every folder shareport publishes holds a small marker file (``.shareport``). ``--overwrite``
replaces only a folder that has it, or an empty folder: a user's folder, a base model folder
or anything else is refused, whatever the flag says.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import ShareportError

MARKER_NAME = ".shareport"
MARKER_TEXT = "This folder was written by shareport; 'shareport ... --overwrite' may replace it.\n"


def written_by_shareport(folder: Path) -> bool:
    """A folder shareport published (it holds the marker), or an empty one: what --overwrite may replace."""
    return (folder / MARKER_NAME).is_file() or not any(folder.iterdir())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output folder path before any work is done; return it resolved."""
    out = Path(out)
    if out.is_symlink():
        raise ShareportError(f"output '{out}' is a symbolic link; give a real path")
    resolved = out.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if _inside(resolved, inp) or _inside(inp, resolved):
            raise ShareportError(f"output '{out}' overlaps the input '{inp}'; choose another output folder")
    # what --overwrite would refuse is refused first, without suggesting it
    if out.exists() and not out.is_dir():
        raise ShareportError(f"output '{out}' exists and is not a folder; choose another name")
    if out.exists() and not written_by_shareport(out):
        raise ShareportError(
            f"output '{out}' is a folder shareport did not write (no {MARKER_NAME} file) and is "
            "not empty; --overwrite replaces only shareport's own outputs: choose another folder"
        )
    if out.exists() and not overwrite:
        raise ShareportError(f"output '{out}' already exists; pass --overwrite to replace it")
    _check_parent(out, resolved.parent)
    return resolved


def _check_parent(out, parent: Path) -> None:
    """The folder an output goes into must be writable (checked before the work). Folders missing above
    it are made at publication (:func:`_parents`), so it is the nearest existing one that must be a
    writable folder."""
    existing = parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ShareportError(f"cannot write '{out}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ShareportError(f"cannot write '{out}': folder '{existing}' is not writable")


@contextlib.contextmanager
def _parents(out, parent: Path) -> Iterator[None]:
    """Make the folders missing above an output; remove them again (those still empty) if it is not published."""
    missing = []
    folder = parent
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShareportError(f"cannot write '{out}': {exc.strerror or exc}") from None
    try:
        yield
    except BaseException:
        for folder in missing:  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on any error it is removed."""
    target = check_output(out, overwrite, inputs)
    with _parents(out, target.parent):
        remove_stale_temporaries(target)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        except OSError as exc:
            raise ShareportError(f"cannot write '{out}': {exc.strerror or exc}") from None
        try:
            (tmp / MARKER_NAME).write_text(MARKER_TEXT, encoding="utf-8")
            yield tmp
            _fsync_tree(tmp)
            _follow_umask(tmp)
            _replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ShareportError(f"cannot write '{out}': {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_output_file(
    out: str | os.PathLike,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
    owned: Callable[[Path], bool] | None = None,
) -> Path:
    """:func:`check_output`'s rules for a single file (a figure, an ``.onnx_adapter``).

    ``owned(path)`` tells whether an existing file is one shareport wrote (only such a file is
    replaced with ``overwrite``); without it no existing file is replaced."""
    path = Path(out)
    if path.is_dir():
        raise ShareportError(f"{what} '{path}' is a folder; give a file name")
    if path.is_symlink():
        raise ShareportError(f"{what} '{path}' is a symbolic link; give a real path")
    if path.exists() and not (owned is not None and owned(path)):  # refused with --overwrite too: not suggested
        raise ShareportError(
            f"{what} '{path}' is a file shareport did not write; --overwrite replaces only "
            "shareport's own outputs: choose another name"
        )
    if path.exists() and not overwrite:
        raise ShareportError(f"{what} '{path}' already exists; pass --overwrite to replace it")
    for folder in inputs:
        if Path(folder).resolve() in path.resolve().parents:
            raise ShareportError(f"{what} '{path}' is inside the input '{folder}'; choose another output")
    _check_parent(path, path.parent.resolve())
    return path


@contextlib.contextmanager
def atomic_file(
    out: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
    owned: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on any error it is removed."""
    path = check_output_file(out, overwrite, inputs, what, owned)
    with _parents(path, path.parent):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; an output follows the umask like any file
            os.replace(tmp, path)
        except OSError as exc:
            raise ShareportError(f"cannot write '{path}': {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporary folders for ``target`` left by a killed run (their writer is gone).

    A temporary folder is named ``.<name>.tmp-<pid>-<random>``; one whose process no longer
    exists can never be finished, so it is removed. A live writer's folder is left alone.
    """
    prefix = f".{target.name}.tmp-"
    for path in target.parent.glob(prefix + "*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename, so a crash cannot publish empty files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _follow_umask(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (typically 0755/0644), as any tool's outputs: mkdtemp
    makes 0700 and some writers (safetensors) 0600, which would hide the output from other users."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in sorted(folder.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is moved aside first, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(aside)
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(aside, target)  # put the previous complete output back
        raise
    shutil.rmtree(aside, ignore_errors=True)
