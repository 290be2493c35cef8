"""`shareport fleet --quantize`: every factor the fleet stores (shared bases once, each member's B's or
cores) as integers and float16 scales, against a float fleet built from the same LoRAs and quantized here
by an independent numpy reference; the report's errors against the LoRAs; refusals in one line."""

import json
import math

import numpy as np
import pytest
import torch

from converters.factored import difference_sq_norm, product_sq_norm
from shareport.files import load_adapter
from shareport.files.tensorfile import read_header
from tests.tiny import make_peft_adapter, tiny_llama

RANKS = {"alpha": 4, "beta": 2, "gamma": 3}
QMAX = {"int8": 127, "int4": 7}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-quantize")
    for seed, (name, r) in enumerate(RANKS.items()):
        make_peft_adapter(
            tiny_llama(layers=2), root / name, seed=seed + 1, r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]
        )
    return root


def _fleet(cli, loras, out, *args):
    result = cli("fleet", *(loras / n for n in RANKS), "-o", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _data_bytes(path) -> int:
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in read_header(path).values())


def _reference(x: torch.Tensor, bits: str, axis: int, group: int = 64) -> np.ndarray:
    """Symmetric group-wise quantization, written out in numpy: per group of ``group`` along ``axis``
    s = amax / qmax rounded up to float16, q = round-half-even(x / s), y = q * s."""
    a = np.moveaxis(x.double().numpy(), axis, -1)
    out = np.empty_like(a)
    for start in range(0, a.shape[-1], group):
        block = a[..., start : start + group]
        s = (np.abs(block).max(axis=-1, keepdims=True) / QMAX[bits]).astype(np.float16)
        s = np.where(
            s.astype(np.float64) < np.abs(block).max(axis=-1, keepdims=True) / QMAX[bits],
            np.nextafter(s, np.float16(np.inf)),
            s,
        )
        s64 = s.astype(np.float64)
        q = np.where(s64 > 0, np.rint(block / np.where(s64 > 0, s64, 1.0)), 0.0)
        out[..., start : start + group] = (q.astype(np.float32) * s.astype(np.float32)).astype(np.float64)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_every_stored_factor_is_the_float_fleets_quantized(form, bits, loras, tmp_path, cli):
    plain = _fleet(cli, loras, tmp_path / "float", "--form", form, "--rank", 3)
    report = _fleet(cli, loras, tmp_path / "q", "--form", form, "--rank", 3, "--quantize", bits)
    header = read_header(tmp_path / "q" / "shared.safetensors")
    for name in RANKS:
        ref, got = load_adapter(tmp_path / "float" / name), load_adapter(tmp_path / "q" / name)
        fleet = got.config["fleet"]
        products = fleet["products"]
        stored = {s.a: 1 for s in got.sites.values()}  # what the fleet stores, and its grouping axis
        for site in got.sites.values():
            stored.update({products[site.b][0]: 0, products[site.b][1]: 1} if site.b in products else {site.b: 0})
        assert sorted(got.quantized) == sorted(stored)
        for tensor, axis in stored.items():
            want = _reference(ref.tensors[tensor], bits, axis)
            np.testing.assert_array_equal(got.tensors[tensor].double().numpy(), want, err_msg=tensor)
            if tensor in fleet["names"]:  # the shared file holds the integers and scales, not floats
                assert header[tensor]["dtype"] == ("I8" if bits == "int8" else "U8")
                assert header["scale/" + tensor]["dtype"] == "F16"
        for path, site in got.sites.items():  # a two-sided member's B is formed again from U and C
            if site.b in products:
                u, core = (got.tensors[n].double() for n in products[site.b])
                torch.testing.assert_close(got.tensors[site.b].double(), u @ core, rtol=1e-6, atol=1e-9)
        config = json.loads((tmp_path / "q" / name / "adapter_config.json").read_text())["shareport"]
        assert config["format_version"] == 2 and config["quantization"]["scheme"] == "symmetric"
        assert set(config["quantization"]["tensors"]) == set(stored) - set(fleet["names"])  # its own
        assert set(config["fleet"]["quantization"]["tensors"]) >= set(stored) & set(fleet["names"])
        # the report's errors against the LoRA, float and quantized, recomputed from the factors
        lora = load_adapter(loras / name)
        row = next(m for m in report["members"] if m["name"] == name)["quantization"]
        for key, member in (("float_relative_error", ref), ("relative_error", got)):
            error = energy = 0.0
            for path in lora.sites:
                a, bt = lora.factors(path, torch.float64)
                a2, bt2 = member.factors(path, torch.float64)
                error, energy = error + difference_sq_norm(bt, a, bt2, a2), energy + product_sq_norm(bt, a)
            assert row[key] == pytest.approx(math.sqrt(error / energy), rel=1e-9)
        assert row["float_relative_error"] == pytest.approx(
            next(m for m in plain["members"] if m["name"] == name)["relative_error"], rel=1e-9
        )
        assert 0 < row["added_relative_error"] < (0.02 if bits == "int8" else 0.3)
    q = report["quantization"]
    assert (q["quantize"], q["bits"], q["group_size"], q["scheme"]) == (bits, int(bits[3:]), 64, "symmetric")
    # the factor bytes are the files' tensor data: the shared file once, each member's own file
    files = [tmp_path / "q" / "shared.safetensors", *(tmp_path / "q" / n / "adapter_model.safetensors" for n in RANKS)]
    assert q["shared_bytes"] == _data_bytes(files[0]) and q["bytes"] == sum(map(_data_bytes, files))
    assert q["bytes"] < q["float16_bytes"] and q["float32_bytes"] == 2 * q["float16_bytes"]
    # (not the files' bytes: on this tiny model the configs and headers, larger by the scheme, outweigh the factors)


def test_inspect_counts_a_members_stored_bytes_and_the_shared_part(loras, tmp_path, cli):
    _fleet(cli, loras, tmp_path / "q", "--form", "shareab", "--rank", 3, "--quantize", "int4")
    result = cli("inspect", tmp_path / "q" / "beta", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)["storage"]
    # the whole shared file is this (one-cluster) member's basis
    assert s["shared_bytes"] == _data_bytes(tmp_path / "q" / "shared.safetensors")
    assert s["bytes"] - s["shared_bytes"] == _data_bytes(tmp_path / "q" / "beta" / "adapter_model.safetensors")
    assert 4 < s["bits_per_parameter"] < 8 and s["quantized_bits"] == [4]
    text = cli("inspect", tmp_path / "q" / "beta")
    assert "bits per parameter" in text.output and "int4 in groups of 64" in text.output


def test_same_inputs_give_the_same_bytes(loras, tmp_path, cli):
    for out in ("one", "two"):
        _fleet(cli, loras, tmp_path / out, "--form", "sharea", "--rank", 2, "--quantize", "int8")
    for rel in ["shared.safetensors", "alpha/adapter_model.safetensors", "alpha/adapter_config.json"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--quantize", "int3"], "unknown --quantize value 'int3' (expected one of int8, int4)"),
        (["--quantize", "int8", "--group-size", "0"], "--group-size must be a positive number"),
        (["--group-size", "32"], "--group-size is only used with --quantize"),
    ],
)
def test_bad_quantize_options_are_refused_in_one_line_and_nothing_is_written(loras, tmp_path, cli, args, words):
    result = cli("fleet", *(loras / n for n in RANKS), "-o", tmp_path / "out", "--rank", 2, "--form", "sharea", *args)
    assert result.exit_code == 1 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fleet_add_refuses_a_quantized_fleet_naming_a_member(loras, tmp_path, cli):
    fleet = tmp_path / "q"
    result = cli(
        "fleet", loras / "alpha", loras / "beta", "-o", fleet, "--form", "sharea", "--rank", 2, "--quantize", "int8"
    )
    assert result.exit_code == 0, result.output
    before = {p: p.read_bytes() for p in fleet.rglob("*") if p.is_file()}
    for extra in ([], ["-o", tmp_path / "grown"]):
        result = cli("fleet-add", fleet, loras / "gamma", *extra)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"{fleet / 'alpha'}: a member of a quantized fleet" in result.output
    assert not (tmp_path / "grown").exists()
    assert {p: p.read_bytes() for p in fleet.rglob("*") if p.is_file()} == before


def test_a_clustered_fleet_stores_every_clusters_bases_quantized_once(loras, tmp_path, cli):
    make_peft_adapter(
        tiny_llama(layers=2), tmp_path / "delta", seed=9, r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]
    )
    args = ("--form", "shareab", "--rank", 2, "--clusters", 2)
    paths = [*(loras / n for n in RANKS), tmp_path / "delta"]
    result = cli("fleet", *paths, "-o", tmp_path / "q", "--json", *args, "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert cli("fleet", *paths, "-o", tmp_path / "float", *args).exit_code == 0
    header = read_header(tmp_path / "q" / "shared.safetensors")
    seen = set()
    for name in [*RANKS, "delta"]:
        got, ref = load_adapter(tmp_path / "q" / name), load_adapter(tmp_path / "float" / name)
        cluster = got.config["fleet"]["cluster"]
        shared = got.config["fleet"]["names"]
        assert shared and all(n.startswith(f"cluster{cluster}.") for n in shared)
        for n in shared:  # its cluster's bases: the float fleet's, quantized
            assert header[n]["dtype"] == "I8" and n in got.quantized
            np.testing.assert_array_equal(
                got.tensors[n].double().numpy(), _reference(ref.tensors[n], "int8", 0 if n.endswith("fleet_U") else 1)
            )
        seen.update(shared)
    assert seen == {n for n in header if not n.startswith("scale/")}  # every cluster's, each once
