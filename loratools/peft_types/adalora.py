"""AdaLoRA (PEFT's ADALORA, tuners/adalora/layer.py SVDLinear): ΔW = B·(A ⊙ E) · scaling / (ranknum + 1e-5).

Saved per module: lora_A [r, in] (right singular vectors), lora_E [r, 1] (singular values), lora_B [out, r]
(left), transposed for Conv1D (fan_in_fan_out). ranknum is not saved: PEFT sets it to init_r when it builds
the layer, and keeps that value when it cuts the layer to its `rank_pattern` mask (resize_modules_by_rank_pattern),
so a pruned module's r (its saved rows, the mask's True count) and ranknum (init_r) differ. scaling is lora_alpha,
or the layer's r when lora_alpha <= 0. A rank-0 module (every triplet pruned) adds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PeftType, TypedModule, check_2d, module_error, number, require

LEAVES = ("lora_A", "lora_B", "lora_E")


@dataclass(eq=False)
class AdaloraModule(TypedModule):
    A: torch.Tensor = None
    B: torch.Tensor = None
    E: torch.Tensor = None
    scaling: float = 0.0
    ranknum: float = 0.0

    peft_type = "ADALORA"
    additive = True

    def features(self):
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def row_blocks(self) -> bool:
        return not self.fan_in_fan_out  # rows of the stored [out, in] weight are rows of B

    def delta(self, base_w32=None, rows=None) -> torch.Tensor:
        d = (self.B if rows is None else self.B[rows]) @ (self.A * self.E)
        d = d.T if self.fan_in_fan_out else d
        # SVDLinear.get_delta_weight, literally: ranknum is a float32 parameter of shape [1]
        return d * self.scaling / (torch.tensor([self.ranknum], dtype=torch.float32) + 1e-5)

    def tensors(self):
        return {"lora_A": self.A, "lora_B": self.B, "lora_E": self.E}

    def describe(self):
        return {"r": int(self.A.shape[0]), "alpha": self.scaling, "scale": self.scaling / (self.ranknum + 1e-5),
                "ranknum": self.ranknum}


def _mask_rank(cfg: dict, path: str, where) -> int | None:
    """The r rank_pattern gives module `path` (its mask's True count), or None when it has no entry."""
    for key, mask in (cfg.get("rank_pattern") or {}).items():
        module = key.rsplit(".", 1)[0] if key.endswith(".lora_E") else key
        if module == path:
            if not isinstance(mask, list):
                raise module_error(where, path, "lora_E", f"rank_pattern[{key!r}] must be a list of booleans")
            return sum(bool(x) for x in mask)
    return None


def parse(parts, shared, cfg, where) -> dict[str, AdaloraModule]:
    init_r = int(number(cfg, "init_r", where, positive=False))
    alpha = number(cfg, "lora_alpha", where, positive=False)
    fifo = bool(cfg.get("fan_in_fan_out"))
    out = {}
    for path, p in sorted(parts.items()):
        A, B, E = require(p, LEAVES, path, where, "ADALORA")
        masked = _mask_rank(cfg, path, where)
        r = init_r if masked is None else masked
        src = "init_r" if masked is None else "its rank_pattern mask"
        if A.dim() != 2 or A.shape[0] != r:
            raise module_error(where, path, "lora_A", f"lora_A has shape {list(A.shape)}, expected [{r}, in] "
                                                      f"(r={r} from {src})")
        check_2d(E, path, "lora_E", where, rows=r, cols=1)
        check_2d(B, path, "lora_B", where, cols=r)
        scaling = alpha if alpha > 0 else float(r)
        out[path] = AdaloraModule(path, fan_in_fan_out=fifo, A=A, B=B, E=E, scaling=scaling, ranknum=float(init_r))
    return out


TYPE = PeftType("ADALORA", LEAVES, parse, config_keys=("init_r", "lora_alpha", "rank_pattern", "fan_in_fan_out"))
