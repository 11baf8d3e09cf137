"""`convert --as-lora --rank R`: DoRA modules and modules saved whole re-expressed as plain LoRA, lossy and
measured.

A DoRA module's merged weight is m / ‖W₀ + ΔW‖ · (W₀ + ΔW) (lora_math's Dora.merge, PEFT's bits): its
effective update W' − W₀ is not B·A, so formats without a magnitude (GGUF) or a user who wants plain LoRA
get the best rank-R approximation of W' − W₀ instead, through the same truncation `extract` uses
(lowrank.truncate, randomized SVD when R is small against the matrix). One module at a time: the base
tensor is read, merged, differenced and factored, then dropped. A module saved whole (modules_to_save) is
the same with W' = the saved weight: it becomes a LoRA on that module (moved to target_modules).

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
import re
from pathlib import Path
from typing import Callable

import torch

from ..adapter import PREFIX, LoraModule, classify_key, KeyKind
from ..errors import UnsupportedError, UsageError
from ..lora_math import Step, merge_weight, to_layout
from ..lowrank import truncate
from . import PeftFiles, parse


# -- pure tensor functions -------------------------------------------------------------------------------

def effective_delta(base: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """W' − W₀ of one module in float32, in the base tensor's layout, W' merged as PEFT merges it (float32).

    In place on the merged copy: one float32 tensor beside the merge's own workspace. The subtraction
    rounds once, relative to W' − W₀ itself (W₀ in 16 bits is exact in float32)."""
    merged, _ = merge_weight(base, [Step(m, 1.0, 0)], device=base.device, out_dtype=torch.float32)
    return merged.sub_(base)


def _norm(x: torch.Tensor) -> float:
    """‖x‖_F accumulated in float64 (float32's own reduction is off by ~1e-3 on large tensors; lowrank.py)."""
    return math.sqrt(float(torch.sum(x * x, dtype=torch.float64)))


def tail_energy(M: torch.Tensor, k: int) -> float:
    """Σ_{i>k} σᵢ² of M exactly, without an SVD of M: the eigenvalues of the float64 Gram matrix of its short
    side (σᵢ² = λᵢ), built in column blocks. Measured on a 2048×5632 float32 matrix on 2 cores: 4 s, where
    torch.linalg.svdvals took 25–44 s; agrees with float64 svdvals to 7 digits on a nearly rank-k matrix."""
    X = M if M.shape[0] <= M.shape[1] else M.T
    G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=M.device)
    step = max(1, (1 << 22) // X.shape[0])  # float64 blocks of ~32 MB
    for j in range(0, X.shape[1], step):
        blk = X[:, j:j + step].double()
        G.addmm_(blk, blk.T)
    lam = torch.linalg.eigvalsh(G)  # ascending
    return float(lam[: max(0, lam.numel() - k)].clamp_min(0).sum())


def refactor(delta: torch.Tensor, transposed: bool, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(B, A, stats): B·A (scale 1, rank ≤ `rank`) ≈ `delta` in PEFT's factor layout (`transposed`: an
    embedding's, ΔWᵀ), A and B in `dtype`."""
    M = to_layout(delta, transposed).float()
    t = truncate(M, rank=rank)
    B, A = t.factors(1.0)
    B, A = B.to(dtype), A.to(dtype)
    norm = _norm(M)
    if norm == 0:
        return B, A, {"rank": t.rank, "rel_error": 0.0, "optimal_error": 0.0, "svd": t.method, "delta_norm": 0.0}
    rel = _norm(M - B.float() @ A.float()) / norm  # what is written, after the cast to `dtype`
    if t.method == "full":  # the exact SVD ran: its tail is the optimum
        optimal = t.rel_error
    else:  # the randomized SVD has no tail: the exact spectrum, for the report
        optimal = math.sqrt(tail_energy(M, t.rank)) / norm
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

def check_rank(rank: int | None) -> int:
    """`rank` as --as-lora's positive target rank; UsageError (exit 2) when absent or below 1."""
    if rank is None or rank < 1:
        raise UsageError("--as-lora needs --rank R (a positive integer): the rank of the plain LoRA it writes")
    return int(rank)


def _factor_keys(stem: str, embedding: bool) -> tuple[str, str]:
    """PEFT's saved keys of (A, B) under module path `stem`."""
    return (stem + ".lora_embedding_A", stem + ".lora_embedding_B") if embedding else \
        (stem + ".lora_A.weight", stem + ".lora_B.weight")


def _without_module(entries, module: str):
    """modules_to_save without the entries that name `module` (PEFT: exact name or a dotted suffix)."""
    kept = [e for e in entries or () if not (module == e or module.endswith("." + e))]
    return kept or None


def _with_target(target, module: str):
    """target_modules that also matches `module` exactly (a list gains the name, a regex an alternative)."""
    if isinstance(target, str):
        return f"(?:{target})|{re.escape(module)}"
    return sorted(set(target or ()) | {module})


def _refactor_dora(ck, view, ad, dora: dict, rank: int, replace: Callable) -> None:
    """Each DoRA module of `ad` (names in `dora`) re-factored at `rank` from its effective delta on the base
    (`view` of checkpoint `ck`), handed to `replace(module_path, embedding, B, A, row)`."""
    from ..plan import build_plan

    plan = build_plan(ck, [ad], [1.0])
    for key, p in plan.tensors.items():
        for step in p.steps:
            m = step.module
            if p.is_bias or m.name not in dora:
                continue
            w0 = view.read(p.source)
            B, A, stats = refactor(effective_delta(w0, m), m.transposed, rank, m.A.dtype)
            del w0
            replace(m.key_path, m.kind == "embedding", B, A, {"module": m.name, "from": "dora", "base_tensor": key,
                                                              **stats})


def _refactor_saved(ck, view, ad, files: PeftFiles, rank: int, replace: Callable, tensors: dict, notes: list,
                    config: dict) -> dict:
    """Each tensor `ad` saves whole re-factored at `rank` as a LoRA of (saved − base), handed to `replace`
    and moved from modules_to_save to target_modules in the returned config; one equal to the base's bit
    for bit is dropped from `tensors` with a note; others refused in one line."""
    from ..tensor_roles import model_layout
    from ..plan import BASE_LAYER, _saved_kind

    where = files.path
    roles = model_layout(ck)
    by_param = {f"{r.module}.{r.param}": r for r in roles.roles.values()}
    saved_keys = {classify_key(k).name: k for k in files.tensors if classify_key(k).kind is KeyKind.SAVED}
    for name, t in sorted(ad.saved.items()):
        key = saved_keys.get(name, PREFIX + name)
        role = by_param.get(name)
        if role is None:
            raise UnsupportedError("saved whole, and the base has no such tensor: --as-lora cannot take its "
                                   "delta", path=where, tensor=key)
        w0 = view.read(role.key)
        del tensors[key]
        if tuple(w0.shape) == tuple(t.shape) and torch.equal(w0.to(t.dtype), t):
            notes.append(f"--as-lora: {name} saved whole equals the base's own bit for bit: left out")
            continue
        module = role.module
        if _saved_kind(ad, name) == BASE_LAYER or role.param != "weight" or t.dim() != 2 or \
                role.kind not in ("linear", "head", "embedding") or (role.kind == "head" and roles.tied_head):
            raise UnsupportedError(
                f"saved whole ({role.kind} {role.param}, changed from the base): --as-lora turns only the weight "
                f"of a Linear, untied head or embedding saved whole (modules_to_save) into LoRA", path=where,
                tensor=key)
        if tuple(w0.shape) != tuple(t.shape):
            raise UnsupportedError(f"saved whole with shape {list(t.shape)}, the base's is {list(w0.shape)}",
                                   path=where, tensor=key)
        embedding = role.kind == "embedding"
        B, A, stats = refactor(t.float().sub_(w0), embedding, rank, t.dtype)
        del w0
        replace(module, embedding, B, A, {"module": module, "from": "modules_to_save", "base_tensor": role.key,
                                          **stats})
        config["modules_to_save"] = _without_module(config.get("modules_to_save"), module)
        config["target_modules"] = _with_target(config.get("target_modules"), module)
    return config


def as_plain_lora(files: PeftFiles, base: Path | None, rank: int, *, on_module: Callable[[str], None] | None = None
                  ) -> tuple[PeftFiles, list[dict]]:
    """`files` as a plain LoRA adapter: every DoRA module, and every module saved whole (modules_to_save),
    replaced by a rank-`rank` LoRA of what it changes on `base` (W' − W₀).

    Returns the new PeftFiles and one report row per re-factored module (module, from: "dora" |
    "modules_to_save", base_tensor, rank, rel_error, optimal_error, svd, delta_norm). Plain modules keep
    their tensors; a saved tensor equal to the base's bit for bit is dropped."""
    from ..io import Checkpoint
    from ..quantized import DenseView

    rank = check_rank(rank)
    ad = parse(files)
    where = files.path
    dora = {n: m for n, m in ad.modules.items() if m.magnitude is not None}
    if (dora or ad.saved) and base is None:
        raise UsageError("--as-lora needs --base BASE: the effective delta of a DoRA module or a module saved whole "
                         "is taken against the base weight")
    for m in dora.values():
        if m.bias is not None or m.kind == "experts":
            what = "a lora_B.bias" if m.bias is not None else "expert tensors"
            raise UnsupportedError(f"DoRA module with {what}: --as-lora cannot carry it", path=where,
                                   tensor=PREFIX + m.key_path)
    tensors = dict(files.tensors)
    config = dict(files.config)
    rows: list[dict] = []
    notes = list(files.notes)

    def replace(module_path: str, embedding: bool, B, A, row):
        for k in [k for k in tensors if classify_key(k)[:2] == (KeyKind.FACTOR, module_path)]:
            del tensors[k]
        ka, kb = _factor_keys(PREFIX + module_path, embedding)
        tensors[ka], tensors[kb] = A.contiguous(), B.contiguous()
        rows.append(row)
        if on_module is not None:
            on_module(row["module"])

    if dora or ad.saved:
        ck = Checkpoint(base)
        view = DenseView(ck)
    if dora:
        _refactor_dora(ck, view, ad, dora, rank, replace)
    if ad.saved:
        config = _refactor_saved(ck, view, ad, files, rank, replace, tensors, notes, config)
    ranks = {n: (m.r, m.scale) for n, m in ad.modules.items() if n not in dora}
    ranks.update({r["module"]: (r["rank"], 1.0) for r in rows})
    if rows:
        config = plain_config(config, ranks, rank)
        worst = max(rows, key=lambda r: r["rel_error"])
        notes.append(f"--as-lora: {len(rows)} module(s) re-factored as plain LoRA at rank {rank} (lossy): largest "
                     f"relative error {worst['rel_error']:.3g} on {worst['module']} (optimal {worst['optimal_error']:.3g})")
    else:
        notes.append("--as-lora: no DoRA module and no module saved whole, nothing re-factored")
    out = PeftFiles(config=config, tensors=tensors, source=files.source, path=files.path, notes=notes)
    parse(out)  # the result is a PEFT adapter loratools reads back
    return out, rows
