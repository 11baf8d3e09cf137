"""VeRA (PEFT's VERA, tuners/vera/layer.py): ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]), transposed for Conv1D.

Saved: per module vera_lambda_b [out] and vera_lambda_d [r]; once for the model, the shared random
projections `base_model.vera_A` [r, max in] and `base_model.vera_B` [max out, r] (each module slices its
corner), only when save_projection is true. Without them PEFT regenerates both from projection_prng_key:
a CPU torch.Generator seeded with it draws A then B, Kaiming-uniform (bound √3·√2/√fan_in), shaped by the
largest in/out features over the adapted modules (VeraModel._find_dim); loratools does the same, taking the
in features from the base (the adapter alone does not hold them). There is no scale factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError, UnsupportedError
from .base import PeftType, TypedModule, module_error, number, require

LEAVES = ("vera_lambda_b", "vera_lambda_d")
SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


class Projections:
    """vera_A and vera_B: as saved, or regenerated from projection_prng_key once every module knows its base."""

    def __init__(self, A, B, seed: int, r: int, modules: list):
        self._A, self._B, self.seed, self.r, self.modules = A, B, seed, r, modules

    @property
    def saved(self) -> bool:
        return self._A is not None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._A is None:
            if any(m.in_features is None for m in self.modules):  # (fit() against the base sets them)
                raise UnsupportedError("VeRA with save_projection false: its projections are regenerated from "
                                       "projection_prng_key at the base's shapes, so the base is needed")
            out_dim = max(int(m.lambda_b.numel()) for m in self.modules)
            in_dim = max(m.in_features for m in self.modules)
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            self._A = _kaiming_uniform((self.r, in_dim), gen)  # drawn first, as VeraModel._init_vera_A_vera_B
            self._B = _kaiming_uniform((out_dim, self.r), gen)
        return self._A, self._B


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """peft.tuners.vera.model._kaiming_init: U(-b, b), b = √3 · √2 / √fan_in, fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


@dataclass(eq=False)
class VeraModule(TypedModule):
    lambda_b: torch.Tensor = None
    lambda_d: torch.Tensor = None
    projections: Projections = None
    in_features: int | None = None  # from the base (fit)

    peft_type = "VERA"
    additive = True

    def features(self):
        return int(self.lambda_b.numel()), self.in_features

    def fit(self, shape):
        problem = super().fit(shape)
        if problem is None and self.projections.saved:
            A, _ = self.projections.get()
            if A.shape[1] < self.in_features:
                self.in_features = None
                return (f"the adapter's shared vera_A {list(A.shape)} covers only {A.shape[1]} input features, "
                        f"fewer than the base weight's")
        return problem

    def bind(self, shape):
        self.in_features = int(shape[0] if self.fan_in_fan_out else shape[1])

    @property
    def row_blocks(self) -> bool:
        return not self.fan_in_fan_out

    def delta(self, base_w32=None, rows=None) -> torch.Tensor:
        if self.in_features is None:  # never slice A to its full width by default: the base says how much
            raise UnsupportedError(f"VeRA module {self.name}: its input size is known only from the base weight "
                                   f"(the shared vera_A is as wide as the widest module); the base is needed")
        A, B = self.projections.get()
        # Linear.get_delta_weight, literally
        sliced_A, sliced_B = A[:, : self.in_features], B[: self.lambda_b.numel(), :]
        lb = self.lambda_b.unsqueeze(-1)
        if rows is not None:
            lb, sliced_B = lb[rows], sliced_B[rows]
        d = (lb * sliced_B) @ (self.lambda_d.unsqueeze(-1) * sliced_A)
        return d.T if self.fan_in_fan_out else d

    def tensors(self):
        return {"vera_lambda_b": self.lambda_b, "vera_lambda_d": self.lambda_d}

    def describe(self):
        return {"r": int(self.lambda_d.numel()), "projection": "saved" if self.projections.saved else "regenerated"}


def parse(parts, shared, cfg, where) -> dict[str, VeraModule]:
    r = int(number(cfg, "r", where))
    fifo = bool(cfg.get("fan_in_fan_out"))
    A, B = shared.get(SHARED_A), shared.get(SHARED_B)
    if cfg.get("save_projection", True):
        for key, t in ((SHARED_A, A), (SHARED_B, B)):
            if t is None:
                raise FormatError(f"save_projection is true but the adapter has no {key} tensor (VeRA's shared "
                                  f"projection)", path=where, tensor=key)
        if A.dim() != 2 or A.shape[0] != r:
            raise FormatError(f"vera_A has shape {list(A.shape)}, expected [{r}, in] (r={r})", path=where,
                              tensor=SHARED_A)
        if B.dim() != 2 or B.shape[1] != r:
            raise FormatError(f"vera_B has shape {list(B.shape)}, expected [out, {r}] (r={r})", path=where,
                              tensor=SHARED_B)
        A, B = A.to(torch.float32), B.to(torch.float32)
    else:
        A = B = None
        seed = cfg.get("projection_prng_key")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FormatError(f"save_projection is false and projection_prng_key is {seed!r}: the projections "
                              f"cannot be regenerated", path=where)
    modules: list[VeraModule] = []
    proj = Projections(A, B, cfg.get("projection_prng_key", 0), r, modules)
    out = {}
    for path, p in sorted(parts.items()):
        lb, ld = require(p, LEAVES, path, where, "VERA")
        if lb.dim() != 1:
            raise module_error(where, path, "vera_lambda_b",
                               f"vera_lambda_b has shape {list(lb.shape)}, expected [out]")
        if ld.dim() != 1 or ld.numel() != r:
            raise module_error(where, path, "vera_lambda_d", f"vera_lambda_d has shape {list(ld.shape)}, expected "
                                                             f"[{r}] (r={r})")
        if B is not None and B.shape[0] < lb.numel():
            raise module_error(where, path, "vera_lambda_b", f"vera_lambda_b has {lb.numel()} outputs but the shared "
                                                             f"vera_B {list(B.shape)} covers only {B.shape[0]}")
        m = out[path] = VeraModule(path, fan_in_fan_out=fifo, lambda_b=lb, lambda_d=ld, projections=proj)
        modules.append(m)
    return out


TYPE = PeftType("VERA", LEAVES, parse, shared=(SHARED_A, SHARED_B),
                config_keys=("r", "fan_in_fan_out", "save_projection", "projection_prng_key"))
