"""extract for MoE experts: the delta of a fused expert parameter gathered from its stored slices, truncated
per expert at one rank, and packed as the PEFT target_parameters factors the model transformers builds expects.

Note: gathering.
    A checkpoint may store the parameter `mlp.experts.gate_up_proj` [E, 2I, H] as 2E tensors (Mixtral's w1 and
    w3 of each expert, key_layout.Part says where each sits) or whole (GPT-OSS, [E, in, out]). The parameter's
    float32 delta is gathered in one buffer (the size of that parameter, twice in bf16 terms) and truncated once
    every slice has arrived; a slice that did not change is zeros there. Each expert's delta is truncated on
    its own (lowrank.truncate_experts: one rank R for the parameter, as PEFT's ParamWrapper has one r) and
    packed with lora_math.pack_expert_factors into A (R·E, in), B (out, R·E); the error reported per expert is
    measured on the factors as written, through lora_math.expert_delta (PEFT's einsum).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapter import LoraModule
from .key_layout import Part
from .lora_math import expert_delta, pack_expert_factors
from .lowrank import truncate, truncate_experts
from .ranks import RankRule


@dataclass
class ExpertDelta:
    """The delta of one fused expert parameter while its stored slices are read."""

    name: str  # `<module>.<param>`, the model's name (PEFT's target_parameters entry)
    shape: tuple[int, ...]  # as the model holds it: [E, out, in], or [E, in, out] when transposed
    transposed: bool
    slices: int  # stored tensors that make it up
    delta: torch.Tensor | None = None
    seen: int = 0
    changed: bool = False
    tuned_bytes: int = 0

    def add(self, part: Part, base: torch.Tensor, tuned: torch.Tensor, device) -> bool:
        """Put one stored slice's delta in place; True once every slice is in."""
        if self.delta is None:
            self.delta = torch.zeros(self.shape, dtype=torch.float32, device=device)
        if not torch.equal(base, tuned):
            self.delta[part.index] = tuned.to(device, torch.float32) - base.to(device, torch.float32)
            self.changed = True
        self.seen += 1
        return self.seen == self.slices


@dataclass
class ExpertModule:
    module: LoraModule
    row: dict = field(default_factory=dict)


def lowrank_experts(acc: ExpertDelta, rule: RankRule, *, alpha: float | None, method: str,
                    out_dtype: torch.dtype, seed: int) -> ExpertModule:
    """The target_parameters LoRA of one fused expert parameter and its report row."""
    D = acc.delta
    layout = D.transpose(1, 2) if acc.transposed else D  # factors are of [E, out, in] (B·A per expert)
    E = D.shape[0]

    def run(e: int, criteria: dict):
        return truncate(layout[e], method=method, seed=seed, **{k: v for k, v in criteria.items() if v is not None})

    tr = truncate_experts(run, E, rule.kwargs())
    r = tr.rank
    a = float(r) if alpha is None else float(alpha)
    scale = a / r
    B_e, A_e = tr.factors(scale)
    A, B = pack_expert_factors(A_e, B_e)
    A, B = A.to(out_dtype).cpu(), B.to(out_dtype).cpu()
    # the error of the factors as written, per expert, through PEFT's own einsum
    got = expert_delta(B.float().to(D.device), A.float().to(D.device), scale, E, acc.transposed)
    norms = D.flatten(1).double().norm(dim=1)
    errs = (D - got).flatten(1).double().norm(dim=1)
    rel = [float(x / n) if n > 0 else 0.0 for x, n in zip(errs, norms)]
    total = float(norms.square().sum().sqrt())
    rel_all = float(errs.square().sum().sqrt()) / total if total > 0 else 0.0
    module, param = acc.name.rsplit(".", 1)
    m = LoraModule(acc.name, "experts", A, B, r, a, scale, param=param, experts=E,
                   experts_transposed=acc.transposed)
    n_out, n_in = (D.shape[2], D.shape[1]) if acc.transposed else (D.shape[1], D.shape[2])
    row = {"name": acc.name, "kind": "experts", "shape": list(D.shape), "rank": r, "alpha": a, "svd": tr.method,
           "retained_energy": 1.0 - rel_all ** 2, "rel_error": rel_all, "delta_norm": total,
           "parameters": r * E * (n_out + n_in), "delta_parameters": D.numel(), "experts": E,
           "expert_rel_errors": rel, "expert_delta_norms": [float(n) for n in norms]}
    return ExpertModule(m, row)


__all__ = ["ExpertDelta", "ExpertModule", "lowrank_experts"]
