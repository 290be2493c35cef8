"""Export of a quantized fleet's member: one adapter-mode graph dequantizes every member's integers (each
<member>.onnx_adapter holds them), checked against PyTorch running the dequantized member and against
ONNX Runtime's own DequantizeLinear of the file's integers; a folded graph folds the dequantized update."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shareport.export import graph_file, runtime
from shareport.export.ort_adapter import read_onnx_adapter
from shareport.export.signature import Signature, make_inputs
from shareport.export.wrapper import call_model
from shareport.files.adapters import load_adapter, save_adapter
from shareport.model import attach, load_base_model
from tests.export.test_fleet_export import RANKS, make_case  # the float fleet export's base and three LoRAs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("fleet-export-quantized"))


def _ort_dequantize(values: np.ndarray, scales: np.ndarray, *, bits: int, size: int) -> np.ndarray:
    """ONNX Runtime's DequantizeLinear (opset 21, blocked along axis 1, groups of 64) of int8 (r, D) or of
    each row's packed int4 bytes read as an INT4 tensor."""
    import onnxruntime as ort

    rows = values.shape[0]
    if bits == 4:  # each row is packed on its own: unpack row by row through ONNX's INT4 type
        return np.concatenate(
            [_ort_dequantize(values[i : i + 1], scales[i : i + 1], bits=-4, size=size) for i in range(rows)]
        )
    if bits == -4:
        x = helper.make_tensor("x", TensorProto.INT4, (rows, size), values.tobytes(), raw=True)
    else:
        x = numpy_helper.from_array(values, "x")
    s = numpy_helper.from_array(scales.astype(np.float32), "s")
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=1, block_size=64)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [x, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_one_graph_dequantizes_every_members_integers_and_matches_pytorch(setup, form, bits, tmp_path, cli):
    fleet = tmp_path / "fleet"
    r = cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", form, "--rank", 3, "--quantize", bits)
    assert r.exit_code == 0, r.output
    out = tmp_path / "onnx"
    r = cli("export", fleet / "beta", "--base", setup / "base", "-o", out, "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verify"]["ok"]
    assert {"adapter active", "no adapter", *(f"member {n}" for n in RANKS)} <= {
        x["check"] for x in data["verify"]["rows"]
    }
    proto = onnx.load(str(out / graph_file.GRAPH_NAME))
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    sig = Signature.from_dict(graph_file.read_info(proto, out)["signature"])
    inputs = make_inputs(sig, 2, 5, seed=4)
    sess = runtime.session(out / graph_file.GRAPH_NAME)
    model = load_base_model(setup / "base", "CAUSAL_LM")
    for name in RANKS:
        member = load_adapter(fleet / name)
        products = member.config["fleet"]["products"]
        own = {products[s.b][1] if s.b in products else s.b: s for s in member.sites.values()}
        arrays = read_onnx_adapter(out / f"{name}.onnx_adapter")
        # the file holds the integers and scales of the member's own tensors, nothing of the shared basis
        assert set(arrays) == {p + n for n in own for p in ("", "scale/", "scaling/")}
        for tensor, site in own.items():
            values = arrays[tensor]
            assert values.dtype == (np.int8 if bits == "int8" else np.uint8)
            # rank first: a B (n_out, k) transposed; a core (k1, k2) as stored
            want = member.tensors[tensor].T if tensor == site.b else member.tensors[tensor]
            got = _ort_dequantize(values, arrays["scale/" + tensor], bits=int(bits[3:]), size=want.shape[1])
            np.testing.assert_array_equal(got, want.numpy(), err_msg=tensor)
            assert arrays["scaling/" + tensor].tolist() == [np.float32(site.scale)]
        # ONNX Runtime with the member's file against PyTorch with the member read back (dequantized)
        got = runtime.run(sess, {n: t.numpy() for n, t in inputs.items()}, runtime.load_lora(arrays))[0]
        handle = attach(model, member)
        with torch.no_grad():
            want = call_model(model, sig, inputs)[0].numpy()
        handle.detach()
        assert np.abs(got - want).max() < 1e-4


def test_a_folded_export_of_a_quantized_member_folds_its_dequantized_update(setup, tmp_path, cli):
    fleet = tmp_path / "fleet"
    r = cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "shareab", "--rank", 3, "--quantize", "int4")
    assert r.exit_code == 0, r.output
    out = tmp_path / "folded"
    r = cli("export", fleet / "gamma", "--base", setup / "base", "-o", out, "--mode", "folded", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verify"]["ok"]
    # the folded q_proj of layer 0 is W + s U C V from the dequantized factors, formed here by hand
    member = load_adapter(fleet / "gamma")
    site = next(s for p, s in member.sites.items() if p.endswith("layers.0.self_attn.q_proj"))
    u_name, core_name = member.config["fleet"]["products"][site.b]
    update = (
        site.scale
        * member.tensors[u_name].double()
        @ member.tensors[core_name].double()
        @ member.tensors[site.a].double()
    )
    base = load_base_model(setup / "base", "CAUSAL_LM")
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    proto = onnx.load(str(out / graph_file.GRAPH_NAME))
    folded = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    want = (weight + update).numpy()
    # MatMul's weight is W^T (n_in, n_out); square here, so both orientations are tried
    assert any(b.shape == want.shape and np.allclose(b, want, atol=1e-6) for a in folded for b in (a, a.T))


def test_an_fp16_graph_with_olive_names_takes_every_members_integers(setup, tmp_path, cli):
    fleet = tmp_path / "fleet"
    r = cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "sharea", "--rank", 3, "--quantize", "int4")
    assert r.exit_code == 0, r.output
    out = tmp_path / "onnx"
    args = ("--mode", "adapter", "--dtype", "fp16", "--adapter-names", "olive", "--json")
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", out, *args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verify"]["ok"] and {f"member {n}" for n in RANKS} <= {x["check"] for x in data["verify"]["rows"]}
    for name in RANKS:
        arrays = read_onnx_adapter(out / f"{name}.onnx_adapter")
        ints = {n: a for n, a in arrays.items() if not n.startswith(("scale/", "scaling/"))}
        assert ints and all(n.endswith(".weight") and a.dtype == np.uint8 for n, a in ints.items())


def test_a_float_member_beside_quantized_ones_is_refused_by_their_graph_and_exports_its_own(setup, tmp_path, cli):
    """A member whose cores are float again (as finetune writes one) cannot fill an integer graph's slots:
    the quantized members' export is refused naming it, nothing written; its own export is a float graph
    that the quantized members fit too (their dequantized values)."""
    fleet = tmp_path / "fleet"
    r = cli("fleet", *(setup / n for n in RANKS), "-o", fleet, "--form", "shareab", "--rank", 3, "--quantize", "int8")
    assert r.exit_code == 0, r.output
    member = load_adapter(fleet / "beta")
    save_adapter(dataclasses.replace(member, quantized={}), fleet / "floaty")
    assert load_adapter(fleet / "floaty").config["fleet"]["sha256"] == member.config["fleet"]["sha256"]
    r = cli("export", fleet / "alpha", "--base", setup / "base", "-o", tmp_path / "q", "--mode", "adapter")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{fleet / 'floaty'}: a member of this quantized fleet whose own tensors are float" in r.output
    assert not (tmp_path / "q").exists()
    r = cli("export", fleet / "floaty", "--base", setup / "base", "-o", tmp_path / "f", "--mode", "adapter", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verify"]["ok"]
    assert (
        read_onnx_adapter(tmp_path / "f" / "alpha.onnx_adapter")["model.layers.0.self_attn.q_proj.lora_core"].dtype
        == np.float32
    )
