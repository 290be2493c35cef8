"""Fuzz the adapter readers with 10,000 mutated folders; last line: the refused fraction."""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz_readers import fuzz, seed_folders  # noqa: E402


def main(cases: int = 10_000) -> None:
    root = Path(tempfile.mkdtemp(prefix="shareport-fuzz-seed-"))
    start = time.perf_counter()
    outcomes = fuzz(seed_folders(root), cases=cases, seed=0)
    elapsed = time.perf_counter() - start
    print(f"{'cases':>10} {'refused':>10} {'loaded':>10} {'seconds':>10}")
    print(f"{cases:>10} {outcomes['refused']:>10} {outcomes['loaded']:>10} {elapsed:>10.1f}")
    print(f"refused_fraction: {outcomes['refused'] / cases:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
