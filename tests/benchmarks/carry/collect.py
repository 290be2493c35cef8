"""On the device: gather the parts that ``prepare.py`` split, and once all have arrived, check,
unpack and install the wheels (stdlib only; idempotent across calls).

    python3 -m tests.benchmarks.carry.collect .carry/callN [--staging /tmp/shareport-carry]

Each call copies the part it carried into the staging folder (outside the working tree, so it
survives between the calls of one warm machine). With every part there it reassembles the archive,
checks its sha256 and each wheel's, uninstalls the distributions the wheels replace (the image's
CPU ``onnxruntime`` owns the same package folder as ``onnxruntime-gpu``) and runs
``pip install --no-deps --no-index`` on the wheels. Exit status: 0 when installed (now or before)
or when only later calls' parts are missing; 3 when a part of this or an earlier call is missing
(a fresh machine: start again at call 1); 1 on a corrupt part or a failed install.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.benchmarks.carry.carrylib import CarryError, copy_parts, part_problems, reassemble, sha256_file

STAMP = "installed.json"


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_manifest(folder: Path, staging: Path) -> dict:
    carried = folder / "manifest.json"
    if not carried.is_file():
        raise CarryError(f"{folder} holds no manifest.json: carry a folder that prepare.py wrote (.carry/callN)")
    manifest = json.loads(carried.read_text())
    kept = staging / "manifest.json"
    if kept.is_file() and json.loads(kept.read_text())["archive"]["sha256"] != manifest["archive"]["sha256"]:
        print(f"collect: {staging} holds parts of another prepare.py run; starting over")
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(carried, kept)
    return manifest


def already_installed(manifest: dict, staging: Path) -> bool:
    stamp = staging / STAMP
    if not stamp.is_file() or json.loads(stamp.read_text()).get("archive") != manifest["archive"]["sha256"]:
        return False
    return all(installed_version(w["dist"]) == w["version"] for w in manifest["wheels"])


def unpack(manifest: dict, staging: Path) -> list[Path]:
    """The archive reassembled from the staged parts, checked, decompressed; the wheels, checked."""
    archive = reassemble(
        staging, manifest["parts"], staging / manifest["archive"]["name"], sha256=manifest["archive"]["sha256"]
    )
    wheels_dir = staging / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    with lzma.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                raise CarryError(f"unexpected entry {member.name!r} in {archive.name}")
            with tar.extractfile(member) as source, open(wheels_dir / member.name, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    archive.unlink()
    paths = []
    for wheel in manifest["wheels"] + manifest.get("extras", []):
        path = wheels_dir / wheel["file"]
        if not path.is_file() or sha256_file(path) != wheel["sha256"]:
            raise CarryError(f"wheel {wheel['file']} is missing from the archive or does not match its sha256")
        paths.append(path)
    return paths


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise CarryError(f"pip {args[0]} failed: {tail}")


def missing_requirements(manifest: dict) -> list[str]:
    """The wheels' unconditional requirements that no installed distribution provides (names only)."""
    missing = []
    for wheel in manifest["wheels"] + manifest.get("extras", []):
        for requirement in wheel["requires"]:
            name = re.split(r"[ <>=!~;\[(]", requirement, maxsplit=1)[0]
            if installed_version(name) is None:
                missing.append(f"{requirement} (for {wheel['dist']})")
    return missing


def install(manifest: dict, staging: Path, wheels: list[Path], *, target: str | None) -> str:
    removed = []
    if target is None:
        for dist in manifest["replaces"]:
            version = installed_version(dist)
            if version is not None:
                pip("uninstall", "-y", dist)
                removed.append(f"{dist} {version}")
    where = ["--target", target] if target else []
    pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--no-cache-dir", *where, *map(str, wheels))
    if target is None:
        (staging / STAMP).write_text(json.dumps({"archive": manifest["archive"]["sha256"]}) + "\n")
    done = ", ".join(f"{w['dist']} {w['version']}" for w in manifest["wheels"] + manifest.get("extras", []))
    return f"installed {done}" + (f" (removed {', '.join(removed)})" if removed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the carried folder (.carry/callN)")
    parser.add_argument("--staging", type=Path, default=Path("/tmp/shareport-carry"))
    parser.add_argument(
        "--target",
        default=None,
        help="pip install --target DIR instead of into this Python (nothing uninstalled; for a trial run)",
    )
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.folder, args.staging)
        if args.target is None and already_installed(manifest, args.staging):
            print("collect: already installed: " + ", ".join(f"{w['dist']} {w['version']}" for w in manifest["wheels"]))
            return 0
        copied = copy_parts(args.folder, args.staging, manifest["parts"])
        problems = part_problems(args.staging, manifest["parts"])
        if problems:
            here = {p["name"] for p in manifest["parts"] if (args.folder / p["name"]).is_file()}
            last_here = max((i for i, p in enumerate(manifest["parts"]) if p["name"] in here), default=-1)
            calls = {p["name"]: (i, p.get("folder", "?")) for i, p in enumerate(manifest["parts"])}
            have = len(manifest["parts"]) - len(problems)
            listed = ", ".join(f"{calls[name][1]}/{name}" for name in problems)
            print(
                f"collect: {have} of {len(manifest['parts'])} parts staged in {args.staging} "
                f"(copied now: {', '.join(copied) or 'none'}); still missing: {listed}"
            )
            return 3 if any(calls[name][0] <= last_here for name in problems) else 0
        wheels = unpack(manifest, args.staging)
        print("collect: " + install(manifest, args.staging, wheels, target=args.target))
        missing = missing_requirements(manifest)
        if missing:
            print(
                "collect: requirements not installed here (carry them with prepare.py --extra): " + "; ".join(missing)
            )
    except CarryError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
