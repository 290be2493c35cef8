"""onnxruntime-genai and ``shareport generate``: with-past exports against PyTorch PEFT's greedy tokens.

One tiny Llama with a real PEFT LoRA (and a second LoRA of another rank and seed), exported
with past folded and in adapter mode, and once without past. The genai tests run
``og.Generator`` on the folders as exported (their own ``genai_config.json``) from token ids, and
are skipped where ``onnxruntime_genai`` does not import; the ORT-loop, config, Olive-name and
doctor tests run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shareport.errors import ShareportError
from shareport.export import doctor, graph_file
from shareport.export.exporter import ExportOptions, export
from shareport.export.generate import genai_available, generate_ids
from shareport.export.ort_adapter import read_onnx_adapter, write_onnx_adapter
from tests.onnx_cases import make_case
from tests.tiny import TARGETS, VOCAB, make_peft_adapter, tiny_llama

needs_genai = pytest.mark.skipif(
    not genai_available(),
    reason="onnxruntime_genai is not importable (pip install --no-deps onnxruntime-genai, or onnxruntime-genai-cuda)",
)
PROMPT = [5, 9, 17, 33, 40]
NEW = 10


def save_word_tokenizer(folder: Path, pad: bool = True) -> None:
    """A word-level tokenizer over the tiny vocabulary: 'w5 w9' <-> [5, 9]; 0 is '<pad>', or without
    ``pad`` the plain word 'w0' (the tokenizer then has no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>" if pad else "w0": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>" if pad else "w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>") if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **special).save_pretrained(folder)


def _export(adapter, base, out, **options):
    return export(adapter, base, out, ExportOptions(**options), progress=False, verify=False)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    base, lora = make_case(root, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    save_word_tokenizer(base)
    lora2 = root / "lora2"
    make_peft_adapter(tiny_llama(layers=2), lora2, seed=7, r=2, lora_alpha=6, target_modules=TARGETS["llama"])
    folded = _export(lora, base, root / "folded", mode="folded", with_past=True)
    adapted = _export(lora, base, root / "adapted", mode="adapter", with_past=True)
    plain = _export(lora, base, root / "plain", mode="folded")
    return SimpleNamespace(
        root=root,
        base=base,
        lora=lora,
        lora2=lora2,
        folded=folded.path,
        adapted=adapted.path,
        plain=plain.path,
        notes={"folded": folded.genai_config, "plain": plain.genai_config},
    )


def _peft(base, lora=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    return PeftModel.from_pretrained(model, str(lora)).eval() if lora else model


def torch_tokens(base, lora=None, prompt=PROMPT, steps=NEW, eos=2) -> list[int]:
    """PyTorch (PEFT) greedy ``generate``: new tokens only, stopping at the config's eos like both engines."""
    from transformers import GenerationConfig

    model = _peft(base, lora)
    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def want(case):
    """Greedy tokens per adapter: the exported LoRA, the second one, none (the base model)."""
    return {
        "lora": torch_tokens(case.base, case.lora),
        "lora2": torch_tokens(case.base, case.lora2),
        "base": torch_tokens(case.base),
    }


@pytest.fixture(scope="module")
def lora2_file(case):
    from shareport import flows

    return flows.export_adapter(str(case.lora2), str(case.adapted), str(case.root / "lora2.onnx_adapter"))["output"]


# --- genai_config.json and side files (no genai needed) ---


def test_with_past_export_writes_genai_config_from_the_model(case):
    config = json.loads((case.folded / "genai_config.json").read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert (model["type"], model["context_length"], model["vocab_size"]) == ("llama", 64, VOCAB)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 0)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (4, 2, 8)
    assert (decoder["num_hidden_layers"], decoder["hidden_size"], decoder["filename"]) == (2, 32, "model.onnx")
    assert decoder["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"] == {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    assert config["search"]["past_present_share_buffer"] is False and config["search"]["do_sample"] is False
    assert (case.adapted / "genai_config.json").is_file()
    assert "wrote genai_config.json" in case.notes["folded"]


def test_no_past_export_has_no_genai_config_says_why_and_no_cache(case):
    assert not (case.plain / "genai_config.json").exists()
    assert "--with-past" in case.notes["plain"]
    assert json.loads((case.plain / "config.json").read_text())["use_cache"] is False
    assert json.loads((case.folded / "config.json").read_text())["use_cache"] is True


def test_decoder_exports_give_optimum_what_it_reads(case):
    """No token_type_ids from the tokenizer (a decoder graph has no such input); use_cache as the graph in
    generation_config.json too. With Optimum installed, its ORTModelForCausalLM loads the no-past folder."""
    from transformers import AutoTokenizer

    for folder in (case.plain, case.folded):
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_input_names"] == [
            "input_ids",
            "attention_mask",
        ]
        # transformers 4's PreTrainedTokenizerFast (what the file names) adds token_type_ids unless told
        assert set(AutoTokenizer.from_pretrained(str(folder))("w5 w9")) == {"input_ids", "attention_mask"}
    assert json.loads((case.plain / "generation_config.json").read_text())["use_cache"] is False
    assert json.loads((case.folded / "generation_config.json").read_text())["use_cache"] is True
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:
        return
    model = ORTModelForCausalLM.from_pretrained(str(case.plain), use_cache=False)
    tok = AutoTokenizer.from_pretrained(str(case.plain))
    out = model.generate(
        **tok(" ".join(f"w{i}" for i in PROMPT), return_tensors="pt"), max_new_tokens=NEW, do_sample=False
    )
    assert out[0, len(PROMPT) :].tolist() == torch_tokens(case.base, case.lora)


def test_exported_tokenizer_config_names_a_class_transformers_4_knows(case):
    from transformers import AutoTokenizer

    assert json.loads((case.base / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert (
        json.loads((case.folded / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    tok = AutoTokenizer.from_pretrained(str(case.folded))
    assert tok("w5 w9 w17")["input_ids"] == [5, 9, 17]


def test_genai_model_type_falls_back_to_generic_decoder():
    from shareport.export.genai_config import genai_config
    from shareport.export.signature import Signature

    sig = Signature(True, True, ("input_ids", "attention_mask", "position_ids"), "logits", 3, 2, 16, 100)
    data = genai_config({"model_type": "falcon", "n_head": 4, "n_embd": 64, "eos_token_id": [7, 8]}, sig)
    assert data["model"]["type"] == "decoder"
    assert data["model"]["eos_token_id"] == [7, 8] and data["model"]["pad_token_id"] == 7
    assert data["model"]["decoder"]["num_attention_heads"] == 4 and data["model"]["context_length"] == 2048


def _without_token_ids(base: Path) -> None:
    """config.json with null bos/eos/pad and no generation_config.json: the ids live in the tokenizer only."""
    config = json.loads((base / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    (base / "config.json").write_text(json.dumps(config))
    (base / "generation_config.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tokenizer_ids(tmp_path_factory):
    """A base whose special tokens are known only to its tokenizer, which has no pad; exported with past."""
    root = tmp_path_factory.mktemp("tokenizer-ids")
    base, lora = make_case(root, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    _without_token_ids(base)
    save_word_tokenizer(base, pad=False)
    result = _export(lora, base, root / "out", mode="folded", with_past=True)
    return SimpleNamespace(base=base, lora=lora, out=result.path, note=result.genai_config)


def test_genai_config_takes_special_tokens_from_the_tokenizer_and_eos_as_pad(tokenizer_ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_ids.base))
    assert tok.pad_token_id is None and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    model = json.loads((tokenizer_ids.out / "genai_config.json").read_text())["model"]
    assert (model["bos_token_id"], model["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert model["pad_token_id"] == tok.eos_token_id  # what transformers' generate pads with when there is no pad
    assert f"pad_token_id = eos {tok.eos_token_id}" in tokenizer_ids.note and "\n" not in tokenizer_ids.note


def test_special_tokens_come_from_config_then_generation_config_then_tokenizer(tmp_path):
    from shareport.export.genai_config import special_tokens

    save_word_tokenizer(tmp_path)  # bos 1, eos 2, pad 0
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 6], "bos_token_id": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": 8}))
    tokens = special_tokens(tmp_path)
    assert (tokens.bos, tokens.eos, tokens.pad, tokens.note) == (7, [5, 6], 0, "")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ShareportError, match="config.json: eos_token_id must be a token id"):
        special_tokens(tmp_path)


def test_with_past_export_of_a_base_without_any_eos_is_refused_before_it_starts(tmp_path, cli):
    base, lora = make_case(tmp_path, lambda: tiny_llama(layers=1), r=2, lora_alpha=4, target_modules=["q_proj"])
    _without_token_ids(base)  # and no tokenizer files
    result = cli("export", lora, "--base", base, "-o", tmp_path / "out", "--with-past", "--no-verify")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert (
        result.output.startswith(
            f"Error: {base}: no eos token id in config.json, generation_config.json or the tokenizer"
        )
        and len(result.output.strip().splitlines()) == 1
    )


# --- shareport generate with ONNX Runtime's loop (no genai needed) ---


def test_ort_loop_matches_pytorch_peft_greedy_per_adapter(case, want, lora2_file):
    engine, runs = generate_ids(case.folded, PROMPT, max_new_tokens=NEW, engine="ort")
    assert engine == "ort" and runs[0].tokens == want["lora"]
    _, runs = generate_ids(
        case.adapted, PROMPT, [case.adapted / graph_file.ADAPTER_NAME, lora2_file], max_new_tokens=NEW, engine="ort"
    )
    assert [r.tokens for r in runs] == [want["lora"], want["lora2"]]
    _, runs = generate_ids(case.adapted, PROMPT, max_new_tokens=NEW, engine="ort", no_adapter=True)
    assert runs[0].tokens == want["base"]
    assert len(set(map(tuple, want.values()))) == 3, (
        "the adapters must change the tokens for this test to mean anything"
    )
    assert min(len(t) for t in want.values()) >= 8, want


@pytest.mark.parametrize("given", ["int", "list", "missing"])
def test_ort_generate_stops_at_the_eos_config_json_gives(case, want, tmp_path, given):
    """config.json's eos_token_id as one int, a list, or absent (no genai_config.json to read instead)."""
    import shutil

    tokens = want["lora"]
    stop = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    folder = tmp_path / "folder"
    shutil.copytree(case.folded, folder)
    (folder / "genai_config.json").unlink()
    (folder / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = {"int": tokens[stop], "list": [VOCAB - 1, tokens[stop]], "missing": None}[given]
    (folder / "config.json").write_text(json.dumps(config))
    _, (run,) = generate_ids(folder, PROMPT, max_new_tokens=NEW, engine="ort")
    assert run.tokens == (tokens if given == "missing" else tokens[: stop + 1])


def test_cli_generate_prints_the_greedy_text(case, want, cli):
    prompt = " ".join(f"w{i}" for i in PROMPT)
    result = cli("generate", case.adapted, "--prompt", prompt, "--max-new-tokens", NEW, "--engine", "ort", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["prompt_ids"] == PROMPT and data["engine"] == "ort"
    (run,) = data["runs"]
    assert run["tokens"] == want["lora"] and run["adapter"].endswith(graph_file.ADAPTER_NAME)
    assert run["text"] == " ".join(f"w{i}" for i in want["lora"] if i > 2)
    text = cli("generate", case.folded, "--prompt", prompt, "--max-new-tokens", NEW, "--engine", "ort")
    assert text.exit_code == 0 and text.output.strip() == run["text"]


def test_generate_refuses_a_graph_without_past_and_adapters_on_folded(case, cli):
    result = cli("generate", case.plain, "--prompt", "w5", "--engine", "ort")
    assert result.exit_code != 0 and "--with-past" in result.output
    result = cli("generate", case.folded, "--prompt", "w5", "--adapter", case.adapted / graph_file.ADAPTER_NAME)
    assert result.exit_code != 0 and "folded graph" in result.output
    garbage = case.root / "garbage.onnx_adapter"
    garbage.write_bytes(b"not an adapter")
    result = cli("generate", case.adapted, "--prompt", "w5", "--adapter", garbage)
    assert result.exit_code != 0 and "not a readable .onnx_adapter" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- onnxruntime-genai ---


def _og_tokens(folder, adapters=None, name=None, prompt=PROMPT, steps=NEW) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder)) if adapters is None else adapters[0]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    if name:
        generator.set_active_adapter(adapters[1], name)
    generator.append_tokens(np.asarray([prompt], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


@needs_genai
def test_genai_folded_export_generates_peft_greedy_tokens(case, want):
    assert _og_tokens(case.folded) == want["lora"]


@needs_genai
def test_genai_adapters_switch_per_generator(case, want, lora2_file):
    import onnxruntime_genai as og

    model = og.Model(str(case.adapted))
    adapters = og.Adapters(model)
    adapters.load(str(case.adapted / graph_file.ADAPTER_NAME), "exported")
    adapters.load(lora2_file, "second")
    handles = (model, adapters)
    # interleaved: each generator has its own active adapter on the one model
    assert _og_tokens(case.adapted, handles, "exported") == want["lora"]
    assert _og_tokens(case.adapted, handles, "second") == want["lora2"]
    assert _og_tokens(case.adapted, handles, None) == want["base"]
    assert _og_tokens(case.adapted, handles, "exported") == want["lora"]


@needs_genai
def test_generate_auto_uses_genai_and_agrees_with_the_ort_loop(case, want, lora2_file):
    engine, runs = generate_ids(
        case.adapted, PROMPT, [case.adapted / graph_file.ADAPTER_NAME, lora2_file], max_new_tokens=NEW
    )
    assert engine == "genai" and [r.tokens for r in runs] == [want["lora"], want["lora2"]]


@needs_genai
def test_genai_batch_of_prompts_of_different_lengths_matches_peft_per_prompt(tokenizer_ids):
    """A batch padded with the tokenizer's pad (eos, as it has none) gives each prompt's own greedy tokens."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_ids.base))
    pad, eos = tok.eos_token_id, tok.eos_token_id
    prompts = [PROMPT, [7, 0, 12]]  # 0 is a plain word here: a genai that took it for the pad would mask it
    want = [torch_tokens(tokenizer_ids.base, tokenizer_ids.lora, p, eos=eos) for p in prompts]
    model = og.Model(str(tokenizer_ids.out))
    width = max(map(len, prompts))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([p + [pad] * (width - len(p)) for p in prompts], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [[int(t) for t in generator.get_sequence(i)][width:] for i in range(len(prompts))]
    got = [g[: g.index(eos) + 1] if eos in g else g for g in got]
    assert got == want and want[0] != want[1]


def test_gpt2_export_is_a_generic_decoder_for_genai(tmp_path):
    """genai's own "gpt2" model expects another cache layout; the export says "decoder" and runs."""
    from tests.tiny import tiny_gpt2

    base, lora = make_case(tmp_path, tiny_gpt2, r=4, lora_alpha=8, target_modules=TARGETS["gpt2"], fan_in_fan_out=True)
    out = _export(lora, base, tmp_path / "gpt2", mode="folded", with_past=True).path
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "decoder"
    want = torch_tokens(base, lora)
    assert generate_ids(out, PROMPT, max_new_tokens=NEW, engine="ort")[1][0].tokens == want
    if genai_available():
        assert _og_tokens(out) == want


# --- Olive's adapter names ---


def _olive_file(case, tmp_path, arrays=None) -> Path:
    arrays = arrays or read_onnx_adapter(case.adapted / graph_file.ADAPTER_NAME)
    path = tmp_path / "olive.onnx_adapter"
    write_onnx_adapter({f"{n}.weight": a for n, a in arrays.items()}, path)
    return path


def test_export_adapter_maps_olive_weight_names(case, tmp_path, cli, want):
    out = tmp_path / "mapped.onnx_adapter"
    result = cli("export-adapter", _olive_file(case, tmp_path), "--graph", case.adapted, "-o", out)
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "Olive" in result.output
    assert sorted(read_onnx_adapter(out)) == sorted(read_onnx_adapter(case.adapted / graph_file.ADAPTER_NAME))
    _, runs = generate_ids(case.adapted, PROMPT, [_olive_file(case, tmp_path)], max_new_tokens=NEW, engine="ort")
    assert runs[0].tokens == want["lora"] and "Olive" in runs[0].note


def test_olive_adapter_with_wrong_rank_is_refused_clearly(case, tmp_path, cli):
    arrays = read_onnx_adapter(case.adapted / graph_file.ADAPTER_NAME)
    name = next(n for n in sorted(arrays) if n.endswith("lora_A"))
    arrays[name] = np.ascontiguousarray(arrays[name][:, :3])
    result = cli("export-adapter", _olive_file(case, tmp_path, arrays), "--graph", case.adapted, "-o", tmp_path / "x")
    assert result.exit_code != 0 and "ranks 3 and 4" in result.output and "rank dim" in result.output
    assert not (tmp_path / "x").exists()


def test_export_with_olive_names_verifies_and_takes_shareport_adapters(case, tmp_path, want, cli):
    from shareport import flows

    out = tmp_path / "olive-names"
    result = export(
        case.lora, case.base, out, ExportOptions(mode="adapter", with_past=True, adapter_names="olive"), progress=False
    )
    assert result.report.ok
    names = read_onnx_adapter(out / graph_file.ADAPTER_NAME)
    assert names and all(n.endswith(".lora_A.weight") or n.endswith(".lora_B.weight") for n in names)
    second = flows.export_adapter(str(case.lora2), str(out), str(tmp_path / "second.onnx_adapter"))["output"]
    assert all(n.endswith(".weight") for n in read_onnx_adapter(second))
    _, runs = generate_ids(out, PROMPT, [out / graph_file.ADAPTER_NAME, second], max_new_tokens=NEW)
    assert [r.tokens for r in runs] == [want["lora"], want["lora2"]]
    refused = cli("export", case.lora, "--base", case.base, "--onnx", tmp_path / "x", "--adapter-names", "olive")
    assert refused.exit_code != 0 and "--mode adapter" in refused.output


def test_verify_accepts_a_shipped_adapter_with_olive_names(case, tmp_path):
    import shutil

    from shareport.export.verify import verify

    folder = tmp_path / "olive-graph"
    shutil.copytree(case.adapted, folder)
    shutil.copy(_olive_file(case, tmp_path), folder / graph_file.ADAPTER_NAME)
    report = verify(folder, case.base, case.lora)
    assert report.ok and report.notes and "Olive" in report.notes[0]


# --- doctor ---


def test_doctor_warns_when_two_onnxruntime_wheels_are_installed():
    clash = doctor.doctor({"onnxruntime": "1.31.0", "onnxruntime-gpu": "1.31.1", "onnxruntime-genai": "0.18.0"})
    (line,) = clash["warnings"]
    assert "onnxruntime 1.31.0 and onnxruntime-gpu 1.31.1" in line and "'onnxruntime/'" in line
    assert not doctor.clashes({"onnxruntime-gpu": "1.31.1", "onnxruntime-genai-cuda": "0.18.0"})
    assert len(doctor.clashes({"onnxruntime-genai": "0.18", "onnxruntime-genai-cuda": "0.18"})) == 1


def test_doctor_cli_reports_versions_and_working_providers(cli):
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["torch"]["version"] and data["onnxruntime"]["version"]
    assert "CPUExecutionProvider" in data["onnxruntime"]["providers_working"]
    assert set(data["distributions"]) <= set(doctor.ORT_DISTRIBUTIONS + doctor.GENAI_DISTRIBUTIONS)


# --- provider selection (runtime.providers) with a stubbed onnxruntime ---


def _fake_ort(listed, runs_on=None, raises=None, preload=True):
    """An ``onnxruntime`` stand-in: ``runs_on`` is what a session reports, ``raises`` what it throws."""
    import types

    calls = []
    fake = types.ModuleType("onnxruntime")
    fake.get_available_providers = lambda: list(listed)
    fake.SessionOptions = types.SimpleNamespace

    def session(model, options, providers):
        if raises:
            raise raises
        return types.SimpleNamespace(get_providers=lambda: list(runs_on))

    fake.InferenceSession = session
    if preload:

        def preload_dlls():
            calls.append("preload")
            print("Failed to load libcudart.so.12: cannot open shared object file")

        fake.preload_dlls = preload_dlls
    return fake, calls


@pytest.fixture
def stub_ort(monkeypatch):
    import sys

    from shareport.export import runtime

    def install(*args, **kwargs):
        fake, calls = _fake_ort(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "onnxruntime", fake)
        runtime._selection.cache_clear()
        return calls

    yield install
    runtime._selection.cache_clear()


def test_cuda_is_chosen_after_preloading_its_libraries(stub_ort, capsys):
    from shareport.export import runtime

    calls = stub_ort([runtime.CUDA, runtime.CPU], runs_on=[runtime.CUDA, runtime.CPU])
    assert runtime.providers() == (runtime.CUDA, runtime.CPU) and runtime.provider_note() == ""
    assert calls == ["preload"] and capsys.readouterr().out == ""  # what preload printed is not output


def test_cpu_fallback_says_why_in_one_line(stub_ort, capsys):
    from shareport.export import runtime

    stub_ort([runtime.CUDA, runtime.CPU], runs_on=[runtime.CPU])
    assert runtime.providers() == (runtime.CPU,)
    note = runtime.provider_note()
    assert "libcudart.so.12" in note and note.endswith(f"using {runtime.CPU}") and "\n" not in note
    assert capsys.readouterr().out == ""
    stub_ort(
        [runtime.CUDA, runtime.CPU], raises=RuntimeError("CUDA driver version is insufficient\nmore"), preload=False
    )
    assert runtime.providers() == (runtime.CPU,) and "CUDA driver version is insufficient" in runtime.provider_note()
    calls = stub_ort([runtime.CPU])
    assert runtime.providers() == (runtime.CPU,) and runtime.provider_note() == "" and calls == []


@pytest.mark.parametrize("mode", ["folded", "adapter"])
def test_ort_generate_on_an_fp16_with_past_export_gives_the_fp32_tokens(case, want, tmp_path, mode):
    """``generate --engine ort`` on an fp16 ``--with-past`` export runs (its past is fp16 too) and gives
    the fp32 export's greedy tokens, which are PEFT's."""
    fp16 = _export(case.lora, case.base, tmp_path / mode, mode=mode, with_past=True, dtype="fp16").path
    engine, (run,) = generate_ids(fp16, PROMPT, max_new_tokens=NEW, engine="ort")
    fp32 = case.folded if mode == "folded" else case.adapted
    _, (reference,) = generate_ids(fp32, PROMPT, max_new_tokens=NEW, engine="ort")
    assert engine == "ort" and run.tokens == reference.tokens == want["lora"]
