"""How durably an output is written (`--sync/--no-sync`), as a value passed down with the output path.

Note: durability.
    By default every output file and directory is fsync'ed before the output is renamed into place,
    so an output that exists survives a power cut too. `--no-sync` skips that, as `save_pretrained`,
    cp and rsync do: the rename is still atomic, so a killed or failed run still leaves no partial
    output; only a power loss or OS crash shortly after the run could lose data.

The choice travels with the output path (`OutputPath(path, Durability(sync=False))`) down to the
writers, so there is no process-wide switch to set and reset. No torch here (the command line builds
an OutputPath before torch is imported).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@dataclass(frozen=True)
class Durability:
    """Whether outputs are fsync'ed before they are renamed into place (the default) or not."""

    sync: bool = True

    def fsync(self, fd: int) -> None:
        """os.fsync(fd), unless sync is off."""
        if self.sync:
            os.fsync(fd)

    def fsync_path(self, path: str | os.PathLike) -> None:
        """fsync a file or directory by path, unless sync is off."""
        if not self.sync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def start_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to start writing these bytes to disk now, without waiting for it.

        Note: durable output, pipelined.
            Left alone, the kernel starts writing dirty pages back only after ~30 s or gigabytes of
            them, so the whole output would reach the disk during the final fsync, after all the
            computing. Starting the write-back of each tensor as soon as it is written lets the disk
            work while the next tensor is computed; the final fsync then waits only for the last
            few. A hint: where the call is missing it is skipped, and the fsync at close still
            guarantees durability. Skipped with sync off (nothing waits for the disk then)."""
        fn = _sync_file_range()
        if fn is not None and nbytes > 0 and self.sync:
            fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)  # ctypes releases the GIL meanwhile


DURABLE = Durability(sync=True)


@dataclass(frozen=True)
class OutputPath(os.PathLike):
    """An output directory and how durably to write it; usable wherever a path is (os.fspath, Path()).

    Example:
        >>> convert_checkpoint("in", OutputPath("out", Durability(sync=False)), max_shard_size=2**30)
    """

    path: str
    durability: Durability = field(default=DURABLE)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def durability_of(output: str | os.PathLike) -> Durability:
    """The durability an output asks for: its own for an OutputPath, else the default (synced)."""
    return output.durability if isinstance(output, OutputPath) else DURABLE


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux / not glibc
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn
