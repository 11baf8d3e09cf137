"""The safetensors file format, parsed and written by hand.

Note: why not `safetensors.safe_open`?
    Its default backend memory-maps the whole shard: every page a tensor read touches stays resident
    (and counted in RSS) until the shard is closed, so a 5 GB shard costs up to 5 GB of RSS. Its
    `backend="pread"` (safetensors 0.8) bounds RSS as we do, so we measured it: reading every tensor
    of a 0.34 GB float16 file, page cache warm, 11 interleaved runs on a shared 2-core box, ours
    (one `readinto` per tensor into a fresh buffer) took min 0.137 / median 0.190 s and 0.201 / 0.219 s
    in two runs, pread 0.171 / 0.214 s and 0.225 / 0.241 s: ours ~10% faster at the same peak RSS
    (+0.1 GB, one tensor alive; mmap +0.33 GB, the whole file). `python benchmarks/read_safetensors.py
    --repeat 11`. Parsing the header ourselves also checks every offset and size against the file
    length before allocating anything (a truncated shard or a header claiming a huge tensor is an
    error naming the file and tensor, not an OOM), and works with any safetensors version.

Layout: 8-byte little-endian header length N, N bytes of JSON (may be padded with spaces), then the
data buffer. Each tensor's `data_offsets` are relative to the buffer start; tensors tile the buffer
exactly, with no gaps or overlaps.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import FormatError, InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a real checkpoint (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGN = 8


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk; enough to read it without touching any other tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # absolute path of the shard
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        """The dtype as torch spells it, without `torch.` ("float16")."""
        return str(self.dtype).removeprefix("torch.")


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header; return tensors in file order and the metadata."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(
                    f"corrupt safetensors header: claims {n} header bytes but the file has {size} bytes", path=path
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"corrupt safetensors header: not valid JSON ({e})", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header: expected a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("corrupt safetensors header: __metadata__ must map strings to strings", path=path)

    data_start = 8 + n
    data_len = size - data_start
    spans = []
    infos = {}
    for name, entry in header.items():
        try:
            dtype_s, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise FormatError("corrupt safetensors header: entry lacks dtype/shape/data_offsets", path=path, tensor=name) from None
        if dtype_s not in DTYPES:
            raise FormatError(f"unsupported dtype {dtype_s!r}", path=path, tensor=name)
        dtype = DTYPES[dtype_s]
        if any(d < 0 for d in shape):
            raise FormatError(f"negative dimension in shape {list(shape)}", path=path, tensor=name)
        expected = math.prod(shape) * element_size(dtype)
        if end - begin != expected or begin < 0:
            raise FormatError(
                f"header gives {end - begin} bytes for a {dtype_s} tensor of shape {list(shape)}, expected {expected}",
                path=path,
                tensor=name,
            )
        if end > data_len:
            raise FormatError(
                f"file is truncated: tensor needs bytes up to {data_start + end}, file has {size}",
                path=path,
                tensor=name,
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, shape, os.path.abspath(path), data_start + begin, expected)

    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise FormatError(f"corrupt safetensors header: data offsets overlap or leave a gap at byte {pos}", path=path, tensor=name)
        pos = end
    if pos != data_len:
        raise FormatError(
            f"file size {size} does not match its header (data should end at byte {data_start + pos})", path=path
        )
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, metadata


def read_tensor(info: TensorInfo, fh: BinaryIO | None = None, empty=None) -> torch.Tensor:
    """Read one tensor into a fresh CPU buffer (no mmap; see the module note); `empty(shape, dtype)`
    makes that buffer when given (parallel.pooled_empty: a recycled one)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if empty is None else empty((info.nbytes,), torch.uint8)
    own = fh is None
    try:
        if own:
            fh = open(info.file, "rb", buffering=0)
        fh.seek(info.offset)
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            k = fh.readinto(view[got:])
            if not k:
                raise FormatError(
                    f"file is truncated: read {got} of {info.nbytes} bytes", path=info.file, tensor=info.name
                )
            got += k
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=info.file, tensor=info.name) from None
    finally:
        if own and fh is not None:
            fh.close()
    if info.dtype == torch.uint8:
        return buf.view(info.shape)
    return buf.view(info.dtype).view(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())


def build_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None,
                 min_size: int = 0) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors laid out in the given order.

    Returns the full prefix (8-byte length + JSON padded with spaces to a multiple of 8 and at least
    `min_size` bytes) and each tensor's offset in the data buffer.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * element_size(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    target = max(len(raw), min_size)
    target += (-target) % ALIGN
    raw += b" " * (target - len(raw))
    return struct.pack("<Q", len(raw)) + raw, offsets
