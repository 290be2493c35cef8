"""converters.quantize against independent references: the float tensor (each element within half its
group's scale) and ONNX Runtime's own DequantizeLinear (opset 21, blocked, int8 and int4) run on the very
integers and scales shareport stores, int4 fed as the packed bytes themselves."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from converters.quantize import QMAX, dequantize, pack_int4, quantize, unpack_int4

# (shape, axis, group): full groups, a shorter last group, a dimension smaller than one group, odd numel
CASES = [((4, 128), 1, 64), ((96, 3), 0, 64), ((5, 48), 1, 64), ((3, 7), 1, 2), ((33, 2), 0, 8)]


def _tensor(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 0, shape[0])[:, None]  # groups of many magnitudes
    x[0, : min(3, shape[1])] = 0.0  # a group may start with zeros; a whole one is tested below
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, axis, group", CASES)
def test_each_element_is_within_half_its_scale_of_the_float_value(bits, shape, axis, group):
    x = _tensor(shape)
    q = quantize(x, bits, group, axis)
    assert q.values.dtype == torch.int8 and q.values.shape == x.shape
    assert int(q.values.abs().max()) <= QMAX[bits]
    expected_scales = list(shape)
    expected_scales[axis] = -(-shape[axis] // group)
    assert q.scales.dtype == torch.float16 and list(q.scales.shape) == expected_scales
    scale = q.scales.double().repeat_interleave(group, dim=axis).narrow(axis, 0, shape[axis])
    error = (q.dequantize().double() - x.double()).abs()
    assert bool((error <= scale / 2 * (1 + 1e-9)).all())
    # the scale is the least float16 that holds the group's largest value at qmax: nothing clipped
    amax = x.double().abs().movedim(axis, -1)
    pad = expected_scales[axis] * group - shape[axis]
    amax = torch.nn.functional.pad(amax, (0, pad)).reshape(*amax.shape[:-1], -1, group).amax(-1).movedim(-1, axis)
    s = q.scales.double()
    assert bool((s * QMAX[bits] >= amax).all())
    below = (q.scales.view(torch.int16) - 1).view(torch.float16).double()
    assert bool((below * QMAX[bits] < amax)[s > 0].all())


def test_an_all_zero_tensor_has_zero_scales_and_integers():
    q = quantize(torch.zeros(2, 10), 4, 4, 1)
    assert not q.values.any() and not q.scales.any() and not q.dequantize().any()


def test_rounding_is_half_to_even_as_onnx_quantizelinear():
    # amax 127 makes the int8 scale exactly 1, so x / s is each value itself: ties at .5
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    q = quantize(x, 8, 6, 1)
    assert float(q.scales[0, 0]) == 1.0
    assert q.values.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("numel", [1, 2, 7, 64])
def test_int4_packing_round_trips(numel):
    values = torch.arange(numel) % 16 - 8
    packed = pack_int4(values.to(torch.int8).reshape(1, numel))
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, (1, numel)), values.to(torch.int8).reshape(1, numel))


def _dequantize_in_ort(q, scales_dtype):
    """One DequantizeLinear node (opset 21, block_size, axis) in a CPU session; the integers are an
    initializer holding exactly the bytes shareport stores (int4: the packed bytes as raw data)."""
    shape = list(q.values.shape)
    if q.bits == 4:
        ints = helper.make_tensor("x", TensorProto.INT4, shape, pack_int4(q.values).numpy().tobytes(), raw=True)
    else:
        ints = helper.make_tensor("x", TensorProto.INT8, shape, q.values.numpy().tobytes(), raw=True)
    scale_type = TensorProto.FLOAT16 if scales_dtype == np.float16 else TensorProto.FLOAT
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=q.axis, block_size=q.group_size)
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info("s", scale_type, list(q.scales.shape))],
        [helper.make_tensor_value_info("y", scale_type, shape)],
        initializer=[ints],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"s": q.scales.numpy().astype(scales_dtype)})[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, axis, group", CASES)
def test_dequantization_is_onnx_runtimes_dequantizelinear(bits, shape, axis, group):
    q = quantize(_tensor(shape, seed=1), bits, group, axis)
    ours = q.dequantize().numpy()
    # float16 scales widened to float32 (exact): the same float32 values, bit for bit
    assert np.array_equal(_dequantize_in_ort(q, np.float32), ours)
    # float16 scales as stored: ORT's float16 output is ours rounded to float16
    assert np.array_equal(_dequantize_in_ort(q, np.float16), ours.astype(np.float16))
    assert torch.equal(dequantize(q.values, q.scales, group, axis), q.dequantize())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(2, 2), 3, 2, 1)
    with pytest.raises(ValueError, match="group size"):
        quantize(torch.ones(2, 2), 8, 0, 1)
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((1, 4), 1e8), 4, 4, 1)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (2, 2))
