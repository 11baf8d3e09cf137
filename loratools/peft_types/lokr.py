"""LoKr (PEFT's LOKR, tuners/lokr/layer.py): ΔW = kron(w1, w2) · alpha / r on a Linear weight.

Saved per module: w1 whole (lokr_w1 [a, c]) or as lokr_w1_a [a, r] @ lokr_w1_b [r, c] (decompose_both), w2
whole (lokr_w2 [b, d]) or as lokr_w2_a [b, r] @ lokr_w2_b [r, d]; the base is [a·b, c·d]. Which form a
module has follows from r and decompose_factor at creation; here the saved tensors say. The scale is
alpha / r even when both factors are whole (PEFT's scaling). rank_dropout (and rank_dropout_scale) and
module_dropout act in training only. PEFT makes LoKr for Linear and Conv layers only (not GPT-2's Conv1D);
the Conv forms (lokr_t2, 3-D/4-D factors) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import pattern_value
from ..errors import UnsupportedError
from .base import PeftType, TypedModule, check_2d, module_error, number, require

LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(eq=False)
class LokrModule(TypedModule):
    factors: dict = None  # leaf -> float32 tensor, as saved
    r: int = 0
    alpha: float = 0.0

    peft_type = "LOKR"
    additive = True
    row_blocks = True

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def _w(self, i: int) -> torch.Tensor:
        f = self.factors
        return f[f"lokr_w{i}"] if f"lokr_w{i}" in f else f[f"lokr_w{i}_a"] @ f[f"lokr_w{i}_b"]

    def _shape(self, i: int) -> tuple[int, int]:
        f = self.factors
        if f"lokr_w{i}" in f:
            return tuple(f[f"lokr_w{i}"].shape)
        return f[f"lokr_w{i}_a"].shape[0], f[f"lokr_w{i}_b"].shape[1]

    def features(self):
        (a, c), (b, d) = self._shape(1), self._shape(2)
        return a * b, c * d

    def delta(self, base_w32=None, rows=None) -> torch.Tensor:
        w1, w2 = self._w(1), self._w(2).contiguous()
        if rows is None:  # get_delta_weight + make_kron, literally (the scale a Python float there)
            return torch.kron(w1, w2) * self.scale
        # rows r0..r1 of kron(w1, w2) lie in the Kronecker rows of w1's rows r0 // b .. (r1 - 1) // b: each
        # element is one product w1[i, j] · w2[k, l], so the block has the whole one's bits
        b = w2.shape[0]
        r0, r1 = rows.start or 0, rows.stop
        a0 = r0 // b
        return (torch.kron(w1[a0: (r1 - 1) // b + 1], w2) * self.scale)[r0 - a0 * b: r1 - a0 * b]

    def tensors(self):
        return dict(self.factors)

    def describe(self):
        return {"r": self.r, "alpha": self.alpha, "scale": self.scale}


def _factor(p: dict, i: int, path: str, where, r: int) -> dict:
    whole, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
    if whole in p:
        check_2d(p[whole], path, whole, where)
        return {whole: p[whole].to(torch.float32)}
    fa, fb = require(p, (a, b), path, where, "LOKR")
    check_2d(fa, path, a, where, cols=r)
    check_2d(fb, path, b, where, rows=r)
    return {a: fa, b: fb}


def parse(parts, shared, cfg, where) -> dict[str, LokrModule]:
    r0 = number(cfg, "r", where)
    a0 = number(cfg, "alpha", where, positive=False)
    out = {}
    for path, p in sorted(parts.items()):
        if "lokr_t2" in p:
            raise module_error(where, path, "lokr_t2", "LoKr on a convolution (Tucker form, use_effective_conv2d) "
                                                       "is not supported", UnsupportedError)
        r = int(pattern_value(cfg["rank_pattern"], path, r0))
        alpha = float(pattern_value(cfg["alpha_pattern"], path, a0))
        factors = {**_factor(p, 1, path, where, r), **_factor(p, 2, path, where, r)}
        out[path] = LokrModule(path, factors=factors, r=r, alpha=alpha)
    return out


TYPE = PeftType("LOKR", LEAVES, parse, config_keys=("r", "alpha", "rank_pattern", "alpha_pattern"))
