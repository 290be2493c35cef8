"""ONNX export against PyTorch: families x modes x forms, with past, fp16, greedy generation.

Exports are the slow part (seconds each), so each is made once per module and shared.
Matrix: Llama LoRA folded+adapter with past; GPT-2 ASLoRA-like adapter with past and folded fp16;
BERT (classifier head carried as modules_to_save) LoRA folded and ShareA adapter, through the CLI.
"""

import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.signature import Signature, make_inputs
from shareport.export.verify import verify
from shareport.files.adapters import load_adapter
from shareport.model import attach, fold, load_base_model
from tests.onnx_cases import make_case, ort_greedy, torch_greedy
from tests.tiny import TARGETS, tiny_bert, tiny_gpt2, tiny_llama


def _export(adapter, base, out, **options):
    return export(adapter, base, out, ExportOptions(**options), progress=False, verify=False).path


def _signature(graph) -> Signature:
    proto = graph_file.load_proto(graph)
    return Signature.from_dict(graph_file.read_info(proto, graph)["signature"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, adapter = make_case(root, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    return SimpleNamespace(
        base=base,
        adapter=adapter,
        folded=_export(adapter, base, root / "folded", mode="folded", with_past=True),
        adapted=_export(adapter, base, root / "adapted", mode="adapter", with_past=True),
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base, adapter = make_case(
        root,
        tiny_gpt2,
        "aslora",
        b_groups=[[0, 1], [2]],
        r=4,
        lora_alpha=8,
        target_modules=TARGETS["gpt2"],
        fan_in_fan_out=True,
    )
    return SimpleNamespace(
        base=base,
        adapter=adapter,
        adapted=_export(adapter, base, root / "adapted", mode="adapter", with_past=True),
        fp16=_export(adapter, base, root / "fp16", mode="folded", dtype="fp16", opset=18),
    )


def _assert_verified(graph, base, adapter, checks):
    report = verify(graph, base, adapter)
    bad = [r for r in report.rows if not r.ok]
    assert report.ok, bad
    assert {r.check for r in report.rows} == set(checks)
    assert {r.output for r in report.rows} >= {"logits"}
    return report


def test_llama_folded_and_adapter_graphs_match_pytorch(llama):
    report = _assert_verified(llama.folded, llama.base, llama.adapter, ["folded"])
    assert {r.output for r in report.rows} == {"logits", "present.*"}
    assert {r.case for r in report.rows} == {"b2 s5 p0", "b2 s1 p6", "b3 s3 p4"}
    _assert_verified(llama.adapted, llama.base, llama.adapter, ["adapter active", "no adapter"])


def test_adapter_file_active_equals_folded_and_no_adapter_equals_base(llama):
    sig = _signature(llama.adapted)
    inputs = make_inputs(sig, batch=2, seq=4, past=3, seed=7)
    feeds = {n: t.numpy() for n, t in inputs.items()}
    lora = ort.LoraAdapter()
    lora.Load(str(llama.adapted / graph_file.ADAPTER_NAME))  # the file export wrote
    adapted = runtime.session(llama.adapted / graph_file.GRAPH_NAME)
    with_file = runtime.run(adapted, feeds, lora)
    folded = runtime.run(runtime.session(llama.folded / graph_file.GRAPH_NAME), feeds)
    without = runtime.run(adapted, feeds)
    base = load_base_model(llama.base)
    from shareport.export.wrapper import call_model

    with torch.no_grad():
        base_out = [t.numpy() for t in call_model(base, sig, inputs)]
    for a, b in zip(with_file, folded):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for a, b in zip(without, base_out):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert np.abs(with_file[0] - without[0]).max() > 1e-2  # the adapter really changes the model


def test_llama_greedy_generation_with_past_matches_generate(llama):
    prompt = torch.tensor([[5, 9, 17, 33], [40, 12, 7, 21]])
    adapter = load_adapter(llama.adapter)
    want = torch_greedy(fold(load_base_model(llama.base), adapter), prompt, 8)
    sig = _signature(llama.folded)
    assert torch.equal(ort_greedy(runtime.session(llama.folded / graph_file.GRAPH_NAME), sig, prompt, 8), want)
    lora = runtime.load_lora({n: a for n, a in _adapter_arrays(llama.adapted, adapter).items()})
    got = ort_greedy(runtime.session(llama.adapted / graph_file.GRAPH_NAME), sig, prompt, 8, lora)
    assert torch.equal(got, want)
    assert want.shape == (2, 12)


def _adapter_arrays(graph, adapter):
    from shareport.export.ort_adapter import adapter_arrays

    return adapter_arrays(adapter, graph_file.graph_slots(graph_file.load_proto(graph)))


def test_gpt2_aslora_adapter_with_past(gpt2):
    _assert_verified(gpt2.adapted, gpt2.base, gpt2.adapter, ["adapter active", "no adapter"])
    # one input per pool tensor: a shared A and a grouped B are each one graph input
    adapter = load_adapter(gpt2.adapter)
    slots = graph_file.graph_slots(graph_file.load_proto(gpt2.adapted))
    assert set(slots) == set(adapter.used_tensor_names())
    assert len(slots) == len(adapter.kinds()) * (1 + 2)  # per kind: one A, two B groups
    prompt = torch.tensor([[5, 9, 17], [40, 12, 7]])
    model = load_base_model(gpt2.base)
    attach(model, adapter)
    lora = runtime.load_lora(_adapter_arrays(gpt2.adapted, adapter))
    got = ort_greedy(runtime.session(gpt2.adapted / graph_file.GRAPH_NAME), _signature(gpt2.adapted), prompt, 8, lora)
    assert torch.equal(got, torch_greedy(model, prompt, 8))


def test_gpt2_fp16_folded_within_relative_bound(gpt2):
    report = _assert_verified(gpt2.fp16, gpt2.base, gpt2.adapter, ["folded"])
    assert report.dtype == "fp16" and "rtol" in report.tolerance
    assert all(r.top1 == 1.0 for r in report.rows)
    proto = graph_file.load_proto(gpt2.fp16)
    assert proto.graph.output[0].type.tensor_type.elem_type == 10  # FLOAT16
    assert graph_file.read_info(proto, gpt2.fp16)["opset"] == 18


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    build = lambda: tiny_bert(num_labels=3)  # noqa: E731
    opts = dict(r=2, lora_alpha=4, target_modules=TARGETS["bert"], task_type="SEQ_CLS", modules_to_save=["classifier"])
    base, lora = make_case(root, build, **opts)
    _, sharea = make_case(root, build, "sharea", seed=2, **opts)
    return SimpleNamespace(root=root, base=base, lora=lora, sharea=sharea)


def test_bert_folded_export_cli_verifies_and_is_self_contained(bert, cli):
    out = bert.root / "folded"
    result = cli("export", bert.lora, "--base", bert.base, "--onnx", out)
    assert result.exit_code == 0, result.output
    assert "all comparisons within tolerance" in result.output
    assert (out / "config.json").is_file() and (out / graph_file.GRAPH_NAME).is_file()
    names = [i.name for i in graph_file.load_proto(out).graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    # the same graph against another adapter's PyTorch model: verify fails, non-zero exit
    result = cli("verify", out, "--base", bert.base, "--adapter", bert.sharea)
    assert result.exit_code != 0
    assert "exceed the tolerance" in result.output and "FAIL" in result.output
    # no overwrite without --overwrite
    result = cli("export", bert.lora, "--base", bert.base, "--onnx", out, "--no-verify")
    assert result.exit_code != 0 and "--overwrite" in result.output


def test_failed_verification_publishes_nothing(bert, cli):
    """export verifies the graph before renaming it into place: a mismatch leaves no output."""
    out = bert.root / "strict"
    result = cli("export", bert.lora, "--base", bert.base, "--onnx", out, "--atol", "0")
    assert result.exit_code != 0 and "nothing was written" in result.output
    assert "FAIL" in result.output  # the numbers are still shown
    assert not out.exists() and not [p for p in bert.root.iterdir() if p.name.startswith(".strict")]


def test_verify_runs_the_shipped_adapter_file(bert, cli, tmp_path):
    """verify checks the folder's adapter.onnx_adapter against --adapter, not --adapter against itself."""
    from shareport.files.adapters import load_adapter, save_adapter

    out = bert.root / "shipped"
    assert cli("export", bert.lora, "--base", bert.base, "--onnx", out, "--mode", "adapter").exit_code == 0
    other = load_adapter(bert.lora)
    other.tensors = {n: t * 2 if n.endswith("lora_B") else t for n, t in other.tensors.items()}
    save_adapter(other, tmp_path / "other")  # same structure, other values
    result = cli("verify", out, "--base", bert.base, "--adapter", tmp_path / "other")
    assert result.exit_code != 0 and "FAIL" in result.output


def test_opset_out_of_range_is_refused():
    from shareport.errors import ShareportError
    from shareport.export.exporter import ExportOptions

    with pytest.raises(ShareportError, match="--opset 3 is not supported"):
        ExportOptions(mode="folded", opset=3).check()


def test_bert_sharea_adapter_mode_cli_json(bert, cli, monkeypatch):
    out = bert.root / "adapted"
    monkeypatch.setattr(graph_file, "EXTERNAL_DATA_BYTES", 0)  # take the >2 GB path: weights beside the graph
    result = cli("export", bert.sharea, "--base", bert.base, "--onnx", out, "--mode", "adapter", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # progress goes to stderr
    assert data["graph"] == str(out) and data["mode"] == "adapter"
    report = data["verify"]
    assert report["ok"] and report["mode"] == "adapter"
    assert {r["check"] for r in report["rows"]} == {"adapter active", "no adapter"}
    assert {r["output"] for r in report["rows"]} == {"logits"}
    assert (out / graph_file.DATA_NAME).is_file()
