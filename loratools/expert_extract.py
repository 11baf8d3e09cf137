"""extract for MoE experts: one fused expert parameter truncated one expert at a time, at one rank, and packed as
the PEFT target_parameters factors the model transformers builds expects.

Note: one expert at a time.
    A checkpoint stores the parameter `mlp.experts.gate_up_proj` [E, 2I, H] as 2E tensors (Mixtral's w1 and w3
    of each expert; key_layout.Part says where each sits) or whole (GPT-OSS, [E, in, out]). Its float32 delta is
    never formed: expert e's ΔW_e (Mixtral: w1_e and w3_e stacked, [2I, H]) is built from the stored tensors that
    hold it, truncated (lowrank.truncate), its factors kept (they are small) and its error measured on the
    factors as written, and then dropped. Memory is a few expert-sized float32 matrices, not the parameter.

    PEFT's ParamWrapper has one r per parameter, so with --energy / --sv-ratio the rank is the largest R any
    expert needs and every expert keeps R components (lowrank.py, Note: one rank per expert parameter). That R is
    known only after the last expert; an expert whose own rank came out below the largest seen so far has its
    factors discarded and is read again at the end (re-read, not re-kept: a sufficient rank cap is not known in
    advance, and holding a full spectrum costs as much as the delta), then truncated at rank R. So each expert
    costs the same SVDs as truncating the whole parameter at once (one, plus one at rank R when its own rank was
    lower), and the bytes written are the same; the price is reading those experts' stored slices twice (a
    whole stored tensor, GPT-OSS, is read once and held). An expert that did not change (never routed to) is
    zeros in the factors and takes no part in choosing R: under --sv-ratio a zero matrix selects every component,
    so one such expert made the whole parameter full-rank before. A parameter whose experts all kept their
    values makes no LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import LoraModule
from .key_layout import Part
from .lora_math import pack_expert_factors
from .lowrank import Truncation, truncate
from .ranks import RankRule

# (part, BASE tensor, TUNED tensor) for every stored tensor holding expert e
Pairs = list[tuple[Part, torch.Tensor, torch.Tensor]]


def expert_matrix(pairs: Pairs, expert: int, shape: tuple[int, ...], transposed: bool, device) -> torch.Tensor | None:
    """ΔW_e in float32 as B_e·A_e holds it ([out, in]; a view of the stored [in, out] when transposed), from the
    stored tensors that hold expert e; None when none of them changed there."""
    D = None
    for part, b, t in pairs:
        if part.whole:  # the stored tensor is the whole [E, ...] parameter
            b, t, index = b[expert], t[expert], ()
        else:
            index = () if part.rows is None else (slice(*part.rows),)
        if torch.equal(b, t) if b.dtype == t.dtype else torch.equal(b.float(), t.float()):
            continue
        if D is None:
            D = torch.zeros(shape[1:], dtype=torch.float32, device=device)
        D[index] = t.to(device, torch.float32) - b.to(device, torch.float32)
    if D is None:
        return None
    return D.T if transposed else D  # factors are of [out, in] (B·A per expert)


@dataclass
class _Done:
    """One expert's final truncation: its factors as written (out_dtype) and their error."""

    rank: int
    B: torch.Tensor  # [out, rank]
    A: torch.Tensor  # [rank, in]
    norm: float
    rel_error: float
    method: str


@dataclass
class ExpertParam:
    """One targeted fused expert parameter, its experts truncated as they are read (see the module note)."""

    name: str  # `<module>.<param>`, the model's name (PEFT's target_parameters entry)
    shape: tuple[int, ...]  # as the model holds it: [E, out, in], or [E, in, out] when transposed
    transposed: bool
    parts: list[Part]  # its stored tensors
    rule: RankRule
    alpha: float | None
    method: str
    out_dtype: torch.dtype
    seed: int
    device: object = "cpu"
    tuned_bytes: int = 0
    done: dict[int, _Done] = field(default_factory=dict)
    again: set[int] = field(default_factory=set)  # read, below the largest rank: truncate again at the end
    zero: set[int] = field(default_factory=set)  # read, unchanged
    rank: int = 0  # the largest rank any changed expert needed so far

    @property
    def experts(self) -> int:
        return self.shape[0]

    def parts_of(self, expert: int) -> list[Part]:
        """The stored tensors holding expert e (a whole stored parameter holds all)."""
        return [p for p in self.parts if p.whole or p.expert == expert]

    @property
    def read_all(self) -> bool:
        return len(self.done) + len(self.again) + len(self.zero) == self.experts

    def _truncate(self, M: torch.Tensor, criteria: dict) -> Truncation:
        return truncate(M, method=self.method, seed=self.seed, **{k: v for k, v in criteria.items() if v is not None})

    def _keep(self, e: int, M: torch.Tensor, t: Truncation):
        """Expert e's factors at rank t.rank (the parameter's rank so far) as written, and their error."""
        a = float(t.rank) if self.alpha is None else float(self.alpha)
        B, A = t.factors(a / t.rank)
        B, A = B.to(self.out_dtype), A.to(self.out_dtype)
        # the error of the factors as written (after rounding to out_dtype)
        got = (B.float() @ A.float()) * (a / t.rank)
        norm = float(torch.linalg.vector_norm(M, dtype=torch.float64))
        err = float(torch.linalg.vector_norm(M - got, dtype=torch.float64))
        self.done[e] = _Done(t.rank, B.cpu(), A.cpu(), norm, err / norm if norm > 0 else 0.0, t.method)

    def add(self, e: int, pairs: Pairs) -> None:
        """Expert e read for the first time: truncated by the rule; kept when its rank is the largest so far."""
        M = expert_matrix(pairs, e, self.shape, self.transposed, self.device)
        if M is None:
            self.zero.add(e)
            return
        t = self._truncate(M, self.rule.kwargs())
        if t.rank >= self.rank:
            self.rank = t.rank
            self._keep(e, M, t)
        else:
            self.again.add(e)

    def finish(self, pairs_of: Callable[[int], Pairs]) -> tuple[LoraModule, dict] | None:
        """The LoRA and report row once every expert was added (None when none changed); `pairs_of(e)` reads
        expert e again for those truncated below the final rank R."""
        if not self.done:
            return None
        R, fixed = self.rank, {k: None for k in self.rule.kwargs()} | {"rank": self.rank}
        self.again |= {e for e, d in self.done.items() if d.rank != R}
        for e in sorted(self.again):
            M = expert_matrix(pairs_of(e), e, self.shape, self.transposed, self.device)
            self._keep(e, M, self._truncate(M, fixed))
        for e in sorted(self.zero):  # as a changed expert would be: by the rule, then at R
            M = torch.zeros(self.shape[1:], dtype=torch.float32, device=self.device)
            M = M.T if self.transposed else M
            t = self._truncate(M, self.rule.kwargs())
            self._keep(e, M, t if t.rank == R else self._truncate(M, fixed))
        E = self.experts
        exp = [self.done[e] for e in range(E)]
        a = float(R) if self.alpha is None else float(self.alpha)
        A, B = pack_expert_factors(torch.stack([d.A for d in exp]), torch.stack([d.B for d in exp]))
        module, param = self.name.rsplit(".", 1)
        m = LoraModule(self.name, "experts", A, B, R, a, a / R, param=param, experts=E,
                       experts_transposed=self.transposed)
        total = sum(d.norm ** 2 for d in exp) ** 0.5
        rel_all = (sum((d.rel_error * d.norm) ** 2 for d in exp) ** 0.5) / total if total > 0 else 0.0
        n_out, n_in = exp[0].B.shape[0], exp[0].A.shape[1]
        row = {"name": self.name, "kind": "experts", "shape": list(self.shape), "rank": R, "alpha": a,
               "svd": exp[0].method, "retained_energy": 1.0 - rel_all ** 2, "rel_error": rel_all,
               "delta_norm": total, "parameters": R * E * (n_out + n_in), "delta_parameters": E * n_out * n_in,
               "experts": E, "expert_rel_errors": [d.rel_error for d in exp],
               "expert_delta_norms": [d.norm for d in exp]}
        return m, row


__all__ = ["ExpertParam", "Pairs", "expert_matrix"]
