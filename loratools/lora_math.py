"""PEFT's LoRA arithmetic in one place: ΔW = B·A·scale in the base weight's layout, merging it into a weight
and taking it out again (plain LoRA and DoRA, one small strategy object each, as PEFT's lora/variants.py),
and the lora_bias delta. Pure tensor functions in float32; merge, combine, extract and validate share them.

Note: matching PEFT bit for bit.
    PEFT's `merge_and_unload()` (tuners/lora/layer.py and variants.py) computes, per adapter,
    ΔW = transpose(B @ A, fan_in_fan_out) · scale in float32 and adds it to the base weight in place,
    which PyTorch evaluates in float32 and rounds once into W's dtype. We compute the same expression with
    the same ops in float32 and round once, so one plain LoRA adapter gives PEFT's bits on the same device.
    PEFT deviates from "one rounding" in two places, both within one ulp of ours: an embedding delta is
    cast to the weight's dtype before the add, and several adapters are merged one after another.

Note: DoRA.
    PEFT's DoraLinearVariant.merge computes `norm = ||W₀ + ΔW||` per output feature with
    `torch.linalg.norm(transpose(W₀) + transpose(ΔW), dim=1)` (W₀ in its own dtype, ΔW float32, so the sum
    is float32), then `W ← (m / norm) · (W + ΔW)`. The norm runs over the input axis of the [out, in] layout:
    for a Conv1D weight [in, out] and an embedding [num_embeddings, dim] that is axis 0 of the stored
    tensor, and m / norm scales columns. We replicate the expression literally to get the same bits.
    Plain LoRA deltas commute; DoRA steps do not: each rescales everything merged so far, with the norm
    taken on the unmerged W₀ plus that adapter's own ΔW, applied in the order the adapters are given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import parallel

if TYPE_CHECKING:
    from .adapter import LoraModule


# -- layout and scale ------------------------------------------------------------------------------------

def stored_transposed(kind: str, fan_in_fan_out: bool = False) -> bool:
    """True when the base weight is stored as (B·A)ᵀ, [in, out]: an embedding ([num_embeddings, dim]) or a
    fan_in_fan_out (GPT-2 Conv1D) weight; False for an nn.Linear weight [out, in]."""
    return kind == "embedding" or fan_in_fan_out


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def to_layout(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`x` in the base weight's layout (a view): transposed for embeddings and Conv1D weights."""
    return x.T if transposed else x


def peft_delta(B: torch.Tensor, A: torch.Tensor, scale: float, transposed: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's get_delta_weight: (B @ A) · scale in the base weight's layout, in B and A's dtype.

    One whole-matrix product, as PEFT computes it; with `out` the product lands there (a workspace buffer)."""
    d = B @ A if out is None else torch.mm(B, A, out=out)
    return to_layout(d.mul_(scale), transposed)


class Workspace:
    """Reusable float32 buffers, one per role, grown to the largest tensor seen.

    Note: why reuse.
        A fresh 50 MB float32 tensor costs more in page faults (the kernel zeroes every page) than the
        rank-16 matmul that fills it; on CPU, reusing two buffers across tensors makes the plain merge
        about 1.5x faster. The buffers are a few tensors' worth of memory, whatever the model size."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape, device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = self._bufs[role] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(tuple(shape))


# -- MoE experts: LoRA on a 3-D parameter (PEFT target_parameters) -------------------------------------------

def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert views of PEFT's packed expert factors: A (r·E, in) -> [E, r, in], B (out, r·E) -> [E, out, r].

    PEFT's ParamWrapper puts the expert index first in A's rows and last in B's columns: expert e owns
    A[e·r:(e+1)·r] and B[:, e::E]."""
    r = A.shape[0] // experts
    return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)


def pack_expert_factors(A_e: torch.Tensor, B_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of expert_factors: A_e [E, r, in], B_e [E, out, r] -> A (r·E, in), B (out, r·E), contiguous."""
    E, r, n_in = A_e.shape
    return A_e.reshape(E * r, n_in).contiguous(), B_e.permute(1, 2, 0).reshape(B_e.shape[1], r * E).contiguous()


def expert_delta(B: torch.Tensor, A: torch.Tensor, scale: float, experts: int,
                 transposed: bool = False) -> torch.Tensor:
    """PEFT's ParamWrapper.get_delta_weight for a 3-D expert parameter, in B and A's dtype.

    Args:
        B: lora_B.weight, (out, r·E).
        A: lora_A.weight, (r·E, in).
        scale: lora_alpha / r (or / √r with rsLoRA) of this parameter, times any merge weight.
        experts: E.
        transposed: the base stores the experts as [E, in, out] (transformers' `is_transposed`, e.g. GPT-OSS);
            False for [E, out, in] (Mixtral, Qwen3-MoE, OLMoE: gate_up_proj [E, 2I, H], down_proj [E, H, I]).

    Returns:
        ΔW [E, out, in] (or [E, in, out] when transposed); expert e is B[:, e::E] @ A[e·r:(e+1)·r] · scale.

    The same einsum as PEFT (tuners/lora/layer.py), so in float32 the bits are PEFT's merge_and_unload delta.
    """
    r = A.shape[0] // experts
    Bv, Av = B.reshape(B.shape[0], r, experts), A.reshape(experts, r, A.shape[1])
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", Bv, Av) * scale


def expert_delta_norms(A: torch.Tensor, B: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    """‖ΔW_e‖_F per expert [E] in float32, from the factors alone: ‖B_e A_e‖² = Σ (B_eᵀB_e) ⊙ (A_e A_eᵀ)."""
    A_e, B_e = expert_factors(A.to(torch.float32), B.to(torch.float32), experts)
    gram = (B_e.transpose(1, 2) @ B_e) * (A_e @ A_e.transpose(1, 2))
    return gram.sum(dim=(1, 2)).clamp_min(0).sqrt() * abs(scale)


def lora_delta(m: "LoraModule", weight: float = 1.0, device="cpu", ws: Workspace | None = None,
               rows: slice | None = None) -> torch.Tensor:
    """weight · scale · B @ A of one module in float32 on `device`, in the base tensor's layout.

    `rows` (an [out, in] layout only) gives those rows of it from B's rows alone, with the same bits (see
    Note: row blocks of B @ A). With a workspace the product lands in its "delta" buffer (valid until the
    next call)."""
    A = m.A.to(device=device, dtype=torch.float32)
    B = m.B.to(device=device, dtype=torch.float32)
    if m.kind == "experts":  # [E, out, in] (or [E, in, out]): one einsum, no row blocks, no workspace
        assert rows is None, "row blocks of an expert delta"
        return expert_delta(B, A, m.scale * weight, m.experts, m.transposed)
    transposed = stored_transposed(m.kind, m.fan_in_fan_out)
    if rows is not None:
        assert not transposed, "row blocks of a transposed delta"
        B = B[rows]
    out = None if ws is None else ws.get("delta", (B.shape[0], A.shape[1]), device)
    return peft_delta(B, A, m.scale * weight, transposed, out)


def bias_delta(steps: list["Step"], device="cpu") -> torch.Tensor:
    """Σ weight · scale · lora_B.bias in float32 (PEFT: `bias += lora_B.bias * scaling`)."""
    total = None
    for s in steps:
        b = s.module.bias.to(device=device, dtype=torch.float32) * (s.module.scale * s.weight)
        total = b if total is None else total + b
    return total


# -- DoRA ------------------------------------------------------------------------------------------------

def dora_weight_norm(base: torch.Tensor, delta: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """||W₀ + ΔW|| per output feature, as PEFT's DoraLinearLayer.get_weight_norm computes it.

    `base` stays in its own dtype: PEFT adds the float32 delta to the base weight as stored."""
    return torch.linalg.norm(to_layout(base, is_transposed) + to_layout(delta, is_transposed),
                             dim=1).to(torch.float32)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """m / ||W₀ + ΔW||, shaped to scale the rows ([out, in]) or columns ([in, out]) of the base tensor."""
    f = magnitude.to(device=norm.device, dtype=torch.float32) / norm
    return f.view(1, -1) if is_transposed else f.view(-1, 1)


# -- one strategy per adapter variant (as PEFT's lora/variants.py) ---------------------------------------

class PlainLora:
    """W ± ΔW. Embedding and Conv1D modules differ only in layout, which lora_delta already applies."""

    name = "lora"
    records_norm = False  # merge leaves nothing unmerge would need beyond the adapter itself
    additive = True  # ΔW alone is the update: deltas sum (combine) and truncate (resize)
    typed = False  # a LoRA module (not a peft_types one)

    def merge(self, acc: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, m: "LoraModule"):
        """acc += ΔW; returns what unmerge needs besides the adapter (nothing)."""
        acc += delta
        return None

    def unmerge(self, acc: torch.Tensor, delta: torch.Tensor, m: "LoraModule", norm) -> None:
        acc -= delta


class Dora(PlainLora):
    """W ← m / ||W₀ + ΔW|| · (W + ΔW); the norm, one number per output feature, is returned for the record
    (it cannot be recovered from the merged weights)."""

    name = "dora"
    records_norm = True
    additive = False  # m / ||W + ΔW|| depends on the whole base weight: updates neither sum nor truncate

    def merge(self, acc, base, delta, m):
        tr = stored_transposed(m.kind, m.fan_in_fan_out)
        norm = dora_weight_norm(base, delta, tr)
        acc += delta
        acc *= dora_factor(m.magnitude, norm, tr)
        return norm

    def unmerge(self, acc, delta, m, norm) -> None:
        acc /= dora_factor(m.magnitude, norm.to(acc.device), stored_transposed(m.kind, m.fan_in_fan_out))
        acc -= delta


class PeftTypeVariant:
    """A module of a non-LoRA PEFT type (loratools.peft_types): it merges and unmerges itself, in float32,
    as its PEFT layer does (TypedModule.merge / unmerge); nothing is recorded."""

    name = "peft_type"
    records_norm = False
    additive = False  # per module (TypedModule.additive); adapters of these types are not combined
    typed = True


PLAIN_LORA, DORA, PEFT_TYPE = PlainLora(), Dora(), PeftTypeVariant()


def variant_of(m: "LoraModule") -> PlainLora:
    """The strategy that merges and unmerges module `m` (a peft_types module names its own)."""
    return getattr(m, "variant", None) or (DORA if m.magnitude is not None else PLAIN_LORA)


def _typed_weight(w: torch.Tensor, steps: list["Step"], device, out_dtype, undo: bool) -> torch.Tensor:
    """Steps of peft_types modules on one weight, in float32, rounded once (unmerge: in reverse order).

    Modules that can (`row_blocks`) work on row blocks of the weight, spread over threads as the plain LoRA
    merge's (Note: row blocks of B @ A): no full-size float32 copy or delta, the same bits."""
    w = w.to(device)
    order = list(reversed(steps)) if undo else steps
    blocks = _row_blocks(w) if all(s.module.row_blocks for s in steps) else [slice(None)]

    def block(rows):  # rows None: the whole weight
        acc = (w if rows is None else w[rows]).to(dtype=torch.float32, copy=True)
        for s in order:
            acc = s.module.unmerge(acc, rows) if undo else s.module.merge(acc, rows)
        return acc

    if len(blocks) == 1:
        return block(None).to(out_dtype)
    out = parallel.pooled_empty(w.shape, out_dtype, w.device)
    out[blocks[0]] = block(blocks[0])  # first on its own: a module's lazy state (VeRA's projections) is built once

    def rest(rows):
        out[rows] = block(rows)

    parallel.map_ordered(rest, blocks[1:], parallel.cpu_workers(w.device))
    return out


@dataclass
class Step:
    """One adapter's contribution to one base tensor."""

    module: "LoraModule"
    weight: float
    adapter_index: int  # the adapter's position on the command line

    @property
    def variant(self) -> PlainLora:
        return variant_of(self.module)

    @property
    def dora(self) -> bool:
        return self.variant.records_norm


# -- a whole weight ----------------------------------------------------------------------------------------

# Elementwise work on CPU runs in row blocks of about this many elements, so that the float32 sum of a
# plain merge is one small block, not a second full-size float32 tensor.
BLOCK_ELEMENTS = 1 << 20


# Row blocks are a multiple of this many rows, and a shorter remainder joins the block before it: a
# matmul of fewer than 4 rows takes another kernel and can differ in the last bit (Note: row blocks).
BLOCK_ROWS = 64


def _row_blocks(t: torch.Tensor) -> list[slice]:
    if t.dim() != 2 or t.device.type != "cpu":
        return [slice(None)]
    rows = t.shape[0]
    step = max(BLOCK_ROWS, BLOCK_ELEMENTS // max(1, t.shape[1]) // BLOCK_ROWS * BLOCK_ROWS)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < BLOCK_ROWS:
        starts.pop()
    return [slice(r, starts[i + 1] if i + 1 < len(starts) else rows) for i, r in enumerate(starts)]


def _plain_blocks(w0: torch.Tensor, steps: list[Step], device, out_dtype, ws: Workspace,
                  undo: bool = False) -> torch.Tensor | None:
    """W ± ΣΔW (plain LoRA steps, in order; unmerge: reversed) and the cast, block by block, the blocks
    spread over threads (parallel.py); None when the steps need the whole-tensor path (several steps
    whose deltas are not taken by rows)."""
    blocks = _row_blocks(w0)
    by_rows = len(blocks) > 1 and all(not stored_transposed(s.module.kind, s.module.fan_in_fan_out)
                                      and s.module.kind != "experts" for s in steps)
    if not by_rows and len(steps) > 1:
        return None
    d = None if by_rows else lora_delta(steps[0].module, steps[0].weight, device, ws)  # one whole-matrix product
    order = list(reversed(steps)) if undo else steps
    workers = parallel.cpu_workers(w0.device) if len(blocks) > 1 else 1
    out = parallel.pooled_empty(w0.shape, out_dtype, w0.device)

    def block(rows):
        # each block's ops in the serial order, on one thread: the same bits for any number of workers
        bws = ws if workers == 1 else parallel.thread_local(Workspace)
        blk = w0[rows]
        acc = bws.get("acc", blk.shape, device)
        acc.copy_(blk)
        for s in order:
            # Note: row blocks of B @ A.
            #     Each element of B @ A is one rank-long dot product. The CPU kernels compute it the same
            #     way whatever the number of rows in the call, except for calls of fewer than 4 rows
            #     (measured), which _row_blocks never makes; so a block's product has the bits of the
            #     whole product's rows (tests/test_merge.py checks it on awkward shapes; benchmarks/merge.py
            #     on all 84 weights against PEFT). The float32 delta then never exists at full size: 46 MB
            #     less memory and one pass less over it for a 5632 x 2048 weight.
            d_blk = lora_delta(s.module, s.weight, device, bws, rows) if by_rows else d[rows]
            if undo:
                s.variant.unmerge(acc, d_blk, s.module, None)
            else:
                s.variant.merge(acc, blk, d_blk, s.module)
        out[rows] = acc

    parallel.map_ordered(block, blocks, workers)
    return out


def merge_weight(base: torch.Tensor, steps: list[Step], device="cpu", out_dtype=torch.float32,
                 ws: Workspace | None = None) -> tuple[torch.Tensor, list]:
    """Apply steps in order in float32 (each through its variant: W += ΔW for LoRA,
    W = m/||W₀+ΔW|| · (W + ΔW) for DoRA) and round once to `out_dtype`. Returns the result (a new tensor
    on `device`) and, per step, what its unmerge needs (the DoRA norm; None for plain LoRA)."""
    if steps[0].variant.typed:  # a non-LoRA PEFT type merges itself (peft_types/base.py)
        return _typed_weight(base, steps, device, out_dtype, undo=False), [None] * len(steps)
    ws = ws or Workspace()
    w0 = base.to(device)
    if all(s.variant is PLAIN_LORA for s in steps):
        out = _plain_blocks(w0, steps, device, out_dtype, ws)
        if out is not None:
            return out, [None] * len(steps)
    acc = ws.get("acc", w0.shape, device)
    acc.copy_(w0)
    norms = [s.variant.merge(acc, w0, lora_delta(s.module, s.weight, device, ws), s.module) for s in steps]
    return acc.to(out_dtype, copy=True), norms


def unmerge_weight(merged: torch.Tensor, steps: list[Step], norms: list, device="cpu", out_dtype=torch.float32,
                   ws: Workspace | None = None) -> torch.Tensor:
    """Undo `merge_weight` in reverse order (W -= ΔW for LoRA, W = W / (m/norm) − ΔW for DoRA) in float32,
    rounded once to `out_dtype`."""
    if steps[0].variant.typed:
        return _typed_weight(merged, steps, device, out_dtype, undo=True)
    ws = ws or Workspace()
    m = merged.to(device)
    if all(s.variant is PLAIN_LORA for s in steps):
        out = _plain_blocks(m, steps, device, out_dtype, ws, undo=True)
        if out is not None:
            return out
    acc = ws.get("acc", m.shape, device)
    acc.copy_(m)
    for s, norm in zip(reversed(steps), reversed(norms)):
        s.variant.unmerge(acc, lora_delta(s.module, s.weight, device, ws), s.module, norm)
    return acc.to(out_dtype, copy=True)


# -- what a planned tensor is: a weight, or a bias (lora_bias) ----------------------------------------------

class WeightTensor:
    """A base weight the steps' ΔW are merged into."""

    is_bias = False

    def merge(self, base, steps, device, out_dtype, ws=None):
        return merge_weight(base, steps, device, out_dtype, ws)

    def unmerge(self, merged, steps, norms, device, out_dtype, ws=None):
        return unmerge_weight(merged, steps, norms, device, out_dtype, ws)


class BiasTensor:
    """A base bias the steps' lora_B.bias · scale are added to (PEFT's lora_bias)."""

    is_bias = True

    def merge(self, base, steps, device, out_dtype, ws=None):
        acc = base.to(device).to(torch.float32, copy=True)
        acc += bias_delta(steps, device)
        return acc.to(out_dtype), [None] * len(steps)

    def unmerge(self, merged, steps, norms, device, out_dtype, ws=None):
        acc = merged.to(device).to(torch.float32, copy=True)
        acc -= bias_delta(steps, device)
        return acc.to(out_dtype)


WEIGHT, BIAS = WeightTensor(), BiasTensor()


__all__ = ["BIAS", "BLOCK_ELEMENTS", "BLOCK_ROWS", "DORA", "PEFT_TYPE", "PLAIN_LORA", "WEIGHT", "BiasTensor", "Dora",
           "PeftTypeVariant", "PlainLora", "Step", "WeightTensor", "Workspace", "bias_delta", "dora_factor",
           "dora_weight_norm",
           "expert_delta", "expert_delta_norms", "expert_factors", "lora_delta", "lora_scale", "merge_weight",
           "pack_expert_factors", "peft_delta", "stored_transposed", "to_layout", "unmerge_weight", "variant_of"]
