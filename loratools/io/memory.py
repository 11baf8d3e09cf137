"""Keeping RSS at what is live: how freed tensor buffers go back to the OS (glibc malloc).

Note: allocator.
    Commands stream tensors of 10-130 MB that are allocated on one thread (the reader, the main
    thread) and freed on another (the writer). glibc serves a freed block again only from its own
    thread's arena, and by default raises its mmap threshold to the size of the last large block
    freed (up to 32 MiB), after which blocks of that size come from the arenas and stay mapped when
    freed. Memory then drifts 100-200 MB above what is live (figures in docs/quantize.md). Fixing
    the thresholds keeps RSS at the live tensors without a malloc_trim per read. No-op where glibc
    is not the allocator.
"""
from __future__ import annotations

import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 8 << 20
# Fixing the mmap threshold also stops glibc adapting its trim threshold (128 KiB by default): the heap
# would then be shrunk after every free and re-faulted by the next op's temporaries (quantize's
# chunked maths slowed by a quarter, see docs/quantize.md). Freed heap below this much is kept.
TRIM_THRESHOLD = 64 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


@functools.lru_cache(maxsize=1)
def big_frees_to_os() -> None:
    """Serve allocations of MMAP_THRESHOLD and more by mmap from now on (process-wide, once)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
