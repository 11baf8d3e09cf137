"""LoHa (PEFT's LOHA, tuners/loha/layer.py): ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b)) · alpha / r on a Linear weight.

Saved per module: hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a [out, r], hada_w2_b [r, in]; r and alpha
from `r` / `alpha` or their rank_pattern / alpha_pattern entries. PEFT makes LoHa for Linear and Conv layers
only (not GPT-2's Conv1D); the Conv forms (hada_t1/hada_t2, use_effective_conv2d) are refused.
rank_dropout and module_dropout act in training only: merge ignores them, as PEFT's does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import pattern_value
from ..errors import UnsupportedError
from .base import PeftType, TypedModule, check_2d, module_error, number, require

LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(eq=False)
class LohaModule(TypedModule):
    w1a: torch.Tensor = None
    w1b: torch.Tensor = None
    w2a: torch.Tensor = None
    w2b: torch.Tensor = None
    r: int = 0
    alpha: float = 0.0

    peft_type = "LOHA"
    additive = True
    row_blocks = True

    @property
    def scale(self) -> float:
        return self.alpha / self.r  # PEFT: self.scaling = alpha / r

    def features(self):
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    def delta(self, base_w32=None, rows=None) -> torch.Tensor:
        w1a, w2a = (self.w1a, self.w2a) if rows is None else (self.w1a[rows], self.w2a[rows])
        # HadaWeight.forward, literally: the scale is a float32 0-d tensor there
        return ((w1a @ self.w1b) * (w2a @ self.w2b)) * torch.tensor(self.scale)

    def tensors(self):
        return dict(zip(LEAVES, (self.w1a, self.w1b, self.w2a, self.w2b)))

    def describe(self):
        return {"r": self.r, "alpha": self.alpha, "scale": self.scale}


def parse(parts, shared, cfg, where) -> dict[str, LohaModule]:
    r0 = number(cfg, "r", where)
    a0 = number(cfg, "alpha", where, positive=False)
    out = {}
    for path, p in sorted(parts.items()):
        for leaf in ("hada_t1", "hada_t2"):
            if leaf in p:
                raise module_error(where, path, leaf, "LoHa on a convolution (Tucker form, use_effective_conv2d) is "
                                                      "not supported", UnsupportedError)
        w1a, w1b, w2a, w2b = require(p, LEAVES, path, where, "LOHA")
        r = int(pattern_value(cfg["rank_pattern"], path, r0))
        alpha = float(pattern_value(cfg["alpha_pattern"], path, a0))
        check_2d(w1a, path, "hada_w1_a", where, cols=r)
        n_out = w1a.shape[0]
        check_2d(w1b, path, "hada_w1_b", where, rows=r)
        n_in = w1b.shape[1]
        check_2d(w2a, path, "hada_w2_a", where, rows=n_out, cols=r)
        check_2d(w2b, path, "hada_w2_b", where, rows=r, cols=n_in)
        out[path] = LohaModule(path, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, r=r, alpha=alpha)
    return out


TYPE = PeftType("LOHA", LEAVES + ("hada_t1", "hada_t2"), parse, config_keys=("r", "alpha", "rank_pattern",
                                                                             "alpha_pattern"))
