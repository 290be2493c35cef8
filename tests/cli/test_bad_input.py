"""Bad adapter folders, across commands: each gets one clear line naming the file and the
problem, a non-zero exit, nothing written, and an untouched input (checksums)."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import make_peft_adapter, tiny_llama

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CFG).read_text())
    cfg.update(changes)
    (folder / CFG).write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    state = load_file(str(folder / WTS))
    save_file(fn(state), str(folder / WTS))


def _rename_keys(state, old, new):
    return {k.replace(old, new): v for k, v in state.items()}


def _shrink_B(state):
    key = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
    state[key] = state[key][:, :1].contiguous()
    return state


def _huge_header(folder):
    header = {"x.lora_A.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}
    raw = json.dumps(header).encode()
    (folder / WTS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)


def _nan(state):
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    return state


def _inf(state):
    key = sorted(state)[-1]
    state[key] = state[key].clone()
    state[key][0, 0] = float("inf")
    return state


def _zero_rank(state):
    return {k: (v[:0] if "lora_A" in k else v[:, :0]).contiguous() for k, v in state.items()}


def _drop_one_B(state):
    del state[next(k for k in sorted(state) if k.endswith("lora_B.weight"))]
    return state


def _four_d(state):
    return {k: v[:, :, None, None].contiguous() if "lora_A" in k else v for k, v in state.items()}


def _integer(state):
    """The last lora_B as int32 (as a careless quantiser might leave it): refused, never cast."""
    key = max(k for k in state if k.endswith("lora_B.weight"))
    state[key] = (state[key] * 100).to(torch.int32)
    return state


INTEGER_B = "'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' has dtype int32"


def _native(folder, form=None, rename_a=None, scale=None, format_version=None):
    """Rewrite the folder as a native (shareport) adapter, then break one thing."""
    from shareport.files.adapters import load_adapter, write_adapter_files

    adapter = load_adapter(folder)
    for p in folder.iterdir():
        p.unlink()
    write_adapter_files(adapter, folder, as_peft=False)
    cfg = json.loads((folder / CFG).read_text())
    section = cfg["shareport"]
    site = section["sites"][sorted(section["sites"])[0]]
    if form:
        section["form"] = form
    if rename_a:
        site["A"] = rename_a
    if scale:
        site["scale"] = scale
    if format_version:
        section["format_version"] = format_version
    (folder / CFG).write_text(json.dumps(cfg))


def _native_integer(folder):
    _native(folder)
    state = load_file(str(folder / WTS))
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int8)
    save_file(state, str(folder / WTS))
    return key


# name -> (how to break the folder, words the error must contain)
CASES = {
    "missing config": (lambda f: (f / CFG).unlink(), "missing adapter config"),
    "missing weights": (lambda f: (f / WTS).unlink(), "missing adapter weights"),
    "malformed json": (lambda f: (f / CFG).write_text("{not json"), "malformed JSON"),
    "config not an object": (lambda f: (f / CFG).write_text("[1, 2]"), "expected a JSON object"),
    "truncated safetensors": (lambda f: (f / WTS).write_bytes((f / WTS).read_bytes()[:-40]), "truncated"),
    "huge declared shape": (_huge_header, "does not fit the file"),
    "A/B shape mismatch": (lambda f: _edit_weights(f, _shrink_B), "disagree on the rank"),
    "unknown key layout": (
        lambda f: _edit_weights(f, lambda s: _rename_keys(s, "base_model.model.", "")),
        "unknown key layout",
    ),
    "no numbered blocks": (
        lambda f: _edit_weights(f, lambda s: _rename_keys(s, "model.layers.", "model.layers_")),
        "unknown key layout",
    ),
    "DoRA": (lambda f: _edit_config(f, use_dora=True), "DoRA"),
    "lora bias": (lambda f: _edit_config(f, lora_bias=True), "lora_bias"),
    "rank disagrees with config": (lambda f: _edit_config(f, r=3), "says r=3"),
    "r of wrong type": (lambda f: _edit_config(f, r="8"), "field 'r' must be int"),
    "NaN weights": (lambda f: _edit_weights(f, _nan), "NaN or Inf"),
    "embedding LoRA": (
        lambda f: _edit_weights(f, lambda s: _rename_keys(s, "lora_A.weight", "lora_embedding_A")),
        "embedding LoRA",
    ),
    "not LoRA": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type 'IA3'"),
    "Inf weights": (lambda f: _edit_weights(f, _inf), "NaN or Inf"),
    "zero rank": (lambda f: _edit_weights(f, _zero_rank), "rank 0"),
    "alpha of wrong type": (lambda f: _edit_config(f, lora_alpha="16"), "field 'lora_alpha' must be"),
    "rank_pattern disagrees": (lambda f: _edit_config(f, rank_pattern={"q_proj": 3}), "says r=3"),
    "rank_pattern bad value": (lambda f: _edit_config(f, rank_pattern={"q_proj": "3"}), "rank_pattern"),
    "layers_to_transform excludes": (lambda f: _edit_config(f, layers_to_transform=[5]), "layers_to_transform"),
    "target_modules wrong type": (lambda f: _edit_config(f, target_modules=5), "target_modules"),
    "modules_to_save wrong type": (lambda f: _edit_config(f, modules_to_save=[1]), "modules_to_save"),
    "use_rslora wrong type": (lambda f: _edit_config(f, use_rslora="yes"), "use_rslora"),
    "missing lora_B": (lambda f: _edit_weights(f, _drop_one_B), "no lora_B"),
    "conv LoRA": (lambda f: _edit_weights(f, _four_d), "convolution LoRA"),
    "empty weights file": (lambda f: (f / WTS).write_bytes(b""), "not a safetensors file"),
    "header not JSON": (lambda f: (f / WTS).write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
    "native: unknown form": (lambda f: _native(f, form="sharez"), "unknown form"),
    "native: missing tensor": (lambda f: _native(f, rename_a="nope"), "is missing"),
    "native: bad scale": (lambda f: _native(f, scale="x"), "invalid scale"),
    "native: wrong version": (lambda f: _native(f, format_version=9), "format_version"),
    "integer factors": (lambda f: _edit_weights(f, _integer), INTEGER_B),
    "native: integer factor": (_native_integer, "has dtype int8; LoRA factors must be floating point"),
}


def _checksums(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "lora"
    make_peft_adapter(tiny_llama(layers=2), folder, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return folder


COMMANDS = {
    "inspect": lambda folder, out: ["inspect", folder],
    "convert": lambda folder, out: ["convert", folder, "--to", "sharea", "-o", out],
    "convert-to-lora": lambda folder, out: ["convert", folder, "--to", "lora", "-o", out],
}


def check_refused(name, args, good_adapter, tmp_path, cli, watched=(), progress=False):
    """Break a copy of ``good_adapter`` as CASES[name] says, run the command ``args(folder, out)``:
    one line naming the folder and the problem, non-zero exit, nothing written to ``tmp_path``, and
    the folder (and every folder in ``watched``) unchanged. ``progress``: the command may also
    show a progress display (on stderr) before the error line."""
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(good_adapter, folder)
    breaker, words = CASES[name]
    breaker(folder)
    before = [_checksums(f) for f in (folder, *watched)]
    result = cli(*args(folder, tmp_path / "out"))
    assert result.exit_code != 0
    message = result.output.strip().splitlines()
    if progress:
        message = [line for line in message if line.startswith("Error")]
    assert len(message) == 1, result.output
    assert message[0].startswith("Error:") and words in message[0] and str(folder) in message[0], message[0]
    assert [_checksums(f) for f in (folder, *watched)] == before, "an input was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"], "something was written"


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_adapter_is_refused(name, command, good_adapter, tmp_path, cli):
    check_refused(name, COMMANDS[command], good_adapter, tmp_path, cli)


def test_good_adapter_inspects(good_adapter, cli):
    result = cli("inspect", good_adapter, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["form"] == "lora" and info["ranks"] == [2]
    assert info["parameters"] == sum(t.numel() for t in load_file(str(good_adapter / WTS)).values())
    norms = [row["update_norm"] for row in info["kinds"]["self_attn.q_proj"]["layers"]]
    state = load_file(str(good_adapter / WTS))
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert norms[0] == pytest.approx(float(torch.linalg.norm(2.0 * b @ a)), rel=1e-5)
