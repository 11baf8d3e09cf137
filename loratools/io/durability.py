"""Output settings that the command line parses before anything heavy is imported: shard sizes and
durability (`--max-shard-size`, `--sync/--no-sync`). No torch here, so `loratools --help` and the
start of every command do not wait for it (see cli/options.py and io/provenance.start_digests).
"""
from __future__ import annotations

import functools
import os

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (GB = 10^9 as transformers does, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * mult)


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h

# Note: durability.
#     By default every output file and directory is fsync'ed before the output is renamed into place,
#     so an output that exists survives a power cut too. `--no-sync` (set_sync(False)) skips that, as
#     `save_pretrained`, cp and rsync do: the rename is still atomic, so a killed or failed run still
#     leaves no partial output; only a power loss or OS crash shortly after the run could lose data.
_SYNC = True


def set_sync(enabled: bool) -> None:
    """Turn fsync of outputs on (the default) or off for this process (`--sync/--no-sync`)."""
    global _SYNC
    _SYNC = bool(enabled)


def sync_enabled() -> bool:
    return _SYNC


def fsync(fd: int) -> None:
    """os.fsync unless `--no-sync` was given."""
    if _SYNC:
        os.fsync(fd)


def fsync_path(path) -> None:
    """fsync a file or directory by path, unless `--no-sync` was given."""
    if not _SYNC:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting for it.

    Note: durable output, pipelined.
        Every output is fsync'ed before it is renamed into place. Left alone, the kernel starts
        writing dirty pages back only after ~30 s or gigabytes of them, so the whole output would be
        written to disk during that final fsync, after all the computing (2.1 s of a 9 s merge of
        1.5 GB here). Starting the write-back of each tensor as soon as it is written lets the disk
        work while the next tensor is computed; the final fsync then waits only for the last few.
        A hint: where the call is missing it is skipped, and the fsync at close still guarantees
        durability."""
    fn = _sync_file_range()
    if fn is not None and nbytes > 0 and _SYNC:
        fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)  # ctypes releases the GIL meanwhile
