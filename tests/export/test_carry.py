"""tests/benchmarks/carry: wheels split into per-call parts here and put back together on the device.

The reference for every check is hashlib over the original bytes, computed here, independently
of the manifest that ``split_file`` writes."""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from pathlib import Path

import pytest

from tests.benchmarks.carry.carrylib import CarryError, copy_parts, reassemble, split_file


def _load(name: str):
    return importlib.import_module(f"tests.benchmarks.carry.{name}")


@pytest.fixture
def blob(tmp_path):
    data = random.Random(7).randbytes(3 * (1 << 20) + 12345)  # 3 MiB and a ragged tail
    path = tmp_path / "src" / "archive.tar.xz"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, data


def _split(blob, tmp_path, part_size=256 * 1024):
    path, data = blob
    parts = split_file(path, tmp_path / "parts", part_size)
    return parts, hashlib.sha256(data).hexdigest()


def test_parts_arriving_in_shuffled_calls_reassemble_to_the_same_bytes(blob, tmp_path):
    parts, want = _split(blob, tmp_path)
    assert len(parts) == 13 and all(p["size"] <= 256 * 1024 for p in parts)
    assert sum(p["size"] for p in parts) == len(blob[1])
    order = list(range(len(parts)))
    random.Random(3).shuffle(order)
    staging = tmp_path / "staging"
    for i in order:  # each "call" carries one part, in shuffled order, in a folder of its own
        call = tmp_path / f"call{i}"
        call.mkdir()
        (call / parts[i]["name"]).write_bytes((tmp_path / "parts" / parts[i]["name"]).read_bytes())
        assert copy_parts(call, staging, parts) == [parts[i]["name"]]
        assert copy_parts(call, staging, parts) == []  # idempotent: a good staged copy is kept
    out = reassemble(staging, parts, tmp_path / "out.bin", sha256=want)
    assert out.read_bytes() == blob[1]


def test_a_part_size_dividing_the_file_leaves_no_empty_part(tmp_path):
    path = tmp_path / "even.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16384 bytes
    parts = split_file(path, tmp_path / "p", 4096)
    assert [p["size"] for p in parts] == [4096] * 4
    assert [p["sha256"] for p in parts] == [hashlib.sha256(bytes(range(256)) * 16).hexdigest()] * 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_corrupt_or_missing_part_is_refused_and_nothing_is_written(blob, tmp_path, damage):
    parts, want = _split(blob, tmp_path)
    victim = tmp_path / "parts" / parts[5]["name"]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-1]))
    else:
        victim.unlink()
    with pytest.raises(CarryError, match=parts[5]["name"]):
        reassemble(tmp_path / "parts", parts, tmp_path / "out.bin", sha256=want)
    assert not list(tmp_path.glob("out.bin*"))


def test_a_corrupt_carried_part_is_not_staged(blob, tmp_path):
    parts, _ = _split(blob, tmp_path)
    victim = tmp_path / "parts" / parts[0]["name"]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    with pytest.raises(CarryError, match="corrupt"):
        copy_parts(tmp_path / "parts", tmp_path / "staging", parts)
    assert not (tmp_path / "staging" / parts[0]["name"]).exists()


def test_parts_matching_a_wrong_whole_file_sha_are_refused(blob, tmp_path):
    parts, want = _split(blob, tmp_path)
    with pytest.raises(CarryError, match="sha256"):
        reassemble(tmp_path / "parts", parts, tmp_path / "out.bin", sha256=hashlib.sha256(b"other").hexdigest())
    assert not list(tmp_path.glob("out.bin*"))


def _fake_carry(tmp_path, part_size=40_000):
    """Two fake wheels bundled and split as prepare.py does; one manifest copy per call folder."""
    prepare, collect = _load("prepare"), _load("collect")
    wheels = []
    for i, name in enumerate(["onnxruntime_gpu-9.9.9-cp312-cp312-any.whl", "extra_pkg-1.0-py3-none-any.whl"]):
        path = tmp_path / "dl" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(random.Random(i).randbytes(60_000))
        wheels.append(path)
    archive = tmp_path / "build" / "w.tar.xz"
    archive.parent.mkdir()
    prepare.bundle(wheels, archive, threads=1)
    parts = split_file(archive, tmp_path / "build", part_size)
    folders = [tmp_path / f for f in prepare.place_parts(parts, tmp_path / "build", tmp_path, root=tmp_path)]
    manifest = {
        "archive": {"name": archive.name, "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()},
        "parts": parts,
        "replaces": [],
        "wheels": [
            {
                "file": w.name,
                "dist": w.name.split("-")[0],
                "version": "9.9.9",
                "requires": [],
                "sha256": hashlib.sha256(w.read_bytes()).hexdigest(),
            }
            for w in wheels
        ],
    }
    for folder in folders:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return collect, folders, wheels, manifest


def test_collect_waits_for_later_calls_and_flags_a_lost_earlier_one(tmp_path, capsys):
    collect, folders, _, _ = _fake_carry(tmp_path)
    assert len(folders) >= 3
    staging = tmp_path / "staging"
    assert collect.main([str(folders[0]), "--staging", str(staging)]) == 0  # only later parts missing
    assert "still missing" in capsys.readouterr().out
    assert collect.main([str(folders[2]), "--staging", str(staging)]) == 3  # call 2's part never came
    out = capsys.readouterr().out
    assert f"{folders[1].name}/" in out and f"{folders[0].name}/" not in out.split("still missing")[1]


def test_collect_unpacks_the_wheels_once_every_part_is_staged(tmp_path):
    collect, folders, wheels, manifest = _fake_carry(tmp_path)
    staging = tmp_path / "staging"
    for folder in reversed(folders):
        collect.copy_parts(folder, staging, manifest["parts"])
    unpacked = collect.unpack(manifest, staging)
    assert [p.read_bytes() for p in unpacked] == [w.read_bytes() for w in wheels]
    assert not (staging / manifest["archive"]["name"]).exists()  # the archive is gone once unpacked


def test_prepare_refuses_a_part_too_large_for_one_call(capsys, tmp_path):
    prepare = _load("prepare")
    assert prepare.main(["--part-mib", "63.9", "--out", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit one call" in err
    assert not (tmp_path / "nowhere").exists()


def test_device_calls_end_with_install_check_and_bench():
    prepare = _load("prepare")
    calls = prepare.device_calls([".carry/call1", ".carry/call2", ".carry/call3"], bench_s=400)
    assert [c["carry"] for c in calls] == [[".carry/call1"], [".carry/call2"], [".carry/call3"]]
    assert "tests.benchmarks.bench_gpu --cuda-ep" in calls[-1]["command"]
    assert "tests.benchmarks.carry.check_cuda_ep" in calls[-1]["command"]
    assert not any("bench_gpu" in c["command"] for c in calls[:-1])
    assert all(len(c["command"]) <= 2000 for c in calls) and calls[-1]["timeout_s"] <= 600


def test_collect_installs_once_all_parts_are_in_and_only_once(tmp_path, monkeypatch, capsys):
    collect, folders, wheels, manifest = _fake_carry(tmp_path)
    manifest["replaces"] = ["onnxruntime", "onnxruntime-genai"]
    for folder in folders:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    installed = {"onnxruntime": "1.30.0"}  # the device image's CPU wheel
    calls = []

    def pip(*args):
        calls.append(args)
        if args[0] == "uninstall":
            installed.pop(args[-1])
        else:
            installed.update({w["dist"]: w["version"] for w in manifest["wheels"]})

    monkeypatch.setattr(collect, "pip", pip)
    monkeypatch.setattr(collect, "installed_version", installed.get)
    staging = tmp_path / "staging"
    for folder in folders:
        assert collect.main([str(folder), "--staging", str(staging)]) == 0
    assert [c[0] for c in calls] == ["uninstall", "install"] and calls[0][-1] == "onnxruntime"
    assert {"--no-deps", "--no-index"} <= set(calls[1])
    assert sorted(Path(a).name for a in calls[1] if a.endswith(".whl")) == sorted(w.name for w in wheels)
    assert "removed onnxruntime 1.30.0" in capsys.readouterr().out
    assert collect.main([str(folders[-1]), "--staging", str(staging)]) == 0  # a rerun: nothing to do
    assert len(calls) == 2 and "already installed" in capsys.readouterr().out
