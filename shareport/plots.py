"""Figures: per kind, the layer-by-layer distance matrix of the updates with the B groups
marked, and the retained energy against the shared rank.

matplotlib is an optional extra (``pip install 'shareport[plot]'``); it is imported only here,
and only when a figure is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import converters

from .adapter import Adapter
from .errors import ShareportError
from .files.atomic import atomic_file, check_output_file


def update_distances(adapter: Adapter, paths: list[str]) -> torch.Tensor:
    """||dW_i - dW_j||_F for every pair, from the factors: <B_i A_i, B_j A_j> = sum((B_j^T B_i) * (A_j A_i^T))."""
    factors = [adapter.factors(p, torch.float64) for p in paths]
    n = len(paths)
    inner = torch.empty(n, n, dtype=torch.float64)
    for i, (a_i, b_i) in enumerate(factors):
        for j, (a_j, b_j) in enumerate(factors[: i + 1]):
            inner[i, j] = inner[j, i] = ((b_j.T @ b_i) * (a_j @ a_i.T)).sum()
    sq = inner.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * inner).clamp(min=0).sqrt()


def energy_curve(adapter: Adapter, paths: list[str]) -> torch.Tensor:
    """Fraction of the kind's energy a shared A of rank k keeps, for k = 1, 2, ... (ShareA spectrum)."""
    As, Bts = zip(*(adapter.factors(p) for p in paths))
    spectrum = converters.spectrum("sharea", list(As), list(Bts))
    total = float(spectrum.sum())
    return spectrum.cumsum(0) / total if total > 0 else torch.ones_like(spectrum)


def has_matplotlib() -> bool:
    """Whether figures can be drawn (matplotlib is an optional extra)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ShareportError(
            "--plot needs matplotlib: pip install 'shareport[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def check_plot_path(path: str | os.PathLike, overwrite: bool, inputs=()) -> None:
    """Refuse a bad figure path before any work is done."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ShareportError(f"--plot '{path}': the figure is a PNG, give a path ending in .png")
    check_output_file(path, overwrite, inputs, what="--plot", owned=_is_our_figure)
    _pyplot()


# PNG text chunk every figure carries, so --overwrite can tell shareport's figures from others
_SOFTWARE = "shareport"


def _is_our_figure(path: Path) -> bool:
    head = path.read_bytes()[:4096]
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + _SOFTWARE.encode() in head


def plot_adapter(
    source: Adapter, path: str | os.PathLike, grouped: Adapter | None = None, ranks: dict[str, int] | None = None
) -> Path:
    """Write the figure for ``source``; groups come from ``grouped`` (default: the source itself).

    One row per kind: left, the distance matrix of the source's updates with each group of
    layers that shares a B outlined; right, retained energy against rank, the chosen rank marked.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    grouped = grouped or source
    kinds = source.kinds()
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 3.6 * len(kinds)), squeeze=False)
    for row, (kind, sites) in enumerate(kinds.items()):
        paths = [s.path for s in sites]
        layers = [s.layer for s in sites]
        ax = axes[row][0]
        if len(paths) == 1:  # a 1x1 matrix says nothing: say so in words
            ax.axis("off")
            ax.text(
                0.5,
                0.5,
                f"{kind}: one layer ({layers[0]})\nno distances between layers, no groups",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        else:
            _distance_panel(
                plt, fig, ax, kind, layers, update_distances(source, paths), [grouped.sites[p].b for p in paths]
            )
        curve = energy_curve(source, paths)
        ax = axes[row][1]
        ax.plot(range(1, len(curve) + 1), curve.numpy(), marker=".")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("shared rank k")
        ax.set_ylabel("energy kept (fraction)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{kind}: ShareA energy vs rank")
        if ranks and kind in ranks:
            ax.axvline(ranks[kind], color="red", ls="--", label=f"chosen rank {ranks[kind]}")
            ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_frontier(
    points: list, front: list, chosen, path: str | os.PathLike, ylabel: str, keep: float, *, size: str = "parameters"
) -> Path:
    """Fidelity against percent of the LoRA's parameters (``size`` "parameters") or against the bytes
    the factors are stored in ("bytes"): one line per form (converted points filled, recovered points
    hollow), the Pareto front as a step line, the chosen point ringed."""
    plt = _pyplot()

    def x(p):
        return p.bytes if size == "bytes" else 100 * p.ratio

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    for i, form in enumerate(sorted({p.form for p in points})):
        for recovered, style in ((False, dict(marker="o")), (True, dict(marker="o", mfc="none", ls="--"))):
            pts = sorted((p for p in points if p.form == form and p.recovered == recovered), key=x)
            if pts:
                ax.plot(
                    [x(p) for p in pts],
                    [p.fidelity for p in pts],
                    color=colors(i),
                    **style,
                    label=f"{form}{' recovered' if recovered else ''}",
                )
    if front:
        ax.step(
            [x(p) for p in front],
            [p.fidelity for p in front],
            where="post",
            color="black",
            lw=1,
            alpha=0.6,
            label="Pareto front",
        )
    if chosen is not None:
        ax.scatter(
            [x(chosen)],
            [chosen.fidelity],
            s=220,
            facecolors="none",
            edgecolors="red",
            lw=2,
            label=f"smallest keeping {keep:g}",
        )
    ax.axhline(keep, color="red", ls=":", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    if size == "bytes":
        ax.set_xlabel("bytes of the stored factors (log scale)")
    else:
        # ticks where the points are (the budgets asked for), not the log axis's own 10, 20, 30 ...
        ax.xaxis.set_major_locator(FixedLocator(sorted({100 * p.budget for p in points})))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("parameters, % of the source LoRA (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    """Write the figure atomically (its path was checked before the work began) and close it."""
    fig.tight_layout()
    try:
        with atomic_file(path, overwrite=True, what="figure", owned=_is_our_figure) as tmp:
            # no matplotlib version stamp (same input, same bytes); our name marks the file as ours
            fig.savefig(tmp, dpi=90, metadata={"Software": _SOFTWARE})
    finally:
        plt.close(fig)
    return Path(path)


def _distance_panel(plt, fig, ax, kind: str, layers: list[int], dist: torch.Tensor, b_of: list[str]) -> None:
    """The layer-by-layer distances, each group of layers sharing a B outlined in red."""
    im = ax.imshow(dist.numpy(), cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("||dW_i - dW_j||_F")
    ax.set_title(f"{kind}: distance between layers' updates")
    ticks = list(range(len(layers)))
    ax.set_xticks(ticks, [str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(ticks, [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    for name in sorted(set(b_of)):
        members = [i for i, b in enumerate(b_of) if b == name]
        if 1 < len(members) < len(b_of):
            for i in members:
                for j in members:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
