"""``shareport/export/verify.py`` piece by piece: the comparison arithmetic against numpy written out
here, and :func:`verify` on three small graphs (folded fp16, adapter mode with past, adapter embedded).

Written against the surviving mutants of a mutation run (tests/mutation/mutation.sh verify). Each
graph is checked the way it can fail: a wrong adapter must fail the adapter rows and only those, a
"no adapter" row must compare against the bare base, the folder's own adapter file is what runs.

Exporting is the slow part (seconds per graph), verifying is fast: the three graphs are made once per
module, or read from ``$SHAREPORT_VERIFY_GRAPHS`` when that folder holds them (the mutation script
builds them once there, since verify.py - the only code mutated - plays no part in exporting).
"""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shareport.errors import ShareportError
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.ort_adapter import OLIVE_SUFFIX, adapter_arrays, read_onnx_adapter, write_onnx_adapter
from shareport.export.verify import (
    FP16_RTOL,
    FP32_ATOL,
    PAST_CASES,
    PLAIN_CASES,
    Comparison,
    Report,
    VerifyMismatch,
    _feeds,
    _torch_outputs,
    compare_outputs,
    limit_for,
    verify,
)
from shareport.files.adapters import load_adapter, save_adapter
from tests.onnx_cases import make_case
from tests.tiny import tiny_llama

GRAPHS = {
    "fp16": ExportOptions("folded", dtype="fp16", with_past=True),
    "adapter": ExportOptions("adapter", with_past=True),
    "embedded": ExportOptions("adapter", embed_adapter=True),
}


def build_graphs(root: Path) -> SimpleNamespace:
    """A one-layer tiny Llama, its LoRA on q and v, a second LoRA (other seed), and the three graphs."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = repr(sorted(GRAPHS.items())) + "\n"
    if not (root / "done").is_file() or (root / "done").read_text() != recipe:
        build = lambda: tiny_llama(layers=1)  # noqa: E731
        base, adapter = make_case(root, build, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        make_case(root / "other", build, seed=7, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        for name, options in GRAPHS.items():
            export(adapter, base, root / name, options, progress=False, verify=False)
        (root / "done").write_text(recipe)
    return SimpleNamespace(
        root=root,
        base=root / "base",
        lora=root / "lora",
        other=root / "other" / "lora",
        **{name: root / name for name in GRAPHS},
    )


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    cached = os.environ.get("SHAREPORT_VERIFY_GRAPHS")
    return build_graphs(Path(cached) if cached else tmp_path_factory.mktemp("verify-graphs"))


def _cases(cases, with_past: bool) -> set[str]:
    return {f"b{b} s{s}" + (f" p{p}" if with_past else "") for b, s, p in cases}


def _by_check(report) -> dict[str, list[Comparison]]:
    out: dict[str, list[Comparison]] = {}
    for row in report.rows:
        out.setdefault(row.check, []).append(row)
    return out


# ---------------------------------------------------------------------------------- the arithmetic


def test_compare_outputs_groups_present_and_measures_like_numpy():
    rng = np.random.default_rng(0)
    want = [
        rng.normal(size=(2, 3, 7)).astype(np.float32),
        rng.normal(size=(2, 1, 3, 4)).astype(np.float32),
        rng.normal(size=(2, 1, 5, 4)).astype(np.float32),
        rng.normal(size=(2, 6)).astype(np.float32),
    ]
    got = [w + rng.normal(scale=s, size=w.shape).astype(np.float32) for w, s in zip(want, (1e-5, 3e-5, 2e-4, 1e-6))]
    got[0][1, 2] = want[0][1, 2][::-1]  # one position's argmax moves
    names = ["logits", "present.0.key", "present.0.value", "pooled"]
    rows = compare_outputs("folded", "b2 s3", names, got, want, "fp32", 1e-4, 2e-2)
    assert [r.output for r in rows] == ["logits", "present.*", "pooled"]
    for row, idx in zip(rows, ([0], [1, 2], [3])):
        diff = np.concatenate([np.abs(got[i].astype(np.float64) - want[i].astype(np.float64)).ravel() for i in idx])
        assert (row.check, row.case, row.limit) == ("folded", "b2 s3", 1e-4)
        assert row.max_abs == pytest.approx(diff.max(), rel=1e-12) and row.mean_abs == pytest.approx(
            diff.mean(), rel=1e-12
        )
        assert row.ok == (diff.max() <= 1e-4)
    same = got[0].argmax(-1) == want[0].argmax(-1)
    assert rows[0].top1 == pytest.approx(same.mean()) and 0 < rows[0].top1 < 1
    assert rows[1].top1 is None and rows[2].top1 is None
    assert [r.ok for r in rows] == [False, False, True]  # logits' moved row; present's 2e-4 noise


def test_compare_outputs_fp16_limit_scales_with_the_reference():
    want = [np.array([[0.5, -40.0, 3.0]], dtype=np.float32)]
    rows = compare_outputs("c", "b1", ["logits"], [want[0] + np.float32(0.7)], want, "fp16", 1e-4, 2e-2)
    assert rows[0].limit == pytest.approx(2e-2 * 40.0) and rows[0].ok  # 0.7 <= 0.8
    rows = compare_outputs("c", "b1", ["logits"], [want[0] + np.float32(0.9)], want, "fp16", 1e-4, 2e-2)
    assert not rows[0].ok
    small = [np.array([[0.1, -0.2]], dtype=np.float32)]
    assert compare_outputs("c", "b1", ["x"], [small[0]], small, "fp16", 1e-4, 0.5)[0].limit == 0.5


def test_compare_outputs_edge_cases():
    want = [np.zeros((1, 2, 3), dtype=np.float32)]
    exact = compare_outputs("c", "b1", ["logits"], [want[0] + np.float32(0.5)], want, "fp32", 0.5, 2e-2)[0]
    assert exact.ok and exact.max_abs == 0.5  # exactly at the limit passes
    bad = want[0].copy()
    bad[0, 0, 0] = np.nan
    assert not compare_outputs("c", "b1", ["logits"], [bad], want, "fp32", 1.0, 2e-2)[0].ok
    inf = want[0].copy()
    inf[0, 1, 2] = np.inf
    assert not compare_outputs("c", "b1", ["h"], [inf], want, "fp32", 1.0, 2e-2)[0].ok
    empty = [np.zeros((2, 1, 0, 4), dtype=np.float32)]  # a prefill's empty past
    row = compare_outputs("c", "b2", ["present.0.key"], empty, empty, "fp16", 1e-4, 2e-2)[0]
    assert (row.max_abs, row.mean_abs, row.limit, row.ok) == (0.0, 0.0, 2e-2, True)
    assert limit_for("fp16", np.zeros(0), 1e-4, 0.3) == 0.3


def test_report_ok_and_its_dict_round_trip():
    rows = [
        Comparison("folded", "b1 s1", "logits", 0.0, 0.0, 1.0, 1e-4, True),
        Comparison("folded", "b1 s1", "present.*", 1.0, 0.5, None, 1e-4, False),
    ]
    report = Report("g", "folded", "fp32", "cpu", "atol 0.0001", rows, ["a note"])
    assert not report.ok and Report("g", "folded", "fp32", "cpu", "t", rows[:1]).ok
    assert Report("g", "folded", "fp32", "cpu", "t", []).ok and Report("g", "m", "d", "c", "t", []).notes == []
    data = report.to_dict()
    assert data["ok"] is False and data["rows"][1] == {
        "check": "folded",
        "case": "b1 s1",
        "output": "present.*",
        "max_abs": 1.0,
        "mean_abs": 0.5,
        "top1": None,
        "limit": 1e-4,
        "ok": False,
    }
    assert (data["graph"], data["tolerance"], data["notes"]) == ("g", "atol 0.0001", ["a note"])
    again = Report.from_dict(data)
    assert again == report and again.to_dict() == data


def test_verify_mismatch_carries_its_report():
    report = Report("g", "folded", "fp32", "cpu", "t", [])
    err = VerifyMismatch(report, "graph g does not match")
    assert isinstance(err, ShareportError) and err.report is report and str(err) == "graph g does not match"


def test_feeds_cast_floats_only():
    inputs = {"input_ids": torch.tensor([[3, 4]]), "past": torch.ones(1, 2, dtype=torch.float32) / 3}
    feeds = _feeds(inputs, torch.float16)
    assert feeds["input_ids"].dtype == np.int64 and feeds["past"].dtype == np.float16
    np.testing.assert_array_equal(feeds["input_ids"], [[3, 4]])
    np.testing.assert_array_equal(feeds["past"], np.full((1, 2), np.float16(1 / 3)))


# ---------------------------------------------------------------------------------------- the graphs


def _said(report, floor: str, reference: str) -> str:
    """The header's tolerance from the report's own rows: the floor, the multiple of the reference
    run's largest own error, and the widest limit (the numbers the comparisons used)."""
    own = max(r.reference_error for r in report.rows)
    return (
        f"tolerance max({floor}, {report.multiple:g} x {reference} PyTorch's own error {own:.2g}) "
        f"= {max(r.limit for r in report.rows):.2g} at most"
    )


def test_folded_fp16_graph(graphs):
    report = verify(graphs.fp16, graphs.base, graphs.lora)
    assert report.ok, [r for r in report.rows if not r.ok]
    assert (report.graph, report.mode, report.dtype) == (str(graphs.fp16), "folded", "fp16")
    assert report.device == runtime.device_name() and report.notes == []
    assert report.tolerance == _said(report, f"rtol {FP16_RTOL:g} x max(1, max|ref|)", "float16")
    assert {r.check for r in report.rows} == {"folded"}
    assert {r.case for r in report.rows} == _cases(PAST_CASES, True)  # fp16 past fed as fp16
    assert {r.output for r in report.rows} == {"logits", "present.*"}
    assert all(r.limit >= FP16_RTOL for r in report.rows) and all(0 < r.max_abs for r in report.rows)
    wrong = verify(graphs.fp16, graphs.base, graphs.other)  # PyTorch attaches the other LoRA
    assert not wrong.ok
    loose = verify(graphs.fp16, graphs.base, graphs.other, rtol=10.0)
    assert loose.ok and loose.tolerance == _said(loose, "rtol 10 x max(1, max|ref|)", "float16")


def test_adapter_graph_checks_active_and_bare(graphs):
    report = verify(graphs.adapter, graphs.base, graphs.lora)
    assert report.ok, [r for r in report.rows if not r.ok]
    assert (report.mode, report.dtype, report.tolerance) == (
        "adapter",
        "fp32",
        _said(report, f"{FP32_ATOL:g}", "float32"),
    )
    assert report.notes == []  # names fit: nothing mapped, nothing to say
    rows = _by_check(report)
    assert set(rows) == {"adapter active", "no adapter"}
    assert {r.case for r in report.rows} == _cases(PAST_CASES, True)
    assert all({r.case for r in rows[c]} == _cases(PAST_CASES, True) for c in rows)
    assert {r.output for r in report.rows} == {"logits", "present.*"}
    assert all(r.limit == FP32_ATOL for r in report.rows)
    custom = verify(graphs.adapter, graphs.base, graphs.lora, atol=0.25, rtol=0.5)
    assert custom.tolerance == _said(custom, "0.25", "float32") and all(r.limit == 0.25 for r in custom.rows)


def test_adapter_graph_runs_the_shipped_file_and_compares_no_adapter_with_the_base(graphs, tmp_path):
    """PyTorch attaches --adapter; ORT runs the folder's adapter file. The shipped file is the right one
    and --adapter is another LoRA: 'adapter active' fails, 'no adapter' (the base on both sides) passes."""
    report = verify(graphs.adapter, graphs.base, graphs.other)
    rows = _by_check(report)
    assert not any(r.ok for r in rows["adapter active"] if r.output == "logits")
    assert all(r.ok for r in rows["no adapter"])
    # without a shipped file, --adapter itself is what runs: then both sides match
    bare = tmp_path / "bare"
    shutil.copytree(graphs.adapter, bare)
    (bare / graph_file.ADAPTER_NAME).unlink()
    assert verify(bare, graphs.base, graphs.other).ok
    # a shipped file of the other LoRA fails against the right --adapter
    shipped = tmp_path / "shipped"
    shutil.copytree(bare, shipped)
    slots = graph_file.graph_slots(graph_file.load_proto(graphs.adapter))
    write_onnx_adapter(adapter_arrays(load_adapter(graphs.other), slots), shipped / graph_file.ADAPTER_NAME)
    assert not verify(shipped, graphs.base, graphs.lora).ok


def test_olive_named_shipped_file_is_mapped_and_noted(graphs, tmp_path):
    olive = tmp_path / "olive"
    shutil.copytree(graphs.adapter, olive)
    shipped = olive / graph_file.ADAPTER_NAME
    arrays = read_onnx_adapter(shipped)
    write_onnx_adapter({name + OLIVE_SUFFIX: a for name, a in arrays.items()}, shipped)
    report = verify(olive, graphs.base, graphs.lora)
    assert report.ok
    assert report.notes == [
        f"{shipped}: mapped {len(arrays)} tensor names between Olive's '<name>{OLIVE_SUFFIX}' and the graph's names"
    ]


def test_embedded_graph_checks_default_and_zero_rank(graphs):
    report = verify(graphs.embedded, graphs.base, graphs.lora)
    assert report.ok, [r for r in report.rows if not r.ok]
    rows = _by_check(report)
    assert set(rows) == {"adapter active", "embedded default", "no adapter"}
    assert {r.case for r in report.rows} == _cases(PLAIN_CASES, False)
    wrong = _by_check(verify(graphs.embedded, graphs.base, graphs.other))
    assert not any(r.ok for r in wrong["embedded default"]) and not any(r.ok for r in wrong["adapter active"])
    assert all(r.ok for r in wrong["no adapter"])  # zero-rank feeds: the bare base on both sides


def test_torch_outputs_are_fp32_numpy_of_fp32_inputs(graphs):
    from shareport.export.signature import Signature, make_inputs
    from shareport.model import load_base_model

    proto = graph_file.load_proto(graphs.adapter)
    sig = Signature.from_dict(graph_file.read_info(proto, graphs.adapter)["signature"])
    model = load_base_model(graphs.base)
    inputs = make_inputs(sig, 1, 2, 3, torch.float16, seed=1)
    got = _torch_outputs(model, sig, inputs)
    want = _torch_outputs(model, sig, {n: t.float() if t.is_floating_point() else t for n, t in inputs.items()})
    assert all(g.dtype == np.float32 for g in got) and len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_shipped_file_that_does_not_fit_is_named(graphs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(graphs.adapter, broken)
    shipped = broken / graph_file.ADAPTER_NAME
    arrays = read_onnx_adapter(shipped)
    dropped = min(arrays)
    write_onnx_adapter({n: a for n, a in arrays.items() if n != dropped}, shipped)
    with pytest.raises(ShareportError, match=rf"^{shipped} lacks the graph's adapter input '{dropped}'"):
        verify(broken, graphs.base, graphs.lora)


def test_a_graph_without_shareport_metadata_is_named(graphs, tmp_path):
    import onnx

    bare = tmp_path / "bare"
    shutil.copytree(graphs.fp16, bare)
    model = onnx.load(str(bare / graph_file.GRAPH_NAME), load_external_data=False)
    del model.metadata_props[:]
    onnx.save(model, str(bare / graph_file.GRAPH_NAME))
    with pytest.raises(ShareportError, match=rf"^{bare}/{graph_file.GRAPH_NAME}: no shareport metadata"):
        verify(bare, graphs.base, graphs.lora)


def test_a_pickled_adapter_only_with_allow_pickle(graphs, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(graphs.lora, pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), pickled / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ShareportError, match="only a pickled checkpoint is present"):
        verify(graphs.fp16, graphs.base, pickled)
    assert verify(graphs.fp16, graphs.base, pickled, allow_pickle=True).ok


def test_an_adapter_that_does_not_fit_a_graph_without_its_file_is_named(graphs, tmp_path):
    """No shipped file: --adapter itself is checked against the graph's slots (here it lacks v_proj)."""
    bare = tmp_path / "bare"
    shutil.copytree(graphs.adapter, bare)
    (bare / graph_file.ADAPTER_NAME).unlink()
    full = load_adapter(graphs.lora)
    sites = {p: s for p, s in full.sites.items() if s.kind.endswith("q_proj")}
    used = {n for s in sites.values() for n in (s.a, s.b)}
    q_only = tmp_path / "q-only"
    save_adapter(full.with_sites({n: t for n, t in full.tensors.items() if n in used}, sites, full.form), q_only)
    with pytest.raises(ShareportError, match=r"^adapter lacks the graph's adapter input '.*v_proj"):
        verify(bare, graphs.base, q_only)
