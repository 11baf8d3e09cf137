"""The `loratools` command line: one click group; each command parses, calls one library function, reports.

Errors: library code raises LoratoolsError; `LoratoolsGroup.main` turns it into one line on stderr
(plus a JSON error object on stdout under --json) and exit code 1, or 2 for usage errors. `--debug`
(anywhere on the line, or LORATOOLS_DEBUG=1) re-raises with the traceback instead.
"""
from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import LoratoolsError
from .console import print_json


class LoratoolsGroup(click.Group):
    """The command group whose `main` turns every failure into one line and an exit code (module notes)."""

    def main(self, args: list[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra) -> int:
        """Run a command; return (or exit with) 0, 1 for a failure the user can fix, 2 for a usage error."""
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")
        argv = [a for a in argv if a != "--debug"]
        json_mode = "--json" in argv
        _log_to_stderr()
        code = 0
        try:
            rv = super().main(args=argv, prog_name=prog_name or "loratools", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.UsageError as e:  # includes BadParameter, NoSuchOption, MissingParameter
            if debug:
                raise
            cmd = e.ctx.command_path if e.ctx else "loratools"
            code = _fail(f"{e.format_message()} (see `{cmd} --help`)", 2, json_mode, "usage")
        except click.ClickException as e:
            if debug:
                raise
            code = _fail(e.format_message(), e.exit_code or 1, json_mode, "usage")
        except click.Abort:  # click turns Ctrl-C (KeyboardInterrupt) into Abort before it reaches us
            code = _fail("aborted", 1, json_mode, "aborted")
        except LoratoolsError as e:
            if debug:
                raise
            click.echo(f"error: {e.one_line()}", err=True)
            if json_mode:
                print_json(e.to_json())
            code = e.exit_code
        except MemoryError:
            if debug:
                raise
            code = _fail("out of memory", 1, json_mode, "memory")
        except OSError as e:
            if debug:
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            code = _fail(f"{where}{e.strerror or e}", 1, json_mode, "os")
        except Exception as e:  # a bug: still one line, and a way to see more
            if debug:
                raise
            code = _fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                         f"(rerun with --debug for the traceback)", 1, json_mode, "internal")
        if standalone_mode:
            sys.exit(code)
        return code


def _log_to_stderr():
    """Library warnings (e.g. stale temporaries removed) become `warning: ...` lines on stderr."""
    import logging

    log = logging.getLogger("loratools")
    if not any(getattr(h, "_loratools", False) for h in log.handlers):
        h = logging.StreamHandler()
        h._loratools = True
        h.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    for h in log.handlers:
        if getattr(h, "_loratools", False):
            h.setStream(sys.stderr)  # follow test runners that swap stderr
    log.setLevel(logging.WARNING)


def _fail(message: str, code: int, json_mode: bool, kind: str) -> int:
    message = " ".join(message.split())
    click.echo(f"error: {message}", err=True)
    if json_mode:
        print_json({"error": {"type": kind, "message": message, "file": None, "tensor": None, "exit_code": code}})
    return code


@click.group(cls=LoratoolsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loratools")
def cli():
    """LoRA/QLoRA adapter algebra and model conversion, directly on checkpoints on disk.

    Every command streams tensor by tensor, writes its output atomically, and exits 0 on success,
    1 on bad input, 2 on a usage error. Add --debug anywhere for a traceback.
    """


def _register():
    """Each `cli/*_cmd.py` module defines one click command named `command`; all are registered."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            cli.add_command(importlib.import_module(f"{__name__}.{info.name}").command)


_register()


def main() -> None:
    """The `loratools` console script."""
    cli.main(prog_name="loratools")
