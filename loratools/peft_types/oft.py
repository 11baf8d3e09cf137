"""PEFT's OFT arithmetic (tuners/oft, PEFT 0.21.2): the stored `oft_R` vectors -> the block-diagonal
rotation R, and merging R into / out of a float32 weight. Pure tensor functions; no file plumbing.

Saved keys (PEFT strips the adapter name):
    base_model.model.<module>.oft_R.weight              [r, b(b-1)/2]   nn.Linear (r = 1 with block_share)
    base_model.model.<module>.oft_embedding_R.weight    [r, b(b-1)/2]   nn.Embedding
    base_model.model.<module>.base_layer.weight          the embedding, saved whole (as for LoRA)
Each row is the strict upper triangle (torch.triu_indices order) of one skew-symmetric b x b block Q.
The tensor alone fixes b (from its width) and the number of blocks in_features / b; PEFT refuses other
layer kinds (GPT-2's Conv1D, Conv2d for LLM checkpoints here) and so do we.

Note: what PEFT computes, and why we can match it bit for bit.
    OFTRotationModule.get_weight: optionally (coft) project each Q onto the Frobenius ball of radius
    eps / sqrt(#rows), then R_blk = Cayley(Q) = (I - Q)(I + Q)^-1 by `torch.linalg.solve(I + Q, I - Q,
    left=False)`, or with `use_cayley_neumann` (the default) the truncated series
    I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) (n = num_cayley_neumann_terms), then R = block_diag of the r
    blocks (one block repeated in_features / b times with block_share).
    Linear.merge: W <- (R @ W^T)^T, i.e. W R^T on the [out, in] weight (the forward rotates the input,
    x -> x R); Embedding.merge: W <- W @ R on the [num_embeddings, dim] weight.
    We run the same torch ops in the same order on float32 copies (a float32 model is what the reference
    merges), including the dense in x in product PEFT makes, so on the same device the float32 result has
    PEFT's bits and rounding it once to the base dtype gives PEFT-in-float32-rounded-once exactly. A
    block-wise product would be cheaper (b/in of the work) but sums in another order, so it would not.
    Cost: R is a dense float32 in x in matrix (64 MB for in = 4096) and the merge is an out x in x in matmul.

Note: unmerge.
    PEFT's unmerge multiplies by torch.linalg.inv(R) (not R^T), again densely; we do the same. R^T would be
    wrong for the Neumann variant, whose truncated series is not orthogonal (||R^T R - I|| grows like
    ||Q||^n); inv(R) undoes it up to float32 error. coft only changes Q, not this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# PEFT's OFTConfig defaults (used when a config omits the field, as PEFT's dataclass does).
DEFAULTS = {"coft": False, "eps": 6e-5, "block_share": False, "use_cayley_neumann": True,
            "num_cayley_neumann_terms": 5}


@dataclass(frozen=True)
class OftSettings:
    """The adapter_config.json fields that change how the stored vectors become R."""

    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    @classmethod
    def from_config(cls, config: dict) -> "OftSettings":
        return cls(**{k: type(v)(config[k]) if config.get(k) is not None else v for k, v in DEFAULTS.items()})


def block_size_of(n_elements: int) -> int | None:
    """b with b(b-1)/2 == n_elements (the width of a stored row), or None when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b >= 2 and b * (b - 1) // 2 == n_elements else None


def check_shape(shape: tuple[int, ...], in_features: int, block_share: bool) -> str | None:
    """Why a stored oft_R of `shape` cannot rotate `in_features` inputs (None when it can)."""
    if len(shape) != 2:
        return f"expected a 2-D [r, b(b-1)/2] tensor, got shape {list(shape)}"
    rows, n = shape
    b = block_size_of(n)
    if b is None:
        return f"width {n} is not b(b-1)/2 for any block size b >= 2"
    if in_features % b:
        return f"block size {b} (from width {n}) does not divide the base's {in_features} input features"
    blocks = in_features // b
    expected = 1 if block_share else blocks
    if rows != expected:
        return (f"{rows} rows for {blocks} blocks of {b}; expected {expected}"
                f" ({'block_share' if block_share else 'one per block'})")
    return None


def _triu(b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, 1)
    return rows.to(device), cols.to(device)


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """[rows, b(b-1)/2] -> [rows, b, b] skew-symmetric (OFTRotationModule._pytorch_skew_symmetric)."""
    rows, cols = _triu(b, vec.device)
    m = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT: each block's Q scaled onto the ball ||Q||_F <= eps / sqrt(rows) (OFTRotationModule._project_batch,
    the same expression so the same bits)."""
    q = skew(vec, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((q.size(1), q.size(1)), device=q.device, dtype=q.dtype).unsqueeze(0).expand_as(q)
    diff = q - zero
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps).bool(), q, zero + eps * (diff / norm))
    rows, cols = _triu(b, vec.device)
    return out[:, rows, cols]


def cayley(vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """[rows, b(b-1)/2] -> [rows, b, b] rotation blocks (OFTRotationModule._cayley_batch)."""
    n = vec.shape[0]
    q = skew(vec, b)
    if neumann:
        r = torch.eye(b, device=vec.device, dtype=vec.dtype).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                q2 = torch.bmm(q, q)
                r.add_(q2, alpha=2.0)
                power = q2
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
        return r
    eye = torch.eye(b, device=vec.device).unsqueeze(0).expand(n, b, b)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def rotation(stored: torch.Tensor, in_features: int, settings: OftSettings, device="cpu") -> torch.Tensor:
    """The dense [in, in] float32 rotation R PEFT's OFTRotationModule.get_weight builds from `stored`
    (the saved oft_R / oft_embedding_R weight, any float dtype: PEFT loads it into a float32 model as
    float32). The shape must pass check_shape."""
    vec = stored.to(device=device, dtype=torch.float32)
    b = block_size_of(vec.shape[1])
    if settings.coft:
        vec = project(vec, b, settings.eps)
    blocks = cayley(vec, b, settings.use_cayley_neumann, settings.num_cayley_neumann_terms)
    count = in_features // b
    return torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(count)])


def merge(acc: torch.Tensor, R: torch.Tensor, embedding: bool = False) -> None:
    """acc (float32, stored layout) <- acc R^T for a Linear [out, in], acc R for an embedding [num, dim],
    in place, with PEFT's ops: `mm(R, W.t())` transposed back (Linear), `mm(W, R)` (Embedding)."""
    acc.copy_(torch.mm(acc, R) if embedding else torch.mm(R, acc.t()).t())


def unmerge(acc: torch.Tensor, R: torch.Tensor, embedding: bool = False) -> None:
    """Undo merge in place with PEFT's unmerge ops: `mm(inv(R), W.t())` transposed back (Linear),
    `mm(W, inv(R))` (Embedding); inv is torch.linalg.inv of the dense R (see Note: unmerge)."""
    inv = torch.linalg.inv(R)
    acc.copy_(torch.mm(acc, inv) if embedding else torch.mm(inv, acc.t()).t())


def orthogonality_error(R: torch.Tensor) -> float:
    """max |R^T R - I|: ~1e-7 for the exact Cayley transform, ~||Q||^n for the Neumann series."""
    return (R.T @ R - torch.eye(R.shape[0], device=R.device)).abs().max().item()


__all__ = ["DEFAULTS", "OftSettings", "block_size_of", "cayley", "check_shape", "merge", "orthogonality_error",
           "project", "rotation", "skew", "unmerge"]
