"""One path for every command that writes a checkpoint: atomic directory + planned shards + side files."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from .atomic import AtomicOutput
from .memory import big_frees_to_os
from .safetensors_format import TensorInfo
from .sidefiles import copy_side_files
from .settings import DEFAULT_MAX_SHARD_SIZE
from .writer import ShardWriter, TensorSpec


def write_checkpoint(output, *, inputs: Iterable, force: bool, specs: list[TensorSpec],
                     tensors: Iterable[tuple[str, torch.Tensor]], side_files: list[Path] = (),
                     config: dict | None = None, metadata: dict[str, str] | None = None,
                     max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, filename: str = "model.safetensors",
                     on_tensor: Callable[[str], None] | None = None,
                     extra_files: Callable[[Path], list[str]] | None = None,
                     shrinkable: Iterable[str] = ()) -> dict:
    """Stream `tensors` (name, tensor) into a new checkpoint at `output`, all or nothing.

    `specs` is the full plan (names, dtypes, shapes) known before any tensor is computed; `tensors` may
    be a generator, so only the tensor being written is alive here. An item may carry an input's
    TensorInfo instead of a tensor: its bytes are then copied file to file (ShardWriter.copy_from). `extra_files(tmp)`, when given, is
    called after the last tensor to write files known only then (e.g. merge's DoRA record) into the
    temporary directory; it returns their paths relative to it. `shrinkable` names 1-D uint8 tensors
    planned last at an upper-bound length (see ShardWriter).
    """
    big_frees_to_os()  # RSS follows the live tensors (see io/memory.py)
    atomic = AtomicOutput(output, inputs, force)
    with atomic as tmp:
        writer = ShardWriter(tmp, specs, filename=filename, max_shard_size=max_shard_size, metadata=metadata,
                             shrinkable=shrinkable)

        def put(name, t):
            if isinstance(t, TensorInfo):
                writer.copy_from(name, t)
            else:
                writer.write(name, t)

        # Note: write-behind.
        #     Each tensor is written by a second thread while the generator computes the next one
        #     (pwrite, copy_file_range and torch ops release the GIL), so the writes leave the
        #     critical path at the cost of one more tensor in memory. At most one write is in flight
        #     and they run in order; a write's error surfaces at the next tensor or at the end, and a
        #     failure anywhere waits for the write in flight before the temporary output is removed.
        pending = None
        with ThreadPoolExecutor(1, thread_name_prefix="loratools-write") as pool:
            try:
                for name, t in tensors:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(put, name, t)
                    del t
                    if on_tensor:
                        on_tensor(name)
                if pending is not None:
                    pending, last = None, pending
                    last.result()
                files = writer.close()
            finally:
                if pending is not None:
                    pending.cancel() or pending.exception()
                close = getattr(tensors, "close", None)
                if close is not None:  # a generator stopped early: its own clean-up (read-ahead) runs now
                    close()
                writer.abort()
        files += copy_side_files(list(side_files), tmp, config=config)
        if extra_files is not None:
            files += extra_files(tmp)
    total = sum((atomic.out / f).stat().st_size for f in files)
    return {"output": str(atomic.out), "files": sorted(files), "bytes": total,
            "stale_removed": [str(p) for p in atomic.stale_removed]}
