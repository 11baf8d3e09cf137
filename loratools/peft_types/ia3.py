"""(IA)³ (PEFT's IA3, tuners/ia3/layer.py): a learned vector scales a Linear/Conv1D weight.

Saved per module: ia3_l, [1, in] on a feed-forward module (it scales the input: W's columns, or the rows of a
Conv1D [in, out] weight) and [out, 1] otherwise (the output: W's rows, and the layer's bias too). Which modules
are feed-forward is `feedforward_modules`; the saved shape must agree with it.

Note: merge and unmerge, as PEFT's Linear.merge / unmerge.
    merge: W ← W ⊙ transpose(ia3_l, fan_in_fan_out), bias ← bias ⊙ ia3_l (non-feed-forward only);
    unmerge: W ← W ⊘ (transpose(ia3_l) + 1e-8), bias ← bias ⊘ (ia3_l + 1e-8). Unmerge is not exact: beyond
    the 1e-8 PEFT adds, the merged weight was rounded to 16 bits, so W' = round(W·l)/(l+1e-8) is within
    half an ulp of the merged value, divided by l, plus one rounding: |W' − W| ≤ ulp(W·l)/(2|l|) + ulp(W')/2
    (+ |W|·1e-8/|l|). With |l| < 1 the error grows by 1/|l|; l = 0 loses W entirely.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import PeftType, TypedModule, module_error, require

LEAVES = ("ia3_l",)


@dataclass(eq=False)
class Ia3Module(TypedModule):
    l: torch.Tensor = None  # noqa: E741  ([1, in] feed-forward, [out, 1] otherwise), float32
    feedforward: bool = False

    peft_type = "IA3"
    additive = False
    row_blocks = True

    @property
    def scales_bias(self) -> bool:
        return not self.feedforward

    def features(self):
        n = int(self.l.numel())
        return (None, n) if self.feedforward else (n, None)

    def _vec(self, rows=None) -> torch.Tensor:
        v = self.l.T if self.fan_in_fan_out else self.l  # peft.utils.transpose
        return v[rows] if rows is not None and v.shape[0] > 1 else v  # a column vector scales rows

    def merge(self, acc, rows=None):
        return acc.mul_(self._vec(rows))  # torch.mul(W, l), in place: the same products

    def unmerge(self, acc, rows=None):
        return acc.div_(self._vec(rows) + 1e-8)

    def delta(self, base_w32=None, rows=None):
        if base_w32 is None:
            raise ValueError("IA3 is multiplicative: its delta needs the base weight")
        return torch.mul(base_w32, self._vec(rows)) - base_w32

    def merge_bias(self, acc):
        return torch.mul(acc, self.l.reshape(acc.shape))

    def unmerge_bias(self, acc):
        return torch.div(acc, self.l.reshape(acc.shape) + 1e-8)

    def tensors(self):
        return {"ia3_l": self.l}

    def describe(self):
        return {"feedforward": self.feedforward}


def is_feedforward(cfg: dict, module: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward (a str is a full-match regex; a list matches a suffix)."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(t) for t in ff)


def parse(parts, shared, cfg, where) -> dict[str, Ia3Module]:
    fifo = bool(cfg.get("fan_in_fan_out"))
    out = {}
    for path, p in sorted(parts.items()):
        (l,) = require(p, LEAVES, path, where, "IA3")  # noqa: E741
        ff = is_feedforward(cfg, path)
        if l.dim() != 2 or l.shape[0 if ff else 1] != 1:
            want = "[1, in] (a feedforward_modules entry)" if ff else "[out, 1] (not in feedforward_modules)"
            raise module_error(where, path, "ia3_l", f"ia3_l has shape {list(l.shape)}, expected {want}")
        out[path] = Ia3Module(path, fan_in_fan_out=fifo, l=l, feedforward=ff)
    return out


TYPE = PeftType("IA3", LEAVES, parse, config_keys=("feedforward_modules", "fan_in_fan_out"))
