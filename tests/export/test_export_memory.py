"""`export` estimates its memory from the base's size and refuses, before loading anything, what the
machine cannot hold; big bases are written with external data, in fp16 if asked."""

import numpy as np
import onnx
import pytest

from shareport.errors import ShareportError
from shareport.export import exporter, graph_file
from shareport.export.exporter import ExportOptions, export
from shareport.model import load_base_model
from tests.onnx_cases import make_case
from tests.tiny import TARGETS, tiny_llama


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("case")
    return make_case(root, lambda: tiny_llama(layers=2), r=4, lora_alpha=8, target_modules=TARGETS["llama"])


def test_base_size_is_read_from_the_headers(case):
    base, _ = case
    model = load_base_model(base)
    assert exporter.base_parameters(base) == sum(p.numel() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    for dtype, factor in exporter.MEMORY_FACTOR.items():
        assert exporter.export_memory(base, dtype) == int(factor * 4 * params) + exporter.MEMORY_FIXED


def test_available_memory_reads_the_system():
    have = exporter.available_memory()
    assert have is None or have > 0


def test_export_too_big_for_memory_is_refused_before_loading(case, tmp_path, monkeypatch, cli):
    base, adapter = case
    monkeypatch.setattr(exporter, "available_memory", lambda: 100 * 2**20)  # 100 MiB free
    monkeypatch.delenv(exporter.SKIP_MEMORY_CHECK, raising=False)

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded before the memory check")

    monkeypatch.setattr(exporter, "prepare_model", never)
    out = tmp_path / "onnx"
    with pytest.raises(ShareportError) as refused:
        export(adapter, base, out, ExportOptions(), progress=False)
    message = str(refused.value)
    need = exporter.export_memory(base, "fp32") / 2**30
    assert "\n" not in message and str(base) in message and f"{need:.1f} GiB" in message and "0.1 GiB" in message
    assert "--dtype fp16" in message and exporter.SKIP_MEMORY_CHECK in message
    result = cli("export", adapter, "--base", base, "-o", out, "--dtype", "fp16")
    assert result.exit_code == 1 and "Error:" in result.output and "--dtype fp16" not in result.output
    assert not out.exists()


def test_override_exports_fp16_with_external_data(case, tmp_path, monkeypatch):
    """The >2 GB path on a tiny base: weights in model.onnx_data, fp16, verified against PyTorch."""
    base, adapter = case
    monkeypatch.setattr(exporter, "available_memory", lambda: 1)
    monkeypatch.setenv(exporter.SKIP_MEMORY_CHECK, "1")
    monkeypatch.setattr(graph_file, "EXTERNAL_DATA_BYTES", 0)
    result = export(adapter, base, tmp_path / "onnx", ExportOptions(mode="folded", dtype="fp16"), progress=False)
    assert result.report.ok
    assert (tmp_path / "onnx" / graph_file.DATA_NAME).is_file()
    proto = onnx.load(str(tmp_path / "onnx" / graph_file.GRAPH_NAME), load_external_data=False)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in weights} == {np.dtype(np.float16)}
