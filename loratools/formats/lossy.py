"""`convert --as-lora --rank R`: DoRA modules re-expressed as plain LoRA, lossy and measured.

A DoRA module's merged weight is m / ‖W₀ + ΔW‖ · (W₀ + ΔW) (lora_math's Dora.merge, PEFT's bits): its
effective update W' − W₀ is not B·A, so formats without a magnitude (GGUF) or a user who wants plain LoRA
get the best rank-R approximation of W' − W₀ instead, through the same truncation `extract` uses
(lowrank.truncate, randomized SVD when R is small against the matrix). One module at a time: the base
tensor is read, merged, differenced and factored, then dropped.

Per module the report gives `rel_error` = ‖ΔW − B·A·s‖_F / ‖ΔW‖_F of the factors as written (measured
again after the cast to the adapter's dtype) and `optimal_error`, the Eckart–Young tail
√(Σ_{i>R} σᵢ²) / ‖ΔW‖_F from the exact singular values (equal to rel_error when the exact SVD was used).

Plain LoRA modules pass through with their bits; the new config has use_dora false, r = lora_alpha = R
(scale 1 for the converted modules) and exact-name rank_pattern / alpha_pattern entries for every module
whose rank or scale differs (rsLoRA scales written as alpha = scale · r), so PEFT resolves each module to
what it was.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..adapter import PREFIX, LoraModule, classify_key, KeyKind
from ..errors import UnsupportedError, UsageError
from ..lora_math import Step, merge_weight, to_layout
from ..lowrank import truncate
from . import PeftFiles, parse


# -- pure tensor functions -------------------------------------------------------------------------------

def effective_delta(base: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """W' − W₀ of one module in float64, in the base tensor's layout, W' merged as PEFT merges it (float32)."""
    merged, _ = merge_weight(base, [Step(m, 1.0, 0)], device=base.device, out_dtype=torch.float32)
    return merged.double() - base.double()


def refactor(delta: torch.Tensor, m: LoraModule, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(B, A, stats): B·A (scale 1, rank ≤ `rank`) ≈ `delta` in PEFT's factor layout, A and B in `dtype`."""
    M = to_layout(delta, m.transposed).float()
    t = truncate(M, rank=rank)
    B, A = t.factors(1.0)
    B, A = B.to(dtype), A.to(dtype)
    Md = M.double()
    norm = float(torch.linalg.matrix_norm(Md))
    if norm == 0:
        return B, A, {"rank": t.rank, "rel_error": 0.0, "optimal_error": 0.0, "svd": t.method, "delta_norm": 0.0}
    rel = float(torch.linalg.matrix_norm(Md - B.double() @ A.double())) / norm
    if t.method == "full":  # the exact SVD ran: its tail is the optimum
        optimal = t.rel_error
    else:  # the randomized SVD has no tail: the exact singular values, for the report
        tail = torch.linalg.svdvals(M).double()[t.rank:]
        optimal = math.sqrt(float((tail ** 2).sum())) / norm
    return B, A, {"rank": t.rank, "rel_error": rel, "optimal_error": optimal, "svd": t.method, "delta_norm": norm}


def plain_config(config: dict, ranks: dict[str, tuple[int, float]], rank: int) -> dict:
    """adapter_config.json for the plain LoRA adapter: use_dora off, r = lora_alpha = `rank`, no rsLoRA, and
    exact-name rank_pattern / alpha_pattern entries for every module (name -> (r, scale)) that differs."""
    cfg = dict(config, use_dora=False, use_rslora=False, r=rank, lora_alpha=rank)
    rp, ap = {}, {}
    for name, (r, scale) in sorted(ranks.items()):
        if r != rank:
            rp[name] = r
        if r != rank or scale != 1.0:
            alpha = scale * r
            ap[name] = int(alpha) if float(alpha).is_integer() else alpha
    cfg["rank_pattern"], cfg["alpha_pattern"] = rp, ap
    return cfg


# -- the plumbing ----------------------------------------------------------------------------------------

def check_rank(rank) -> int:
    if rank is None or rank < 1:
        raise UsageError("--as-lora needs --rank R (a positive integer): the rank of the plain LoRA it writes")
    return int(rank)


def as_plain_lora(files: PeftFiles, base: Path | None, rank: int, *, on_module=None) -> tuple[PeftFiles, list[dict]]:
    """`files` with every DoRA module replaced by a rank-`rank` LoRA of its effective delta on `base`.

    Returns the new PeftFiles and one report row per converted module (name, rank, rel_error,
    optimal_error, svd, delta_norm). Plain modules and saved tensors are kept as they are."""
    from ..io import Checkpoint
    from ..plan import build_plan
    from ..quantized import DenseView

    rank = check_rank(rank)
    ad = parse(files)
    where = files.path
    dora = {n: m for n, m in ad.modules.items() if m.magnitude is not None}
    if dora and base is None:
        raise UsageError("--as-lora needs --base BASE: a DoRA module's effective delta depends on the base weight")
    for m in dora.values():
        if m.bias is not None or m.kind == "experts":
            what = "a lora_B.bias" if m.bias is not None else "expert tensors"
            raise UnsupportedError(f"DoRA module with {what}: --as-lora cannot carry it", path=where,
                                   tensor=PREFIX + m.key_path)
    tensors = dict(files.tensors)
    rows: list[dict] = []
    if dora:
        ck = Checkpoint(base)
        plan = build_plan(ck, [ad], [1.0])
        view = DenseView(ck)
        for key, p in plan.tensors.items():
            for step in p.steps:
                m = step.module
                if p.is_bias or m.name not in dora:
                    continue
                w0 = view.read(p.source)
                B, A, stats = refactor(effective_delta(w0, m), m, rank, m.A.dtype)
                del w0
                emb = m.kind == "embedding"
                for k in [k for k in tensors if classify_key(k)[:2] == (KeyKind.FACTOR, m.key_path)]:
                    del tensors[k]
                # PEFT's keys: lora_embedding_A [r, num_embeddings] = (A of the transposed layout)
                stem = PREFIX + m.key_path
                tensors[stem + (".lora_embedding_A" if emb else ".lora_A.weight")] = A.contiguous()
                tensors[stem + (".lora_embedding_B" if emb else ".lora_B.weight")] = B.contiguous()
                rows.append({"module": m.name, "base_tensor": key, **stats})
                if on_module is not None:
                    on_module(m.name)
    ranks = {n: (m.r, m.scale) for n, m in ad.modules.items() if n not in dora}
    ranks.update({r["module"]: (r["rank"], 1.0) for r in rows})
    config = plain_config(files.config, ranks, rank) if dora else dict(files.config)
    notes = list(files.notes)
    if rows:
        worst = max(rows, key=lambda r: r["rel_error"])
        notes.append(f"--as-lora: {len(rows)} DoRA modules re-factored as plain LoRA at rank {rank} (lossy): largest "
                     f"relative error {worst['rel_error']:.3g} on {worst['module']} (optimal {worst['optimal_error']:.3g})")
    else:
        notes.append("--as-lora: no DoRA module, nothing re-factored")
    return PeftFiles(config=config, tensors=tensors, source=files.source, path=files.path, notes=notes), rows
