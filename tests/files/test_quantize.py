"""`shareport convert --quantize` end to end: every form stored as integers and float16 scales, read back
as the dequantized adapter, re-saved byte for byte, expanded into a LoRA PEFT loads, and counted by
`inspect` as the file's own bytes say."""

import copy
import json
import math
import shutil
import struct

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from shareport import flows
from shareport.errors import ShareportError
from shareport.files import load_adapter, save_adapter
from tests.tiny import input_ids, make_peft_adapter, tiny_llama

FORMS = ["lora", "sharea", "shareb", "shareab", "aslora"]
CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize") / "lora"
    make_peft_adapter(tiny_llama(), folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return folder


def _header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def _convert(cli, lora, out, *args):
    result = cli("convert", lora, "-o", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("form", FORMS)
def test_each_form_quantizes_within_half_a_scale_of_the_float_conversion(form, bits, lora, tmp_path, cli):
    size = ["--budget", "0.5"] if form == "lora" else ["--rank", "3"]
    _convert(cli, lora, tmp_path / "float", "--to", form, *size)
    report = _convert(cli, lora, tmp_path / "q", "--to", form, *size, "--quantize", bits)
    reference, quantized = load_adapter(tmp_path / "float"), load_adapter(tmp_path / "q")
    assert quantized.form == form and set(quantized.sites) == set(reference.sites)
    assert sorted(quantized.quantized) == quantized.used_tensor_names() == reference.used_tensor_names()
    header = _header(tmp_path / "q" / WTS)
    for name, record in quantized.quantized.items():
        assert header[name]["dtype"] == ("I8" if bits == "int8" else "U8")
        assert header["scale/" + name]["dtype"] == "F16"
        assert record.bits == int(bits[3:]) and record.group_size == 64
        # groups run along the model dimension: A (r, n_in) along axis 1, B (n_out, r) along axis 0
        assert record.axis == (1 if name.endswith("lora_A") else 0)
        scale = (
            record.scales.double()
            .repeat_interleave(64, record.axis)
            .narrow(record.axis, 0, record.values.shape[record.axis])
        )
        error = (quantized.tensors[name].double() - reference.tensors[name].double()).abs()
        assert bool((error <= scale / 2 * (1 + 1e-9)).all()), name
    q = report["quantization"]
    assert q["quantize"] == bits and 0 < q["relative_error"] < (0.01 if bits == "int8" else 0.25)
    assert quantized.provenance["history"][-1] == {
        "step": "quantize",
        "quantize": bits,
        "bits": int(bits[3:]),
        "group_size": 64,
        "scheme": "symmetric",
    }


def test_a_quantized_adapter_is_resaved_byte_for_byte(lora, tmp_path, cli):
    _convert(cli, lora, tmp_path / "q", "--to", "shareb", "--rank", "3", "--quantize", "int4", "--group-size", "16")
    adapter = load_adapter(tmp_path / "q")
    save_adapter(adapter, tmp_path / "again")
    for name in (CFG, WTS):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name
    # the float tensors are the dequantized integers
    for name, record in adapter.quantized.items():
        assert torch.equal(adapter.tensors[name], record.dequantize())
    # a new pool (any later conversion or training) drops the integers: stored as floats again
    plain = adapter.with_sites(dict(adapter.tensors), dict(adapter.sites), adapter.form)
    save_adapter(plain, tmp_path / "plain")
    assert {e["dtype"] for e in _header(tmp_path / "plain" / WTS).values()} == {"F32"}


def test_same_input_gives_the_same_bytes(lora, tmp_path, cli):
    for out in ("a", "b"):
        _convert(cli, lora, tmp_path / out, "--to", "aslora", "--quantize", "int4")
    for name in (CFG, WTS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_to_lora_dequantizes_into_a_lora_peft_loads(lora, tmp_path, cli):
    _convert(cli, lora, tmp_path / "q", "--to", "shareab", "--rank", "3", "--quantize", "int4")
    _convert(cli, tmp_path / "q", tmp_path / "peft", "--to", "lora")
    assert "shareport" not in json.loads((tmp_path / "peft" / CFG).read_text())
    base = tiny_llama()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    # the reference: the base with each site's dequantized update added by hand
    quantized = load_adapter(tmp_path / "q")
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for path in quantized.sites:
            merged.get_submodule(path).weight += quantized.update(path)
    ids = input_ids()
    with torch.no_grad():
        expected, got = merged(ids).logits, peft_model(ids).logits
    assert not torch.allclose(expected, base(ids).logits, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4", None])
def test_inspect_counts_the_files_bytes(bits, lora, tmp_path, cli):
    _convert(cli, lora, tmp_path / "float", "--to", "sharea", "--rank", "3")
    folder = tmp_path / "float"
    if bits:
        _convert(cli, lora, tmp_path / "q", "--to", "sharea", "--rank", "3", "--quantize", bits)
        folder = tmp_path / "q"
    result = cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    storage = json.loads(result.stdout)["storage"]
    # independent: bytes from the file's own header; parameters from the float conversion's shapes
    stored = sum(
        e["data_offsets"][1] - e["data_offsets"][0]
        for k, e in _header(folder / WTS).items()
        if not k.startswith("extra/")
    )
    parameters = sum(math.prod(e["shape"]) for e in _header(tmp_path / "float" / WTS).values())
    assert storage["bytes"] == stored
    assert storage["bits_per_parameter"] == pytest.approx(8 * stored / parameters)
    assert storage["float32_bytes"] == 4 * parameters
    if bits:
        assert storage["quantized_bits"] == [int(bits[3:])] and storage["group_sizes"] == [64]
        assert storage["bits_per_parameter"] < (8.6 if bits == "int8" else 4.6)
    text = cli("inspect", folder).output
    assert f"{storage['bits_per_parameter']:.2f} bits per parameter" in text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--quantize", "int3"], "Invalid value for '--quantize'"),
        (["--quantize", "int4", "--group-size", "0"], "--group-size must be a positive"),
        (["--group-size", "32"], "--group-size is only used with --quantize"),
    ],
)
def test_bad_options_are_refused_and_nothing_is_written(args, words, lora, tmp_path, cli):
    result = cli("convert", lora, "--to", "shareab", "-o", tmp_path / "out", *args)
    assert result.exit_code != 0 and words in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_an_unknown_quantization(lora, tmp_path):
    with pytest.raises(ShareportError, match="unknown --quantize value 'int3'"):
        flows.convert(str(lora), "shareab", str(tmp_path / "out"), quantize="int3", progress=False)
    assert not (tmp_path / "out").exists()


def _drop_scale(folder):
    state = load_file(str(folder / WTS))
    del state[min(k for k in state if k.startswith("scale/"))]
    save_file(state, str(folder / WTS))


def _widen_scale(folder):
    state = load_file(str(folder / WTS))
    key = min(k for k in state if k.startswith("scale/"))
    state[key] = state[key].float()
    save_file(state, str(folder / WTS))


def _bad_bits(folder):
    cfg = json.loads((folder / CFG).read_text())
    entry = next(iter(cfg["shareport"]["quantization"]["tensors"].values()))
    entry["bits"] = 3
    (folder / CFG).write_text(json.dumps(cfg))


def _version_one(folder):
    cfg = json.loads((folder / CFG).read_text())
    cfg["shareport"]["format_version"] = 1
    (folder / CFG).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "breaker, words",
    [
        (_drop_scale, "or its scales are missing"),
        (_widen_scale, "must be float16"),
        (_bad_bits, "needs bits (4 or 8)"),
        (_version_one, "format_version 1 is not supported"),
    ],
)
def test_a_broken_quantized_adapter_is_refused_in_one_line(breaker, words, lora, tmp_path, cli):
    _convert(cli, lora, tmp_path / "q", "--to", "shareab", "--rank", "3", "--quantize", "int4")
    shutil.copytree(tmp_path / "q", tmp_path / "bad")
    breaker(tmp_path / "bad")
    result = cli("inspect", tmp_path / "bad")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0] and "bad" in lines[0], lines
