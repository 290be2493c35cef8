"""Calibrated projection on a 7B-shaped kind: time, rounds, gain over plain, statistics memory.

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_calibrated_math [--sites 32] [--rank 16]
        [--dim 4096] [--k 16] [--truncate 8] [--groups 8] [--tokens 1024] [--lam 1e-2]

Not collected by pytest. The kind: L sites, LoRA rank r, n_in = n_out = dim, random factors
(the A's share a common component, as trained layers of one kind do). Inputs per site are
low-rank plus noise, ``x = U_l z + 0.05 e`` with U_l = 32 directions common to all layers and 32
of the layer's own, decaying scales growing with depth, N tokens. They are drawn directly in
the statistics basis: ``Q^T x = (Q^T U_l) z + 0.05 Q^T e`` and ``Q^T e`` is exactly standard normal
in p dimensions, so S_l = (1/N) sum (Q^T x)(Q^T x)^T has the distribution a collector would see,
without N x dim x p products per site.

For each form (per-site truncation "lora" at rank ``--truncate``, the shared forms at ``--k``):
wall and CPU seconds of the calibrated conversion, alternation rounds (kept run / all starts),
its objective on the raw statistics, and the plain converter's result scored on the same
statistics. Then the memory of the statistics for a LLaMA-7B LoRA (7 kinds x 32 layers) in
the basis (p x p) against full input second moments (n_in x n_in). Last line: the calibrated
ShareA's output error relative to plain ShareA's.
"""

from __future__ import annotations

import time

import torch

# run from the checkout's root (python3 -m): this checkout's converters come first on sys.path,
# not whichever copy an editable install points at
import converters
from tests.benchmarks.bench_converters_math import kind_parser

F64 = torch.float64
LLAMA7B_KINDS = {  # kind -> n_in
    "q_proj": 4096,
    "k_proj": 4096,
    "v_proj": 4096,
    "o_proj": 4096,
    "gate_proj": 4096,
    "up_proj": 4096,
    "down_proj": 11008,
}


def make_kind(n_sites: int, rank: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(rank, dim, generator=gen, dtype=F64)
    As = [(0.7 * common + torch.randn(rank, dim, generator=gen, dtype=F64)) / dim**0.5 for _ in range(n_sites)]
    decay = torch.logspace(0, -1, rank, dtype=F64)
    Bts = [torch.randn(dim, rank, generator=gen, dtype=F64) * decay for _ in range(n_sites)]
    return As, Bts


def make_statistics(q: torch.Tensor, n_sites: int, tokens: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dim, p = q.shape
    shared = torch.randn(dim, 32, generator=gen, dtype=F64)
    scales = torch.logspace(0, -2, 64, dtype=F64)
    stats = []
    for layer in range(n_sites):
        own = torch.randn(dim, 32, generator=gen, dtype=F64)
        directions = q.T @ (torch.cat([shared, own], dim=1) * scales * (1 + 0.1 * layer))  # (p, 64)
        x = torch.randn(tokens, 64, generator=gen, dtype=F64) @ directions.T + 0.05 * torch.randn(
            tokens, p, generator=gen, dtype=F64
        )
        stats.append(x.T @ x / tokens)
    return stats


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = kind_parser(__doc__)
    parser.add_argument("--truncate", type=int, default=8, help="rank of the per-site truncation")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--lam", type=float, default=converters.DEFAULT_RIDGE)
    args = parser.parse_args()

    As, Bts = make_kind(args.sites, args.rank, args.dim)
    q = converters.calibration_basis(As)
    S = make_statistics(q, args.sites, args.tokens)
    p = q.shape[1]
    identity = [torch.eye(p, dtype=F64)] * args.sites
    # first LAPACK calls pay one-off setup: warm up on a small kind
    small_As, small_Bts = make_kind(2, 2, 64)
    small_q = converters.calibration_basis(small_As)
    small_identity = [torch.eye(small_q.shape[1], dtype=F64)] * 2
    converters.convert_kind_calibrated("sharea", small_As, small_Bts, small_identity, 2)

    print(
        f"kind: L={args.sites} r={args.rank} n_in=n_out={args.dim} p={p} k={args.k} "
        f"truncate={args.truncate} groups={args.groups} tokens={args.tokens} lam={args.lam} "
        f"threads={torch.get_num_threads()}"
    )
    header = (
        f"{'form':<9}{'wall s':>8}{'cpu s':>8}{'rounds':>10}{'calibrated':>14}{'plain':>14}"
        f"{'cal/plain':>10}{'frob cal/plain':>16}"
    )
    print(header)
    ratios = {}
    for method in ("lora", "shareb", "shareab", "sharea", "aslora"):
        groups = args.groups if method == "aslora" else None
        k = args.truncate if method == "lora" else args.k
        res, wall, cpu = timed(
            lambda: converters.convert_kind_calibrated(method, As, Bts, S, k, groups=groups, lam=args.lam)
        )
        if method == "lora":  # the plain truncation: the calibrated one with identity statistics
            plain = converters.convert_kind_calibrated("lora", As, Bts, identity, k, lam=0.0).result
        else:
            plain = converters.convert_kind(method, As, Bts, k, groups=groups)
        plain_raw = converters.calibrated_objective(As, Bts, S, q, plain)
        ratios[method] = res.raw_objective / plain_raw
        rounds = f"{res.iterations}/{res.total_iterations}"
        print(
            f"{method:<9}{wall:>8.2f}{cpu:>8.2f}{rounds:>10}{res.raw_objective:>14.6g}{plain_raw:>14.6g}"
            f"{ratios[method]:>10.4f}{res.frobenius_error / plain.error:>16.4f}"
        )

    layers, lora_rank = 32, 16  # LLaMA-7B with an r=16 LoRA on every projection: p = 512 per kind
    basis_entries = sum(min(n_in, layers * lora_rank) ** 2 for n_in in LLAMA7B_KINDS.values()) * layers
    full_entries = sum(n_in**2 for n_in in LLAMA7B_KINDS.values()) * layers
    print("\nstatistics for a LLaMA-7B LoRA, 7 kinds x 32 layers, r=16 (p = 512 per kind):")
    print(f"{'storage':<34}{'float64':>14}{'float32':>14}")
    print(f"{'basis S_l (p x p)':<34}{basis_entries * 8 / 2**20:>11.0f} MiB{basis_entries * 4 / 2**20:>10.0f} MiB")
    print(f"{'basis, upper triangle':<34}{basis_entries * 4 / 2**20:>11.0f} MiB{basis_entries * 2 / 2**20:>10.0f} MiB")
    print(f"{'full C_l (n_in x n_in)':<34}{full_entries * 8 / 2**30:>11.1f} GiB{full_entries * 4 / 2**30:>10.1f} GiB")
    print(f"memory_ratio_full_over_basis: {full_entries / basis_entries:.0f}")
    print(f"calibrated_over_plain_sharea_output_error: {ratios['sharea']:.4f}")


if __name__ == "__main__":
    main()
