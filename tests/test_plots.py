"""Figures from inspect/convert --plot, and the numbers drawn in them."""

import builtins

import pytest
import torch

from shareport.files.adapters import load_adapter
from shareport.plots import energy_curve, update_distances
from tests.tiny import make_peft_adapter, tiny_llama


@pytest.fixture
def lora(tmp_path):
    make_peft_adapter(tiny_llama(layers=4), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    return tmp_path / "lora"


def test_distances_and_energy_match_dense(lora):
    adapter = load_adapter(lora)
    paths = [s.path for s in adapter.kinds()["self_attn.q_proj"]]
    dense = [adapter.update(p, torch.float64) for p in paths]
    expected = torch.tensor([[float(torch.linalg.norm(x - y)) for y in dense] for x in dense], dtype=torch.float64)
    torch.testing.assert_close(update_distances(adapter, paths), expected, atol=1e-6, rtol=1e-6)
    s = torch.linalg.svdvals(torch.cat(dense)) ** 2
    curve = energy_curve(adapter, paths)
    torch.testing.assert_close(curve, (s.cumsum(0) / s.sum())[: len(curve)], atol=1e-6, rtol=1e-6)
    assert float(curve[-1]) == pytest.approx(1.0)


def test_plot_files_are_png_and_deterministic(lora, tmp_path, cli):
    for name in ("a.png", "b.png"):
        r = cli("inspect", lora, "--plot", tmp_path / name)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    r = cli("convert", lora, "--to", "aslora", "-o", tmp_path / "as", "--plot", tmp_path / "c.png")
    assert r.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 1000
    r = cli("inspect", lora, "--plot", tmp_path / "a.png")
    assert r.exit_code != 0 and "--overwrite" in r.output


def test_missing_matplotlib_says_how_to_install(lora, tmp_path, cli, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = cli("convert", lora, "--to", "sharea", "-o", tmp_path / "out", "--plot", tmp_path / "x.png")
    assert r.exit_code != 0 and "pip install 'shareport[plot]'" in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()
