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


def test_one_layer_kind_is_text_axes_are_labelled_and_rank_ticks_are_integers(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from shareport.adapter import Adapter
    from shareport.plots import _is_our_figure, plot_adapter

    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{i}.self_attn.q_proj": (
            torch.randn(2, 16, generator=gen),
            torch.randn(16, 2, generator=gen),
            2.0,
        )
        for i in range(3)
    }
    factors["model.layers.2.mlp.down_proj"] = (
        torch.randn(2, 16, generator=gen),
        torch.randn(16, 2, generator=gen),
        2.0,
    )
    adapter = Adapter.from_factors(factors)
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    for name in ("a.png", "b.png"):
        plot_adapter(adapter, tmp_path / name, ranks={"self_attn.q_proj": 2})
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert _is_our_figure(tmp_path / "a.png")
    (one_dist, one_energy), (many_dist, many_energy) = figures[0].axes[0:2], figures[0].axes[2:4]
    assert not one_dist.images and "one layer" in one_dist.texts[0].get_text()
    assert many_dist.images and many_dist.get_xlabel() and many_dist.get_ylabel()
    for ax in (one_energy, many_energy):
        assert ax.get_xlabel() and ax.get_ylabel()
        assert all(float(t).is_integer() for t in ax.get_xticks())
