"""Quantized adapters in ONNX: integer adapter inputs dequantized in the graph, folded graphs of the
dequantized adapter, the ``.onnx_adapter`` files' integers, swapping, refusals and bytes.

References are independent of the exporter: PyTorch with the adapter attached (through ``verify``, or
by hand for a swapped adapter), ONNX Runtime's own ``DequantizeLinear`` on the file's integers, and
the float16 export's file for the bytes.
"""

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file

from converters.quantize import quantize
from shareport import flows
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.ort_adapter import read_onnx_adapter
from shareport.export.quantized import QuantizedSlot, dequantize_nodes, pack_rows
from shareport.export.signature import Signature, make_inputs
from shareport.export.verify import verify
from shareport.export.wrapper import call_model
from shareport.files.adapters import load_adapter
from shareport.files.folder import WEIGHTS_NAME
from shareport.files.quantized import SCALE_PREFIX
from shareport.model import attach, load_base_model
from tests.onnx_cases import make_case
from tests.tiny import make_peft_adapter, tiny_llama, wide_llama_with_lora

# rank 3 and alpha 8: s = 8/3, which no float16 scale can absorb exactly; groups of 12 leave a short
# last group on the 32-wide model dims, 16 divides them
OPTS = dict(r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
GROUPS = {"int8": 16, "int4": 12}


def _convert(lora, out, bits, group):
    flows.convert(str(lora), "lora", str(out), quantize=bits, group_size=group, progress=False)
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("qonnx")
    base, lora = make_case(root, tiny_llama, "lora", seed=1, **OPTS)
    other = root / "other-lora"
    make_peft_adapter(tiny_llama(), other, seed=7, **OPTS)
    out = SimpleNamespace(root=root, base=base, lora=lora, graphs={}, q={}, other={})
    for bits, group in GROUPS.items():
        out.q[bits] = _convert(lora, root / bits, bits, group)
        out.other[bits] = _convert(other, root / f"other-{bits}", bits, group)
        out.graphs[bits] = export(out.q[bits], base, root / f"onnx-{bits}", ExportOptions("adapter"), progress=False)
    return out


@pytest.mark.parametrize("bits", sorted(GROUPS))
def test_quantized_adapter_graph_verifies_against_pytorch(case, bits):
    result = case.graphs[bits]
    assert result.report.ok, result.report.failure()  # export verified before publishing
    report = verify(result.path, case.base, case.q[bits])
    assert report.ok, report.failure()
    assert {r.check for r in report.rows} == {"adapter active", "no adapter"}
    assert any(f"quantized ({bits} in groups of {GROUPS[bits]})" in note for note in report.notes)
    proto = onnx.load(str(result.path / graph_file.GRAPH_NAME), load_external_data=False)
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    slots = graph_file.graph_slots(proto)
    adapter = load_adapter(case.q[bits])
    for name in adapter.used_tensor_names():
        assert slots[name][0] == (np.int8 if bits == "int8" else np.uint8)
        assert slots[SCALE_PREFIX + name][0] == np.float16
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)


def _ort_dequantize(values: np.ndarray, scales: np.ndarray, *, bits: int, size: int, group: int) -> np.ndarray:
    """ONNX Runtime's DequantizeLinear (opset 21, blocked, axis 1) of int8 (r, D), or of packed int4
    bytes (r, D/2) read as an INT4 tensor, with float16 scales cast to float32."""
    rows = values.shape[0]
    if bits == 4:
        x = helper.make_tensor("x", TensorProto.INT4, (rows, size), values.tobytes(), raw=True)
    else:
        x = numpy_helper.from_array(values, "x")
    s = numpy_helper.from_array(scales.astype(np.float32), "s")
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=1, block_size=group)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [x, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("bits", sorted(GROUPS))
def test_onnx_adapter_holds_the_integers_and_dequantizes_to_the_adapters_floats(case, bits):
    adapter = load_adapter(case.q[bits])
    stored = read_onnx_adapter(case.graphs[bits].path / graph_file.ADAPTER_NAME)
    carrier = {s.b: s.scale for s in adapter.sites.values()}
    for name in adapter.used_tensor_names():
        values, scales = stored[name], stored[SCALE_PREFIX + name]
        # the graph's integers are rank first: A (r, n_in) as stored, B (n_out, r) transposed
        want = adapter.tensors[name] if name not in carrier else adapter.tensors[name].T
        assert values.dtype == (np.int8 if bits == "int8" else np.uint8) and scales.dtype == np.float16
        assert values.shape[1] == (want.shape[1] if bits == "int8" else want.shape[1] // 2)
        got = _ort_dequantize(values, scales, bits=int(bits[3:]), size=want.shape[1], group=GROUPS[bits])
        np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
        if name in carrier:
            np.testing.assert_array_equal(stored["scaling/" + name], np.array([carrier[name]], np.float32))


def _torch_logits(base, adapter_dir, inputs, sig):
    model = load_base_model(base, "CAUSAL_LM")
    attach(model, load_adapter(adapter_dir))
    with torch.no_grad():
        return call_model(model, sig, inputs)[0].numpy()


@pytest.mark.parametrize("bits", sorted(GROUPS))
def test_a_second_quantized_adapter_swaps_in_through_its_file(case, bits, tmp_path):
    graph = case.graphs[bits].path
    out = tmp_path / "other.onnx_adapter"
    flows.export_adapter(str(case.other[bits]), str(graph), str(out))
    assert read_onnx_adapter(out)[SCALE_PREFIX + "model.layers.0.self_attn.q_proj.lora_A"].dtype == np.float16
    sig = Signature.from_dict(graph_file.read_info(graph_file.load_proto(graph), graph)["signature"])
    inputs = make_inputs(sig, 2, 6, seed=3)
    sess = runtime.session(graph / graph_file.GRAPH_NAME)
    got = runtime.run(sess, {n: t.numpy() for n, t in inputs.items()}, runtime.load_lora(read_onnx_adapter(out)))[0]
    want = _torch_logits(case.base, case.other[bits], inputs, sig)
    first = _torch_logits(case.base, case.q[bits], inputs, sig)
    assert np.abs(got - want).max() < 1e-4 < np.abs(want - first).max()


def test_folded_export_folds_the_dequantized_factors(case):
    """The folded graph against the base with W + s B A added by hand, B and A dequantized from the
    integers in the native file (not through shareport's reader)."""
    folder = case.q["int4"]
    result = export(folder, case.base, case.root / "folded-int4", ExportOptions("folded"), progress=False)
    assert result.report.ok, result.report.failure()
    stored = load_file(str(folder / WEIGHTS_NAME))  # int4: packed bytes (U8), float16 scales
    adapter = load_adapter(folder)
    model = load_base_model(case.base, "CAUSAL_LM")
    with torch.no_grad():
        for path, site in adapter.sites.items():
            factors = []
            for name, axis in ((site.a, 1), (site.b, 0)):
                shape = tuple(adapter.tensors[name].shape)
                packed = stored[name].numpy()
                nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[: np.prod(shape)].astype(np.int16)
                q = np.where(nibbles > 7, nibbles - 16, nibbles).reshape(shape).astype(np.float32)
                scales = stored[SCALE_PREFIX + name].numpy().astype(np.float32)
                expanded = np.repeat(scales, GROUPS["int4"], axis=axis)[: shape[0], : shape[1]]
                factors.append(torch.from_numpy(q * expanded).double())
            a, b = factors  # A (r, n_in), B (n_out, r)
            weight = model.get_submodule(path).weight
            weight.copy_((weight.double() + site.scale * b @ a).float())
    sig = Signature.from_dict(graph_file.read_info(graph_file.load_proto(result.path), result.path)["signature"])
    inputs = make_inputs(sig, 2, 6, seed=4)
    with torch.no_grad():
        want = call_model(model, sig, inputs)[0].numpy()
    sess = runtime.session(result.path / graph_file.GRAPH_NAME)
    got = runtime.run(sess, {n: t.numpy() for n, t in inputs.items()})[0]
    assert np.abs(got - want).max() < 1e-4


def test_fp16_embedded_quantized_graph_verifies(case):
    result = export(
        case.q["int4"],
        case.base,
        case.root / "int4-fp16",
        ExportOptions("adapter", dtype="fp16", embed_adapter=True),
        progress=False,
    )
    assert result.report.ok, result.report.failure()
    assert {r.check for r in result.report.rows} == {"adapter active", "embedded default", "no adapter"}


def test_same_input_gives_the_same_bytes(case, tmp_path):
    again = export(
        case.q["int4"], case.base, tmp_path / "again", ExportOptions("adapter"), progress=False, verify=False
    )
    for name in (graph_file.GRAPH_NAME, graph_file.ADAPTER_NAME):
        assert (again.path / name).read_bytes() == (case.graphs["int4"].path / name).read_bytes(), name


@pytest.mark.parametrize(
    "source, graph, words",
    [
        (
            "lora",
            "int4",
            "is float; this graph takes it quantized (int4 in groups of 12): convert the adapter with "
            "--quantize int4 --group-size 12",
        ),
        ("int8", "int4", "is int8 in groups of 16; this graph takes int4 in groups of 12"),
    ],
)
def test_export_adapter_refuses_another_precision_in_one_line(case, cli, tmp_path, source, graph, words):
    folder = case.lora if source == "lora" else case.q[source]
    out = tmp_path / "x.onnx_adapter"
    result = cli("export-adapter", folder, "--graph", case.graphs[graph].path, "-o", out)
    assert result.exit_code != 0
    assert words in result.output.strip().splitlines()[-1] and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_float_and_quantized_graphs_refuse_each_others_adapters(case, cli, tmp_path):
    float_graph = export(
        case.lora, case.base, case.root / "float", ExportOptions("adapter"), progress=False, verify=False
    ).path
    out = tmp_path / "x.onnx_adapter"
    cases = [
        (case.q["int4"], float_graph, "is quantized (int4 in groups of 12); this graph takes float adapter tensors"),
        (
            float_graph / graph_file.ADAPTER_NAME,
            case.graphs["int4"].path,
            "holds float tensors; this graph takes a quantized adapter",
        ),
        (
            case.graphs["int4"].path / graph_file.ADAPTER_NAME,
            float_graph,
            "holds a quantized adapter (integers and scales); this graph takes float tensors",
        ),
    ]
    for source, graph, words in cases:
        result = cli("export-adapter", source, "--graph", graph, "-o", out)
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and words in lines[0], result.output
        assert not out.exists()


def test_an_opset_below_21_is_refused_before_anything_is_written(case, cli, tmp_path):
    result = cli(
        "export", case.q["int8"], "--base", case.base, "-o", tmp_path / "o", "--mode", "adapter", "--opset", "20"
    )
    assert result.exit_code != 0
    assert "--opset 20 cannot hold a quantized adapter" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits, size, role", [(4, 9, "A"), (4, 9, "B"), (8, 10, "B"), (4, 8, "A")])
def test_the_graphs_dequantization_is_the_float_exports_value_bit_for_bit(bits, size, role):
    """The nodes that rebuild a slot, run alone in ONNX Runtime, give exactly ``graph_tensors``'s value
    for the dequantized factor (odd D: a padded nibble per int4 row; B carries s = 8/3)."""
    import onnx_ir as ir
    import onnxruntime as ort

    rank, group, scale = 3, 4, 8 / 3
    gen = torch.Generator().manual_seed(bits + size)
    shape = (rank, size) if role == "A" else (size, rank)
    record = quantize(torch.randn(shape, generator=gen), bits, group, 1 if role == "A" else 0)
    want = record.dequantize()
    want = (want.T if role == "A" else (want * scale).T).contiguous().numpy()  # A_g (n_in, r), B_g (r, n_out)
    qslot = QuantizedSlot("t", role, bits, group, size, "rank", scaled=role == "B")
    values = record.values if role == "A" else record.values.T
    scales = (record.scales if role == "A" else record.scales.T).contiguous().numpy()
    ints = values.contiguous().numpy() if bits == 8 else pack_rows(values).numpy()
    feeds = {"t": ints, "scale/t": scales, "scaling/t": np.array([scale], np.float32)}
    inputs = {
        n: ir.Value(name=n, shape=ir.Shape(list(s)), type=ir.TensorType(ir.DataType.from_numpy(d)))
        for n, (d, s) in qslot.inputs().items()
    }
    nodes, out = dequantize_nodes(qslot, inputs)
    graph = ir.Graph(list(inputs.values()), [out], nodes=nodes, opset_imports={"": 21})
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: feeds[n] for n in inputs})[0]
    np.testing.assert_array_equal(got, want)
    empty = sess.run(
        None, {n: np.zeros([0 if d == "rank" else d for d in s], t) for n, (t, s) in qslot.inputs().items()}
    )[0]
    assert empty.size == 0


def test_int4_onnx_adapter_is_under_three_tenths_of_the_float16_one(tmp_path):
    """On a Llama with 512-wide layers (rank 8, groups of 64): the int4 graph verifies and its
    ``.onnx_adapter`` is <= 0.3x the bytes of the float16 export's."""
    base, lora = tmp_path / "base", tmp_path / "lora"
    wide_llama_with_lora(base, lora)
    int4 = _convert(lora, tmp_path / "int4", "int4", None)
    fp16 = export(lora, base, tmp_path / "fp16", ExportOptions("adapter", dtype="fp16"), progress=False, verify=False)
    q = export(int4, base, tmp_path / "q", ExportOptions("adapter", dtype="fp16"), progress=False)
    assert q.report.ok, q.report.failure()
    ratio = (q.path / graph_file.ADAPTER_NAME).stat().st_size / (fp16.path / graph_file.ADAPTER_NAME).stat().st_size
    assert ratio <= 0.3, ratio


def test_write_onnx_adapter_keeps_a_transposed_arrays_copy_alive(tmp_path):
    """ORT's OrtValue points into a numpy array without holding it: the C-contiguous copy of a transposed
    array must outlive the write, or the file holds freed memory."""
    from shareport.export.ort_adapter import write_onnx_adapter

    arrays = {f"t{i}": np.arange(64 * 48, dtype=np.uint8).reshape(64, 48).T * (i + 1) for i in range(4)}
    write_onnx_adapter(arrays, tmp_path / "t.onnx_adapter")
    back = read_onnx_adapter(tmp_path / "t.onnx_adapter")
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
