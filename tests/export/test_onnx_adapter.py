"""Adapter-mode files: shared tensors stored once, --embed-adapter, export-adapter and its refusals.

Qwen2-like model with a ShareA adapter (every kind's A shared by all layers): one fp16 with-past
graph, one fp32 graph with the adapter embedded as the default.
"""

import os
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shareport.errors import ShareportError
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.ort_adapter import check_fits, read_onnx_adapter
from shareport.export.signature import Signature, make_inputs
from shareport.export.slots import graph_tensors
from shareport.export.verify import verify
from shareport.export.wrapper import call_model
from shareport.files.adapters import load_adapter
from shareport.model import attach, load_base_model
from tests.onnx_cases import make_case
from tests.tiny import tiny_qwen2

OPTS = dict(lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    base, sharea = make_case(root, tiny_qwen2, "sharea", r=4, **OPTS)
    _, lora = make_case(root, tiny_qwen2, "lora", seed=5, r=4, **OPTS)
    fp16 = export(
        sharea,
        base,
        root / "fp16",
        ExportOptions("adapter", with_past=True, dtype="fp16"),
        progress=False,
        verify=False,
    ).path
    embedded = export(
        sharea, base, root / "embedded", ExportOptions("adapter", embed_adapter=True), progress=False, verify=False
    ).path
    return SimpleNamespace(root=root, base=base, sharea=sharea, lora=lora, fp16=fp16, embedded=embedded)


def test_fp16_with_past_adapter_graph_verifies(qwen):
    report = verify(qwen.fp16, qwen.base, qwen.sharea)
    assert report.ok, [r for r in report.rows if not r.ok]
    assert report.dtype == "fp16"
    assert {r.check for r in report.rows} == {"adapter active", "no adapter"}


def test_onnx_adapter_holds_each_shared_a_once(qwen):
    adapter = load_adapter(qwen.sharea)
    stored = read_onnx_adapter(qwen.fp16 / graph_file.ADAPTER_NAME)
    assert set(stored) == set(adapter.used_tensor_names())
    assert sum(a.size for a in stored.values()) == adapter.num_parameters() < adapter.num_lora_parameters()
    a_names = {s.a for s in adapter.sites.values()}
    assert len(a_names) == len(adapter.kinds())  # one A per kind, stored once
    assert all(stored[n].dtype == np.float16 for n in stored)


def test_read_onnx_adapter_arrays_outlive_the_reader(qwen):
    """The arrays must own their memory: views into ORT's freed buffer read garbage or NaN."""
    adapter = load_adapter(qwen.sharea)
    stored = read_onnx_adapter(qwen.fp16 / graph_file.ADAPTER_NAME)
    churn = [np.random.default_rng(i).random((512, 512)) for i in range(16)]  # reuse the freed memory
    assert churn and all(a.flags.owndata for a in stored.values())
    want = graph_tensors(adapter, torch.float16)
    assert set(stored) == set(want)
    for name, array in stored.items():
        np.testing.assert_array_equal(array, want[name].numpy(), err_msg=name)


def test_embedded_graph_stores_shared_a_once_and_verifies(qwen):
    adapter = load_adapter(qwen.sharea)
    model = onnx.load(str(qwen.embedded / graph_file.GRAPH_NAME))
    slots = graph_file.graph_slots(model)
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer if i.name in slots}
    assert set(sizes) == set(adapter.used_tensor_names())
    assert sum(sizes.values()) == adapter.num_parameters()
    report = verify(qwen.embedded, qwen.base, qwen.sharea)
    assert report.ok, [r for r in report.rows if not r.ok]
    assert {r.check for r in report.rows} == {"adapter active", "embedded default", "no adapter"}


def test_export_adapter_swaps_in_an_adapter_of_another_rank(qwen, cli):
    _, other = make_case(qwen.root / "other", tiny_qwen2, "sharea", seed=9, r=2, **OPTS)
    out = qwen.root / "other-r2.onnx_adapter"
    result = cli("export-adapter", other, "--graph", qwen.embedded, "-o", out)
    assert result.exit_code == 0, result.output
    lora = ort.LoraAdapter()
    lora.Load(str(out))

    sig = Signature.from_dict(graph_file.read_info(graph_file.load_proto(qwen.embedded), qwen.embedded)["signature"])
    inputs = make_inputs(sig, batch=2, seq=6, vocab=64)
    got = runtime.run(
        runtime.session(qwen.embedded / graph_file.GRAPH_NAME), {n: t.numpy() for n, t in inputs.items()}, lora
    )
    model = load_base_model(qwen.base)
    attach(model, load_adapter(other))
    with torch.no_grad():
        want = call_model(model, sig, inputs)[0].numpy()
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)

    again = cli("export-adapter", other, "--graph", qwen.embedded, "-o", out)
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_shareport_sessions_do_not_log_the_adapter_slot_notice(qwen, capfd):
    """ORT warns that each adapter slot is an initializer that is also an input (that is what makes it
    overridable); shareport's own sessions log errors only."""
    runtime.session(qwen.embedded / graph_file.GRAPH_NAME)
    assert "appears in graph inputs" not in capfd.readouterr().err


def test_export_adapter_file_follows_the_umask(qwen, cli):
    old = os.umask(0o022)
    try:
        out = qwen.root / "umask.onnx_adapter"
        assert cli("export-adapter", qwen.sharea, "--graph", qwen.embedded, "-o", out).exit_code == 0
        assert out.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 is not kept
    finally:
        os.umask(old)


def test_export_adapter_json_describes_the_written_file(qwen, cli):
    import json

    out = qwen.root / "as-json.onnx_adapter"
    result = cli("export-adapter", qwen.sharea, "--graph", qwen.embedded, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    stored = read_onnx_adapter(out)
    assert data["output"] == str(out) and data["tensors"] == len(stored) and data["note"] == ""
    assert data["parameters"] == sum(a.size for a in stored.values()) == load_adapter(qwen.sharea).num_parameters()
    assert {data["dtype"]} == {str(a.dtype) for a in stored.values()}


def test_export_adapter_overwrite_refuses_a_file_that_is_not_an_ort_adapter(qwen, cli):
    notes = qwen.root / "notes.onnx_adapter"
    notes.write_bytes(b"my notes, not an adapter\n")
    result = cli("export-adapter", qwen.sharea, "--graph", qwen.embedded, "-o", notes, "--overwrite")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert str(notes) in result.output and "shareport did not write" in result.output
    assert notes.read_bytes() == b"my notes, not an adapter\n"


def test_export_adapter_refuses_an_adapter_of_another_form(qwen, cli):
    result = cli("export-adapter", qwen.lora, "--graph", qwen.embedded, "-o", qwen.root / "x.onnx_adapter")
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1]
    assert "is not an input of the graph" in message and "another form" in message
    assert not (qwen.root / "x.onnx_adapter").exists()


SLOTS = {
    "k.lora_A": (np.dtype(np.float32), (32, "rank_k")),
    "k.lora_B": (np.dtype(np.float32), ("rank_k", 16)),
}


def _arrays(rank_a=4, rank_b=4, n_in=32, dtype=np.float32):
    return {"k.lora_A": np.zeros((n_in, rank_a), dtype), "k.lora_B": np.zeros((rank_b, 16), dtype)}


def test_check_fits_accepts_another_rank():
    check_fits(_arrays(rank_a=7, rank_b=7), SLOTS)


@pytest.mark.parametrize(
    "arrays, slots, message",
    [
        (_arrays(n_in=48), SLOTS, r"'k.lora_A' has shape \(48, 4\), the graph's input is \(32, 'rank_k'\)"),
        (_arrays(rank_b=3), SLOTS, r"share the graph's rank dim 'rank_k' but have ranks 4 and 3"),
        (_arrays(dtype=np.float16), SLOTS, r"'k.lora_A' is float16, the graph's input is float32"),
        ({"k.lora_A": _arrays()["k.lora_A"]}, SLOTS, r"lacks the graph's adapter input 'k.lora_B'"),
        (_arrays(), {}, r"no adapter inputs \(it was exported with --mode folded\)"),
    ],
)
def test_check_fits_refuses_with_one_line(arrays, slots, message):
    with pytest.raises(ShareportError, match=message) as info:
        check_fits(arrays, slots)
    assert "\n" not in str(info.value)


def test_export_refuses_bad_options_before_tracing(qwen, cli, tmp_path):
    result = cli("export", qwen.sharea, "--base", qwen.base, "--onnx", tmp_path / "o", "--embed-adapter")
    assert result.exit_code != 0 and "--embed-adapter needs --mode adapter" in result.output
    from tests.tiny import tiny_bert

    base, lora = make_case(tmp_path, tiny_bert, r=2, target_modules=["query"])
    result = cli("export", lora, "--base", base, "--onnx", tmp_path / "o", "--with-past")
    assert result.exit_code != 0 and "--with-past needs a decoder" in result.output
    assert not (tmp_path / "o").exists()
