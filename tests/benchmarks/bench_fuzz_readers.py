"""Fuzz the adapter readers with 10,000 mutated folders; last line: the refused fraction."""

import argparse
import tempfile
import time
from pathlib import Path

from tests.fuzz_readers import fuzz, seed_folders


def main(cases: int = 10_000) -> None:
    root = Path(tempfile.mkdtemp(prefix="shareport-fuzz-seed-"))
    start = time.perf_counter()
    outcomes = fuzz(seed_folders(root), cases=cases, seed=0)
    elapsed = time.perf_counter() - start
    print(f"{'cases':>10} {'refused':>10} {'loaded':>10} {'seconds':>10}")
    print(f"{cases:>10} {outcomes['refused']:>10} {outcomes['loaded']:>10} {elapsed:>10.1f}")
    print(f"refused_fraction: {outcomes['refused'] / cases:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="?", type=int, default=10_000, help="mutated folders to read (default 10000)")
    main(parser.parse_args().cases)
