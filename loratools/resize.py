"""`loratools resize`: recompute an adapter at another rank, the optimal truncation of its own delta.

Note: never the dense delta.
    Each module's delta is B·A·scale. lowrank.truncate_factors takes thin QRs of B and Aᵀ and the SVD of
    the small r×r core, so the cost is O((m+n)r²) per module and the spectrum is exact: the kept part is
    the best rank-k approximation of B·A·scale (Eckart–Young), and the reported error is the exact tail
    √(Σ_{i>k} σᵢ²)/‖ΔW‖. A rank at or above the module's current rank keeps every singular value (the
    rank never grows past it: there is nothing to add), so the result is lossless up to float32 rounding.

Note: what happens to each part of an adapter.
    - scale: folded into the new factors; the output has use_rslora off and alpha = r per module (scale 1),
      per-module ranks and alphas in rank_pattern / alpha_pattern. An rsLoRA adapter's α/√r is therefore
      already inside B·A, and consumers that assume alpha = r see the right delta.
    - lora_bias (lora_B.bias): not part of the low-rank product; kept, multiplied by old_scale / new_scale
      so that bias · scale is unchanged.
    - embedding LoRA: the same truncation on lora_embedding_B · lora_embedding_A (its delta is that
      product transposed, which has the same singular values).
    - modules_to_save tensors and embedding base layers PEFT saved whole: copied unchanged.
    - MoE expert parameters (target_parameters, A (r·E, in), B (out, r·E)): each expert's own delta is
      truncated, and the rank is per parameter, the largest any expert needs (PEFT has one r per parameter;
      lowrank's Note: one rank per expert parameter); the report lists each expert's error. Parameter
      targets keep their names, nesting and target_parameters; their rank_pattern entries are keyed by the
      parameter's path, which is what PEFT matches them against.
    - DoRA: refused. Its magnitude vector rescales each row by m / ‖W + ΔW‖, which depends on the full
      base weight; truncating ΔW changes every row's norm, so no adapter of lower rank keeps the meaning
      of the stored magnitudes (and the optimal-truncation guarantee is gone). Merge it instead.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapter import LoraModule, adapter_tensors, load_adapter
from .errors import UnsupportedError
from .io import check_output_path, provenance
from .io.output import ADAPTER_WEIGHTS, check_report_path, write_adapter_dir
from .lora_math import pack_expert_factors, variant_of
from .lowrank import truncate_experts, truncate_factors
from .ranks import RankRule, most_common_rank


def resize_module(m: LoraModule, *, rank=None, energy=None, sv_ratio=None, max_rank=None):
    """A new LoraModule (alpha = r, scale 1) holding the optimal truncation of m's B·A·scale; and stats.

    Experts: each expert's B_e·A_e·scale is truncated on its own, at one rank for the parameter
    (lowrank.truncate_experts); the stats add each expert's relative error."""
    criteria = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "max_rank": max_rank}
    A_e, B_e = m.expert_factors()
    t = truncate_experts(lambda e, c: truncate_factors(B_e[e] * m.scale, A_e[e], **c), m.experts, criteria)
    r = t.rank
    newB_e, newA_e = t.factors(1.0)
    if m.kind == "experts":
        newA, newB = pack_expert_factors(newA_e, newB_e)
    else:
        newA, newB = newA_e[0], newB_e[0]
    dtype = m.A.dtype
    bias = (m.bias.float() * m.scale).to(m.bias.dtype) if m.bias is not None else None
    out = replace(m, A=newA.to(dtype), B=newB.to(dtype), r=r, alpha=float(r), scale=1.0, bias=bias)
    stats = {"name": m.name, "kind": m.kind, "old_rank": m.r, "rank": r, "retained_energy": t.retained_energy,
             "rel_error": t.rel_error, "delta_norm": t.norm,
             "old_parameters": m.A.numel() + m.B.numel(), "parameters": newA.numel() + newB.numel()}
    if m.kind == "experts":
        stats |= {"experts": m.experts, "expert_rel_errors": [x.rel_error for x in t.experts],
                  "expert_delta_norms": [x.norm for x in t.experts]}
    return out, stats


def resize_adapter(adapter: str | Path, output: str | Path, *, rank: int | None = None,
                   energy: float | None = None, sv_ratio: float | None = None, max_rank: int | None = None,
                   force: bool = False, report: str | None = None, base: str | Path | None = None) -> dict:
    """Recompute a LoRA adapter at another rank: per module, the optimal truncation of its own B·A·scale,
    without forming it (see the module notes). The output has alpha = rank (scale 1); DoRA is refused.

    Args:
        adapter: an adapter in any format loratools.formats reads (PEFT, MLX-LM, kohya, GGUF LoRA).
        output: adapter directory to write; written atomically, refused if it exists unless `force`.
        rank: the new rank of every module (a module never grows past its current rank); or, exactly one
            instead: `energy`, the fraction of ‖ΔW‖² kept per module, in (0, 1], or `sv_ratio`, keeping
            σ ≥ σ_max / R (R ≥ 1).
        max_rank: a cap on any module's rank.
        force: replace an existing output once the new one is complete.
        report: also write the returned report as JSON to this file.
        base: the base checkpoint, which kohya and GGUF LoRA inputs need to be read back (their module names).

    Returns:
        The report: output, files, bytes, r and lora_alpha, per-module rows (old and new rank, retained energy,
        relative error), saved_tensors, totals (parameters, bytes, overall error), stale_removed.

    Example:
        >>> rep = resize_adapter("fixtures/llama-lora", "/tmp/llama-lora-r4", rank=4)
        >>> rep["r"]
        4
    """
    RankRule(rank, energy, sv_ratio, max_rank).check(one_criterion=True)
    ad = load_adapter(adapter, base=base)  # any format; kohya/GGUF need `base` for their module names
    dora = [n for n, m in ad.modules.items() if not variant_of(m).additive]
    if ad.use_dora or dora:
        raise UnsupportedError("DoRA adapters cannot be resized: the magnitude vector rescales each row by "
                               "m / ‖W + ΔW‖, which depends on the full base weight, so truncating ΔW changes "
                               "what every stored magnitude means; merge it into its base instead "
                               "(`loratools merge`)", path=Path(adapter) / "adapter_config.json" if ad.source == "peft" else adapter,
                               tensor=dora[0] if dora else None)
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_path(output, inputs, force)
    if report is not None:
        check_report_path(report, output, inputs)
    meta = provenance("resize", {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "max_rank": max_rank},
                      {"adapter": adapter, **({"base": base} if base is not None else {})})
    modules, rows = {}, []
    for name, m in ad.modules.items():
        new, stats = resize_module(m, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank)
        modules[name] = new
        rows.append(stats)
    ranks = {n: m.r for n, m in modules.items()}
    r0 = most_common_rank(ranks.values(), default=int(ad.config["r"]))
    pattern = {n: r for n, r in ranks.items() if r != r0}
    config = dict(ad.config)
    config.update({"r": r0, "lora_alpha": r0, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                   "use_rslora": False})
    tensors = adapter_tensors(modules, ad.saved)
    d2 = sum(r["delta_norm"] ** 2 for r in rows)
    e2 = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)

    def report_doc(summary: dict, sizes: dict[str, int]) -> dict:
        return {
            "kind": "resize",
            "output": summary["output"],
            "files": summary["files"],
            "adapter": str(adapter),
            "r": r0,
            "lora_alpha": r0,
            "modules": rows,
            "saved_tensors": sorted(ad.saved),
            "totals": {
                "modules": len(rows),
                "old_parameters": sum(r["old_parameters"] for r in rows),
                "parameters": sum(r["parameters"] for r in rows),
                "old_bytes": _weights_bytes(Path(adapter)),
                "bytes": sizes[ADAPTER_WEIGHTS],
                "rel_error": (e2 / d2) ** 0.5 if d2 > 0 else 0.0,
                "retained_energy": 1 - e2 / d2 if d2 > 0 else 1.0,
            },
            "bytes": summary["bytes"],
            "stale_removed": summary["stale_removed"],
        }

    return write_adapter_dir(output, inputs=inputs, force=force, config=config, tensors=tensors,
                             provenance=meta, report_doc=report_doc, report=report)


def _weights_bytes(path: Path) -> int:
    """Bytes of an input adapter's tensors: the file (kohya, GGUF) or the directory's weights files."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))
