"""Tables on stderr, as every command prints its report, and the formatting of their cells."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from .console import stderr_console


def table(title: str | None, columns: list[str], rows: list[list], *, justify_numbers: bool = True) -> None:
    """A table on stderr; columns whose every cell is a number are right-aligned."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        numeric = justify_numbers and rows and all(isinstance(r[i], (int, float)) for r in rows)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(Text(fmt(v)) for v in r))
    stderr_console().print(t)


def kv_table(title: str | None, items: list[tuple[str, object]]) -> None:
    """A two-column field/value table on stderr."""
    t = Table(title=title, title_justify="left", show_header=False, show_edge=False, pad_edge=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in items:
        t.add_row(k, Text(fmt(v)))
    stderr_console().print(t)


def fmt(v) -> str:
    """A cell: '-' for None, yes/no, 4 significant digits (scientific outside [1e-3, 1e4)), thousands."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    return str(v)


def expert_cell(row: dict) -> str:
    """A report row's per-expert errors: '-' for a plain module, else "E experts, worst #e 1.2e-03"."""
    errs = row.get("expert_rel_errors")
    if not errs:
        return "-"
    worst = max(range(len(errs)), key=errs.__getitem__)
    return f"{len(errs)} experts, worst #{worst} {fmt(float(errs[worst]))}"


def human_bytes(n: int) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
