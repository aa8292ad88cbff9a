"""How the ``rswap`` commands print: one way to write a figure in its unit, one plain-text table.

Every command that shows allocations (``run``'s tick table, ``status``, ``top``, ``replay``)
goes through :func:`fmt_units`, so one number reads the same everywhere.  Sizes (``bytes``: GPU
memory) take binary prefixes, as the kernel, ``nvidia-smi`` and Kubernetes quantities (``Mi``,
``Gi``) write memory; rates (``bytes_per_s``: egress bandwidth) take decimal ones, as link
speeds, ``tc`` rates and ``/sys/class/net/*/speed`` do, so a 1 Gbit/s link reads ``125.0MB/s``.

>>> fmt_units(1536, "bytes"), fmt_units(125e6, "bytes_per_s"), fmt_units(1500, "millicores")
('1.5KiB', '125.0MB/s', '1500m')
>>> print(render_table([Column("TASK"), Column("USED", ">")], [["web", "1500m"], ["batch", "20m"]]))
TASK   USED
web   1500m
batch   20m
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rswap_ebpf.model.resources import Resource

_BINARY = (("", 1), ("Ki", 1024), ("Mi", 1024 ** 2), ("Gi", 1024 ** 3), ("Ti", 1024 ** 4))
_DECIMAL = (("", 1), ("k", 1000), ("M", 1000 ** 2), ("G", 1000 ** 3), ("T", 1000 ** 4))


def _scaled(value: float, prefixes: tuple[tuple[str, int], ...], tail: str) -> str:
    for prefix, scale in reversed(prefixes):
        if abs(value) >= scale or scale == 1:
            if scale == 1:
                return f"{value:.0f}{tail}"
            return f"{value / scale:.1f}{prefix}{tail}"
    raise AssertionError("unreachable: the last prefix has scale 1")


def fmt_units(value: float | int | None, resource: Resource | str) -> str:
    """``value`` in ``resource``'s unit (a resource, or its unit's name as status.json has it),
    short enough for a table and never holding a space, so a space-separated table (``rswap
    run``'s) stays one field per column: ``1500m``, ``40%``, ``1.5GiB``, ``12.0MB/s``,
    ``20.0k/s`` (IO/s), ``4w`` (cache ways), ``3`` (a co-processor's own units).  None (no
    reading yet) is ``-``.

    >>> fmt_units(3 * 1024 ** 3, "bytes"), fmt_units(20000, "iops"), fmt_units(None, "ways")
    ('3.0GiB', '20.0k/s', '-')
    """
    if value is None:
        return "-"
    unit = resource if isinstance(resource, str) else resource.unit
    v = float(value)
    if unit == "millicores":
        return f"{v:.0f}m"
    if unit == "percent":
        return f"{v:.0f}%"
    if unit == "bytes":
        return _scaled(v, _BINARY, "B")
    if unit == "bytes_per_s":
        return _scaled(v, _DECIMAL, "B/s")
    if unit == "iops":
        return f"{v / 1000:.1f}k/s" if abs(v) >= 10000 else f"{v:.0f}/s"
    if unit == "ways":
        return f"{v:.0f}w"
    return f"{v:g}"


def fmt_duration(seconds: float) -> str:
    """A season's length as an operator reads it: ``30s``, ``2m``, ``16m40s``, ``1h30m``, ``7d``.

    >>> fmt_duration(30), fmt_duration(1000), fmt_duration(5400), fmt_duration(7 * 86400)
    ('30s', '16m40s', '1h30m', '7d')
    """
    s = int(round(float(seconds)))
    if s < 1:
        return f"{float(seconds):.1f}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size and len(parts) < 2:  # two fields are enough: 1h30m, not 1h30m7s
            parts.append(f"{s // size}{unit}")
            s %= size
        elif parts:
            break
    return "".join(parts)


def fmt_model(v: dict, unit: str) -> str:
    """A status row's forecast (``TaskProfile.describe``'s fields): the serving model, the
    season it follows in ticks and time with how sure the search is of it (none for a period
    the configuration gives), and the model's MAE; ``p=-`` where it follows no season, so a
    forecast that repeats the last value says so (with ``found=TICKS`` where the period search
    holds a season that the model chosen now does not follow).

    >>> fmt_model({"model": "seasonal_long", "mae": 4.0, "period": 2000, "period_s": 1000.0,
    ...            "period_confidence": 0.71, "period_source": "buckets"}, "millicores")
    'seasonal_long p=2000=16m40s/0.71 (4m)'
    >>> fmt_model({"model": "last_value", "mae": None, "period": 0, "period_s": 0,
    ...            "period_confidence": 0.0, "period_source": "none"}, "millicores")
    'last_value p=-'
    >>> fmt_model({"model": "holt_winters", "mae": 2.0, "period": 0, "period_found": 240},
    ...           "millicores")
    'holt_winters p=- found=240 (2m)'
    """
    model = v.get("model") or "-"
    if v.get("period"):
        model += f" p={v['period']}"
        if v.get("period_s"):
            model += f"={fmt_duration(v['period_s'])}"
        if v.get("period_source") not in (None, "given"):
            model += f"/{v.get('period_confidence') or 0:.2f}"
    elif "period" in v and model != "-":
        model += " p=-"
        if v.get("period_found"):  # a season is known, but the model chosen does not follow it
            model += f" found={v['period_found']}"
    if v.get("mae") is not None:
        model += f" ({fmt_units(v['mae'], unit)})"
    return model


@dataclass(frozen=True)
class Column:
    """One column: its title, ``<`` (text) or ``>`` (figures), and the least width it takes
    (a table printed one row at a time cannot measure rows it has not seen)."""

    title: str
    align: str = "<"
    width: int = 0

    def __post_init__(self) -> None:
        if self.align not in ("<", ">"):
            raise ValueError(f"align must be '<' or '>', not {self.align!r}")


def format_row(columns: Sequence[Column], cells: Sequence[object], widths: Sequence[int] | None = None,
               sep: str = " ") -> str:
    """One line of ``cells`` under ``columns`` (at ``widths``, else each column's least width).
    The last column is not padded on the right, so lines carry no trailing blanks."""
    if len(cells) != len(columns):
        raise ValueError(f"{len(cells)} cells for {len(columns)} columns")
    widths = widths if widths is not None else [c.width for c in columns]
    out = []
    for i, (col, cell, w) in enumerate(zip(columns, cells, widths)):
        text = "" if cell is None else str(cell)
        if i == len(columns) - 1 and col.align == "<":
            out.append(text)
        else:
            out.append(f"{text:{col.align}{w}}")
    return sep.join(out).rstrip()


def header(columns: Sequence[Column], widths: Sequence[int] | None = None, sep: str = " ") -> str:
    """The titles line, at the same widths as :func:`format_row`'s."""
    return format_row(columns, [c.title for c in columns], widths, sep)


def column_widths(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> list[int]:
    """Each column as wide as its title, its least width and its widest cell."""
    widths = [max(c.width, len(c.title)) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len("" if cell is None else str(cell)))
    return widths


def render_table(columns: Sequence[Column], rows: Iterable[Sequence[object]], sep: str = " ") -> str:
    """The titles, then one line per row, every column as wide as its widest cell."""
    rows = [list(r) for r in rows]
    widths = column_widths(columns, rows)
    return "\n".join([header(columns, widths, sep)] + [format_row(columns, r, widths, sep)
                                                        for r in rows])
