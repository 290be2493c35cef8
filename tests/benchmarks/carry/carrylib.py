"""Split a file into checksummed parts and put it back together (stdlib only: it runs on the device).

``prepare.py`` (here) and ``collect.py`` (on the device) share this; ``tests/export/test_carry.py`` tests it.
A part is refused when its size or sha256 differs from the manifest's, so a truncated or corrupted
transfer is named, never installed.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

CHUNK = 1 << 20


class CarryError(Exception):
    """A one-line reason a part set cannot be used (missing, corrupt, or not matching the manifest)."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(src: str | Path, dest: str | Path, part_size: int) -> list[dict]:
    """Write ``src`` as ``dest/<name>.partNNN`` pieces of at most ``part_size`` bytes; returns one
    ``{"name", "size", "sha256"}`` per part, in order."""
    if part_size < 1:
        raise CarryError(f"part size must be at least 1 byte, got {part_size}")
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(src, "rb") as handle:
        while True:
            name = f"{src.name}.part{len(parts) + 1:03d}"
            digest, size = hashlib.sha256(), 0
            with open(dest / name, "wb") as out:
                while size < part_size:
                    block = handle.read(min(CHUNK, part_size - size))
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            if size == 0:
                (dest / name).unlink()
                break
            parts.append({"name": name, "size": size, "sha256": digest.hexdigest()})
            if size < part_size:
                break
    return parts


def check_part(path: Path, entry: dict) -> str | None:
    """None when ``path`` is the part ``entry`` describes, else why not (one phrase)."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["size"]:
        return f"size {path.stat().st_size} != {entry['size']}"
    if sha256_file(path) != entry["sha256"]:
        return "sha256 mismatch"
    return None


def part_problems(folder: str | Path, parts: list[dict]) -> dict[str, str]:
    """name -> problem for each part of ``parts`` that ``folder`` lacks or holds corrupted."""
    folder = Path(folder)
    problems = {}
    for entry in parts:
        problem = check_part(folder / entry["name"], entry)
        if problem:
            problems[entry["name"]] = problem
    return problems


def reassemble(folder: str | Path, parts: list[dict], out: str | Path, *, sha256: str) -> Path:
    """Concatenate ``parts`` (found in ``folder``, in the manifest's order) into ``out`` and check
    the whole file's ``sha256``; raises CarryError, leaving no ``out``, when anything is off."""
    problems = part_problems(folder, parts)
    if problems:
        listed = ", ".join(f"{name} ({why})" for name, why in problems.items())
        raise CarryError(f"cannot reassemble: {listed}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as sink:
        for entry in parts:
            with open(Path(folder) / entry["name"], "rb") as source:
                for block in iter(lambda: source.read(CHUNK), b""):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise CarryError(
            f"reassembled {out.name} has sha256 {digest.hexdigest()[:16]}…, the manifest says {sha256[:16]}…"
        )
    tmp.replace(out)
    return out


def copy_parts(src: str | Path, staging: str | Path, parts: list[dict]) -> list[str]:
    """Copy the manifest's parts found in ``src`` into ``staging`` (a good copy already there is
    kept; a corrupt one in ``src`` is not copied); returns the names copied."""
    src, staging = Path(src), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    copied = []
    for entry in parts:
        source = src / entry["name"]
        if not source.is_file() or check_part(staging / entry["name"], entry) is None:
            continue
        problem = check_part(source, entry)
        if problem:
            raise CarryError(
                f"carried part {entry['name']} is corrupt ({problem}): prepare it again and re-run this call"
            )
        tmp = staging / (entry["name"] + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(staging / entry["name"])
        copied.append(entry["name"])
    return copied
