"""LoftQ (Li et al. 2023, arXiv:2310.08659): a quantized weight and a LoRA pair whose B·A corrects it.

Pure tensor functions, no file I/O; `loratools quantize --nf4 --loftq` (loftq_quantize.py) runs them
one weight at a time.

The alternation is PEFT's `peft.utils.loftq_utils.loftq_init` (peft 0.21), step for step:

    res = W
    repeat N times:
        D   = dequantize(quantize(res))        # the base candidate
        res = W - D                            # its quantization error
        B, A = rank-r SVD factors of res       # B = U_r·sqrt(S_r), A = sqrt(S_r)·Vh_r
        res = W - B·A                          # (skipped after the last iteration)

and returns the LAST quantization (D_N = deq(Q(W - B_{N-1}·A_{N-1})), or deq(Q(W)) for N = 1) with the
factors of ITS error, so that D_N + B·A is the best rank-r correction of the base it is paired with.
PEFT stores A and B unscaled (LoraLayer.loftq_init assigns them as they are), so the pair is exact only
at scaling 1 (lora_alpha = r); loftq_quantize.py writes it that way.

Note: which quantizer.
    PEFT quantizes with bitsandbytes' Params4bit(compress_statistics=False, quant_type="nf4",
    blocksize 64) on a float32 tensor and dequantizes in float32; it has no quantizer of its own any
    more (its NFQuantizer was removed in 0.20). `loftq` takes the quantizer as an argument:
    loftq_quantize.py passes the format the base is written in (NF4 at the chosen blocksize, double
    quantization or not, in the checkpoint's dtype), so that B·A corrects exactly the base a user
    loads. With a float32 checkpoint and --no-double-quant that is PEFT's quantizer, byte for byte.

Note: the factors without the diagonal matrix.
    PEFT forms B = U @ sqrt(diag(S))[:, :r] and A = sqrt(diag(S))[:r, :] @ Vh. Each output element of
    those products is one non-zero product plus exact zeros, so scaling the columns of U (rows of Vh)
    by sqrt(S) gives the same floats without the k x k matrices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# quantize(x) -> (stored form, dequantized float32 tensor of x's shape)
Quantizer = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]


@dataclass
class LoftQResult:
    """The base (in the quantizer's stored form), the LoRA factors and the squared errors measured.

    Errors are squared Frobenius norms (float64) of: `before` W - D_1 (plain quantization, no
    correction), `base` W - D_N (the base written), `after` W - D_N - B·A (the base with the adapter);
    `ref` is ||W||^2.
    """

    stored: Any
    A: torch.Tensor  # [r, in] float32 (lora_A)
    B: torch.Tensor  # [out, r] float32 (lora_B)
    before_sq: float
    base_sq: float
    after_sq: float
    ref_sq: float


def low_rank_factors(res: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's _low_rank_decomposition: (A [r, in], B [out, r]) with B·A the best rank-r approximation
    of `res` (full SVD, torch.linalg.svd with full_matrices=False, split as sqrt(S) on each side)."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(S[:rank])
    return root.unsqueeze(1) * Vh[:rank], U[:, :rank] * root


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def loftq(w: torch.Tensor, rank: int, iters: int, quantize: Quantizer) -> LoftQResult:
    """LoftQ of one 2-D weight (see the module docstring).

    Args:
        w: the dense weight [out, in] (any float dtype; the maths runs in float32, as PEFT's).
        rank: r, 1 <= r <= min(out, in).
        iters: alternations N >= 1 (PEFT's loftq_iter).
        quantize: x (float32) -> (stored form, float32 dequantized values).
    Returns:
        LoftQResult with the last quantization's stored form and its correction.
    Example:
        >>> res = loftq(w, 8, 1, lambda x: (None, bnb_round_trip(x)))
        >>> res.after_sq < res.before_sq
        True
    """
    if w.dim() != 2:
        raise ValueError(f"LoftQ takes a 2-D weight, got shape {list(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in 1..{min(w.shape)} for shape {list(w.shape)}, got {rank}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    weight = w.float()
    res = weight
    before_sq = None
    for i in range(iters):
        stored, deq = quantize(res)
        res = weight - deq
        if before_sq is None:
            before_sq = _sq(res)
        A, B = low_rank_factors(res, rank)
        if i + 1 == iters:
            break
        del stored, deq
        res = weight - B @ A
    base_sq = _sq(res)
    after_sq = _sq(res - B @ A)
    return LoftQResult(stored, A.contiguous(), B.contiguous(), before_sq, base_sq, after_sq, _sq(weight))
