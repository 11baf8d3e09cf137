"""The two output paths: `write_checkpoint` (planned shards + side files) and `write_adapter_dir` (a PEFT
adapter + its optional `--report` file). Both write into an atomic directory (atomic.py), record
provenance, sync as the output asks (durability.py) and return the same summary: output, files,
bytes, stale_removed.
"""
from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import OutputError
from .atomic import TMP_TAG, AtomicOutput
from .durability import DURABLE, Durability, durability_of
from .memory import big_frees_to_os
from .provenance import Provenance
from .safetensors_format import TensorInfo
from .sidefiles import copy_side_files
from .sizes import DEFAULT_MAX_SHARD_SIZE
from .writer import ShardWriter, TensorSpec, save_tensors, write_json

# PEFT's file names (adapter.py reads adapters by them)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_checkpoint(output: str | os.PathLike, *, inputs: Iterable, force: bool, specs: list[TensorSpec],
                     tensors: Iterable[tuple[str, torch.Tensor | TensorInfo]], side_files: Iterable[Path] = (),
                     config: dict | None = None, metadata: dict[str, str] | None = None,
                     provenance: Provenance | None = None,
                     max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, filename: str = "model.safetensors",
                     on_tensor: Callable[[str], None] | None = None,
                     extra_files: Callable[[Path, Durability], list[str]] | None = None,
                     shrinkable: Iterable[str] = ()) -> dict:
    """Stream `tensors` into a new checkpoint at `output`, all or nothing.

    Args:
        output: the directory to create (an OutputPath carries its durability, see durability.py).
        inputs: paths the output must not overwrite or lie inside.
        force: replace an existing output, once the new one is complete.
        specs: the full plan (names, dtypes, shapes), known before any tensor is computed.
        tensors: (name, tensor) pairs, typically a generator, so only the tensor being written is
            alive; an item may carry an input's TensorInfo instead, whose bytes are then copied file
            to file (ShardWriter.copy_from).
        side_files: config, tokenizer and similar files copied beside the weights.
        config: when given, written as config.json instead of the copied one.
        metadata, provenance: safetensors metadata of every shard; the provenance record's digests
            are completed at close.
        max_shard_size, filename: how the shards are cut and named.
        on_tensor: called with each name once its tensor is handed to the writer.
        extra_files: `extra_files(tmp, durability)` writes files known only after the last tensor
            (merge's DoRA record) into the temporary directory; returns their relative paths.
        shrinkable: 1-D uint8 tensors planned last at an upper-bound length (see ShardWriter).
    Returns:
        {"output", "files" (sorted, relative), "bytes" (all files), "stale_removed"}.
    Example:
        >>> write_checkpoint("out", inputs=[src], force=False, specs=specs, tensors=gen(),
        ...                  provenance=provenance("convert", {}, {"checkpoint": src}))
    """
    big_frees_to_os()  # RSS follows the live tensors (see io/memory.py)
    durability = durability_of(output)
    atomic = AtomicOutput(output, inputs, force, durability)
    with atomic as tmp:
        writer = ShardWriter(tmp, specs, filename=filename, max_shard_size=max_shard_size, metadata=metadata,
                             provenance=provenance, shrinkable=shrinkable, durability=durability)

        files = _write_behind(writer, tensors, on_tensor)
        files += copy_side_files(list(side_files), tmp, config=config, durability=durability)
        if extra_files is not None:
            files += extra_files(tmp, durability)
        summary = _summary(atomic, tmp, files)
    return summary


def _write_behind(writer: ShardWriter, tensors: Iterable, on_tensor: Callable | None) -> list[str]:
    """Write every (name, tensor or TensorInfo) on a second thread; returns writer.close().

    Note: write-behind.
        Each tensor is written by a second thread while the generator computes the next one (pwrite,
        copy_file_range and torch ops release the GIL), so the writes leave the critical path at the
        cost of one more tensor in memory. At most one write is in flight and they run in order; a
        write's error surfaces at the next tensor or at the end, and a failure anywhere waits for the
        write in flight before the temporary output is removed.
    """
    def put(name, t):
        if isinstance(t, TensorInfo):
            writer.copy_from(name, t)
        else:
            writer.write(name, t)

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
            return writer.close()
        finally:
            if pending is not None:
                pending.cancel() or pending.exception()
            close = getattr(tensors, "close", None)
            if close is not None:  # a generator stopped early: its own clean-up (read-ahead) runs now
                close()
            writer.abort()


def _summary(atomic: AtomicOutput, tmp: Path, files: list[str]) -> dict:
    """What both output paths return, measured in the temporary directory (same bytes once renamed)."""
    return {"output": str(atomic.out), "files": sorted(files), "bytes": sum((tmp / f).stat().st_size for f in files),
            "stale_removed": [str(p) for p in atomic.stale_removed]}


# -- adapters ---------------------------------------------------------------------------------------

def write_adapter_files(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], *,
                        metadata: dict[str, str] | None = None, provenance: Provenance | None = None,
                        durability: Durability = DURABLE) -> list[str]:
    """Write a PEFT adapter's two files into an existing directory; returns their names.

    Example:
        >>> write_adapter_files(tmp, {"r": 8, ...}, {"base_model.model.q.lora_A.weight": A, ...})
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    write_json(Path(directory) / ADAPTER_CONFIG, config, durability)
    files = save_tensors(directory, tensors, filename=ADAPTER_WEIGHTS, allow_shards=False, metadata=metadata,
                         provenance=provenance, durability=durability)
    return [ADAPTER_CONFIG] + files


def write_adapter_dir(output: str | os.PathLike, *, inputs: Iterable, force: bool, config: dict,
                      tensors: dict[str, torch.Tensor], provenance: Provenance | None = None,
                      report_doc: Callable[[dict, dict[str, int]], dict] | None = None,
                      report: str | os.PathLike | None = None) -> dict:
    """Write a PEFT adapter at `output`, all or nothing; return its report (and write it to `report`).

    Args:
        output: the directory to create (an OutputPath carries its durability, see durability.py).
        inputs, force: as for write_checkpoint.
        config: adapter_config.json's dict.
        tensors: the adapter's tensors by key, written in this order.
        provenance: the record written into the safetensors metadata.
        report_doc: `report_doc(summary, sizes)` builds the command's report from the summary
            ({"output", "files", "bytes", "stale_removed"}, as write_checkpoint returns) and the bytes
            of each written file; without it the summary is the report.
        report: a file outside the output and the inputs (see check_report_path) that receives the
            report as JSON.
    Returns:
        The report.

    Note: the report file.
        It is written to a temporary sibling and synced before the output is renamed into place,
        and renamed itself right after, so a failure before the output exists leaves neither.
    Example:
        >>> write_adapter_dir("out", inputs=[src], force=False, config=cfg, tensors=t, report="r.json",
        ...                   report_doc=lambda summary, sizes: {"kind": "resize", **summary})
    """
    durability = durability_of(output)
    atomic = AtomicOutput(output, inputs, force, durability)
    report_path = check_report_path(report, atomic.out, inputs) if report is not None else None
    staged = None
    try:
        with atomic as tmp:
            files = write_adapter_files(tmp, config, tensors, provenance=provenance, durability=durability)
            doc = summary = _summary(atomic, tmp, files)
            if report_doc is not None:
                doc = report_doc(summary, {f: (tmp / f).stat().st_size for f in files})
            if report_path is not None:
                staged = report_path.with_name(f".{report_path.name}{TMP_TAG}{os.getpid()}")
                write_json_doc(staged, doc, durability)
        if staged is not None:
            try:
                os.replace(staged, report_path)
            except OSError as e:
                raise OutputError(f"the adapter was written, but not its report: {e.strerror}",
                                  path=report_path) from None
            staged = None
            with contextlib.suppress(OSError):  # as for the output's own directory (atomic.py)
                durability.fsync_path(report_path.parent)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
    return doc


def write_json_doc(path: Path, doc: dict, durability: Durability = DURABLE) -> None:
    """A report document as the command line prints it (indented; non-JSON values as strings)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2, default=str) + "\n")
            f.flush()
            durability.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write the report: {e.strerror or e}", path=path) from None


def check_report_path(report: str | os.PathLike, output: str | os.PathLike, inputs: Iterable) -> Path:
    """The absolute path of a `--report` file, refused when it lies in the output or in an input,
    names a directory, or has no parent directory."""
    rp = Path(report).absolute()
    out = Path(output).absolute()
    if rp == out or out in rp.parents:
        raise OutputError("--report must not be written into the output adapter directory", path=report)
    real = Path(os.path.realpath(rp))
    if any(Path(os.path.realpath(i)) in (real, *real.parents) for i in inputs if i is not None):
        raise OutputError("--report would be written into an input", path=report)
    if not rp.parent.is_dir():
        raise OutputError(f"parent directory {rp.parent} does not exist", path=report)
    if rp.is_dir():
        raise OutputError("--report names a directory; give a file name", path=report)
    return rp
