"""Plain-text tables for the CLI, and the ``--json`` twin of every report."""

from __future__ import annotations

import json
import math
from typing import Sequence

# the floats of a column share one format: fixed decimals that keep this many significant digits of
# the smallest nonzero one (so 1.0 beside 0.9964 reads 1.0000), or scientific where that takes more
# than MAX_DECIMALS decimals or the column spans MAX_SPAN or more (1e-6 beside 2.5)
SIGNIFICANT = 4
MAX_DECIMALS = 6
MAX_SPAN = 1e4


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """Left-aligned text columns, right-aligned numbers, one header rule; one float format per column
    (``column_format``), integers with thousands separators."""
    specs = [column_format([row[i] for row in rows]) for i in range(len(headers))]
    cells = [[_cell(v, spec) for v, spec in zip(row, specs)] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    numeric = [all(_is_number(row[i]) for row in rows) and rows for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def column_format(values: Sequence) -> str:
    """The format spec of every float among ``values`` (a column's cells; other cells are ignored)."""
    sizes = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0]
    if not sizes:  # zeros, nan, inf
        return ",.0f"
    low, high = min(sizes), max(sizes)
    decimals = SIGNIFICANT - 1 - math.floor(math.log10(low))
    if decimals > MAX_DECIMALS or high / low >= MAX_SPAN:
        return f".{SIGNIFICANT - 1}e"
    return f",.{max(decimals, 0)}f"


def _cell(v, spec: str) -> str:
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def share_of_source(ratio: float, source: int) -> str:
    """How convert and inspect state a size: against the source LoRA's parameter count."""
    return f"{ratio:.1%} of the source LoRA ({source:,} parameters)"


def to_json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
