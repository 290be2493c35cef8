"""``shareport doctor``: a clash of two ONNX Runtime wheels exits non-zero with a fix after which
``pip check`` is clean, and the CUDA provider is reported as working, missing a named library, or
not built in. Stand-ins replace the installed wheels and onnxruntime: no GPU needed."""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np
import pytest

from shareport.export import doctor

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# Requires-Dist (unconditional) of the real wheels, read off their METADATA (0.18.0 / 1.31.1 / 1.32.0)
REQUIRES = {
    "onnxruntime-genai": {"onnxruntime"},
    "onnxruntime-genai-cuda": {"onnxruntime-gpu"},
    "onnxruntime-gpu": set(),
    "onnxruntime": set(),
}
PACKAGE = {
    "onnxruntime": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime",
    "onnxruntime-genai": "onnxruntime_genai",
    "onnxruntime-genai-cuda": "onnxruntime_genai",
}
CLASHING = [
    {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"},
    {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1", "onnxruntime-genai": "0.18.0"},
    {"onnxruntime-gpu": "1.31.1", "onnxruntime-genai": "0.18.0", "onnxruntime-genai-cuda": "0.18.0"},
    {
        "onnxruntime": "1.32.0",
        "onnxruntime-gpu": "1.31.1",
        "onnxruntime-genai": "0.18.0",
        "onnxruntime-genai-cuda": "0.18.0",
    },
]


def _after(command: str, installed: set[str]) -> set[str]:
    """What is installed after ``pip uninstall -y A B && pip install C D`` (pip resolving C, D's requirements)."""
    uninstall, install = command.split(" && ")
    assert uninstall.startswith("pip uninstall -y ") and install.startswith("pip install ")
    left = installed - set(uninstall.split()[3:])
    todo = [w for w in install.split()[2:] if not w.startswith("-")]
    while todo:
        name = todo.pop()
        if name not in left:
            left.add(name)
            todo += sorted(REQUIRES[name])
    return left


@pytest.mark.parametrize("dists", CLASHING, ids=lambda d: "+".join(sorted(d)))
def test_the_clash_fix_leaves_one_owner_per_package_and_pip_check_clean(dists):
    report = doctor.doctor(dists, dependents=[], cuda=lambda: {"state": "x", "missing": None, "line": "x"})
    assert report["clashes"] and report["fix"]
    left = _after(report["fix"], set(dists))
    unmet = {(n, r) for n in left for r in REQUIRES[n] if r not in left}
    assert not unmet  # what pip check would list
    owners = [PACKAGE[n] for n in left]
    assert len(owners) == len(set(owners))
    assert "onnxruntime-gpu" in left and all(n in report["fix"].split("&&")[0] for n in dists)  # fresh reinstall


def test_no_clash_no_fix_and_the_cuda_wheels_pass():
    report = doctor.doctor(
        {"onnxruntime-gpu": "1.31.1", "onnxruntime-genai-cuda": "0.18.0"},
        dependents=[],
        cuda=lambda: {"state": "x", "missing": None, "line": "x"},
    )
    assert report["clashes"] == [] and report["fix"] is None


def test_other_dependents_of_the_cpu_wheel_are_named(monkeypatch):
    def dist(name, requires):
        return types.SimpleNamespace(metadata={"Name": name}, requires=requires)

    monkeypatch.setattr(
        doctor.metadata,
        "distributions",
        lambda: [
            dist("optimum", ["onnxruntime>=1.17", "numpy"]),
            dist("other", ["onnxruntime-gpu"]),
            dist("extra-only", ['onnxruntime; extra == "cpu"']),
            dist("onnxruntime-genai", ["onnxruntime"]),
            dist("rapidocr", ["onnxruntime (>=1.7)"]),
            dist("none", None),
        ],
    )
    assert doctor.onnxruntime_dependents() == ["optimum", "rapidocr"]
    report = doctor.doctor(CLASHING[0], cuda=lambda: {"state": "x", "missing": None, "line": "x"})
    assert any("optimum, rapidocr" in w for w in report["warnings"])


@pytest.fixture
def stub_machine(monkeypatch):
    def stub(dists):
        monkeypatch.setattr(doctor, "installed_distributions", lambda: dict(dists))
        monkeypatch.setattr(doctor, "onnxruntime_dependents", lambda: [])
        monkeypatch.setattr(
            doctor,
            "cuda_ep_status",
            lambda: {
                "state": "not working",
                "missing": "libcudart.so.13",
                "line": "CUDA EP: not working: libcudart.so.13 is missing",
            },
        )

    return stub


def test_cli_exits_non_zero_on_a_clash_and_prints_the_fix(cli, stub_machine):
    stub_machine(CLASHING[1])
    result = cli("doctor")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "CUDA EP: not working: libcudart.so.13 is missing" in lines
    assert lines[-1] == (
        "fix: pip uninstall -y onnxruntime onnxruntime-gpu onnxruntime-genai "
        "&& pip install onnxruntime-gpu onnxruntime-genai-cuda"
    )
    as_json = cli("doctor", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.output)["fix"] == lines[-1][len("fix: ") :]


def test_cli_exits_zero_without_a_clash(cli, stub_machine):
    stub_machine({"onnxruntime-gpu": "1.31.1"})
    result = cli("doctor")
    assert result.exit_code == 0 and "fix:" not in result.output


# --- the CUDA provider, with a stand-in onnxruntime ---


def _fake_ort(tmp_path, listed=(CUDA, CPU), runs_on=CUDA, raises=None, add=lambda x: x + x):
    fake = types.ModuleType("onnxruntime")
    fake.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")
    fake.get_available_providers = lambda: list(listed)
    fake.SessionOptions = types.SimpleNamespace
    fake.preloaded = []
    fake.preload_dlls = lambda: (fake.preloaded.append(True), print("Failed to load libcudnn.so.9"))

    def session(model, options, providers):
        assert providers == [CUDA]
        if raises:
            raise raises
        return types.SimpleNamespace(get_providers=lambda: [runs_on, CPU], run=lambda names, feeds: [add(feeds["x"])])

    fake.InferenceSession = session
    return fake


def _loads(path):
    return None


def test_cuda_ep_not_listed_is_the_cpu_build(tmp_path):
    status = doctor.cuda_ep_status(_fake_ort(tmp_path, listed=(CPU,)), _loads)
    assert status == {
        "state": "not available",
        "missing": None,
        "line": "CUDA EP: not available (CPU build of onnxruntime)",
    }


def test_cuda_ep_missing_library_is_named_from_the_loader(tmp_path):
    seen = []

    def refuse(path):
        seen.append(path)
        raise OSError("libcublasLt.so.13: cannot open shared object file: No such file or directory")

    ort = _fake_ort(tmp_path)
    status = doctor.cuda_ep_status(ort, refuse)
    assert status["state"] == "not working" and status["missing"] == "libcublasLt.so.13"
    assert "libcublasLt.so.13 is missing" in status["line"] and "\n" not in status["line"]
    assert seen == [str(tmp_path / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so")]
    assert ort.preloaded  # preload_dlls ran first (it may find the libraries), quietly


def test_cuda_ep_working_runs_a_session_and_checks_its_answer(tmp_path):
    assert doctor.cuda_ep_status(_fake_ort(tmp_path), _loads)["state"] == "working"
    wrong = doctor.cuda_ep_status(_fake_ort(tmp_path, add=lambda x: x * 3), _loads)
    assert wrong["state"] == "not working" and "wrong" in wrong["line"]


def test_cuda_ep_silent_fallback_to_cpu_is_not_working(tmp_path):
    status = doctor.cuda_ep_status(_fake_ort(tmp_path, runs_on=CPU), _loads)
    assert status["state"] == "not working" and "ran on CPUExecutionProvider" in status["line"]


def test_cuda_ep_ort_error_names_the_library(tmp_path):
    error = RuntimeError(
        'Error loading "/x/libonnxruntime_providers_cuda.so" which depends on "libcudnn.so.9" which is missing.\nmore'
    )
    status = doctor.cuda_ep_status(_fake_ort(tmp_path, raises=error), _loads)
    assert status["missing"] == "libcudnn.so.9" and "\n" not in status["line"]


def test_the_probe_graph_runs_in_this_onnxruntime():
    """onnx >= 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses: the probe must not."""
    import onnxruntime

    session = onnxruntime.InferenceSession(doctor.probe_model(), providers=[CPU])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.array([[0, 2, 4], [6, 8, 10]], np.float32))


def test_cuda_ep_status_on_this_machine():
    """The real check: where it names a missing library, that library really does not load here."""
    import onnxruntime

    status = doctor.cuda_ep_status()
    if CUDA not in onnxruntime.get_available_providers():
        assert status["line"] == doctor.CUDA_NOT_AVAILABLE
    elif status["missing"]:
        with pytest.raises(OSError):
            ctypes.CDLL(status["missing"])
    else:
        assert status["state"] == "working" or "CUDA EP: not working" in status["line"]


def test_the_cuda_probe_prints_nothing_where_cuda_is_listed_but_cannot_run():
    """onnxruntime-gpu on a machine without CUDA logs the failed provider load through ORT's default
    logger (a red ``[E:onnxruntime`` line in the middle of an export); the probe keeps it quiet and
    says why in its note instead. Where CUDA is not listed, or works, there is nothing to check."""
    import subprocess
    import sys

    import onnxruntime as ort

    from shareport.export import runtime

    if runtime.CUDA not in ort.get_available_providers() or runtime.providers()[0] == runtime.CUDA:
        pytest.skip("CUDA is not listed here, or it runs")
    code = "from shareport.export import runtime; print(runtime.providers())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "CPUExecutionProvider" in done.stdout
    assert "onnxruntime" not in done.stderr, done.stderr[-500:]
