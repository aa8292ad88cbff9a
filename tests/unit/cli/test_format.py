"""One way to print a figure in its unit and one plain-text table (rswap_ebpf/cli/format.py)."""
from __future__ import annotations

import doctest

import pytest

from rswap_ebpf.cli import format as fmt
from rswap_ebpf.cli.format import Column, fmt_units, format_row, header, render_table
from rswap_ebpf.model.resources import ResourceId, ResourceType


def test_docstring_examples_hold():
    assert doctest.testmod(fmt).failed == 0


@pytest.mark.parametrize("value,unit,text", [
    (0, "bytes", "0B"), (1023, "bytes", "1023B"), (1024, "bytes", "1.0KiB"),
    (int(1.5 * 1024 ** 3), "bytes", "1.5GiB"), (5 * 1024 ** 5, "bytes", "5120.0TiB"),
    (999, "bytes_per_s", "999B/s"), (1000, "bytes_per_s", "1.0kB/s"),
    (125_000_000, "bytes_per_s", "125.0MB/s"), (-2_000_000, "bytes_per_s", "-2.0MB/s"),
    (1500.4, "millicores", "1500m"), (40, "percent", "40%"), (9999, "iops", "9999/s"),
    (20000, "iops", "20.0k/s"), (3, "ways", "3w"), (2, "units", "2"),
    (None, "bytes", "-"),
])
def test_each_unit_has_one_spelling(value, unit, text):
    assert fmt_units(value, unit) == text


def test_a_resource_and_its_unit_name_print_the_same():
    for r in (*ResourceType, ResourceId(ResourceType.SPECIALIZED_COPROC, "fpga0")):
        assert fmt_units(123456789, r) == fmt_units(123456789, r.unit)
    assert fmt_units(125e6, ResourceType.NETWORK_BANDWIDTH) == "125.0MB/s"
    assert fmt_units(2 ** 30, ResourceType.GPU_MEMORY) == "1.0GiB"


def test_table_columns_take_the_widest_cell_and_align():
    cols = (Column("TASK"), Column("USED", ">"), Column("MODEL"))
    text = render_table(cols, [["web-frontend", "1500m", "auto"], ["b", "20m", "seasonal_naive"]])
    lines = text.splitlines()
    assert lines == ["TASK          USED MODEL",
                     "web-frontend 1500m auto",
                     "b              20m seasonal_naive"]
    assert all(line == line.rstrip() for line in lines)


def test_rows_printed_one_at_a_time_line_up_under_the_header():
    cols = (Column("TICK", ">", 5), Column("TASK", "<", 8), Column("USED", ">", 8), Column("EVENTS"))
    head = header(cols)
    row = format_row(cols, [12, "web", "1500m", "cpu 1000->1500 (forecast)"])
    assert head.index("TASK") == row.index("web")
    assert head.index("USED") + len("USED") == row.index("1500m") + len("1500m")
    assert format_row(cols, [1, "web", None, ""]) == "    1 web"


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        format_row((Column("A"), Column("B"), Column("C")), ["x", "y"])
    with pytest.raises(ValueError, match="align"):
        Column("A", "^")
