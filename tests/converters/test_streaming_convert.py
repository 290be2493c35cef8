"""`convert` reads its input one tensor at a time from the file's memory map (StreamedTensors):
the same bytes out as reading the whole file, and every check the whole-file reader makes."""

import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from shareport import flows
from shareport.convert import convert_adapter
from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter, save_adapter
from shareport.files.folder import WEIGHTS_NAME, file_sha256
from shareport.files.tensorfile import StreamedTensors
from tests.tiny import make_peft_adapter, tiny_gpt2, tiny_llama

FORMS = [  # (form, options): every form and every way of sizing one
    ("sharea", {"rank": 3}),
    ("shareb", {"energy": 0.9}),
    ("shareab", {"rank": 2}),
    ("aslora", {}),
    ("lora", {"budget": 0.3}),
    ("lora", {}),
    ("auto", {"budget": 0.25}),
]
# every form on Llama; GPT-2's transposed Conv1D factors and fp16 storage on two
CASES = [("llama", *c) for c in FORMS] + [(w, *FORMS[i]) for w in ("gpt2", "half") for i in (0, 4)]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_peft_adapter(
        tiny_llama(layers=3), root / "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    make_peft_adapter(tiny_gpt2(), root / "gpt2", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    # half precision, as adapters trained in bf16/fp16 are stored
    half = root / "half"
    make_peft_adapter(tiny_llama(layers=3), half, r=4, target_modules=["q_proj", "o_proj"])
    tensors = load_file(half / WEIGHTS_NAME)
    save_file({k: v.half() for k, v in tensors.items()}, half / WEIGHTS_NAME)
    return root


@pytest.mark.parametrize("which,form,options", CASES)
def test_streamed_convert_writes_the_bytes_of_a_whole_file_read(loras, form, options, which, tmp_path):
    src = loras / which
    flows.convert(str(src), form, str(tmp_path / "streamed"), progress=False, **options)
    # the reference: the whole file read at once, as convert read it before streaming
    whole = load_adapter(src)
    assert isinstance(whole.tensors, dict)
    out, _ = convert_adapter(whole, form, source_digest=file_sha256(src / WEIGHTS_NAME), **options)
    save_adapter(out, tmp_path / "whole", as_peft=out.form == "lora")
    for name in (WEIGHTS_NAME, "adapter_config.json"):
        assert file_sha256(tmp_path / "streamed" / name) == file_sha256(tmp_path / "whole" / name), name


def test_streamed_adapter_holds_no_tensor(loras):
    adapter = load_adapter(loras / "llama", stream=True)
    assert isinstance(adapter.tensors, StreamedTensors)
    whole = load_adapter(loras / "llama")
    assert sorted(adapter.tensors) == sorted(whole.tensors) and adapter.sites == whole.sites
    for name in whole.tensors:
        assert torch.equal(adapter.tensors[name], whole.tensors[name])
        assert adapter.tensors[name] is not adapter.tensors[name]  # read afresh, never cached


def test_streamed_tensors_equal_the_library_reader_for_every_dtype(tmp_path):
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64),
        "f16": torch.randn(7, 3).half(),
        "bf16": torch.randn(9, 2).bfloat16(),
        "i8": torch.arange(-6, 7).to(torch.int8),
        "bool": torch.rand(5) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.0),
        "u16": torch.arange(7).to(torch.uint16),
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
        "big": torch.randn(70_001),  # spans pages, odd offset after
        "i64": torch.arange(5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    before = file_sha256(path)
    reference, streamed = load_file(path), StreamedTensors(path)
    assert sorted(streamed) == sorted(reference)
    for name, expected in reference.items():
        got = streamed[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if expected.numel():
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    streamed["big"].add_(1.0)  # a private copy of the page: the file is never written
    assert torch.equal(StreamedTensors(path)["big"], reference["big"]) and file_sha256(path) == before


def _rewrite(path, mutate):
    """Rewrite a safetensors file with ``mutate(tensors)`` applied."""
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


def test_streamed_read_keeps_every_check(loras, tmp_path):
    import shutil

    def broken(name, mutate=None, raw=None):
        folder = tmp_path / name
        shutil.copytree(loras / "llama", folder)
        if mutate:
            _rewrite(folder / WEIGHTS_NAME, mutate)
        if raw:
            raw(folder / WEIGHTS_NAME)
        return folder

    def nan(tensors):
        key = sorted(k for k in tensors if "lora_B" in k)[1]
        tensors[key][0, 0] = float("nan")

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])

    def forge_shape(path):  # a header claiming a larger tensor than its bytes
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = data[8 : 8 + n].decode().replace('"shape":[4,', '"shape":[40,', 1)
        header = header.ljust(n)[:n]
        path.write_bytes(data[:8] + header.encode() + data[8 + n :])

    cases = {
        "nan": (broken("nan", mutate=nan), "contains NaN or Inf"),
        "truncated": (broken("truncated", raw=truncate), "truncated or corrupt"),
        "forged": (broken("forged", raw=forge_shape), "does not fit the file"),
        "rank": (
            broken(
                "rank",
                mutate=lambda t: t.update(
                    {k: v[:3] for k, v in t.items() if "lora_A" in k and "layers.1.self_attn.q" in k}
                ),
            ),
            "rank",
        ),
    }
    for name, (folder, message) in cases.items():
        with pytest.raises(ShareportError, match=message) as streamed:
            load_adapter(folder, stream=True)
        with pytest.raises(ShareportError) as whole:
            load_adapter(folder)
        assert str(streamed.value) == str(whole.value), name
        assert str(folder) in str(streamed.value)
        with pytest.raises(ShareportError):
            flows.convert(str(folder), "sharea", str(tmp_path / f"out-{name}"), progress=False)
        assert not (tmp_path / f"out-{name}").exists()
