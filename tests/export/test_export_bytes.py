"""Same inputs, same model.onnx bytes, whatever the install path (and after an edit that moves lines).

torch's exporter records per node the stack trace that built it (absolute paths, line numbers and
source lines of shareport's files), so before ``graph_file.strip_debug`` two installs wrote different
graphs. Here the package is copied to two directories (the second deeper, with a line inserted at the
top of the modules the trace passes through) and each copy exports the same adapter in a subprocess.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

from shareport.export import graph_file
from shareport.export.verify import verify
from tests.onnx_cases import make_case
from tests.tiny import tiny_llama

PACKAGE = Path(__file__).resolve().parents[2] / "shareport"
EXPORT = """
import sys, shareport
from shareport.export.exporter import ExportOptions, export
assert shareport.__file__.startswith(sys.argv[1]), shareport.__file__
export(sys.argv[2], sys.argv[3], sys.argv[4], ExportOptions(mode="adapter", with_past=True), progress=False, verify=False)
"""


def _install(root: Path, moved: bool) -> Path:
    shutil.copytree(PACKAGE, root / "shareport", ignore=shutil.ignore_patterns("__pycache__"))
    if moved:  # an edit that moves every line of the files torch's trace records
        for name in ("export/wrapper.py", "export/exporter.py", "model/surgery.py"):
            path = root / "shareport" / name
            path.write_text("# moved\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def _export(install: Path, adapter: Path, base: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(install), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", EXPORT, str(install), str(adapter), str(base), str(out)],
        cwd=install,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_two_installs_write_the_same_bytes_and_the_graph_verifies(tmp_path):
    base, adapter = make_case(
        tmp_path / "case",
        lambda: tiny_llama(layers=2),
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    one = _export(_install(tmp_path / "a", moved=False), adapter, base, tmp_path / "out-a")
    two = _export(_install(tmp_path / "another" / "install", moved=True), adapter, base, tmp_path / "out-b")
    for name in (graph_file.GRAPH_NAME, graph_file.ADAPTER_NAME):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    graph = one / graph_file.GRAPH_NAME
    assert str(tmp_path).encode() not in graph.read_bytes()  # no path of either install, nor of the inputs
    onnx.checker.check_model(str(graph), full_check=True)
    proto = onnx.load(str(graph))
    assert not any(n.metadata_props for n in proto.graph.node) and not proto.graph.metadata_props
    assert [p.key for p in proto.metadata_props] == [graph_file.INFO_KEY]  # shareport's own record stays
    report = verify(one, base, adapter)
    assert report.ok, report.failure()
