"""What the command line prints besides tables: the JSON document on stdout, messages and progress bars on
stderr. With cli/tables.py, the only modules that import rich."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def stderr_console() -> Console:
    """A rich console on the current sys.stderr (built per call, so test runners that swap it see the output)."""
    console = Console(file=sys.stderr, highlight=False)
    if not console.is_terminal:
        console.width = 200  # logs and pipes: never truncate module names
    return console


def print_json(doc) -> None:
    """The one JSON document a --json command prints on stdout (non-JSON values as strings)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """One message on stderr, printed as is (no rich markup)."""
    stderr_console().print(message, markup=False)


@contextmanager
def bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal; silent in pipes and CI. Yields advance(n=1)."""
    console = stderr_console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
