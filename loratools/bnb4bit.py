"""The bitsandbytes 4-bit number formats (NF4, FP4), blockwise absmax scaling and double quantization.

One file, pure tensor functions, no file I/O: everything `loratools quantize` / `dequantize` and the
4-bit reader (quantized.py) need to produce and read exactly the bytes that bitsandbytes + transformers
write for a `load_in_4bit` model. bitsandbytes itself is only used by the tests, which prove byte parity
against the installed release (written against 0.50; an older one within pyproject's range may round
differently, and the tests would say so).

Layout of one quantized weight `W` (any shape, `n` elements, flattened row-major):
  - `W`               uint8 `[ceil(n/2), 1]`: two 4-bit codes per byte, element 2k in the high nibble;
  - `W.absmax`        float32 `[ceil(n/blocksize)]` (or uint8 with double quantization);
  - `W.quant_map`     float32 `[16]`: the code table;
  - with double quantization, `W.nested_absmax` float32 `[ceil(blocks/256)]` and
    `W.nested_quant_map` float32 `[256]` (the 8-bit dynamic table), plus an offset in the JSON;
  - `W.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of a JSON dict (see QuantState).

Note: one arithmetic for every device.
    bitsandbytes quantizes with different kernels on CPU (pure torch for 4 bits, a C loop for the
    8-bit absmax) and CUDA, and design.md records that they disagree in a few double-quant bytes. The
    functions here are element-wise torch ops whose results are exactly rounded (abs, max, one
    multiply or divide, compare), so they give the same bytes on CPU and CUDA; the two steps that are
    not (the mean used as the double-quant offset, and argsort of the FP4 table, which has +0 and -0)
    always run on CPU. The bytes are those of bitsandbytes on CPU, which is also what
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` gives on a
    machine without a GPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import parallel
from .dtypes import FLOAT_DTYPES

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # fixed by bitsandbytes for the absmax of the absmax
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_STATE_PREFIX = ".quant_state.bitsandbytes__"

# Note: chunking.
#     A weight is processed CHUNK elements at a time (a multiple of every block size, and even, so
#     chunks hold whole blocks and whole bytes). Every block is independent, so the bytes do not
#     depend on the chunk size. 2^18 float32 temporaries (1 MiB) stay in the CPU caches between the
#     dozen passes over a chunk, which measured 2-3x faster than chunks of 2^22, and bound the
#     working memory whatever the size of the weight.
CHUNK = 1 << 18


# -- code tables ----------------------------------------------------------------------------------

# NF4: the 16 quantiles of N(0, 1) from the QLoRA paper, normalised to [-1, 1], exactly as bitsandbytes
# stores them (float32 values written out, so no scipy at run time).
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, scaled to [-1, 1] by its
# largest magnitude (12). Index 8 is the sign bit on zero, but bitsandbytes stores +0.0 there (its table
# is written with the integer -0), so both zero codes dequantize to +0.0.
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data / data.abs().max()  # float32 division, as bitsandbytes does: NF4 unchanged, FP4 / 12


def code_4bit(quant_type: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """The 16-entry float32 table that `quant_map` stores."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return _code_cpu(quant_type).to(device)


@lru_cache(maxsize=None)
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Note: FP4 bucket order.
    #     The FP4 table is not sorted and holds zero twice (indices 0 and 8). Values are bucketed
    #     against the midpoints of the sorted table, then mapped back to a table index. Which of the
    #     two a value near zero lands on depends on how argsort orders the tie, so argsort runs on
    #     CPU, as in bitsandbytes (small positive values land on index 8).
    code = _code_cpu(quant_type)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' signed 8-bit "dynamic" table (create_dynamic_map(True, 7, 8)), used for the
    # absmax of double quantization: per decade 10^-6 .. 10^0, the midpoints of a float32 linspace
    # over [0.1, 1] with 2^i + 1 points, both signs, plus 0 and 1, sorted.
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    assert len(data) == 256
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: str | torch.device = "cpu") -> torch.Tensor:
    """The 256-entry float32 table that `nested_quant_map` stores."""
    return _dynamic_map_cpu().to(device)


# -- 4-bit blockwise quantization -----------------------------------------------------------------

@lru_cache(maxsize=None)
def _bucket_tables_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables over the top 16 bits of a float32: (count of midpoints below, midpoint inside).

    Note: rounding without a search.
        A value is quantized to the table entry whose bucket holds it: the number of midpoints
        between consecutive (sorted) entries that are STRICTLY below it (bitsandbytes uses
        bucketize(right=False): a value exactly on a midpoint goes to the lower entry). All float32
        values sharing their top 16 bits (sign, exponent, 7 mantissa bits) form one interval; over
        most intervals that count is constant, and where one midpoint falls inside an interval the
        count is the count below it plus (x > midpoint). So per value: one table read by its top
        bits, one compare. This gives exactly bucketize's answer (tested exhaustively around every
        midpoint) for a fraction of the cost of a binary search per value. No interval holds two
        midpoints (asserted).
    """
    midpoints, _ = _bounds_cpu(quant_type)
    top = torch.arange(65536, dtype=torch.int64) << 16
    a = top.to(torch.int32).view(torch.float32)  # the interval's end with low bits 0 ...
    b = (top | 0xFFFF).to(torch.int32).view(torch.float32)  # ... and with low bits 1 (NaN for inf/NaN tops)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    below_lo = torch.searchsorted(midpoints, torch.where(finite, lo, a), right=False)
    below_hi = torch.searchsorted(midpoints, torch.where(finite, hi, a), right=False)
    inside = below_hi - below_lo
    assert int(inside.max()) <= 1
    corr = torch.full((65536,), math.inf, dtype=torch.float32)
    corr[inside == 1] = midpoints[below_lo[inside == 1]]
    return below_lo.to(torch.uint8), corr


def _positions(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 position of each float32 value in the SORTED code table (see _bucket_tables_cpu).

    Note: fast lookups.
        The top 16 bits are read through a uint16 view (the high half of each little-endian float32)
        and every table is gathered as 1- or 4-byte integers: torch's CPU gather is ~5x slower on
        float32 data than on int32 data of the same size, and index_select slower still.
    """
    base, corr, _ = _device_tables(quant_type, str(x.device))
    top = x.view(torch.uint16)[1::2].long()
    return torch.gather(base, 0, top).add_(x > torch.gather(corr, 0, top).view(torch.float32))


@lru_cache(maxsize=None)
def _device_tables(quant_type: str, device: str):
    base, corr = _bucket_tables_cpu(quant_type)
    _, order = _bounds_cpu(quant_type)
    return base.to(device), corr.view(torch.int32).to(device), order.to(torch.uint8).to(device)


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Element 2k in the high nibble, 2k+1 in the low one (q: contiguous uint8 codes, even count).

    Each pair is read as one little-endian int16 v = q[2k] + 256 q[2k+1]: the byte is the low 8 bits
    of (v << 4) | (v >> 8), in four contiguous ops instead of two strided ones.
    """
    v = q.view(torch.int16)
    return ((v << 4) | (v >> 8)).to(torch.uint8)


def _map_chunks(fn, starts: list[int], workers: int) -> list:
    """fn over chunk starts, in order; on parallel.py's thread pool when workers > 1.

    Note: workers.
        Each chunk is a dozen short torch ops; splitting every op over threads (torch's intra-op
        parallelism) pays a fork/join per op, which measured slower than one thread. Whole chunks on
        separate threads, each running its ops single-threaded, keep the cores busy instead. Results
        come back in chunk order, so sums over chunks are deterministic.
    """
    return parallel.map_ordered(fn, starts, workers)


def blockwise_absmax(w: torch.Tensor, blocksize: int, workers: int = 1) -> torch.Tensor:
    """float32 max |w| per block of the flattened tensor (a last, partial block clamped to >= 1e-38)."""
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)

    def chunk(start):
        stop = min(start + CHUNK, full)
        absmax[start // blocksize: stop // blocksize] = flat[start:stop].float().view(-1, blocksize).abs().amax(dim=1)

    _map_chunks(chunk, list(range(0, full, CHUNK)), workers)
    if full < n:
        # bitsandbytes stores the tail's absmax after its guard against division by zero
        absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
    return absmax


def _encode(w: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
            measure: torch.Tensor | None = None, workers: int = 1) -> tuple[torch.Tensor, float, float]:
    """Packed 4-bit codes of w given its block absmax; with `measure` (the absmax bitsandbytes will
    dequantize with), also (sum of squared errors, sum of squares) of the dequantized weight.

    Note: one pass.
        Each chunk is scaled, bucketed, packed and (optionally) dequantized and compared while it is
        in cache; nothing of the size of the weight is allocated besides the packed output.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    order = _device_tables(quant_type, str(w.device))[2]
    packed = parallel.pooled_empty(((n + 1) // 2,), torch.uint8, w.device)
    table = None
    if measure is not None:  # dequantization table in sorted order: a position indexes it directly
        _, sorted_order = _bounds_cpu(quant_type)
        table = _dequant_code(quant_type, tuple(w.shape), blocksize, w.device)[sorted_order.to(w.device)]
        table = table.view(torch.int32)  # gathered as int32 (see _positions)
    inv = 1.0 / absmax.clamp(min=1e-38)

    def emit(x, pos, start, scale):
        codes = pos
        if codes.numel() % 2:  # an odd count is padded with a 0.0 value: the code of zero, low nibble
            codes = torch.cat([codes, _positions(torch.zeros(1, device=w.device), quant_type)])
        if quant_type != "nf4":  # FP4's table is not sorted: position -> code
            codes = torch.gather(order, 0, codes.long())
        packed[start // 2: start // 2 + codes.numel() // 2] = _pack(codes)
        if table is None:
            return None
        values = torch.gather(table, 0, pos.long()).view(torch.float32)
        d = x - scale(values).to(w.dtype).float()
        return torch.dot(d, d).double(), torch.dot(x, x).double()

    def chunk(start):
        stop = min(start + CHUNK, full)
        b0, b1 = start // blocksize, stop // blocksize
        x = flat[start:stop].float()
        # Note: scaling.
        #     Full blocks are multiplied by the float32 reciprocal of their absmax (not divided by
        #     it: the two differ in the last bit for some values, and so can the nibble). An
        #     all-zero block gets absmax 0 and scale 1/1e-38, so its values stay 0. bitsandbytes
        #     then clamps to [-1, 1]; that cannot change a bucket (every midpoint is inside), so
        #     the clamp is left out.
        scaled = (x.view(-1, blocksize) * inv[b0:b1].unsqueeze(1)).view(-1)
        return emit(x, _positions(scaled, quant_type), start,
                    lambda v: (v.view(-1, blocksize) * measure[b0:b1].unsqueeze(1)).view(-1))

    sums = _map_chunks(chunk, list(range(0, full, CHUNK)), workers)
    if full < n:
        x = flat[full:].float()
        # The last, partial block is divided, not multiplied by the reciprocal (bitsandbytes does so).
        sums.append(emit(x, _positions(x / absmax[-1], quant_type), full, lambda v: v * measure[-1]))
    err = ref = 0.0
    if table is not None:
        for e, r in sums:  # in chunk order: the same total whatever the number of workers
            err += float(e)
            ref += float(r)
    return packed.unsqueeze(1), err, ref


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of `w` (any shape; flattened row-major).

    Returns (packed uint8 `[ceil(n/2), 1]`, absmax float32 `[ceil(n/blocksize)]`), on w's device.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    absmax = blockwise_absmax(w, blocksize)
    return _encode(w, absmax, blocksize, quant_type)[0], absmax


def _dequant_code(quant_type: str, shape: tuple[int, ...], blocksize: int, device) -> torch.Tensor:
    # Note: the sign of FP4 zero.
    #     bitsandbytes' C/CUDA dequantization kernels decode FP4 code 8 (sign bit on zero) as -0.0,
    #     while its stored table and its pure-torch fallback hold +0.0. On CPU the fallback runs for
    #     an odd last dimension, or on AVX-512 machines for blocksize >= 2048. We follow the same rule,
    #     so that the dense bytes match bitsandbytes, down to the sign of zero.
    code = code_4bit(quant_type, device)
    if quant_type == "fp4":
        fallback = torch.device(device).type == "cpu" and (
            shape[-1] % 2 != 0 or (blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512"))
        if not fallback:
            code = code.clone()
            code[8] = -0.0
    return code


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, start: int, blocksize: int) -> torch.Tensor:
    """values (float32, flat, from element `start`, a block boundary) * their block's absmax."""
    n = values.numel()
    first = start // blocksize
    full = n - n % blocksize
    if full == n:
        return (values.view(-1, blocksize) * absmax[first:first + n // blocksize].unsqueeze(1)).view(-1)
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[first:first + full // blocksize].unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[first + full // blocksize]
    return out


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, *, blocksize: int, quant_type: str,
                    shape: tuple[int, ...], dtype: torch.dtype, workers: int | None = None) -> torch.Tensor:
    """Inverse of quantize_4bit: table[nibble] * absmax[block] in float32, one rounding to `dtype`.
    The chunks go to `workers` threads (default parallel.cpu_workers); the bytes do not depend on it.

    Bit-identical to bitsandbytes.functional.dequantize_4bit (its CPU kernel computes the same float32
    product and rounds to nearest even; so does its CUDA kernel).
    """
    n = math.prod(shape)
    code = _dequant_code(quant_type, tuple(shape), blocksize, packed.device)
    # one read per byte: both of its nibbles' table values
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1).contiguous()  # [256, 2]
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    absmax = absmax.float()
    out = parallel.pooled_empty((n,), dtype, packed.device)

    def chunk(start):
        stop = min(start + CHUNK, n)
        byte = flat[start // 2: (stop + 1) // 2]
        values = torch.index_select(pairs, 0, byte.int()).view(-1)[: stop - start]
        out[start:stop] = _scale_blocks(values, absmax, start, blocksize).to(dtype)

    _map_chunks(chunk, list(range(0, n, CHUNK)), parallel.cpu_workers(packed.device) if workers is None else workers)
    return out.reshape(shape)


# -- double quantization: the absmax vector in 8 bits ------------------------------------------

def quantize_absmax(absmax: torch.Tensor, mean_threads: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization: (uint8 codes, float32 nested_absmax, offset) for a float32 absmax vector.

    Note: the offset.
        The absmax values are all positive; subtracting their mean centres them so that the signed
        8-bit table is used on both sides. The mean is a float32 reduction whose last bit depends on
        the summation order: on the device (so CPU and CUDA differ), and on CPU on the number of
        intra-op threads torch splits it over (for more than 32768 blocks, i.e. weights above 2M
        values); that one bit moves the JSON offset, the nested absmax and some absmax codes. It is
        taken on CPU with torch over `mean_threads` threads (None: torch's current setting), so a
        caller that runs its maths single-threaded passes the count bitsandbytes would run with
        (quantize passes torch's setting at the start of the command).
    Note: 8-bit rounding (bitsandbytes' CPU kernel as of 0.50, reproduced step for step; tested for parity).
        It does not search the table per value. Each value is scaled by the float32 reciprocal of
        its block's absmax, clamped to [-1, 1], mapped to one of 65536 bins by
        trunc(((v + 1) * 0.5) * 65535 + 0.5) (four float32 roundings), and the bin looked up in a
        precomputed table of "nearest entry" (see _lut_8bit). Values within about 1e-5 of a midpoint
        between two entries can thus land on the farther entry; matching the bytes means making the
        same choice. An all-zero block (every absmax equal to the offset) stores code 0.
    """
    offset = _mean_over_threads(absmax.float().cpu(), mean_threads)
    x = absmax.float() - offset.to(absmax.device)
    n = x.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(x, (0, nblocks * NESTED_BLOCKSIZE - n)).reshape(nblocks, NESTED_BLOCKSIZE)
    nested = padded.abs().amax(dim=1)  # padding zeros never exceed a max of absolute values
    inv = (1.0 / nested).unsqueeze(1)
    v = torch.clamp(padded * inv, -1.0, 1.0)
    t = ((v + 1.0) * 0.5) * float(LUT_BINS - 1) + 0.5
    zero = (nested == 0).unsqueeze(1)  # 0 * (1/0) is NaN: such blocks store code 0
    bins = t.nan_to_num(0.0).to(torch.int64).reshape(-1)  # NaN only in all-zero blocks, stored as 0 below
    q = torch.gather(_lut_8bit(absmax.device), 0, bins).reshape(t.shape)
    q = torch.where(zero, 0, q)
    return q.reshape(-1)[:n].contiguous(), nested, offset.item()


def _mean_over_threads(x: torch.Tensor, threads: int | None) -> torch.Tensor:
    """x.mean() with torch split over `threads` intra-op threads (None: as it is set now)."""
    current = torch.get_num_threads()
    if threads is None or threads == current:
        return x.mean()
    torch.set_num_threads(threads)
    try:
        return x.mean()
    finally:
        torch.set_num_threads(current)


LUT_BINS = 65536


@lru_cache(maxsize=None)
def _lut_8bit_cpu() -> torch.Tensor:
    # bin i stands for v_i = -1 + 2i/65535 (float32) and holds the number of midpoints between
    # consecutive table entries that lie strictly below v_i, i.e. the entry nearest v_i, ties down.
    code = _dynamic_map_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    v = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32)) / float(LUT_BINS - 1)
    return torch.searchsorted(midpoints, v, right=False).to(torch.uint8)


def _lut_8bit(device) -> torch.Tensor:
    return _lut_8bit_cpu().to(device)


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: float,
                      code: torch.Tensor | None = None) -> torch.Tensor:
    """table[q] * nested_absmax[block] + offset, all float32 (bitsandbytes' dequantize_blockwise + add)."""
    code = dynamic_map(qabsmax.device) if code is None else code.to(qabsmax.device).float()
    values = torch.gather(code.view(torch.int32), 0, qabsmax.reshape(-1).long()).view(torch.float32)  # see _positions
    out = _scale_blocks(values, nested_absmax.float(), 0, NESTED_BLOCKSIZE)
    return out + torch.tensor(offset, dtype=torch.float32, device=out.device)


# -- the quant_state JSON -------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantState:
    """What `W.quant_state.bitsandbytes__<type>` holds, besides the tensors."""

    quant_type: str
    blocksize: int
    dtype: str  # the dense dtype the weight had, e.g. "float16"
    shape: tuple[int, ...]
    nested_offset: float | None = None  # set iff double quantization
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: str = "float32"

    @property
    def nested(self) -> bool:
        """True with double quantization (the absmax stored in 8 bits)."""
        return self.nested_offset is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dense weight's dtype, as torch spells it."""
        return FLOAT_DTYPES[self.dtype]

    @property
    def key_suffix(self) -> str:
        """The suffix of the tensor holding this state's JSON: `.quant_state.bitsandbytes__nf4`."""
        return QUANT_STATE_PREFIX + self.quant_type

    def to_dict(self) -> dict:
        """The JSON dict bitsandbytes stores (see the comment below on its key order)."""
        # Key order and json.dumps' default separators are what bitsandbytes' pack_dict_to_tensor
        # writes, so the bytes match too.
        d = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": self.dtype,
             "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype=self.nested_dtype,
                     nested_offset=self.nested_offset)
        return d

    def to_tensor(self) -> torch.Tensor:
        """The stored uint8 tensor: the JSON's UTF-8 bytes."""
        return torch.frombuffer(bytearray(json.dumps(self.to_dict()).encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        """Parse (and check) a quant_state dict; raises ValueError naming what is wrong."""
        try:
            qs = cls(quant_type=str(d["quant_type"]), blocksize=int(d["blocksize"]), dtype=str(d["dtype"]),
                     shape=tuple(int(s) for s in d["shape"]),
                     nested_offset=float(d["nested_offset"]) if "nested_offset" in d else None,
                     nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)),
                     nested_dtype=str(d.get("nested_dtype", "float32")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"quant_state lacks or garbles {e}") from None
        if qs.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type {qs.quant_type!r} is not one of {QUANT_TYPES}")
        if qs.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {qs.blocksize} is not one of {BLOCKSIZES}")
        if qs.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {qs.dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
        if qs.nested and (qs.nested_dtype != "float32" or qs.nested_blocksize <= 0):
            raise ValueError(f"unsupported nested state: {qs.nested_dtype}, blocksize {qs.nested_blocksize}")
        return qs

    # shapes of the tensors stored beside the packed weight
    @property
    def numel(self) -> int:
        """Elements of the dense weight."""
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        """absmax blocks over the flattened weight (the last may be partial)."""
        return -(-self.numel // self.blocksize)

    def aux_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """suffix -> (dtype, shape) of every tensor stored beside the packed weight."""
        specs = {"": (torch.uint8, ((self.numel + 1) // 2, 1)),
                 ".absmax": (torch.uint8 if self.nested else torch.float32, (self.blocks,)),
                 ".quant_map": (torch.float32, (16,))}
        if self.nested:
            specs[".nested_absmax"] = (torch.float32, (-(-self.blocks // self.nested_blocksize),))
            specs[".nested_quant_map"] = (torch.float32, (256,))
        specs[self.key_suffix] = (torch.uint8, (len(json.dumps(self.to_dict()).encode("utf-8")),))
        return specs


def quantize_weight(w: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool,
                    mean_threads: int | None = None) -> tuple[dict[str, torch.Tensor], QuantState]:
    """One dense weight -> its stored tensors (suffix -> tensor, on w's device) and QuantState.

    `mean_threads`: see quantize_absmax (the double-quant offset).

    Example:
        >>> stored, qs = quantize_weight(w.half(), quant_type="nf4", blocksize=64, double_quant=True)
        >>> sorted(stored)
        ['', '.absmax', '.nested_absmax', '.nested_quant_map', '.quant_map', '.quant_state.bitsandbytes__nf4']
    """
    tensors, qs, _ = _quantize_weight(w, quant_type, blocksize, double_quant, measure=False,
                                      mean_threads=mean_threads)
    return tensors, qs


def quantize_weight_measured(w: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool,
                             workers: int = 1, mean_threads: int | None = None
                             ) -> tuple[dict[str, torch.Tensor], QuantState, tuple[float, float]]:
    """quantize_weight, plus (sum of squared errors, sum of squares of w) of what bitsandbytes will
    dequantize (table value * dequantized absmax, rounded to w's dtype) against w. `workers` > 1
    spreads the chunks over threads (see _map_chunks); the result does not depend on it."""
    return _quantize_weight(w, quant_type, blocksize, double_quant, measure=True, workers=workers,
                            mean_threads=mean_threads)


def _quantize_weight(w, quant_type, blocksize, double_quant, measure, workers=1, mean_threads=None):
    dtype = str(w.dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"only float16/bfloat16/float32 weights can be quantized, not {dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    absmax = blockwise_absmax(w, blocksize, workers)
    if double_quant:
        qabsmax, nested, offset = quantize_absmax(absmax, mean_threads)
        qs = QuantState(quant_type, blocksize, dtype, tuple(w.shape), nested_offset=offset)
        used = dequantize_absmax(qabsmax, nested, offset) if measure else None
        stored = {".absmax": qabsmax, ".quant_map": code_4bit(quant_type, w.device), ".nested_absmax": nested,
                  ".nested_quant_map": dynamic_map(w.device)}
    else:
        qs = QuantState(quant_type, blocksize, dtype, tuple(w.shape))
        used = absmax if measure else None
        stored = {".absmax": absmax, ".quant_map": code_4bit(quant_type, w.device)}
    packed, err, ref = _encode(w, absmax, blocksize, quant_type, used, workers)
    out = {"": packed, **stored, qs.key_suffix: qs.to_tensor().to(w.device)}
    return out, qs, ((err, ref) if measure else None)


def dequantize_weight(tensors: dict[str, torch.Tensor], qs: QuantState, dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
    """Stored tensors (suffix -> tensor, as quantize_weight returns) -> the dense weight.

    Like bitsandbytes, reads the stored `nested_quant_map` but uses the built-in 4-bit table (its
    kernels ignore the stored `quant_map`).
    """
    absmax = tensors[".absmax"]
    if qs.nested:
        absmax = dequantize_absmax(absmax, tensors[".nested_absmax"], qs.nested_offset,
                                   tensors.get(".nested_quant_map"))
    return dequantize_4bit(tensors[""], absmax, blocksize=qs.blocksize, quant_type=qs.quant_type,
                           shape=qs.shape, dtype=qs.torch_dtype if dtype is None else dtype)
