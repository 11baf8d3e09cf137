"""Atomic output directories.

Every command writes into a hidden temporary sibling of the output (same filesystem, so the final
`rename` is atomic) and renames it into place only after every byte is written and synced. A crash or
SIGKILL leaves at most a `.NAME.loratools-tmp-PID` sibling, which the next run for the same output
removes (and says so). With --force an existing output is replaced only after the new one is complete.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable

from ..errors import OutputError
from .durability import Durability, durability_of

log = logging.getLogger("loratools")

TMP_TAG = ".loratools-tmp-"
OLD_TAG = ".loratools-old-"


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool) -> Path:
    """Refuse outputs that are, contain or lie inside an input, or that exist without --force."""
    out = Path(output).absolute()
    out_real = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(os.path.realpath(inp))
        if out_real == ip or _inside(out_real, ip):
            raise OutputError(f"output would overwrite or lie inside the input {inp}", path=output)
        if _inside(ip, out_real):
            raise OutputError(f"output would replace a directory that contains the input {inp}", path=output)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError("output already exists (use --force to replace it once the new one is complete)",
                              path=output)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{parent} is not a directory", path=output)
    if not parent.is_dir():
        raise OutputError(f"parent directory {parent} does not exist", path=output)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}: permission denied", path=output)
    return out


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries left by killed runs for this output; return what was removed."""
    removed = []
    pat = re.compile(rf"^\.{re.escape(out.name)}({re.escape(TMP_TAG)}|{re.escape(OLD_TAG)})(\d+)-[0-9a-f]+$")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            if m.group(1) == OLD_TAG and not out.exists():
                # killed between the two renames of a --force replace: the old output is the only copy
                os.rename(p, out)
                log.warning("restored %s from %s, left by a run killed while replacing it", out, p)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.warning("removed %s, left by an interrupted earlier run", p)
    return removed


class AtomicOutput:
    """Context manager: `with AtomicOutput(out, inputs, force) as tmp:` write into tmp; renamed on success.

    Directories are fsync'ed as `durability` says (by default as the output asks, see durability.py).
    """

    def __init__(self, output: str | os.PathLike, inputs: Iterable = (), force: bool = False,
                 durability: Durability | None = None):
        self.out = check_output_path(output, inputs, force)
        self.force = force
        self.durability = durability_of(output) if durability is None else durability
        self.stale_removed = clean_stale(self.out)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.out.parent / f".{self.out.name}{TMP_TAG}{token}"
        self.old = self.out.parent / f".{self.out.name}{OLD_TAG}{token}"

    def __enter__(self) -> Path:
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create a temporary directory beside the output: {e.strerror}",
                              path=self.out) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        moved_old = published = False
        try:
            for sub in sorted(p for p in self.tmp.rglob("*") if p.is_dir()):
                _fsync_dir(sub, self.durability)
            _fsync_dir(self.tmp, self.durability)
            if self.out.exists() or self.out.is_symlink():
                if not self.force:  # appeared while we were working
                    raise OutputError("output appeared while writing; not replaced", path=self.out)
                os.rename(self.out, self.old)
                moved_old = True
            os.rename(self.tmp, self.out)
            published = True
            _fsync_dir(self.out.parent, self.durability)
        except BaseException as e:
            if not published:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if moved_old:  # --force replaces only once the new output is in place: put the old one back
                    _restore(self.old, self.out)
            if isinstance(e, OSError):
                raise OutputError(f"could not move the finished output into place: {e.strerror}",
                                  path=self.out) from None
            raise
        if self.old.exists() or self.old.is_symlink():
            if self.old.is_dir() and not self.old.is_symlink():
                shutil.rmtree(self.old, ignore_errors=True)
            else:
                self.old.unlink()
        return False


def _restore(old: Path, out: Path):
    try:
        os.rename(old, out)
    except OSError as e:  # the only copy stays where clean_stale restores it from on the next run
        log.warning("could not put the previous output back from %s: %s", old, e.strerror)


def _fsync_dir(path: Path, durability: Durability):
    with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename is still atomic
        durability.fsync_path(path)
