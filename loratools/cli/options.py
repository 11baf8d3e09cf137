"""Options shared by several commands, so each means the same everywhere."""
from __future__ import annotations

import functools
from typing import Callable

import click

from ..io.durability import Durability, OutputPath
from ..io.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size


class SizeType(click.ParamType):
    """A byte count spelled as --max-shard-size takes it (io/sizes.parse_size)."""

    name = "SIZE"

    def convert(self, value: str | int, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """The byte count; a bad spelling is a usage error naming the option."""
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def output_option(f: Callable) -> Callable:
    """-o/--output and --sync/--no-sync, given to the command as one `output`: an OutputPath that carries
    its durability down to the writers (see io/durability.py). Every command that writes takes both."""
    @functools.wraps(f)
    def command(*args, output: str, sync: bool, **kwargs):
        return f(*args, output=OutputPath(output, Durability(sync=sync)), **kwargs)

    command = click.option("--sync/--no-sync", default=True,
                           help="fsync the output before renaming it into place, so that it survives a power "
                                "cut (default). --no-sync skips that, as save_pretrained does; the output stays "
                                "atomic.")(command)
    return click.option("-o", "--output", required=True, type=click.Path(path_type=str),
                        help="Output directory (written atomically; must not exist unless --force).")(command)


def force_option(f: Callable) -> Callable:
    """--force: replace an existing output once the new one is complete."""
    return click.option("--force", is_flag=True, help="Replace an existing output, only after the new one is complete.")(f)


def json_option(f: Callable) -> Callable:
    """--json (as `as_json`): one JSON document on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout (tables and progress go to stderr).")(f)


def max_shard_size_option(f: Callable) -> Callable:
    """--max-shard-size SIZE, parsed to bytes."""
    return click.option("--max-shard-size", type=SizeType(), default=DEFAULT_MAX_SHARD_SIZE, show_default="5GiB",
                        help="Largest shard to write, e.g. 5GB, 500MB, 2GiB.")(f)


def device_option(f: Callable) -> Callable:
    """--device auto|cpu|cuda."""
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="Where to compute; auto uses CUDA when available.")(f)
