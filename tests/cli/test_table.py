"""format_table: one number format per column, numbers right-aligned, integers with separators."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from shareport.cli.table import format_table


def _column(table: str, index: int) -> list[str]:
    """The cells of column ``index`` below the rule, cut at the rule's dashes (keeps the padding)."""
    lines = table.splitlines()
    rule = lines[1]
    starts = [i for i, c in enumerate(rule) if c == "-" and (i == 0 or rule[i - 1] == " ")]
    ends = [i + 1 for i, c in enumerate(rule) if c == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    return [line.ljust(len(rule))[starts[index] : ends[index]] for line in lines[2:]]


def test_one_next_to_a_near_one_shows_the_same_decimals_right_aligned():
    table = format_table(["point", "fidelity"], [("lora", 1.0), ("sharea", 0.9964), ("wide", 10.25)])
    assert _column(table, 1) == ["  1.0000", "  0.9964", " 10.2500"]


def test_three_and_four_significant_digits_do_not_mix():
    table = format_table(["point", "top-1"], [("a", 0.799), ("b", 0.7823)])
    assert _column(table, 1) == ["0.7990", "0.7823"]


def test_a_column_across_many_decades_is_scientific():
    table = format_table(["check", "max abs diff"], [("a", 1e-6), ("b", 2.5), ("c", 0.0)])
    assert _column(table, 1) == ["   1.000e-06", "   2.500e+00", "   0.000e+00"]


def test_tiny_values_alone_are_scientific_and_large_ones_fixed_with_separators():
    assert _column(format_table(["x"], [(3.2e-9,), (4.1e-9,)]), 0) == ["3.200e-09", "4.100e-09"]
    assert _column(format_table(["x"], [(12345.67,), (100.25,)]), 0) == ["12,345.7", "   100.2"]


def test_integers_keep_separators_strings_stay_and_floats_share_the_column_format():
    table = format_table(["kind", "mixed"], [("q", 1234567), ("k", "-"), ("v", 0.5), ("o", 0.125)])
    # not all numbers: the column stays left-aligned, as before
    assert _column(table, 1) == ["1,234,567", "-        ", "0.5000   ", "0.1250   "]
    assert _column(table, 0) == ["q   ", "k   ", "v   ", "o   "]


def test_zeros_nan_and_inf_alone_print_plainly():
    assert _column(format_table(["x"], [(0.0,), (float("nan"),), (float("inf"),)]), 0) == ["  0", "nan", "inf"]


finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8))
def test_every_float_of_a_column_has_one_shape_and_reads_back_close(values):
    cells = [c.strip() for c in _column(format_table(["x"], [(v,) for v in values]), 0)]
    scientific = ["e" in c for c in cells]
    assert len(set(scientific)) == 1
    if not scientific[0]:
        assert len({len(c.partition(".")[2]) for c in cells}) == 1  # same number of decimals
    nonzero = [abs(v) for v in values if v != 0]
    for cell, value in zip(cells, values):
        back = float(cell.replace(",", ""))
        if scientific[0]:
            assert math.isclose(back, value, rel_tol=5e-4, abs_tol=0)
        else:  # within half a unit of the last decimal, which keeps 4 significant digits of the smallest
            decimals = len(cell.partition(".")[2])
            assert abs(back - value) <= 0.5 * 10**-decimals * (1 + 1e-9) + 1e-9 * abs(value)
            if nonzero:
                assert abs(back - value) <= 5e-4 * min(nonzero) * (1 + 1e-9)
