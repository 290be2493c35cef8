"""verify's limits follow the reference's own error: fp32 (issue #28, item 15) and fp16.

A fixed atol of 1e-4 against float32 PyTorch refused correct exports once the model was a few
layers deep: float32 PyTorch is itself that far from the exact result. verify now measures ORT
against the model run in float64 and allows max(atol, REFERENCE_MULTIPLE x float32 PyTorch's own
error). Here, on models of several sizes: the arithmetic against numpy, every row against a float64
model loaded independently, a correct export the old rule refused (measured here, independently) now
accepted, and an adapter scaled by 1.001 still refused on that same model.

The "medium" model (4 layers, hidden 256, 7M parameters) is the smallest found where the old rule
fails; bench_onnx's own 8-layer, hidden-512 Llama (33M) runs with ``SHAREPORT_BENCH_SIZE=1`` (about
50 s more on two cores, most of it exporting).
"""

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shareport.errors import ShareportError
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.signature import Signature, make_inputs
from shareport.export.verify import (
    FP16_MULTIPLE,
    FP16_RTOL,
    FP32_ATOL,
    PLAIN_CASES,
    REFERENCE_MULTIPLE,
    VerifyMismatch,
    _in_float64,
    compare_outputs,
    limit_for,
    verify,
)
from shareport.files.adapters import load_adapter, save_adapter
from shareport.model import attach, load_base_model, surgery
from tests.onnx_cases import make_case
from tests.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MESSAGE = re.compile(
    r"ORT differs from float64 PyTorch by (\S+), allowed (\S+) \(the larger of (\S+) x float32 "
    r"PyTorch's own error (\S+) and the floor (\S+)\)"
)


def llama(hidden: int, layers: int, vocab: int, init: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init,
    )
    return LlamaForCausalLM(cfg).eval()


def bench_llama():
    from tests.benchmarks.bench_onnx import bench_model

    return bench_model()


SIZES = {
    "small": lambda: llama(128, layers=2, vocab=512, init=0.02),  # float32's own error ~1e-6: the floor decides
    "medium": lambda: llama(256, layers=4, vocab=1000, init=0.05),  # ~4e-4: the old atol refused it
    "bench": bench_llama,
}


def _scaled(root: Path, adapter_dir: Path, factor: float) -> Path:
    adapter = load_adapter(adapter_dir)
    sites = {p: s.__class__(s.path, s.kind, s.layer, s.a, s.b, s.scale * factor) for p, s in adapter.sites.items()}
    out = root / f"scaled-{factor:g}"
    save_adapter(adapter.with_sites(dict(adapter.tensors), sites, adapter.form), out)
    return out


def _build(root: Path, size: str) -> SimpleNamespace:
    base, adapter = make_case(root, SIZES[size], r=16, lora_alpha=32, target_modules=TARGETS)
    graph = export(adapter, base, root / "folded", ExportOptions("folded"), progress=False, verify=False).path
    return SimpleNamespace(root=root, base=base, adapter=adapter, graph=graph, scaled=_scaled(root, adapter, 1.001))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each size built once per module, on first use."""
    cases: dict[str, SimpleNamespace] = {}

    def get(size: str) -> SimpleNamespace:
        if size not in cases:
            cases[size] = _build(tmp_path_factory.mktemp(size), size)
            cases[size].size = size
        return cases[size]

    return get


@pytest.fixture(params=["small", "medium", "bench"])
def sized(request, built):
    if request.param == "bench" and os.environ.get("SHAREPORT_BENCH_SIZE") != "1":
        pytest.skip("bench_onnx's 33M Llama: set SHAREPORT_BENCH_SIZE=1 (about 50 s on two cores)")
    return built(request.param)


@pytest.fixture
def medium(built):
    return built("medium")


def _independent_outputs(case, adapter_dir, graph=None, own=torch.float32) -> list[dict]:
    """Per verify case: ORT's outputs, PyTorch's in ``own`` (the graph's dtype; key "own") and float64
    PyTorch's, each from its own model in that dtype (not converted by verify), the adapter attached in it."""
    graph = graph or case.graph
    proto = graph_file.load_proto(graph)
    sig = Signature.from_dict(graph_file.read_info(proto, graph)["signature"])
    adapter = load_adapter(adapter_dir)
    models = {}
    for dtype in (own, torch.float64):
        # float16 as the exporter makes it: loaded in float32 and cast, buffers too (rotary's inv_freq; a
        # model loaded in float16 keeps that in float32, another fp16 model whose own error differs ~2x)
        models[dtype] = load_base_model(case.base, dtype=torch.float32 if dtype == torch.float16 else dtype)
        attach(models[dtype], adapter)
        models[dtype].to(dtype)
    assert all(p.dtype == torch.float64 for p in models[torch.float64].parameters())
    sess = runtime.session(Path(graph) / graph_file.GRAPH_NAME)
    out = []
    for batch, seq, past in PLAIN_CASES:
        inputs = make_inputs(sig, batch, seq, past, seed=batch * 100 + seq, vocab=int(models[own].config.vocab_size))
        row = {"case": f"b{batch} s{seq}", "ort": runtime.run(sess, {n: t.numpy() for n, t in inputs.items()})[0]}
        with torch.no_grad():
            for dtype, key in ((own, "own"), (torch.float64, "fp64")):
                row[key] = models[dtype](
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
                ).logits.numpy()
        out.append(row)
    return out


# ---------------------------------------------------------------------------------- the arithmetic


def test_limit_is_the_larger_of_the_floor_and_the_multiple_of_float32s_own_error():
    rng = np.random.default_rng(0)
    exact = [rng.normal(size=(2, 3, 50)), rng.normal(size=(2, 1, 3, 4))]
    own = [e + rng.normal(scale=s, size=e.shape) for e, s in zip(exact, (3e-4, 1e-7))]  # float32 PyTorch
    got = [e + rng.normal(scale=s, size=e.shape) for e, s in zip(exact, (1e-3, 2e-5))]  # ORT
    rows = compare_outputs(
        "folded", "b2 s3", ["logits", "present.0.key"], got, exact, "fp32", 1e-4, 2e-2, own=own, multiple=4.0
    )
    for row, g, o, e in zip(rows, got, own, exact):
        own_error = float(np.abs(o - e).max())
        assert row.reference_error == pytest.approx(own_error)
        assert row.max_abs == pytest.approx(float(np.abs(g - e).max()))
        assert row.limit == pytest.approx(max(1e-4, 4.0 * own_error))
        assert row.ok == (row.max_abs <= row.limit)
    assert rows[0].limit > 1e-4 and rows[1].limit == 1e-4  # widened by float32's error / the floor
    assert rows[0].ok and rows[1].ok
    # the same ORT error against the multiple of a smaller own error fails
    tight = compare_outputs(
        "folded", "b2 s3", ["logits"], got[:1], exact[:1], "fp32", 1e-4, 2e-2, own=[exact[0] + 1e-5], multiple=4.0
    )[0]
    assert tight.limit == pytest.approx(max(1e-4, 4e-5)) and not tight.ok


def test_a_non_finite_float32_error_widens_nothing():
    assert limit_for("fp32", np.zeros(3), 1e-4, 2e-2, own_error=float("inf")) == 1e-4
    assert limit_for("fp32", np.zeros(3), 1e-4, 2e-2, own_error=float("nan")) == 1e-4
    assert limit_for("fp32", np.zeros(3), 1e-4, 2e-2, own_error=1e-3) == pytest.approx(REFERENCE_MULTIPLE * 1e-3)
    # fp16: the larger of rtol x max(1, max |reference|) and the multiple of float16's own error
    assert limit_for("fp16", np.array([3.0]), 1e-4, 2e-2, own_error=1e-3, multiple=2.0) == pytest.approx(2e-2 * 3)
    assert limit_for("fp16", np.array([3.0]), 1e-4, 2e-2, own_error=1.0, multiple=2.0) == pytest.approx(2.0)
    assert limit_for("fp16", np.array([3.0]), 1e-4, 2e-2, own_error=float("inf"), multiple=2.0) == pytest.approx(0.06)


def test_float64_round_trip_leaves_the_model_exactly_as_it_was(tmp_path):
    """In place and back: same values bit for bit, same dtypes, the attached (shared) parameters the
    same objects, and float64 inside."""
    base, lora = make_case(
        tmp_path, lambda: tiny_llama(layers=2), "sharea", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    model = load_base_model(base)
    handle = attach(model, load_adapter(lora))
    shared = {id(w.lora_A) for w in handle.wrappers.values()}
    assert len(shared) < len(handle.wrappers)  # ShareA: one A object serves several sites
    before = {n: t.clone() for n, t in model.state_dict().items()}
    params = list(model.parameters())
    with _in_float64(model):
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert all(torch.equal(t, before[n].double()) for n, t in model.state_dict().items() if t.is_floating_point())
    after = model.state_dict()
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
    assert {id(w.lora_A) for w in handle.wrappers.values()} == shared
    assert set(after) == set(before)
    for name, t in after.items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name


# ------------------------------------------------------------------------------------ the models


def test_rows_match_an_independent_float64_model_at_every_size(sized):
    """Each row's measured error and float32's own error, against a model loaded in float64 by the
    test; the limit from them; the correct export passes; 1.001 x the adapter's scale fails."""
    report = verify(sized.graph, sized.base, sized.adapter)
    want = _independent_outputs(sized, sized.adapter)
    assert [r.case for r in report.rows] == [w["case"] for w in want]
    for row, w in zip(report.rows, want):
        own = float(np.abs(w["own"].astype(np.float64) - w["fp64"]).max())
        ort = float(np.abs(w["ort"].astype(np.float64) - w["fp64"]).max())
        assert row.reference_error == pytest.approx(own, rel=1e-6, abs=1e-12)
        assert row.max_abs == pytest.approx(ort, rel=1e-6, abs=1e-12)
        assert row.limit == pytest.approx(max(FP32_ATOL, REFERENCE_MULTIPLE * own))
        assert row.top1 == float((w["ort"].argmax(-1) == w["fp64"].argmax(-1)).mean())
    assert report.ok, report.failure()
    assert (report.floor, report.multiple) == (FP32_ATOL, REFERENCE_MULTIPLE)
    if sized.size == "small":
        assert all(r.limit == FP32_ATOL for r in report.rows)
    else:
        assert any(r.limit > FP32_ATOL for r in report.rows) and "own error" in report.tolerance
    own = max(r.reference_error for r in report.rows)  # the header says the rule and the numbers it used
    widest = max(r.limit for r in report.rows)
    assert report.tolerance == (
        f"tolerance max({FP32_ATOL:g}, {REFERENCE_MULTIPLE:g} x float32 PyTorch's own error {own:.2g}) "
        f"= {widest:.2g} at most"
    )
    assert "atol" not in report.tolerance
    scaled = verify(sized.graph, sized.base, sized.scaled)
    assert not scaled.ok
    assert max(r.max_abs / r.limit for r in scaled.rows) > 4  # far over, not at the edge


def _old_rule_error(case) -> float:
    """max |ORT - float32 PyTorch| over verify's cases: what the fixed atol 1e-4 was compared with."""
    return max(float(np.abs(w["ort"] - w["own"]).max()) for w in _independent_outputs(case, case.adapter))


def test_a_correct_export_the_fixed_atol_refused_is_accepted(medium):
    """Before: max |ORT - float32 PyTorch| above 1e-4 refused this export. It is correct: ORT is as close
    to float64 PyTorch as float32 PyTorch is (within the multiple)."""
    assert _old_rule_error(medium) > 2 * FP32_ATOL
    report = verify(medium.graph, medium.base, medium.adapter)
    assert report.ok, report.failure()
    assert max(r.reference_error for r in report.rows) > FP32_ATOL  # PyTorch's own error alone exceeds the old atol
    assert report.failure() == ""
    assert f"{REFERENCE_MULTIPLE:g} x float32 PyTorch's own error" in report.rule


def test_the_scaled_adapter_still_fails_on_that_model_and_says_by_how_much(medium, cli):
    report = verify(medium.graph, medium.base, medium.scaled)
    assert not report.ok
    worst = max((r for r in report.rows if not r.ok), key=lambda r: r.max_abs / r.limit)
    match = MESSAGE.search(report.failure())
    assert match and report.failure().startswith(f"{worst.check}, {worst.case}, {worst.output}: ")
    measured, allowed, multiple, own, floor = map(float, match.groups())
    assert measured > allowed and multiple == REFERENCE_MULTIPLE and floor == FP32_ATOL
    assert allowed == pytest.approx(max(floor, multiple * own), rel=1e-2)
    assert measured == pytest.approx(worst.max_abs, rel=1e-2) and own == pytest.approx(worst.reference_error, rel=1e-2)
    result = cli("verify", medium.graph, "--base", medium.base, "--adapter", medium.scaled)
    assert result.exit_code != 0 and "FAIL" in result.output
    assert MESSAGE.search(result.output) and "float32 PyTorch's own error here: up to" in result.output


def _fold_without_scale(model, adapter):
    with torch.no_grad():
        for path, site in sorted(adapter.sites.items()):
            module = surgery.get_module(model, path)
            module.weight.add_(adapter.tensors[site.b].float() @ adapter.tensors[site.a].float())
    return model


def test_export_refusal_states_measured_and_allowed(tmp_path, monkeypatch):
    """A broken fold (scale dropped): export publishes nothing and its message carries the numbers."""
    base, lora = make_case(tmp_path, lambda: tiny_llama(layers=1), r=4, lora_alpha=8, target_modules=["q_proj"])
    original = surgery.fold
    for name, module in list(sys.modules.items()):
        if name.startswith("shareport") and getattr(module, "fold", None) is original:
            monkeypatch.setattr(module, "fold", _fold_without_scale)
    with pytest.raises(VerifyMismatch) as err:
        export(lora, base, tmp_path / "out", ExportOptions("folded"), progress=False)
    assert MESSAGE.search(str(err.value)) and "nothing was written" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert isinstance(err.value, ShareportError)


def test_atol_scales_the_whole_limit(medium):
    """--atol stays a knob where float32's own error decides: 2 x atol doubles every limit, and atol 0
    asks for an exact match (the strict export test relies on it)."""
    default = verify(medium.graph, medium.base, medium.adapter)
    doubled = verify(medium.graph, medium.base, medium.adapter, atol=2 * FP32_ATOL)
    assert doubled.multiple == pytest.approx(2 * REFERENCE_MULTIPLE) and doubled.floor == 2 * FP32_ATOL
    for a, b in zip(default.rows, doubled.rows):
        assert b.limit == pytest.approx(2 * a.limit) and b.reference_error == a.reference_error
    strict = verify(medium.graph, medium.base, medium.adapter, atol=0.0)
    assert not strict.ok and all(r.limit == 0 for r in strict.rows)


# ------------------------------------------------------------------------------------------- fp16


@pytest.fixture(params=["medium", "bench"])
def sized16(request, built):
    """That size's model exported folded in fp16 (once), and its adapter scaled by 1.05."""
    if request.param == "bench" and os.environ.get("SHAREPORT_BENCH_SIZE") != "1":
        pytest.skip("bench_onnx's 33M Llama: set SHAREPORT_BENCH_SIZE=1")
    case = built(request.param)
    if not hasattr(case, "fp16"):
        case.fp16 = export(
            case.adapter,
            case.base,
            case.root / "fp16",
            ExportOptions("folded", dtype="fp16"),
            progress=False,
            verify=False,
        ).path
        case.scaled16 = _scaled(case.root, case.adapter, 1.05)
    return case


def test_fp16_limit_follows_float16_pytorchs_own_error(sized16):
    """fp16 rows against an independent float64 model and an independent float16 one: the measured
    error, float16's own error and the limit from them; the correct export (which the fixed share of
    the output refused) passes; 1.05 x the adapter's scale fails. (1.001 x is within fp16's own error
    on these models: no fp16 check can see it.)"""
    report = verify(sized16.fp16, sized16.base, sized16.adapter)
    want = _independent_outputs(sized16, sized16.adapter, graph=sized16.fp16, own=torch.float16)
    for row, w in zip(report.rows, want, strict=True):
        own = float(np.abs(w["own"].astype(np.float64) - w["fp64"]).max())
        floor = FP16_RTOL * max(1.0, float(np.abs(w["fp64"]).max()))
        assert row.reference_error == pytest.approx(own, rel=1e-6, abs=1e-12)
        assert row.max_abs == pytest.approx(float(np.abs(w["ort"].astype(np.float64) - w["fp64"]).max()), rel=1e-6)
        assert row.limit == pytest.approx(max(floor, FP16_MULTIPLE * own), rel=1e-6)
    assert report.ok, report.failure()
    assert any(r.max_abs > FP16_RTOL * max(1.0, float(np.abs(w["fp64"]).max())) for r, w in zip(report.rows, want))
    assert "float16 PyTorch's own error" in report.tolerance and report.multiple == FP16_MULTIPLE
    scaled = verify(sized16.fp16, sized16.base, sized16.scaled16)
    assert not scaled.ok and "float16 PyTorch's own error" in scaled.failure()
