"""Factored ShareA projection vs a dense SVD on a 7B-shaped kind (not collected by pytest).

    python3 -m tests.benchmarks.bench_converters_math [--sites 32] [--rank 16] [--dim 4096] [--k 16]

The dense reference stacks the L updates into an (L n_out, n_in) matrix and takes its singular
values (svdvals, cheaper than a full SVD); its rank-k Eckart-Young error is the tail energy.
Prints a table and a last line ``speedup_over_dense: <x>``.
"""

from __future__ import annotations

import argparse
import time

import torch

# run from the checkout's root (python3 -m): this checkout's converters come first on sys.path,
# not whichever copy an editable install points at
import converters


def kind_parser(doc: str) -> argparse.ArgumentParser:
    """The options every 7B-shaped kind benchmark takes (bench_calibrated_math.py adds its own)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sites", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    return parser


def make_kind(n_sites: int, rank: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(rank, dim, generator=gen)
    As = [(0.7 * common + torch.randn(rank, dim, generator=gen)) / dim**0.5 for _ in range(n_sites)]
    decay = torch.logspace(0, -1, rank)
    Bts = [torch.randn(dim, rank, generator=gen) * decay for _ in range(n_sites)]
    return As, Bts


def dense_error(As, Bts, k: int) -> float:
    stack = torch.cat([bt.double() @ a.double() for a, bt in zip(As, Bts)], dim=0)
    return float(torch.linalg.svdvals(stack)[k:].square().sum())


def main() -> None:
    args = kind_parser(__doc__).parse_args()
    As, Bts = make_kind(args.sites, args.rank, args.dim)
    # first LAPACK calls pay one-off setup: warm both paths up on a small kind
    small_As, small_Bts = make_kind(2, 2, 64)
    converters.convert_kind("sharea", small_As, small_Bts, rank=2)
    dense_error(small_As, small_Bts, 2)

    timings = []
    for _ in range(3):  # the shared machine is noisy: keep the median of three
        start = time.perf_counter()
        result = converters.convert_kind("sharea", As, Bts, rank=args.k)
        timings.append(time.perf_counter() - start)
    factored_s = sorted(timings)[1]
    start = time.perf_counter()
    reference = dense_error(As, Bts, args.k)
    dense_s = time.perf_counter() - start

    print(f"kind: L={args.sites} r={args.rank} n_in=n_out={args.dim} k={args.k}, threads={torch.get_num_threads()}")
    print(f"{'method':<28}{'seconds':>10}{'error':>16}{'rel. error':>12}")
    print(f"{'factored (median of 3)':<28}{factored_s:>10.3f}{result.error:>16.6f}{result.relative_error:>12.6f}")
    print(
        f"{'dense svdvals of stack':<28}{dense_s:>10.3f}{reference:>16.6f}{(reference / result.energy) ** 0.5:>12.6f}"
    )
    print(f"error_relative_difference: {abs(result.error - reference) / reference:.2e}")
    print(f"speedup_over_dense: {dense_s / factored_s:.1f}")


if __name__ == "__main__":
    main()
