"""The only module that imports rich: progress bars and tables on stderr, JSON documents on stdout."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def stderr_console() -> Console:
    # Built on each call so that test runners that swap sys.stderr see the output.
    console = Console(file=sys.stderr, highlight=False)
    if not console.is_terminal:
        console.width = 200  # logs and pipes: never truncate module names
    return console


def print_json(doc) -> None:
    """The one JSON document a --json command prints on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    stderr_console().print(message, markup=False)


@contextmanager
def bar(description: str, total: int):
    """A progress bar on stderr when it is a terminal; silent in pipes and CI. Yields advance()."""
    console = stderr_console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def table(title: str | None, columns: list[str], rows: list[list], *, justify_numbers: bool = True) -> None:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        numeric = justify_numbers and rows and all(isinstance(r[i], (int, float)) for r in rows)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(Text(fmt(v)) for v in r))
    stderr_console().print(t)


def kv_table(title: str | None, items: list[tuple[str, object]]) -> None:
    t = Table(title=title, title_justify="left", show_header=False, show_edge=False, pad_edge=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in items:
        t.add_row(k, Text(fmt(v)))
    stderr_console().print(t)


def fmt(v) -> str:
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


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
