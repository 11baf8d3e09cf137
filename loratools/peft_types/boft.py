"""PEFT's BOFT arithmetic (tuners/boft, PEFT 0.21.2): the stored butterfly factors `boft_R` and scale
`boft_s` -> the rotation R, and merging R and s into / out of a float32 weight. Pure tensor functions.

Saved keys (PEFT strips the adapter name); nn.Linear only (PEFT refuses Conv1D and embeddings):
    base_model.model.<module>.boft_R    [N, D, H, H]   N butterfly factors of D blocks of H x H (D·H = in)
    base_model.model.<module>.boft_s    [out, 1]       per-output-feature scale

Note: what PEFT computes.
    BOFTLayer.get_delta_weight: each H x H block becomes Cayley(S) = (I - S)(I + S)^-1 with
    S = (A - A^T) / 2, by `torch.linalg.solve(I + S, I - S, left=False)`; factor i is
    M_i = P_i · block_diag(blocks_i) · P_i^T with P_i the permutation matrix of
    block_butterfly_perm(in, D / 2^i, H / 2, N - 1) (identity when N = 1), and R = M_{N-1} ··· M_1 M_0.
    Linear.merge: W <- ((R @ W^T)^T) * s on the [out, in] weight; unmerge: W <- ((R^T @ W^T)^T) * (1 / s)
    (R^T: the exact Cayley transform is orthogonal up to float32 error, and PEFT relies on it).

Note: the number of factors comes from the tensor, not the config.
    PEFT builds N = boft_n_butterfly_factor factors only when its CUDA block-diagonal extension compiles;
    otherwise (every CPU-only machine) it warns and uses N = 1, and saves that. So an adapter trained on a
    CPU holds N = 1 whatever its config says, one trained on a GPU N = boft_n_butterfly_factor; we take N
    from boft_R's shape and accept N = 1 or the config's value.

Note: why the same bits.
    Multiplying by a permutation matrix sums one non-zero product per element, so indexing (ours) gives
    the values PEFT's dense bmm with P gives; the products between factors and with W are PEFT's dense
    matmuls in PEFT's order, in float32, so the float32 result is PEFT's and one rounding gives the
    reference exactly (checked against PEFT with N = 1, 2 and 3 in tests/test_peft_types_oft.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PeftType, TypedModule, module_error
from .oft import regroup


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's BOFTLayer.block_butterfly_perm: the permutation (indices) that regroups `n` features into
    `b` blocks for one butterfly level; `r` is half the block size, `n_butterfly_factor` is N - 1."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    block_size = int(n // b)
    indices = torch.arange(n)
    step = block_size / r
    initial = torch.arange(block_size)
    order = torch.empty(block_size, dtype=torch.long)
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)
    for i, pos in enumerate(seq):
        order[int(i * r): int(i * r + r)] = initial[int(pos * r): int(pos * r + r)]
    for i in range(0, n, block_size):
        indices[i:i + block_size] = indices[i:i + block_size][order]
    return indices


def check_shapes(r_shape: tuple[int, ...], s_shape: tuple[int, ...], in_features: int, out_features: int,
                 config: dict) -> str | None:
    """Why boft_R of `r_shape` and boft_s of `s_shape` cannot act on an [out, in] weight under `config`
    (None when they can). Mirrors the checks of BOFTLayer.update_layer that the shapes can fail."""
    if len(r_shape) != 4 or r_shape[2] != r_shape[3]:
        return f"boft_R: expected [N, D, H, H], got shape {list(r_shape)}"
    N, D, H, _ = r_shape
    if D * H != in_features:
        return f"boft_R: {D} blocks of {H} do not cover the base's {in_features} input features"
    if tuple(s_shape) != (out_features, 1):
        return f"boft_s: expected shape [{out_features}, 1] for the base's output features, got {list(s_shape)}"
    size, num = config.get("boft_block_size") or 0, config.get("boft_block_num") or 0
    if (size and size != H) or (num and num != D):
        return (f"boft_R: blocks {D} x {H} disagree with the config's boft_block_size {size} / "
                f"boft_block_num {num}")
    factors = config.get("boft_n_butterfly_factor") or 1
    if N not in (1, factors):
        return f"boft_R: {N} butterfly factors; the config says {factors} (or 1, what PEFT makes on a CPU)"
    if N > 1 and (D % (2 ** (N - 1)) or D % 2 or H % 2):
        return f"boft_R: {N} butterfly factors need an even block size and 2^{N - 1} dividing {D} blocks"
    return None


def cayley(data: torch.Tensor) -> torch.Tensor:
    """[B, H, H] -> [B, H, H]: BOFTLayer.cayley_batch (skew part, then (I - S)(I + S)^-1)."""
    b, r, c = data.shape
    s = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(r, device=data.device).unsqueeze(0).expand(b, r, c)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def rotation(boft_R: torch.Tensor, device="cpu") -> torch.Tensor:
    """The dense [in, in] float32 rotation R of BOFTLayer.get_delta_weight from a stored boft_R [N, D, H, H]
    (any float dtype: PEFT loads it into a float32 model as float32). Shapes must pass check_shapes."""
    R = boft_R.to(device=device, dtype=torch.float32)
    N, D, H, _ = R.shape
    blocks = cayley(R.reshape(N * D, H, H)).view(N, D, H, H)
    n = D * H
    mat = None
    for i in range(N):
        perm = butterfly_perm(n, int(D / (2 ** i)), int(H / 2), N - 1).to(device)
        # P · BD · P^T with P[j, perm[j]] = 1: rows and columns of the block diagonal taken in perm order
        m = torch.block_diag(*torch.unbind(blocks[i]))[perm][:, perm]
        mat = m if mat is None else m @ mat
    return mat


def merge(acc: torch.Tensor, R: torch.Tensor, s: torch.Tensor) -> None:
    """acc [out, in] float32 <- ((R @ acc^T)^T) * s in place (BOFT Linear.merge's ops)."""
    acc.copy_(torch.transpose(torch.mm(R, acc.t()), 0, 1) * s.to(device=acc.device, dtype=torch.float32))


def unmerge(acc: torch.Tensor, R: torch.Tensor, s: torch.Tensor) -> None:
    """acc [out, in] float32 <- ((R^T @ acc^T)^T) * (1 / s) in place (BOFT Linear.unmerge's ops)."""
    s = s.to(device=acc.device, dtype=torch.float32)
    acc.copy_(torch.transpose(torch.mm(R.t(), acc.t()), 0, 1) * (1 / s))


# -- the typed module (peft_types/base.py) ------------------------------------------------------------------

LEAVES = ("boft_R", "boft_s")


@dataclass(eq=False)
class BoftModule(TypedModule):
    """One BOFT-adapted Linear weight. R is rebuilt for each merge/unmerge and not kept (dense in x in)."""

    R: torch.Tensor = None  # boft_R, float32 [N, D, H, H]
    s: torch.Tensor = None  # boft_s, float32 [out, 1]
    config: dict = None
    saved_base: torch.Tensor | None = None  # the layer PEFT saves whole beside a tied head (base_layer.weight)

    peft_type = "BOFT"
    additive = False  # W' = (W R^T) s: the update depends on W

    def features(self):
        return int(self.s.shape[0]), int(self.R.shape[1] * self.R.shape[2])

    def fit(self, shape):
        if len(shape) != 2:
            return f"BOFT needs a 2-D Linear weight [out, in], got shape {list(shape)}"
        if self.saved_base is not None and tuple(self.saved_base.shape) != tuple(shape):
            return (f"the adapter's saved base layer (base_layer.weight) {list(self.saved_base.shape)} differs "
                    f"from the base weight's shape {list(shape)}")
        return check_shapes(tuple(self.R.shape), tuple(self.s.shape), int(shape[1]), int(shape[0]), self.config)

    def merge(self, acc, rows=None):
        assert rows is None, "row_blocks is False: R is built once per call, for the whole weight"
        if self.saved_base is not None:  # PEFT loads the saved layer into the model before merging
            acc.copy_(self.saved_base)
        merge(acc, rotation(self.R, acc.device), self.s)
        return acc

    def unmerge(self, acc, rows=None):
        assert rows is None, "row_blocks is False: R is built once per call, for the whole weight"
        unmerge(acc, rotation(self.R, acc.device), self.s)
        return acc

    def delta(self, base_w32=None, rows=None):
        if base_w32 is None:
            raise ValueError("BOFT is multiplicative: its delta needs the base weight")
        return self.merge(base_w32.clone()) - base_w32

    def tensors(self):
        return {"boft_R": self.R, "boft_s": self.s}

    def describe(self):
        N, D, H, _ = self.R.shape
        return {"butterfly_factors": int(N), "blocks": int(D), "block_size": int(H)}


def parse(parts, shared, cfg, where) -> dict[str, BoftModule]:
    out = {}
    for path, roles in regroup(parts, {f".{leaf}": leaf for leaf in LEAVES}, cfg, where, "BOFT").items():
        missing = [leaf for leaf in LEAVES if leaf not in roles]
        if missing:
            raise module_error(where, path, missing[0], f"BOFT module {path} has no {missing[0]} tensor")
        R, s = (roles[leaf].to(torch.float32) for leaf in LEAVES)
        if R.dim() != 4 or R.shape[2] != R.shape[3] or R.shape[0] < 1:
            raise module_error(where, path, "boft_R", f"boft_R has shape {list(R.shape)}, expected [N, D, H, H]")
        if s.dim() != 2 or s.shape[1] != 1:
            raise module_error(where, path, "boft_s", f"boft_s has shape {list(s.shape)}, expected [out, 1]")
        # the shapes against the config (the base's features are checked in fit)
        N, D, H, _ = R.shape
        why = check_shapes(tuple(R.shape), tuple(s.shape), int(D * H), int(s.shape[0]), cfg)
        if why:
            leaf = "boft_s" if why.startswith("boft_s") else "boft_R"
            raise module_error(where, path, leaf, why)
        out[path] = BoftModule(path, R=R, s=s, config=cfg, saved_base=roles.get("saved_base"))
    return out


TYPE = PeftType("BOFT", LEAVES + ("weight",), parse,
                config_keys=("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"))


__all__ = ["BoftModule", "TYPE", "butterfly_perm", "cayley", "check_shapes", "merge", "parse", "rotation", "unmerge"]
