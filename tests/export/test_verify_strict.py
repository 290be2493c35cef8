"""verify is a hard check: its default tolerances are pinned, an error just above them fails, and a
folded graph is compared with the adapter *attached* (not with the exporter's own ``fold``)."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shareport.cli.main import main
from shareport.export import verify as verify_module
from shareport.export.exporter import ExportOptions, export
from shareport.export.verify import verify
from shareport.files.adapters import load_adapter, save_adapter
from shareport.model import surgery
from tests.onnx_cases import make_case
from tests.tiny import tiny_llama


def _export(adapter, base, out, **options):
    return export(adapter, base, out, ExportOptions(**options), progress=False, verify=False).path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    base, adapter = make_case(
        root, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    return SimpleNamespace(
        root=root,
        base=base,
        adapter=adapter,
        fp32=_export(adapter, base, root / "fp32", mode="folded"),
        fp16=_export(adapter, base, root / "fp16", mode="folded", dtype="fp16"),
    )


def _scaled(case, factor: float):
    """The case's adapter with every site's scale multiplied by ``factor`` (native format)."""
    adapter = load_adapter(case.adapter)
    sites = {p: s.__class__(s.path, s.kind, s.layer, s.a, s.b, s.scale * factor) for p, s in adapter.sites.items()}
    out = case.root / f"scaled-{factor:g}"
    if not out.exists():
        save_adapter(adapter.with_sites(dict(adapter.tensors), sites, adapter.form), out)
    return out


def test_default_tolerances_are_pinned():
    """README: fp32 max abs diff <= 1e-4; fp16 <= 2e-2 x max(1, max |PyTorch|)."""
    import inspect as pyinspect

    from shareport import flows
    from shareport.export import exporter

    assert verify_module.FP32_ATOL == 1e-4 and verify_module.FP16_RTOL == 2e-2
    for func in (verify, flows.verify, flows.export, exporter.export):
        params = pyinspect.signature(func).parameters
        assert params["atol"].default == 1e-4 and params["rtol"].default == 2e-2, func
    for command in ("verify", "export"):
        options = {p.name: p.default for p in main.commands[command].params}
        assert options["atol"] == 1e-4 and options["rtol"] == 2e-2, command
    ref = np.array([0.5, -3.0])
    assert verify_module.limit_for("fp32", ref, 1e-4, 2e-2) == 1e-4
    assert verify_module.limit_for("fp16", ref, 1e-4, 2e-2) == pytest.approx(2e-2 * 3.0)
    assert verify_module.limit_for("fp16", ref / 10, 1e-4, 2e-2) == pytest.approx(2e-2)  # max(1, ...)


def test_fp32_error_just_above_the_tolerance_fails(case):
    """The same graph against its adapter scaled by 1.001: an error of a few 1e-4, far below a loose
    tolerance (1e-1) but above 1e-4, must fail; the unscaled adapter passes."""
    assert verify(case.fp32, case.base, case.adapter).ok
    report = verify(case.fp32, case.base, _scaled(case, 1.001))
    worst = max(r.max_abs for r in report.rows)
    assert 1e-4 < worst < 1e-2, worst  # near the threshold: the check is what decides
    assert not report.ok and all(r.limit == 1e-4 for r in report.rows)


def test_fp16_error_above_the_relative_bound_fails(case):
    """fp16: an error of ~5-25% of max(1, |ref|) is above 2e-2 of it but below a loose 0.5."""
    assert verify(case.fp16, case.base, case.adapter).ok
    report = verify(case.fp16, case.base, _scaled(case, 1.25))
    ratios = [r.max_abs / r.limit * 2e-2 for r in report.rows]  # the error as a share of max(1, |ref|)
    assert 2e-2 < max(ratios) < 0.5, ratios
    assert not report.ok


def _fold_without_scale(model, adapter):
    """A broken fold: W += B @ A, the scale dropped."""
    with torch.no_grad():
        for path, site in sorted(adapter.sites.items()):
            module = surgery.get_module(model, path)
            delta = adapter.tensors[site.b].float() @ adapter.tensors[site.a].float()
            module.weight.add_(delta.to(module.weight.dtype))
    return model


def test_folded_graph_is_checked_against_the_attached_adapter(case, tmp_path, monkeypatch):
    """A fold bug (scale dropped) everywhere ``fold`` is bound: the exported graph is wrong and
    verify must say so, since its PyTorch reference attaches the adapter instead of folding it."""
    assert load_adapter(case.adapter).sites and all(s.scale == 2.0 for s in load_adapter(case.adapter).sites.values())
    original = surgery.fold
    for name, module in list(sys.modules.items()):
        if name.startswith("shareport") and getattr(module, "fold", None) is original:
            monkeypatch.setattr(module, "fold", _fold_without_scale)
    graph = _export(case.adapter, case.base, tmp_path / "broken", mode="folded")
    report = verify(graph, case.base, case.adapter)
    assert not report.ok
    assert max(r.max_abs for r in report.rows) > 1e-2
