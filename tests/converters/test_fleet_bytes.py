"""``shareport fleet --bytes SHARE``: each storage (float32, int8, int4) built at the budget its bytes
hold, the one with the least error written. Checked against each storage built on its own with
``--budget B [--quantize Q]``, scored on the dense updates of what the files read back, and against the
bytes the written safetensors hold; refusals in one line with nothing written."""

import json
import math
import re

import pytest
import torch

from shareport.files import load_adapter
from shareport.files.tensorfile import read_header
from shareport.fleet_bytes import STORAGES, TIE, parameter_budget
from shareport.quantization import BITS
from tests.converters.test_fleet import RANKS, dirs, loras  # noqa: F401  (loras: the module-scoped fixture)
from tests.converters.test_fleet_choice import dense_member_errors


def _fleet(cli, out, *args) -> dict:
    r = cli("fleet", *args, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _factor_bytes(fleet_dir) -> int:
    """The bytes of every tensor the fleet's safetensors files hold (shared file once, each member's own)."""
    files = [fleet_dir / "shared.safetensors", *(fleet_dir / n / "adapter_model.safetensors" for n in RANKS)]
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for f in files for e in read_header(f).values())


def _members(fleet_dir):
    return [load_adapter(fleet_dir / n) for n in RANKS]


@pytest.mark.parametrize("share", [0.1, 0.3, 1.0])
def test_bytes_writes_the_storage_with_the_least_dense_error_within_the_bytes(loras, tmp_path, cli, share):  # noqa: F811
    originals = [load_adapter(d) for d in dirs(loras)]
    limit = share * 4 * sum(a.num_parameters() for a in originals)  # the LoRAs' factors in float32
    data = _fleet(cli, tmp_path / "bytes", *dirs(loras), "--bytes", share)
    storage = data["storage"]
    assert [c["storage"] for c in storage["candidates"]] == [q or "float32" for q in STORAGES]
    dense = {}
    for candidate in storage["candidates"]:
        assert "refused" not in candidate, candidate
        name = candidate["storage"]
        quantize = [] if name == "float32" else ["--quantize", name]
        alone = tmp_path / name
        _fleet(cli, alone, *dirs(loras), "--budget", candidate["budget"], *quantize)  # the same storage, on its own
        errors = dense_member_errors(originals, _members(alone))
        err, energy = sum(e for e, _ in errors), sum(w for _, w in errors)
        dense[name] = (math.sqrt(err / energy), _factor_bytes(alone))
        assert candidate["relative_error"] == pytest.approx(dense[name][0], rel=1e-4, abs=1e-7)
        assert candidate["bytes"] == dense[name][1] <= limit  # what the files hold, within the bytes
    chosen = storage["chosen"]
    least = min(error for error, _ in dense.values())  # the least error; near it, the fewest bytes
    assert chosen == min((n for n, (e, _) in dense.items() if e <= least * (1 + TIE)), key=lambda n: dense[n][1])
    written = tmp_path / "bytes"
    assert _factor_bytes(written) <= limit
    assert (written / "shared.safetensors").read_bytes() == (tmp_path / chosen / "shared.safetensors").read_bytes()
    for fleet_member, own_member in zip(_members(written), _members(tmp_path / chosen)):
        for path in fleet_member.sites:
            assert torch.equal(fleet_member.update(path), own_member.update(path))
    assert (data.get("quantization") or {}).get("quantize", "float32") == chosen


@pytest.mark.parametrize("quantize", STORAGES)
@pytest.mark.parametrize("share", [0.05, 0.125, 0.5])
def test_each_storage_budget_is_the_most_parameters_its_bytes_hold(share, quantize):
    group = 64
    per_parameter = 4.0 if quantize is None else BITS[quantize] / 8 + 2 / group  # integers and a float16 scale
    budget = parameter_budget(share, quantize, group)
    assert budget * per_parameter <= share * 4 + 1e-12
    assert budget == 1.0 or (budget + 1e-4) * per_parameter > share * 4  # none larger at 4 digits


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bytes", 0.2, "--budget", 0.2], ["--bytes", "--budget"]),
        (["--bytes", 0.2, "--quantize", "int8"], ["--bytes", "--quantize"]),
        (["--bytes", 0.2, "--form", "sharea", "--rank", 2], ["--bytes", "--rank"]),
        (["--bytes", 0], ["--bytes", "(0, 1]"]),
        (["--bytes", 1.5], ["--bytes", "(0, 1]"]),
        (["--bytes", 0.2, "--group-size", 0], ["--group-size"]),
        (["--bytes", 1e-9], ["--bytes 1e-09", "no storage fits", "hold no parameter"]),
    ],
)
def test_bad_bytes_arguments_are_one_line_and_write_nothing(loras, tmp_path, cli, args, words):  # noqa: F811
    r = cli("fleet", *dirs(loras), "-o", tmp_path / "out", *args)
    assert r.exit_code == 1 and "\n" not in r.output.strip(), r.output
    assert all(w in r.output for w in words), r.output
    assert not (tmp_path / "out").exists()


def test_one_adapter_is_refused_as_itself_not_as_a_size(loras, tmp_path, cli):  # noqa: F811
    r = cli("fleet", dirs(loras)[0], "-o", tmp_path / "out", "--bytes", 0.2)
    assert r.exit_code == 1 and "at least two adapters" in r.output and "storage" not in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_the_alone_warning_names_the_group_size_it_was_compared_at(loras, tmp_path, cli):  # noqa: F811
    r = cli("fleet", *dirs(loras), "-o", tmp_path / "f", "--budget", 0.3, "--quantize", "int4", "--group-size", 8)
    assert r.exit_code == 0, r.output
    (warning,) = [line for line in r.stderr.splitlines() if "each LoRA truncated alone" in line]
    assert "--quantize int4 --group-size 8`" in warning


def test_a_lossy_float_fleet_points_to_bytes_and_the_hinted_command_runs(loras, tmp_path, cli):  # noqa: F811
    data = _fleet(cli, tmp_path / "float", *dirs(loras), "--budget", 0.1)
    worst = max(m["relative_error"] for m in data["members"])
    (hint,) = data["hints"]
    assert worst > 0.2 and f"{worst:.3f}" in hint
    share = re.search(r"`--bytes ([0-9.]+)`", hint).group(1)
    assert float(share) <= data["parameters"] / data["lora_parameters"]  # the float fleet's bytes, never more
    hinted = _fleet(cli, tmp_path / "hinted", *dirs(loras), "--bytes", share)
    least = min(c["relative_error"] for c in hinted["storage"]["candidates"])
    assert least <= max(m["relative_error"] for m in data["members"])
    assert not hinted.get("hints")  # a --bytes fleet, like a quantized one, is not hinted at
    assert not _fleet(cli, tmp_path / "q", *dirs(loras), "--budget", 0.1, "--quantize", "int8").get("hints")


def test_with_clusters_auto_the_first_storage_searches_and_the_others_take_its_count(tmp_path, cli):
    """Four LoRAs (so auto searches 1 and 2 clusters): float32 searches; int8 and int4 are the fleets
    built with --clusters at the count it chose, which is what the report names."""
    from tests.tiny import make_peft_adapter, tiny_llama

    roots = []
    for seed in range(4):
        roots.append(tmp_path / f"lora{seed}")
        make_peft_adapter(
            tiny_llama(), roots[-1], seed=seed + 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
    data = _fleet(cli, tmp_path / "bytes", *roots, "--bytes", 0.2)
    storage = data["storage"]
    count = storage["clusters"]["count"]
    assert storage["clusters"]["searched_by"] == "float32"
    by_storage = {c["storage"]: c for c in storage["candidates"]}
    searched = _fleet(cli, tmp_path / "float", *roots, "--budget", by_storage["float32"]["budget"])
    assert (searched.get("clusters") or {}).get("count", 1) == count
    for name in ("int8", "int4"):
        c = by_storage[name]
        own = _fleet(cli, tmp_path / name, *roots, "--budget", c["budget"], "--quantize", name, "--clusters", count)
        assert own["quantization"]["bytes"] == c["bytes"]  # the same fleet: the same stored bytes
        assert (own.get("clusters") or {}).get("count", 1) == count
    chosen = tmp_path / storage["chosen"]
    written = (tmp_path / "bytes" / "shared.safetensors").read_bytes()
    assert (
        written
        == (chosen if storage["chosen"] != "float32" else tmp_path / "float")
        .joinpath("shared.safetensors")
        .read_bytes()
    )
