"""Every core on the per-element work, and big buffers recycled instead of re-faulted.

The commands stream one tensor at a time through three stages that already overlap: a reader thread
reads the next tensor (io/checkpoint.py `prefetched`, or `prefetch` here), the caller computes this one,
a writer thread writes the previous one (io/output.py `_write_behind`), and a fourth hashes the inputs
(io/provenance.py). This module adds what those stages share:

  - `map_ordered`: the arithmetic of one tensor split over a pool of threads, in independent pieces
    (row blocks of a merge, chunks of a 4-bit (de)quantization), each piece computed with the same torch
    ops as the serial code, so every result has the same bits whatever the number of threads;
  - `pooled_empty`: recycled big buffers for what is read and computed (Note: page faults);
  - `prefetch`: any per-item function run one item ahead on a reader thread.

Note: threads, not intra-op parallelism.
    The per-element ops are memory-bound and short (a few hundred microseconds on 2^20 elements); torch's
    intra-op threads pay a fork/join per op, and on a busy machine a descheduled worker stalls every op
    (figures in docs/quantize.md). So the drivers run torch single-threaded (device.torch_threads(1)) and
    spread whole pieces over `workers()` threads instead; torch ops release the GIL. A piece's ops run on
    one thread in the order the serial code runs them, so its bits cannot depend on the thread count.
    `LORATOOLS_THREADS=N` caps the workers (benchmarks/scale.py --threads); by default they are torch's
    thread count when loratools was imported (what OMP_NUM_THREADS or torch's default gives, all cores).
    The double-quant offset does not follow this setting: it is the mean bitsandbytes takes with torch's
    threads (bnb4bit.quantize_absmax), whatever the workers.

Note: page faults.
    A tensor of 8 MB or more is its own mmap (io/memory.py), and the kernel zeroes every page of a fresh
    mapping on first touch: reading 1.5 GB into fresh buffers cost 0.75 s of system time and 1.2-1.8 s of
    wall time on the 2-core box, against 0.4 s into reused ones. The pool keeps the big buffers and lends
    them again once nothing refers to them any more (their storage's use count, which views, numpy
    arrays and memoryviews all hold, is back to the pool's own). Buffers are matched by exact byte size
    (a model has a handful of tensor sizes). A free buffer not lent again within `MAX_IDLE` requests (the
    embedding's, once it has passed) is given back, and so are free buffers beyond `KEEP_BYTES`, oldest
    first, so RSS stays at the tensors in flight plus a bounded reserve.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

ENV_THREADS = "LORATOOLS_THREADS"
_TORCH_THREADS = torch.get_num_threads()  # before any driver pins torch to one thread


def workers() -> int:
    """Threads for the per-element work: LORATOOLS_THREADS, else torch's thread count at import."""
    raw = os.environ.get(ENV_THREADS)
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n >= 1:
            return n
    return max(1, _TORCH_THREADS)


def cpu_workers(device, threads: int | None = None) -> int:
    """Workers for arithmetic on `device`: `threads` (default `workers()`, capped by LORATOOLS_THREADS)
    on the CPU while torch runs single-threaded (the drivers' setting); 1 elsewhere (CUDA, or torch
    already using its own intra-op threads)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    n = workers() if threads is None else threads
    if os.environ.get(ENV_THREADS):
        n = min(n, workers())
    return max(1, n)


# -- the thread pool -----------------------------------------------------------------------------

_in_worker = threading.local()


def _mark_worker():
    _in_worker.flag = True


@lru_cache(maxsize=8)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="loratools-cpu", initializer=_mark_worker)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int = 1) -> list[R]:
    """[fn(x) for x in items], on `workers` threads when more than one; results in the items' order.

    Called from inside a worker it runs serially (a worker waiting on its own pool could deadlock)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1 or getattr(_in_worker, "flag", False):
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))


def thread_local(factory: Callable[[], T], _store=threading.local()) -> T:
    """A per-thread instance of what `factory` makes (one per factory and thread), e.g. a workspace."""
    objs = getattr(_store, "objs", None)
    if objs is None:
        objs = _store.objs = {}
    obj = objs.get(factory)
    if obj is None:
        obj = objs[factory] = factory()
    return obj


# -- recycled big buffers ------------------------------------------------------------------------

POOLED_MIN_BYTES = 8 << 20  # below io/memory.MMAP_THRESHOLD glibc reuses freed heap itself
KEEP_BYTES = 128 << 20  # free buffers kept for reuse, at most (Note: page faults)
MAX_IDLE = 16  # requests a free buffer waits to be lent again before it is given back (a layer makes ~14)


def _use_count(buf: torch.Tensor) -> int:
    # references to the buffer's storage, not counting the temporary storage object made to ask
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) - 1


class BufferPool:
    """Big CPU byte buffers lent as tensors of any dtype and shape, taken back when no longer referenced."""

    def __init__(self, keep_bytes: int = KEEP_BYTES, min_bytes: int = POOLED_MIN_BYTES, max_idle: int = MAX_IDLE):
        self.keep_bytes = keep_bytes
        self.min_bytes = min_bytes
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._lent: list[torch.Tensor] = []
        self._free: OrderedDict[int, tuple[torch.Tensor, int]] = OrderedDict()  # id -> (buffer, freed at), oldest first
        self._requests = 0
        self.allocated = 0  # buffers made (for tests and benchmarks)
        self.reused = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor, on a recycled buffer when one of its exact size is free."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes < self.min_bytes:
            return torch.empty(tuple(shape), dtype=dtype)
        with self._lock:
            self._requests += 1
            self._collect()
            buf = next((b for b, _ in self._free.values() if b.numel() == nbytes), None)
            if buf is not None:
                del self._free[id(buf)]
                self.reused += 1
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                self.allocated += 1
            self._lent.append(buf)
            self._trim()
            view = buf.view(dtype).view(tuple(shape))
        return view

    def _collect(self) -> None:
        """Move lent buffers nobody refers to any more to the free list."""
        still = []
        for b in self._lent:
            if _use_count(b) <= 1:
                self._free[id(b)] = (b, self._requests)
            else:
                still.append(b)
        self._lent = still

    def _trim(self) -> None:
        for key, (_, freed) in list(self._free.items()):
            if self._requests - freed > self.max_idle:
                del self._free[key]
        total = sum(b.numel() for b, _ in self._free.values())
        while total > self.keep_bytes and self._free:
            _, (b, _) = self._free.popitem(last=False)
            total -= b.numel()

    def clear(self) -> None:
        """Forget every buffer (those still lent stay valid: their users hold them)."""
        with self._lock:
            self._lent.clear()
            self._free.clear()


POOL = BufferPool()


def pooled_empty(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), from the shared pool on the CPU (Note: page faults)."""
    if torch.device(device).type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return POOL.empty(shape, dtype)


CAST_PIECE = 1 << 20  # elements per piece of a cast


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype) (t itself when it has that dtype), the pieces on `cpu_workers` threads into a pooled
    buffer; a cast rounds each element alone, so the bits are t.to(dtype)'s."""
    if t.dtype == dtype:
        return t
    if t.device.type != "cpu" or not t.is_contiguous():
        return t.to(dtype)
    out = pooled_empty(t.shape, dtype)
    src, dst, n = t.reshape(-1), out.view(-1), t.numel()

    def piece(start):
        dst[start:start + CAST_PIECE].copy_(src[start:start + CAST_PIECE])

    map_ordered(piece, range(0, n, CAST_PIECE), cpu_workers(t.device))
    return out


# -- read-ahead ----------------------------------------------------------------------------------

def prefetch(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in order, fn of the next item running on a reader thread while the caller works
    on this one: one result more in memory. An error surfaces when its item is reached; a caller that
    stops early waits only for the call in flight."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="loratools-read") as reader:
        pending = reader.submit(fn, items[0])
        try:
            for i, item in enumerate(items):
                result = pending.result()
                pending = reader.submit(fn, items[i + 1]) if i + 1 < len(items) else None
                yield item, result
                del result
        finally:
            if pending is not None:
                pending.cancel() or pending.exception()


__all__ = ["BufferPool", "ENV_THREADS", "KEEP_BYTES", "POOL", "cast", "cpu_workers", "map_ordered", "pooled_empty",
           "prefetch", "thread_local", "workers"]
