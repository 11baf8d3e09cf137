"""PEFT's OFT (tuners/oft, PEFT 0.21.2): the stored `oft_R` vectors -> the block-diagonal rotation R and
merging R into / out of a float32 weight (pure tensor functions), then the typed module and its parser
(peft_types/base.py's interface).

Saved keys (PEFT strips the adapter name):
    base_model.model.<module>.oft_R.weight              [r, b(b-1)/2]   nn.Linear (r = 1 with block_share)
    base_model.model.<module>.oft_embedding_R.weight    [r, b(b-1)/2]   nn.Embedding
    base_model.model.<module>.base_layer.weight          an embedding or tied head, saved whole (as for LoRA)
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

from ..errors import FormatError, UnsupportedError
from .base import PeftType, TypedModule, module_error

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


# -- the typed module (peft_types/base.py) ------------------------------------------------------------------

LEAF = {"linear": "oft_R.weight", "embedding": "oft_embedding_R.weight"}


@dataclass(eq=False)
class OftModule(TypedModule):
    """One OFT-adapted Linear or Embedding weight. R is rebuilt for each merge/unmerge and not kept: it is a
    dense in x in float32 matrix per module."""

    stored: torch.Tensor = None  # oft_R / oft_embedding_R weight, float32 [r, b(b-1)/2]
    settings: OftSettings = None
    embedding: bool = False
    saved_base: torch.Tensor | None = None  # the embedding PEFT saves beside oft_embedding_R (base_layer.weight)
    in_features: int | None = None

    peft_type = "OFT"
    additive = False  # W' = W R^T: the update depends on W

    @property
    def kind(self) -> str:
        return "embedding" if self.embedding else "linear"

    @property
    def block_size(self) -> int:
        return block_size_of(int(self.stored.shape[1]))

    def features(self):
        # the tensor gives in (blocks x b) unless one block is shared; never out
        if self.in_features is not None:
            return None, self.in_features
        return None, (None if self.settings.block_share else int(self.stored.shape[0]) * self.block_size)

    def fit(self, shape):
        if len(shape) != 2:
            return f"OFT needs a 2-D {'embedding' if self.embedding else 'Linear'} weight, got shape {list(shape)}"
        if self.saved_base is not None and tuple(self.saved_base.shape) != tuple(shape):
            return (f"the adapter's saved embedding (base_layer.weight) {list(self.saved_base.shape)} differs "
                    f"from the base weight's shape {list(shape)}")
        why = check_shape(tuple(self.stored.shape), int(shape[1]), self.settings.block_share)
        if why is None:
            self.bind(tuple(shape))
        return None if why is None else f"{LEAF[self.kind]}: {why}"

    def bind(self, shape):
        self.in_features = int(shape[1])

    def rotation(self, device="cpu") -> torch.Tensor:
        return rotation(self.stored, self.in_features, self.settings, device)

    def merge(self, acc, rows=None):
        assert rows is None, "row_blocks is False: R is built once per call, for the whole weight"
        if self.saved_base is not None:  # PEFT loads the saved embedding into the layer before merging
            acc.copy_(self.saved_base)
        merge(acc, self.rotation(acc.device), self.embedding)
        return acc

    def unmerge(self, acc, rows=None):
        assert rows is None, "row_blocks is False: R is built once per call, for the whole weight"
        unmerge(acc, self.rotation(acc.device), self.embedding)
        return acc

    def delta(self, base_w32=None, rows=None):
        if base_w32 is None:
            raise ValueError("OFT is multiplicative: its delta needs the base weight")
        return self.merge(base_w32.clone()) - base_w32

    def tensors(self):
        return {LEAF[self.kind]: self.stored}

    def describe(self):
        s, b = self.settings, self.block_size
        _, in_f = self.features()
        # PEFT's r is the number of blocks (in_features / b); with block_share one stored block serves them all
        return {"r": None if in_f is None else in_f // b, "block_size": b, "block_share": s.block_share,
                "coft": s.coft, "eps": s.eps if s.coft else None,
                "cayley": f"neumann({s.num_cayley_neumann_terms})" if s.use_cayley_neumann else "exact"}


def _settings(cfg: dict, where) -> OftSettings:
    if "oft_block_size" not in cfg:  # PEFT's OFTConfig.check_kwargs refuses these (OFT before PEFT 0.14)
        raise UnsupportedError("OFT adapter_config.json has no oft_block_size: an OFT adapter from before "
                               "PEFT 0.14, which PEFT 0.21 no longer loads", path=where)
    try:
        s = OftSettings.from_config(cfg)
    except (TypeError, ValueError):
        raise FormatError(f"OFT settings {', '.join(DEFAULTS)} must be booleans and numbers, found "
                          f"{ {k: cfg.get(k) for k in DEFAULTS} }", path=where) from None
    if s.num_cayley_neumann_terms < 1 or s.eps <= 0:
        raise FormatError(f"num_cayley_neumann_terms must be >= 1 and eps > 0, found "
                          f"{s.num_cayley_neumann_terms} and {s.eps}", path=where)
    return s


SAVED_BASE = ".base_layer.weight"


def regroup(parts, suffixes: dict[str, str], cfg: dict, where, peft_type: str) -> dict[str, dict]:
    """{module: {role: tensor}} from the reader's parts (module -> leaf -> tensor), matching each full saved
    name against `suffixes` (suffix -> role) and `<m>.base_layer.weight` (role "saved_base": the layer PEFT
    saves whole beside an adapted embedding or tied head, and loads into the layer before merging).

    OFT's keys end in `.oft_R.weight`, so the reader (which splits a key at its last dot) hands them over as
    module `<m>.oft_R`, leaf `weight`; rejoining the name here keeps both spellings working."""
    found: dict[str, dict] = {}
    saving = cfg.get("modules_to_save") or []
    for path, p in sorted(parts.items()):
        for leaf, t in p.items():
            full = f"{path}.{leaf}"
            for suffix, role in {**suffixes, SAVED_BASE: "saved_base"}.items():
                if full.endswith(suffix):
                    found.setdefault(full[: -len(suffix)], {})[role] = t
                    break
            else:
                if ".oft_r." in f".{full}":  # PEFT <= 0.15 layout
                    raise module_error(where, path, leaf, "an OFT tensor of PEFT <= 0.15 (oft_r), which PEFT 0.21 "
                                                          "no longer loads", UnsupportedError)
                if any(f".{m}." in f".{path}." for m in saving):
                    raise module_error(where, path, leaf, f"modules_to_save with a {peft_type} adapter is not "
                                                          "supported", UnsupportedError)
                raise module_error(where, path, leaf, f"unexpected tensor for a {peft_type} adapter (its modules "
                                                      f"hold {', '.join(s.lstrip('.') for s in suffixes)})")
    for module, roles in found.items():
        if set(roles) == {"saved_base"}:
            raise module_error(where, module, SAVED_BASE[1:], f"a saved base layer of a module the {peft_type} "
                                                              "adapter does not adapt")
    return found


def parse(parts, shared, cfg, where) -> dict[str, OftModule]:
    """OFT modules from the saved tensors (Linear: oft_R.weight, Embedding: oft_embedding_R.weight)."""
    settings = _settings(cfg, where)
    out = {}
    found = regroup(parts, {"." + LEAF["linear"]: "linear", "." + LEAF["embedding"]: "embedding"}, cfg, where, "OFT")
    for module, roles in found.items():
        if "linear" in roles and "embedding" in roles:
            raise module_error(where, module, LEAF["linear"], "both oft_R and oft_embedding_R for one module")
        kind = "linear" if "linear" in roles else "embedding"
        t = roles[kind]
        b = block_size_of(int(t.shape[1])) if t.dim() == 2 else None
        if b is None or (settings.block_share and t.shape[0] != 1):
            raise module_error(where, module, LEAF[kind], f"{LEAF[kind]} has shape {list(t.shape)}, expected "
                                                          f"[{1 if settings.block_share else 'r'}, b(b-1)/2]")
        out[module] = OftModule(module, stored=t.to(torch.float32), settings=settings,
                                embedding=kind == "embedding", saved_base=roles.get("saved_base"))
    return out


TYPE = PeftType("OFT", ("weight", "oft_R.weight", "oft_embedding_R.weight"), parse,
                config_keys=tuple(DEFAULTS) + ("oft_block_size", "r"))


__all__ = ["DEFAULTS", "OftModule", "OftSettings", "TYPE", "block_size_of", "cayley", "check_shape", "merge",
           "orthogonality_error", "parse", "project", "regroup", "rotation", "skew", "unmerge"]
