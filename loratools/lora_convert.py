"""`loratools convert ADAPTER --to lora`: an adapter that is not a plain LoRA on the original base, written as one.

Two inputs become a plain PEFT LoRA adapter here:

- a PiSSA / OLoRA / CorDA (or LoRA-GA) adapter with the initial adapter PEFT started from (`--initial`):
  ΔW = s·(B·A − B₀·A₀), written exactly as PEFT's
  `save_pretrained(..., path_initial_model_for_weight_conversion=)` writes it (rank 2r), or truncated to a rank;
- any other PEFT type (LoHa, LoKr, VeRA, AdaLoRA, IA3, OFT, BOFT; loratools/peft_types): each module's delta,
  truncated by the randomized SVD `extract` uses (see typed_to_lora).

Note: the base a PiSSA adapter belongs to.
    PiSSA, OLoRA and CorDA initialise A₀, B₀ from the base weight W and train on the residual
    W_res = W − s·B₀·A₀, so the trained adapter (B, A) gives W_res + s·B·A and belongs to W_res, not to W.
    W_res + s·B·A = W + s·(B·A − B₀·A₀), so the converted adapter applies to the ORIGINAL base W, like
    any LoRA, and can be mixed with others; the trained adapter alone cannot (PEFT rebuilds W_res from W
    when it loads it, by running the initialisation again).

Note: PEFT's rank-2r form.
    B·A − B₀·A₀ = [B | −B₀]·[A ; A₀]: A' = cat(A, A₀) on the rank axis, B' = cat(B, −B₀), bit for bit
    what PEFT's `subtract_mutated_init` concatenates (negation and concatenation are exact). The scale must not
    change: PEFT doubles r and lora_alpha (α/r = 2α/2r) and, with rsLoRA, multiplies lora_alpha by √2
    (α/√r = √2α/√(2r)); it doubles every rank_pattern and alpha_pattern value, which keeps α/r but not an
    rsLoRA α/√r, so PEFT refuses rsLoRA with either pattern. Here every alpha (lora_alpha and each
    alpha_pattern value) is multiplied by the same factor as lora_alpha: 2, or √2 with rsLoRA; every rank
    by 2. That is PEFT's config wherever PEFT writes one, and the same scale per module where it refuses.
    A lora_B.bias becomes b − b₀ (PEFT's concatenation cannot take a 1-D bias and fails); tensors the
    trained adapter saves whole (modules_to_save) are carried (PEFT's converted file leaves them out
    while its config still names them).

Note: truncation.
    With a rank rule (--rank / --energy / --sv-ratio / --max-rank) the rank-2r module is re-ranked as
    `resize` re-ranks a LoRA: QR of the stacked factors and an SVD of the small core, so the result is the
    optimal (Eckart–Young) truncation of ΔW itself and no dense ΔW is formed. The report's rel_error is
    measured on the factors as written (after the cast to the adapter's dtype) against the exact ΔW, from
    factors too; optimal_error is the exact spectrum's tail.

Note: other adapter types.
    A LoHa / LoKr / VeRA / AdaLoRA module's update does not depend on the base (`additive`): ΔW is its
    `delta()` (peft_types, PEFT's get_delta_weight in float32), formed per module without reading the base
    unless a dimension is left to it (VeRA's in_features). IA3, OFT and BOFT multiply the base weight, so
    ΔW = merged(W) − W from the base tensor (--base), read through merge's plan, one tensor at a time; IA3 on
    a non-feed-forward layer also scales its bias, which becomes a lora_B.bias (lora_bias, written as zeros
    for the other modules: PEFT's lora_bias is all or nothing). ΔW is truncated by lowrank.truncate, the
    randomized SVD (or exact, `auto` as in extract) with seed 0; the report gives, per module, the relative
    error of the factors as written and the optimal (Eckart–Young) error from the exact spectrum, as
    `convert --as-lora` does. Output: alpha = r per module (scale 1), other ranks in exact-name patterns.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from .adapter import PREFIX, Adapter, LoraModule, adapter_tensors, load_adapter
from .errors import MismatchError, UnsupportedError, UsageError
from .checks import refuse_unless_fits
from .init_methods import base_changing_init
from .lora_math import lora_scale, pack_expert_factors, stored_transposed, to_layout
from .lowrank import factored_svd
from .ranks import RankRule, most_common_rank


# -- pure tensor functions -------------------------------------------------------------------------------

def alpha_factor(use_rslora: bool) -> float | int:
    """What every alpha is multiplied by when r doubles, so that the scale stays (Note: PEFT's rank-2r form);
    the int 2 without rsLoRA, so that an integer alpha stays one in the JSON, as in PEFT's."""
    return 2 ** 0.5 if use_rslora else 2


def stack_initial(m: LoraModule, m0: LoraModule, use_rslora: bool) -> LoraModule:
    """The rank-2r module whose B'·A'·scale is s·(B·A − B₀·A₀), in m's dtype; PEFT's concatenation for
    modules and per expert for expert parameters (whose packed rows interleave experts)."""
    A0, B0 = m0.A.to(m.A.dtype), m0.B.to(m.B.dtype)
    if m.kind == "experts":
        A_e, B_e = m.expert_factors(m.A.dtype)
        A0_e, B0_e = replace(m0, A=A0, B=B0).expert_factors(m.A.dtype)
        A, B = pack_expert_factors(torch.cat([A_e, A0_e], 1), torch.cat([B_e, -B0_e], 2))
    else:
        A, B = torch.cat([m.A, A0], 0), torch.cat([m.B, -B0], 1)
    bias = m.bias
    if m0.bias is not None:  # s·b − s·b₀: the bias term of the same difference
        b = m.bias if m.bias is not None else torch.zeros_like(m0.bias, dtype=m.B.dtype)
        bias = b - m0.bias.to(b.dtype)
    alpha = m.alpha * alpha_factor(use_rslora)
    return replace(m, A=A, B=B, r=2 * m.r, alpha=alpha, scale=lora_scale(alpha, 2 * m.r, use_rslora), bias=bias,
                   magnitude=None)


def stacked_config(config: dict) -> dict:
    """The trained adapter's config for the rank-2r adapter (Note: PEFT's rank-2r form): r, rank_pattern × 2,
    lora_alpha and alpha_pattern × alpha_factor, init_lora_weights true."""
    f = alpha_factor(bool(config.get("use_rslora")))
    cfg = dict(config, init_lora_weights=True, r=2 * int(config["r"]), lora_alpha=config["lora_alpha"] * f)
    cfg["rank_pattern"] = {k: 2 * int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: v * f for k, v in (config.get("alpha_pattern") or {}).items()}
    return cfg


def factored_error(m: LoraModule, new: LoraModule) -> float:
    """‖ΔW(m) − ΔW(new)‖_F from the factors alone ([B·s | −B_new·s_new]·[A ; A_new], QR + small SVD; per
    expert), in float32; the difference of two low-rank modules is low-rank."""
    A_e, B_e = m.expert_factors()
    nA_e, nB_e = new.expert_factors()
    err2 = 0.0
    for e in range(A_e.shape[0]):
        _, S, _ = factored_svd(torch.cat([B_e[e] * m.scale, -nB_e[e] * new.scale], 1),
                               torch.cat([A_e[e], nA_e[e]], 0))
        err2 += float((S.double() ** 2).sum())
    return math.sqrt(err2)


def truncate_module(m: LoraModule, rule: RankRule) -> tuple[LoraModule, dict]:
    """The optimal truncation of m's delta (resize's, alpha = r, scale 1) in m's dtype, and its report row:
    module, kind, old_rank, rank, rel_error (as written), optimal_error, svd, delta_norm."""
    from .resize import resize_module

    new, stats = resize_module(m, **rule.kwargs())
    norm = stats["delta_norm"]
    rel = factored_error(m, new) / norm if norm > 0 else 0.0
    row = {"module": m.name, "kind": m.kind, "old_rank": m.r, "rank": new.r, "rel_error": rel,
           "optimal_error": stats["rel_error"], "svd": "factored", "delta_norm": norm}
    if m.kind == "experts":
        row["expert_rel_errors"] = stats["expert_rel_errors"]
    return new, row


def truncated_config(config: dict, modules: dict[str, LoraModule]) -> dict:
    """Config for modules at alpha = r (scale 1), as resize writes it: the most common rank as r, the others in
    exact-name rank_pattern / alpha_pattern entries, rsLoRA off."""
    ranks = {n: m.r for n, m in modules.items()}
    r0 = most_common_rank(ranks.values(), default=int(config["r"]))
    pattern = {n: r for n, r in ranks.items() if r != r0}
    return dict(config, init_lora_weights=True, r=r0, lora_alpha=r0, rank_pattern=pattern,
                alpha_pattern=dict(pattern), use_rslora=False)


# -- checks ----------------------------------------------------------------------------------------------

def _where(ad: Adapter) -> Path:
    return ad.path / "adapter_config.json" if ad.source == "peft" and ad.path.is_dir() else ad.path


def _factor_key(m: LoraModule, which: str) -> str:
    """The saved key of m's lora_A / lora_B (`which` "A" or "B"), for messages."""
    stem = PREFIX + m.key_path
    return f"{stem}.lora_embedding_{which}" if m.kind == "embedding" else f"{stem}.lora_{which}.weight"


def check_pair(trained: Adapter, initial: Adapter) -> None:
    """MismatchError (one line, naming the initial adapter and the tensor) unless both adapt the same modules
    with the same shapes, ranks and scales; UnsupportedError for DoRA and for a residual base layer saved whole."""
    for ad in (trained, initial):
        dora = [n for n, m in ad.modules.items() if m.magnitude is not None]
        if ad.use_dora or dora:
            raise UnsupportedError("DoRA: its magnitudes are norms of the residual base's rows, so "
                                   "B·A − B₀·A₀ is not its update on the original base; merge it into the "
                                   "residual base instead",
                                   path=_where(ad), tensor=PREFIX + dora[0] if dora else None)
    where = initial.path
    extra = sorted(set(initial.modules) - set(trained.modules))
    missing = sorted(set(trained.modules) - set(initial.modules))
    if missing or extra:
        name = (missing or extra)[0]
        what = "has no module" if missing else "adapts a module the trained adapter does not:"
        raise MismatchError(f"the initial adapter {what} {name} ({len(missing)} missing, {len(extra)} extra; "
                            f"--initial must be the adapter this one was trained from)", path=where,
                            tensor=_factor_key((trained.modules if missing else initial.modules)[name], "A"))
    for name, m in trained.modules.items():
        m0 = initial.modules[name]
        key_a, key_b = _factor_key(m0, "A"), _factor_key(m0, "B")
        for what, a, b, key in (("kind", m0.kind, m.kind, key_a), ("shape", list(m0.A.shape), list(m.A.shape), key_a),
                                ("shape", list(m0.B.shape), list(m.B.shape), key_b), ("rank", m0.r, m.r, key_a),
                                ("experts", m0.experts, m.experts, key_a)):
            if a != b:
                raise MismatchError(f"{what} {a} in the initial adapter, {b} in the trained one (--initial must be "
                                    f"the adapter this one was trained from)", path=where, tensor=key)
        if not math.isclose(m0.scale, m.scale, rel_tol=1e-6):
            raise MismatchError(f"scale {m0.scale:g} (r={m0.r}, alpha={m0.alpha:g}) in the initial adapter, "
                                f"{m.scale:g} (r={m.r}, alpha={m.alpha:g}) in the trained one (rank_pattern, "
                                f"alpha_pattern or use_rslora differ)", path=where, tensor=key_a)
    for name in sorted(trained.saved):
        module = name.rsplit(".", 1)[0]
        if module in trained.modules:
            raise UnsupportedError("a targeted module's base layer saved whole (save_embedding_layers) is the "
                                   "residual base's, which the converted adapter must not carry; save the trained "
                                   "adapter without it", path=trained.path, tensor=PREFIX + name)


def mutating_init(config: dict) -> str | None:
    """The init_lora_weights value when it changes the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), else None
    (the fact lives in init_methods.py)."""
    return base_changing_init(config)


# -- the plumbing ----------------------------------------------------------------------------------------

def _rule_or_none(rank, energy, sv_ratio, max_rank) -> RankRule | None:
    rule = RankRule(rank, energy, sv_ratio, max_rank)
    if rank is None and energy is None and sv_ratio is None:
        if max_rank is not None:
            raise UsageError("--max-rank caps --energy or --sv-ratio; give one of them (or --rank)")
        return None
    return rule.check(one_criterion=True)


def convert_initial(adapter, initial, output, *, rank=None, energy=None, sv_ratio=None, max_rank=None,
                    base=None, force: bool = False, on_module=None) -> dict:
    """Write the plain LoRA adapter of a trained PiSSA/OLoRA/CorDA adapter and its initial one (module notes).

    Args:
        adapter: the trained adapter (any format load_adapter reads).
        initial: the adapter as initialised, before training (what PEFT's docs save as the initial adapter,
            or the directory passed to `path_initial_model_for_weight_conversion`).
        output: adapter directory to write, atomically; refused if it exists unless `force`.
        rank, energy, sv_ratio, max_rank: none for the exact rank-2r adapter (PEFT's); else the rank rule
            of the optimal truncation (one of rank / energy / sv_ratio, as `resize`).
        base: the base checkpoint, for formats that need it to be read (kohya, GGUF); when given, the
            trained adapter must fit it (MismatchError otherwise, as merge refuses it).
        on_module: called with each module's name (progress).
    Returns:
        {"kind": "convert_lora", "output", "files", "bytes", "stale_removed", "from", "init_lora_weights",
         "r", "lora_alpha", "modules" (rows: module, kind, old_rank, rank, rel_error, optimal_error, svd,
         delta_norm; rank-2r rows have rel_error 0 and svd "exact"), "saved_tensors", "notes"}.
    """
    from .io import check_output_path, provenance
    from .io.output import write_adapter_dir

    rule = _rule_or_none(rank, energy, sv_ratio, max_rank)
    for path in (adapter, initial):
        peft_type = _peft_type(path)
        if peft_type not in (None, "LORA"):
            raise UnsupportedError(f"a {peft_type} adapter (peft_type): --initial pairs LoRA adapters (PiSSA, OLoRA, "
                                   f"CorDA are LoRA initialisations); convert a {peft_type} adapter with --to lora "
                                   f"--rank R and no --initial", path=Path(path) / "adapter_config.json")
    trained = load_adapter(adapter, base=base)
    init = load_adapter(initial, base=base)
    check_pair(trained, init)
    if base is not None:
        refuse_unless_fits(trained, base)
    use_rslora = trained.use_rslora
    notes = []
    dt = {m.A.dtype for m in trained.modules.values()} | {m.A.dtype for m in init.modules.values()}
    if len(dt) > 1:
        notes.append(f"factor dtypes differ ({', '.join(sorted(str(d) for d in dt))}): the initial factors are "
                     f"cast to the trained adapter's")
    modules, rows = {}, []
    for name, m in trained.modules.items():
        stacked = stack_initial(m, init.modules[name], use_rslora)
        if rule is None:
            modules[name] = stacked
            rows.append({"module": name, "kind": m.kind, "old_rank": m.r, "rank": stacked.r, "rel_error": 0.0,
                         "optimal_error": 0.0, "svd": "exact", "delta_norm": None})
        else:
            modules[name], row = truncate_module(stacked, rule)
            rows.append(row)
        if on_module is not None:
            on_module(name)
    config = stacked_config(trained.config) if rule is None else truncated_config(trained.config, modules)
    if trained.saved:
        notes.append(f"{len(trained.saved)} tensor(s) saved whole (modules_to_save) carried unchanged")
    inputs = [adapter, initial] + ([base] if base is not None else [])
    check_output_path(output, inputs, force)
    options = {"to": "lora", **{k: v for k, v in rule.kwargs().items() if v is not None}} if rule else {"to": "lora"}
    meta = provenance("convert", options, {"adapter": adapter, "initial": initial,
                                           **({"base": base} if base is not None else {})})
    tensors = adapter_tensors(modules, trained.saved)

    def report_doc(summary: dict, sizes: dict) -> dict:
        return {"kind": "convert_lora", **summary, "from": str(adapter), "initial": str(initial),
                "init_lora_weights": trained.config.get("init_lora_weights"), "r": config["r"],
                "lora_alpha": config["lora_alpha"], "modules": rows, "saved_tensors": sorted(trained.saved),
                "notes": notes}

    return write_adapter_dir(output, inputs=inputs, force=force, config=config, tensors=tensors, provenance=meta,
                             report_doc=report_doc)


def _peft_type(path) -> str | None:
    """The peft_type of a PEFT adapter directory's config (upper case), None for anything else."""
    from .io.checkpoint import load_json

    cfg_path = Path(path) / "adapter_config.json"
    if not cfg_path.is_file():
        return None
    cfg = load_json(cfg_path, "adapter_config.json")
    return (str(cfg.get("peft_type", "")).upper() or None) if isinstance(cfg, dict) else None


def convert_typed(adapter, output, *, rank=None, energy=None, sv_ratio=None, max_rank=None, base=None,
                  force: bool = False) -> dict:
    """`convert ADAPTER --to lora` without --initial: a PEFT adapter of another type (typed_to_lora); a LoRA
    whose initialisation changed its base is refused (it needs --initial), a plain LoRA too (it is one)."""
    peft_type = _peft_type(adapter)
    if peft_type not in (None, "LORA"):
        return typed_to_lora(adapter, output, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank,
                             base=base, force=force)
    ad = load_adapter(adapter, base=base)
    init = mutating_init(ad.config)
    if init is not None:
        raise UsageError(f"{adapter}: init_lora_weights {init!r}: this adapter belongs to the residual base its "
                         f"initialisation made; --initial INIT_ADAPTER (the adapter as initialised, before "
                         f"training) is needed to write it as a LoRA on the original base")
    raise UsageError(f"{adapter} is a plain LoRA adapter already: `loratools convert ADAPTER --to peft` copies it, "
                     f"`loratools resize ADAPTER --rank R` re-ranks it (or give --initial for a PiSSA-style pair)")


def typed_to_lora(adapter, output, *, rank=None, energy=None, sv_ratio=None, max_rank=None, base=None,
                  force: bool = False, on_module=None) -> dict:
    """Write an adapter of another PEFT type (loratools.peft_types) as a plain LoRA: per module, ΔW (Note:
    other adapter types) truncated by the rank rule as `extract` truncates, the error reported.

    Args:
        adapter: a PEFT adapter directory whose peft_type is registered in loratools.peft_types.
        output: adapter directory to write, atomically; refused if it exists unless `force`.
        rank, energy, sv_ratio, max_rank: the rank rule (one of rank / energy / sv_ratio; max_rank caps).
        base: the base checkpoint; required when a module's delta depends on it (IA3, OFT, BOFT) or a
            dimension is known only from it (VeRA's in_features); when given, the adapter must fit it.
        on_module: called with each module's name (progress).
    Returns:
        {"kind": "convert_lora", "output", "files", "bytes", "stale_removed", "from", "peft_type", "r",
         "lora_alpha", "modules" (rows: module, kind, base_tensor, rank, rel_error, optimal_error, svd,
         delta_norm, bias_norm), "saved_tensors", "notes", "totals"}.
    """
    from .adapter import adapter_config
    from .io import check_output_path, provenance
    from .io.output import write_adapter_dir

    rule = _rule_or_none(rank, energy, sv_ratio, max_rank)
    if rule is None:
        raise UsageError("converting an adapter of another type to LoRA needs --rank R (or --energy E / --sv-ratio "
                         "R): its delta is truncated to that rank")
    ad = load_adapter(adapter, typed=True)
    where = _where(ad)
    for m in ad.modules.values():
        if m.kind not in ("linear", "embedding"):
            raise UnsupportedError(f"{ad.peft_type} module of kind {m.kind}: --to lora writes Linear, Conv1D and "
                                   f"Embedding modules only", path=where, tensor=PREFIX + m.key_path)
    needs = [m for m in ad.modules.values() if not m.additive or -1 in m.base_shape]
    if needs and base is None:
        why = "is multiplicative: ΔW = merged(W) − W" if not needs[0].additive else \
            "leaves a dimension to the base weight"
        raise UsageError(f"{adapter}: {ad.peft_type} module {needs[0].name} {why}; give --base BASE, the "
                         f"checkpoint it was trained on")
    dtype = torch.float32 if torch.float32 in ad.dtypes or len(ad.dtypes) != 1 else next(iter(ad.dtypes))
    modules, rows = {}, []
    for m, delta, key, bias in _typed_deltas(ad, base):
        transposed = stored_transposed(m.kind, m.fan_in_fan_out)  # PEFT's B·A is ΔWᵀ for Conv1D and Embedding
        B, A, stats = truncate_delta(to_layout(delta, transposed), rule, dtype)
        del delta
        k = int(A.shape[0])
        modules[m.name] = LoraModule(name=m.name, kind=m.kind, A=A, B=B, r=k, alpha=float(k), scale=1.0,
                                     fan_in_fan_out=m.fan_in_fan_out and m.kind == "linear",
                                     bias=None if bias is None else bias.to(dtype))
        rows.append({"module": m.name, "kind": m.peft_type, "base_tensor": key, **stats,
                     "bias_norm": None if bias is None else float(bias.double().norm())})
        if on_module is not None:
            on_module(m.name)
    if any(m.bias is not None for m in modules.values()):  # PEFT's lora_bias is all or nothing: zeros elsewhere
        for m in modules.values():
            if m.bias is None:
                m.bias = torch.zeros(m.B.shape[0], dtype=dtype)
    cfg = ad.config
    ranks = {n: m.r for n, m in modules.items()}
    r0 = most_common_rank(ranks.values(), default=1)
    pattern = {n: r for n, r in ranks.items() if r != r0}
    fifo = {m.fan_in_fan_out for m in modules.values() if m.kind == "linear"}
    config = adapter_config(r=r0, lora_alpha=r0, target_modules=sorted(modules), rank_pattern=pattern,
                            alpha_pattern=dict(pattern), fan_in_fan_out=fifo == {True},
                            lora_bias=any(m.bias is not None for m in modules.values()),
                            base_model_name_or_path=cfg.get("base_model_name_or_path"),
                            modules_to_save=cfg.get("modules_to_save"), task_type=cfg.get("task_type"))
    notes = []
    if ad.saved:
        notes.append(f"{len(ad.saved)} tensor(s) saved whole (modules_to_save) carried unchanged")
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_path(output, inputs, force)
    options = {"to": "lora", "from": ad.peft_type, **{k: v for k, v in rule.kwargs().items() if v is not None}}
    meta = provenance("convert", options, {"adapter": adapter, **({"base": base} if base is not None else {})})
    tensors = adapter_tensors(modules, ad.saved)
    d2 = sum(r["delta_norm"] ** 2 for r in rows)
    e2 = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)
    o2 = sum((r["optimal_error"] * r["delta_norm"]) ** 2 for r in rows)

    def report_doc(summary: dict, sizes: dict) -> dict:
        return {"kind": "convert_lora", **summary, "from": str(adapter), "peft_type": ad.peft_type, "r": r0,
                "lora_alpha": r0, "modules": rows, "saved_tensors": sorted(ad.saved), "notes": notes,
                "totals": {"modules": len(rows), "rel_error": math.sqrt(e2 / d2) if d2 > 0 else 0.0,
                           "optimal_error": math.sqrt(o2 / d2) if d2 > 0 else 0.0}}

    return write_adapter_dir(output, inputs=inputs, force=force, config=config, tensors=tensors, provenance=meta,
                             report_doc=report_doc)


def _typed_deltas(ad: Adapter, base):
    """(module, ΔW float32 in the base's stored layout, base tensor key, Δbias or None) per module: from the
    factors alone without `base`; with it, through merge's plan (the fit checks, stored names), each base
    weight read once and dropped."""
    if base is None:
        for m in ad.modules.values():
            yield m, m.delta(None), m.base_key, None
        return
    from .io import Checkpoint
    from .plan import build_plan
    from .quantized import DenseView

    ck = Checkpoint(base)
    try:
        view = DenseView(ck)
        plan = build_plan(ck, [ad], [1.0])
        biases = {}
        for key, p in plan.tensors.items():
            if p.is_bias:
                b = view.read(p.source).float()
                for step in p.steps:  # IA3 scales the bias of a non-feed-forward layer
                    biases[step.module.name] = step.module.merge_bias(b.clone()) - b
        for key, p in plan.tensors.items():
            if p.is_bias:
                continue
            # an additive module's delta ignores the base: its weight is not even read
            w = view.read(p.source).float() if any(not s.module.additive for s in p.steps) else None
            for step in p.steps:
                m = step.module
                yield m, m.delta(w if not m.additive else None), key, biases.get(m.name)
            del w
    finally:
        ck.close()


def truncate_delta(M: torch.Tensor, rule: RankRule, dtype: torch.dtype, seed: int = 0):
    """(B, A, stats): B·A (scale 1) ≈ M [out, in] by lowrank.truncate (extract's randomized/exact SVD), in
    `dtype`; stats: rank, rel_error of the factors as written, optimal_error (the exact spectrum's tail: the
    truncation's own when the exact SVD ran, else formats.lossy.tail_energy's), svd, delta_norm."""
    from .formats.lossy import tail_energy
    from .lowrank import truncate

    M = M.float()
    t = truncate(M, seed=seed, **rule.kwargs())
    B, A = t.factors(1.0)
    B, A = B.to(dtype).contiguous(), A.to(dtype).contiguous()
    norm = t.norm
    stats = {"rank": t.rank, "svd": t.method, "delta_norm": norm}
    if norm == 0:
        return B, A, {**stats, "rel_error": 0.0, "optimal_error": 0.0}
    R = M - B.float() @ A.float()
    rel = math.sqrt(float(torch.sum(R * R, dtype=torch.float64))) / norm  # what is written, after the cast
    optimal = t.rel_error if t.method == "full" else math.sqrt(tail_energy(M, t.rank)) / norm
    return B, A, {**stats, "rel_error": rel, "optimal_error": optimal}
