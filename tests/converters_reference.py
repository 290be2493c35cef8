"""Dense references for the converter tests: what the factored code must agree with.

Everything here forms the dense updates dW_l and uses plain SVDs; it is only usable at test sizes.
"""

from __future__ import annotations

import itertools

import torch

F64 = torch.float64


def random_kind(
    gen: torch.Generator,
    n_sites: int,
    n_out: int,
    n_in: int,
    ranks,
    dtype=torch.float32,
    shared_a: bool = False,
    common: float = 0.0,
):
    """Random As/Bts; ``common`` mixes a shared component into every A and B (layers that agree),
    ``shared_a`` makes every A identical (a ShareLoRA checkpoint)."""
    ranks = [ranks] * n_sites if isinstance(ranks, int) else list(ranks)
    r_max = max(ranks)
    a_common = torch.randn(r_max, n_in, generator=gen, dtype=F64)
    b_common = torch.randn(n_out, r_max, generator=gen, dtype=F64)
    As, Bts = [], []
    for r in ranks:
        a = a_common[:r].clone() if shared_a else common * a_common[:r] + torch.randn(r, n_in, generator=gen, dtype=F64)
        decay = torch.logspace(0, -1.5, r, dtype=F64)  # trained adapters have decaying spectra
        bt = (common * b_common[:, :r] + torch.randn(n_out, r, generator=gen, dtype=F64)) * decay
        As.append(a.to(dtype))
        Bts.append(bt.to(dtype))
    return As, Bts


def llama_like(gen: torch.Generator, n_sites: int = 32):
    """Several kinds with different shapes and mixed per-site ranks, small dims (fast tests)."""
    shapes = {
        "q_proj": (24, 24),
        "k_proj": (8, 24),
        "v_proj": (8, 24),
        "o_proj": (24, 24),
        "gate_proj": (40, 24),
        "down_proj": (24, 40),
    }
    kinds = {}
    for i, (name, (n_out, n_in)) in enumerate(shapes.items()):
        ranks = [2 + (l + i) % 5 for l in range(n_sites)]
        kinds[name] = random_kind(gen, n_sites, n_out, n_in, ranks, common=0.5 * (i % 3))
    return kinds


def dense_updates(As, Bts):
    return [bt.to(F64) @ a.to(F64) for a, bt in zip(As, Bts)]


def energy(As, Bts) -> float:
    return sum(float(d.square().sum()) for d in dense_updates(As, Bts))


def tail(values: torch.Tensor, k: int) -> float:
    return float(values[k:].square().sum())


def eckart_young_sharea(As, Bts, k: int) -> float:
    """Best rank-k error with a shared row space: tail of the vertical stack's singular values."""
    return tail(torch.linalg.svdvals(torch.cat(dense_updates(As, Bts), dim=0)), k)


def eckart_young_shareb(As, Bts, k: int) -> float:
    """Best rank-k error with a shared column space: tail of the horizontal stack."""
    return tail(torch.linalg.svdvals(torch.cat(dense_updates(As, Bts), dim=1)), k)


def best_shareab(As, Bts, k: int) -> float:
    """min over rank-k M of sum_l ||dW_l - M||^2, with M the dense SVD truncation of the mean."""
    dws = dense_updates(As, Bts)
    mean = torch.stack(dws).mean(0)
    u, s, vh = torch.linalg.svd(mean, full_matrices=False)
    m_k = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return sum(float((d - m_k).square().sum()) for d in dws)


def dense_error(As, Bts, result) -> float:
    """sum_l ||dW_l - B_l A_l||^2 with the result's factors multiplied out."""
    total = 0.0
    for pos, dw in enumerate(dense_updates(As, Bts)):
        b, a = result.site_factors(pos)
        total += float((dw - b.to(F64) @ a.to(F64)).square().sum())
    return total


def grouped_error_at(As, Bts, a_shared: torch.Tensor, groups) -> float:
    """Dense error of sharing ``a_shared`` (orthonormal rows) and one mean B per group."""
    a_shared = a_shared.to(F64)
    dws = dense_updates(As, Bts)
    total = 0.0
    for g in groups:
        b = torch.stack([dws[l] @ a_shared.T for l in g]).mean(0)
        total += sum(float((dws[l] - b @ a_shared).square().sum()) for l in g)
    return total


def contiguous_splits(n: int, n_groups: int):
    """Every partition of 0..n-1 into n_groups runs of adjacent positions."""
    for cuts in itertools.combinations(range(1, n), n_groups - 1):
        bounds = (0, *cuts, n)
        yield [list(range(bounds[i], bounds[i + 1])) for i in range(n_groups)]


def as_sets(groups):
    """A partition as a set of sets: equality that ignores the order of groups."""
    return {frozenset(g) for g in groups}
