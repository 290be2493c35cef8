"""Download the ONNX Runtime CUDA wheels for the device, compress them, and split them into
per-call folders that each fit one ``run`` call's 64 MiB (runs here, not on the device).

    python3 -m tests.benchmarks.carry.prepare [--part-mib 60] [--out .carry]

Writes ``.carry/callN/`` (one part + ``manifest.json`` each; ``carry`` names one folder per call)
and ``.carry/manifest.json``: every wheel's and part's sha256 and the ordered device calls. The
wheels are bundled in one tar so the parts fill the calls evenly, then xz-compressed (``xz`` when
installed, else Python's ``lzma``; the device decompresses with Python's ``lzma``, which every
Python has, unlike zstd). Downloads are kept in ``.carry/download`` and reused.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from tests.benchmarks.carry.carrylib import CarryError, sha256_file, split_file

ROOT = Path(__file__).resolve().parents[3]

MIB = 1 << 20
CALL_LIMIT_MIB = 64  # one run call's working tree, carried folders included
# pyproject: onnxruntime-gpu>=1.20 and the genai extra onnxruntime-genai-cuda>=0.18; the latest of each.
# Both link CUDA 13 (libcublas.so.13, libcudart.so.13, ...), which the device's torch cu130 wheels bring.
WHEELS = ["onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.18.0"]
# the device's image has the CPU wheels' distributions: they own the same package folders, so
# collect.py uninstalls them before installing (see shareport doctor)
REPLACES = ["onnxruntime", "onnxruntime-genai"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
ARCHIVE = "shareport-wheels.tar.xz"
BENCH = (
    "PYTHONUNBUFFERED=1 timeout -k 10 {bench_s} python3 -m tests.benchmarks.bench_gpu --cuda-ep "
    "2>&1 | tee $OUT/bench_gpu.log"
)


def download(specs: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--only-binary",
        ":all:",
        "--no-deps",
        "-d",
        str(dest),
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    result = subprocess.run(command + specs, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CarryError(f"pip download failed: {tail}")
    wheels = []
    for spec in specs:
        name, _, version = spec.partition("==")
        stem = name.replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{version or '*'}-*.whl"))
        if not found:
            raise CarryError(f"pip download left no wheel for {spec} in {dest}")
        wheels.append(found[-1])
    return wheels


def wheel_info(path: Path) -> dict:
    """Name, version, size, sha256 and the unconditional requirements (from METADATA) of a wheel."""
    with zipfile.ZipFile(path) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(meta).decode().splitlines()
    fields = [line.split(": ", 1) for line in lines if ": " in line]
    name = next(v for k, v in fields if k == "Name")
    requires = [v for k, v in fields if k == "Requires-Dist" and "extra ==" not in v]
    return {
        "file": path.name,
        "dist": name,
        "version": next(v for k, v in fields if k == "Version"),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "requires": requires,
    }


def bundle(wheels: list[Path], out: Path, threads: int) -> str:
    """A tar of ``wheels`` (fixed owner and mtime), xz-compressed into ``out``; returns the tool used."""
    tar_path = out.with_suffix("")  # .tar
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for wheel in wheels:
            info = tar.gettarinfo(str(wheel), arcname=wheel.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(wheel, "rb") as handle:
                tar.addfile(info, handle)
    if shutil.which("xz"):
        with open(out, "wb") as sink:
            subprocess.run(["xz", f"-T{threads}", "-6", "-c", str(tar_path)], stdout=sink, check=True)
        tool = f"xz -T{threads} -6"
    else:
        with open(tar_path, "rb") as source, lzma.open(out, "wb", preset=6) as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        tool = "python lzma preset 6"
    tar_path.unlink()
    return tool


def tree_bytes(root: Path) -> int:
    """What a run call sends besides the carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def place_parts(parts: list[dict], built: Path, out: Path, *, root: Path) -> list[str]:
    """Move each part from ``built`` into a folder of its own, ``out/callN``; records the folder
    (relative to ``root``, as ``carry`` names it) in each part's entry and returns them in order."""
    folders = []
    for i, part in enumerate(parts, 1):
        folder = out / f"call{i}"
        folder.mkdir()
        (built / part["name"]).replace(folder / part["name"])
        part["folder"] = str(folder.relative_to(root))
        folders.append(part["folder"])
    return folders


def device_calls(folders: list[str], bench_s: int) -> list[dict]:
    """The ordered run calls: one per folder; the last also installs, checks the CUDA EP and benchmarks."""
    calls = []
    for i, folder in enumerate(folders):
        command = f"set -o pipefail; python3 -m tests.benchmarks.carry.collect {folder}"
        if i == len(folders) - 1:
            command += " && python3 -m tests.benchmarks.carry.check_cuda_ep && " + BENCH.format(bench_s=bench_s)
        calls.append(
            {
                "call": i + 1,
                "carry": [folder],
                "command": command,
                "timeout_s": 60 if i < len(folders) - 1 else bench_s + 90,
            }
        )
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".carry", help="an ignored folder of the repo (default .carry)"
    )
    parser.add_argument("--part-mib", type=float, default=60.0, help="the most MiB one part (one call) holds")
    parser.add_argument(
        "--wheel", action="append", default=None, help="NAME==VERSION (repeatable; default the ORT CUDA pair)"
    )
    parser.add_argument(
        "--extra", action="append", default=[], help="NAME==VERSION of a pure dependency the device lacks"
    )
    parser.add_argument("--threads", type=int, default=2, help="xz threads")
    parser.add_argument("--bench-s", type=int, default=420, help="the bench's time limit in the last call")
    args = parser.parse_args(argv)
    try:
        part_size = int(args.part_mib * MIB)
        tree = tree_bytes(ROOT)
        room = CALL_LIMIT_MIB * MIB - tree - 64 * 1024  # the manifest and some slack
        if part_size < 1 or part_size > room:
            raise CarryError(
                f"--part-mib {args.part_mib:g} does not fit one call: the tree already sends "
                f"{tree / MIB:.1f} MiB of {CALL_LIMIT_MIB}, leaving {room / MIB:.1f} MiB"
            )
        out = args.out.resolve()
        if (
            not str(out).startswith(str(ROOT))
            or subprocess.run(["git", "check-ignore", "-q", str(out / "x")], cwd=ROOT).returncode != 0
        ):
            raise CarryError(f"{args.out} is not an ignored folder inside the repo (add it to .gitignore)")
        wheels = download(args.wheel or WHEELS, out / "download")
        extras = download(args.extra, out / "download") if args.extra else []
        for old in out.glob("call*"):
            shutil.rmtree(old)
        build = out / "build"
        build.mkdir(parents=True, exist_ok=True)
        archive = build / ARCHIVE
        tool = bundle(wheels + extras, archive, args.threads)
        parts = split_file(archive, build / "parts", part_size)
        folders = place_parts(parts, build / "parts", out, root=ROOT)
        manifest = {
            "format": 1,
            "archive": {
                "name": ARCHIVE,
                "size": archive.stat().st_size,
                "sha256": sha256_file(archive),
                "compression": tool,
            },
            "wheels": [wheel_info(w) for w in wheels],
            "extras": [wheel_info(w) for w in extras],
            "replaces": REPLACES,
            "part_size": part_size,
            "tree_bytes": tree,
            "parts": parts,
            "calls": device_calls(folders, args.bench_s),
        }
        archive.unlink()
        text = json.dumps(manifest, indent=1) + "\n"
        (out / "manifest.json").write_text(text)
        for folder in folders:
            (ROOT / folder / "manifest.json").write_text(text)
    except CarryError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    total = sum(w["size"] for w in manifest["wheels"] + manifest["extras"])
    print(
        f"wheels: {len(wheels) + len(extras)}, {total / MIB:.1f} MiB; {ARCHIVE} ({tool}): "
        f"{manifest['archive']['size'] / MIB:.1f} MiB; tree sent with each call: {tree / MIB:.1f} MiB"
    )
    for part in parts:
        print(f"  {part['folder']}/{part['name']}: {part['size'] / MIB:.2f} MiB")
    print(f"device calls: {len(manifest['calls'])} (plan: {out / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
