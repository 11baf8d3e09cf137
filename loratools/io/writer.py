"""Shard writer: tensors go straight to their final place on disk, one at a time.

Note: planned layout.
    Every loratools command knows the name, dtype and shape of each output tensor from the input
    headers before it computes anything. The writer takes that plan, splits it into shards by the byte
    budget, writes every shard's header up front and then `pwrite`s each tensor at its offset as soon as
    it is computed. No shard is ever assembled in memory, tensors may arrive in any order, and the
    output bytes depend only on the plan and the data (deterministic).

Note: metadata finalized at close.
    Provenance (e.g. input digests) may only be known at the end. The header is sized at open time
    for `reserve_metadata` and rewritten at close; the JSON is padded with spaces, which safetensors
    allows, so the data offsets never move.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import FormatError, InputError, LoratoolsError, OutputError
from .safetensors_format import TensorInfo, build_header, element_size, tensor_bytes
from .durability import DURABLE, Durability
from .provenance import Provenance
from .sizes import DEFAULT_MAX_SHARD_SIZE


@dataclass(frozen=True)
class TensorSpec:
    """One planned output tensor: its name, dtype and shape, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


def _disk_error(e: OSError, path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError("no space left on device while writing the output; nothing was kept", path=path)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write: {e.strerror}", path=path)
    return OutputError(f"write failed: {e.strerror or e}", path=path)


class ShardWriter:
    """Write a planned set of tensors as one safetensors file or as HF-style shards plus an index.

    `provenance`, when given, adds its record to `metadata`: placeholders of the final length at open,
    the digests at close (see io/provenance.py). Shards are synced at close as `durability` says.
    """

    def __init__(self, directory: str | os.PathLike, specs: list[TensorSpec], *,
                 filename: str = "model.safetensors", max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, provenance: Provenance | None = None,
                 reserve_metadata: int = 0, allow_shards: bool = True, shrinkable: Iterable[str] = (),
                 durability: Durability = DURABLE):
        self.dir = Path(directory)
        self._provenance = provenance
        self._durability = durability
        self.metadata = {"format": "pt", **(metadata or {}),
                         **(provenance.placeholder_metadata() if provenance is not None else {})}
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise LoratoolsError("internal: tensor planned twice", tensor=dup)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        shrink = set(shrinkable)
        for k, spec in enumerate(specs):
            tail = spec.name in shrink and k > 0 and specs[k - 1].name in shrink  # shrinkables share a shard
            if allow_shards and groups[-1] and size + spec.nbytes > max_shard_size and not tail:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        stem, ext = filename.rsplit(".", 1)
        n = len(groups)
        self.filenames = [filename] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
        self.index_name = f"{filename}.index.json" if n > 1 else None
        self._specs = {s.name: s for s in specs}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard no, absolute offset)
        self._groups = groups
        self._reserve = reserve_metadata
        self._prefix_len: list[int] = []
        self._pending = set(names)
        self._fd: tuple[int, int] | None = None  # (shard no, fd)
        # Note: shrinkable tensors.
        #     A few outputs have a length known only once computed (bitsandbytes' quant_state JSON holds
        #     a float whose spelling varies). They are planned at an upper bound, must be the last
        #     specs (so they sit at the end of the last shard) and be written in plan order; each may
        #     come shorter than planned, the next one is placed right after it, and close() rewrites
        #     the header with the real shapes (never longer, so the data offsets before them hold) and
        #     truncates the file.
        self._shrinkable = [n for n in names if n in shrink]
        if self._shrinkable and (names[-len(self._shrinkable):] != self._shrinkable
                                 or any(self._specs[n].dtype != torch.uint8 or len(self._specs[n].shape) != 1
                                        for n in self._shrinkable)):
            raise LoratoolsError("internal: shrinkable tensors must be 1-D uint8 and planned last")
        self._shrink_next = 0
        self._check_space(sum(s.nbytes for s in specs))
        try:
            for i, group in enumerate(groups):
                prefix, offsets = self._header(group, self.metadata)
                self._prefix_len.append(len(prefix))
                data_len = sum(s.nbytes for s in group)
                path = self.dir / self.filenames[i]
                with open(path, "wb") as f:
                    f.write(prefix)
                    f.truncate(len(prefix) + data_len)
                for spec, off in zip(group, offsets):
                    self._where[spec.name] = (i, len(prefix) + off)
        except OSError as e:
            raise _disk_error(e, self.dir) from None

    def _check_space(self, needed: int):
        """Fail before any work when the output filesystem cannot hold the planned bytes."""
        import shutil

        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return
        if free < needed:
            raise OutputError(f"not enough space: the output needs {needed:,} bytes, {free:,} are free; "
                              f"nothing was written", path=self.dir)

    def _header(self, group, metadata):
        placeholder = dict(metadata)
        if self._reserve:
            placeholder["~reserve"] = " " * self._reserve
        prefix, offsets = build_header([(s.name, s.dtype, s.shape) for s in group], placeholder)
        return prefix, offsets

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a planned tensor at its offset (any order; its dtype and shape must match the plan)."""
        spec = self._specs.get(name)
        if spec is None or name not in self._pending:
            raise LoratoolsError("internal: tensor not planned or written twice", tensor=name)
        if name in self._shrinkable:
            self._write_shrinkable(name, tensor)
            return
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise LoratoolsError(f"internal: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} "
                                 f"{list(tensor.shape)}", tensor=name)
        self._pwrite(name, tensor)

    def _write_shrinkable(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs[name]
        k = self._shrinkable.index(name)
        if k != self._shrink_next or tensor.dtype != torch.uint8 or tensor.dim() != 1 \
                or tensor.numel() > spec.shape[0]:
            raise LoratoolsError(f"internal: shrinkable tensor out of order or over its planned "
                                 f"{spec.shape[0]} bytes", tensor=name)
        if k > 0:  # right after the previous one, wherever it ended
            prev = self._specs[self._shrinkable[k - 1]]
            shard, prev_off = self._where[prev.name]
            self._where[name] = (shard, prev_off + prev.nbytes)
        self._specs[name] = TensorSpec(name, torch.uint8, (tensor.numel(),))
        self._shrink_next += 1
        self._pwrite(name, tensor)

    def _pwrite(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset = self._where[name]
        data = tensor_bytes(tensor)
        fd = self._open(shard)
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + written)
        except OSError as e:
            raise _disk_error(e, self.dir / self.filenames[shard]) from None
        self._durability.start_writeback(fd, offset, len(data))
        self._pending.discard(name)

    def copy_from(self, name: str, info: TensorInfo) -> None:
        """Write a planned tensor straight from its bytes in an input file (a TensorInfo of the same dtype
        and shape), kernel to kernel where the OS allows: a tensor passed through unchanged never
        occupies memory (merge uses this for every tensor no adapter touches)."""
        spec = self._specs.get(name)
        if spec is None or name not in self._pending or name in self._shrinkable:
            raise LoratoolsError("internal: tensor not planned, written twice or shrinkable", tensor=name)
        if info.dtype != spec.dtype or tuple(info.shape) != spec.shape:
            raise LoratoolsError(f"internal: planned {spec.dtype} {list(spec.shape)}, got {info.dtype} "
                                 f"{list(info.shape)}", tensor=name)
        shard, offset = self._where[name]
        fd = self._open(shard)
        try:
            src = os.open(info.file, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", path=info.file, tensor=info.name) from None
        try:
            _copy_range(src, info.offset, fd, offset, info.nbytes, info, self.dir / self.filenames[shard])
        finally:
            os.close(src)
        self._durability.start_writeback(fd, offset, info.nbytes)
        self._pending.discard(name)

    def _open(self, shard: int) -> int:
        if self._fd and self._fd[0] == shard:
            return self._fd[1]
        self._close_fd()
        try:
            fd = os.open(self.dir / self.filenames[shard], os.O_WRONLY)
        except OSError as e:
            raise _disk_error(e, self.dir / self.filenames[shard]) from None
        self._fd = (shard, fd)
        return fd

    def _close_fd(self):
        # no fsync here: the shard's write-back is under way (start_writeback); close() waits for all
        if self._fd:
            os.close(self._fd[1])
            self._fd = None

    def close(self, final_metadata: dict[str, str] | None = None) -> list[str]:
        """Check that everything planned was written, finalize headers, write the index."""
        if self._pending:
            missing = sorted(self._pending)
            raise LoratoolsError(f"internal: {len(missing)} planned tensors never written", tensor=missing[0])
        try:
            self._close_fd()
            if self._provenance is not None:
                final_metadata = {**self._provenance.final_metadata(), **(final_metadata or {})}
            if self._shrinkable:
                self._groups[-1] = [self._specs[s.name] for s in self._groups[-1]]
                end = self._prefix_len[-1] + sum(s.nbytes for s in self._groups[-1])
                os.truncate(self.dir / self.filenames[-1], end)
            rewrite = final_metadata is not None or self._reserve or self._shrinkable
            meta = {**self.metadata, **(final_metadata or {})}
            for i, group in enumerate(self._groups):
                fd = os.open(self.dir / self.filenames[i], os.O_WRONLY)
                try:
                    if rewrite:
                        prefix, _ = build_header([(s.name, s.dtype, s.shape) for s in group], meta,
                                                 min_size=self._prefix_len[i] - 8)
                        if len(prefix) != self._prefix_len[i]:
                            raise LoratoolsError("internal: final metadata larger than reserved")
                        os.pwrite(fd, prefix, 0)
                    self._durability.fsync(fd)  # every shard durable before the output is renamed into place
                finally:
                    os.close(fd)
            if self.index_name:
                total = sum(s.nbytes for s in self._specs.values())
                weight_map = {s.name: self.filenames[i] for i, g in enumerate(self._groups) for s in g}
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                write_json(self.dir / self.index_name, index, self._durability)
        except OSError as e:
            raise _disk_error(e, self.dir) from None
        return self.filenames + ([self.index_name] if self.index_name else [])

    def abort(self) -> None:
        """Close the open shard without finishing it (the temporary output is removed by its owner)."""
        if self._fd:
            os.close(self._fd[1])
            self._fd = None


COPY_CHUNK = 16 * 2**20


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, nbytes: int, info, dst_path) -> None:
    """Copy nbytes between file offsets: os.copy_file_range (in the kernel), else pread/pwrite chunks."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(COPY_CHUNK, nbytes - done)
        try:
            if use_kernel:
                try:
                    k = os.copy_file_range(src, dst, n, src_off + done, dst_off + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                        raise
                    use_kernel = False
                    continue
            else:
                chunk = os.pread(src, n, src_off + done)
                k = len(chunk)
                w = 0
                while w < k:
                    w += os.pwrite(dst, memoryview(chunk)[w:], dst_off + done + w)
        except OSError as e:
            raise _disk_error(e, dst_path) from None
        if k == 0:
            raise FormatError(f"file is truncated: read {done} of {nbytes} bytes", path=info.file, tensor=info.name)
        done += k


def write_json(path: Path, data: dict | list, durability: Durability = DURABLE) -> None:
    """Write `data` as indented JSON (key order kept) plus a newline, synced as `durability` says."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            durability.fsync(f.fileno())
    except OSError as e:
        raise _disk_error(e, path) from None


def save_tensors(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], **kw) -> list[str]:
    """Write a small dict of tensors (adapters, records) through the same planned writer.

    `kw` are ShardWriter's options; returns the file names written."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = ShardWriter(directory, specs, **kw)
    for n, t in tensors.items():
        w.write(n, t)
    return w.close()
