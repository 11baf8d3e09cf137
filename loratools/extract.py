"""`loratools extract`: a PEFT LoRA adapter from the difference of two checkpoints, with its error.

For every targeted weight, ΔW = TUNED − BASE (float32) is truncated to a low rank (lowrank.truncate)
and written as lora_B · lora_A · scale = the truncation. Everything else that differs is either carried
whole (`modules_to_save=True`) or listed in the report; nothing is dropped silently.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapter import LoraModule, adapter_config, adapter_tensors, nest_param_targets
from .device import resolve_device
from .dtypes import FLOAT_DTYPES
from .errors import InputError, MismatchError, UnsupportedError, UsageError
from .expert_extract import ExpertParam, Pairs
from .io import Checkpoint, check_output_path, provenance
from .io.output import ADAPTER_WEIGHTS, check_report_path, write_adapter_dir
from .lora_math import stored_transposed, to_layout
from .lowrank import truncate
from .ranks import RankRule, most_common_rank
from .task_types import adapter_task_type
from .tensor_roles import CheckpointRoles, TensorRole, model_layout

SEED = 0
PARAM_KINDS = ("experts", "router")  # LoRA on a parameter (PEFT target_parameters), not on a module


# -- pure tensor functions -------------------------------------------------------------------------------

def lora_kind_of(role_kind: str) -> tuple[str, bool]:
    """(LoRA module kind, fan_in_fan_out) PEFT gives a weight of this role: an embedding becomes LoRA
    Embedding, a Conv1D a LoRA Linear with fan_in_fan_out, a Linear or head a LoRA Linear."""
    return ("embedding" if role_kind == "embedding" else "linear"), role_kind == "conv1d"


def factor_layout(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The matrix whose factors PEFT stores as B·A: ΔW for Linear, ΔWᵀ for Conv1D ([in, out]) and Embedding."""
    return to_layout(delta, stored_transposed(*lora_kind_of(kind)))


# Note: scale and alpha.
#     Each module's factors satisfy B·A·(alpha/r) = U_k S_k V_kᵀ exactly (the √S split is divided by the
#     scale), so the adapter reproduces the truncation whatever alpha is. By default alpha = r for every
#     module (scale 1); per-module ranks go to rank_pattern and the matching alphas to alpha_pattern.
#     `alpha=` fixes one lora_alpha for all modules instead (scale alpha/r per module).


def lowrank_module(delta: torch.Tensor, kind: str, rule: RankRule, *, alpha: float | None = None,
                   method: str = "auto", out_dtype: torch.dtype = torch.float32, seed: int = SEED):
    """(B, A, r, alpha, stats) for one weight delta (float32, on any device); B·A·alpha/r ≈ the delta's layout.

    stats: svd method, retained energy, and the relative Frobenius error ‖M − B·A·scale‖ / ‖M‖ of the
    factors as written: the truncation's own error in float32, measured again after a cast to fp16/bf16.
    """
    M = factor_layout(delta.float(), kind)
    t = truncate(M, method=method, seed=seed, **rule.kwargs())
    r = t.rank
    a = float(r) if alpha is None else float(alpha)
    scale = a / r
    B, A = t.factors(scale)
    rel = t.rel_error
    if out_dtype != torch.float32 and t.norm > 0:  # rounding the factors adds error: measure what is written
        B, A = B.to(out_dtype), A.to(out_dtype)
        rel = float(torch.linalg.matrix_norm(M - (B.float() @ A.float()) * scale).double()) / t.norm
    stats = {"svd": t.method, "retained_energy": t.retained_energy, "rel_error": rel, "delta_norm": t.norm}
    return B.cpu(), A.cpu(), r, a, stats


def module_matches(name: str, patterns) -> bool:
    """PEFT's target_modules list semantics (exact name, or a suffix on a dot boundary), plus shell globs."""
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        if any(c in p for c in "*?[") and (fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p)):
            return True
    return False


# -- what each tensor is -----------------------------------------------------------------------------------

def check_pair(base: Checkpoint, tuned: Checkpoint):
    """Same tensors, same shapes (dtypes may differ); dense checkpoints of one architecture."""
    for ck in (base, tuned):
        if ck.is_quantized:
            raise UnsupportedError("a 4-bit quantized checkpoint cannot be differenced; run `loratools dequantize` "
                                   "first", path=ck.path)
    mt = [(ck.config or {}).get("model_type") for ck in (base, tuned)]
    if mt[0] and mt[1] and mt[0] != mt[1]:
        raise MismatchError(f"BASE is a {mt[0]!r} model but TUNED is a {mt[1]!r} model", path=tuned.path)
    only_base = sorted(set(base.tensors) - set(tuned.tensors))
    only_tuned = sorted(set(tuned.tensors) - set(base.tensors))
    if only_base or only_tuned:
        parts = []
        if only_base:
            parts.append(f"{len(only_base)} tensor(s) only in BASE ({_few(only_base)})")
        if only_tuned:
            parts.append(f"{len(only_tuned)} tensor(s) only in TUNED ({_few(only_tuned)})")
        raise MismatchError("BASE and TUNED hold different tensors: " + "; ".join(parts), path=tuned.path,
                            tensor=(only_base or only_tuned)[0])
    bad = [n for n in base.tensors if tuple(base.tensors[n].shape) != tuple(tuned.tensors[n].shape)]
    if bad:
        n = bad[0]
        raise MismatchError(f"shape {list(tuned.tensors[n].shape)} in TUNED but {list(base.tensors[n].shape)} in BASE"
                            + (f" ({len(bad)} tensors differ in shape: {_few(bad)})" if len(bad) > 1 else ""),
                            path=tuned.path, tensor=n)


def _few(names, n=4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


@dataclass
class TargetSelection:
    """Which weights become LoRA modules, and why each other LoRA-capable weight does not."""

    targets: dict[str, TensorRole]  # key -> role, LoRA candidates selected
    excluded: dict[str, str]  # key -> why a LoRA-capable weight is not a candidate
    layout: CheckpointRoles
    notes: list[str] = field(default_factory=list)


def plan_targets(layout: CheckpointRoles, *, target_modules=None, include_embeddings: bool = False) -> TargetSelection:
    roles = layout.roles
    lora_kinds = ("linear", "conv1d", "embedding", "head", "experts", "router")
    candidates = {k: r for k, r in roles.items() if r.kind in lora_kinds}
    targets, excluded = {}, {}
    conv = any(r.kind == "conv1d" for r in candidates.values())
    for key, r in candidates.items():
        if r.kind in ("embedding", "head") and not include_embeddings:
            excluded[key] = f"{'embedding' if r.kind == 'embedding' else 'output head'}: add --include-embeddings"
        elif target_modules and not (module_matches(r.module, target_modules) or
                                     (r.kind in PARAM_KINDS and module_matches(r.param_name, target_modules))):
            excluded[key] = "not selected by --target-modules"
        elif r.kind == "head" and conv:
            # PEFT sets fan_in_fan_out per module, but the adapter config holds one flag for all modules
            excluded[key] = "a Linear head in a Conv1D (fan_in_fan_out) model: one adapter cannot flag both"
        elif r.kind == "head" and layout.tied_head:
            excluded[key] = "tied to the input embedding"
        else:
            targets[key] = r
    if target_modules:
        for p in target_modules:
            if not any(module_matches(r.module, [p]) for r in candidates.values()):
                raise UsageError(f"--target-modules {p!r} matches no 2-D Linear, Conv1D or Embedding weight "
                                 f"(modules look like {next(iter(candidates.values())).module if candidates else '-'})")
            if not any(module_matches(r.module, [p]) for r in targets.values()):
                why = {excluded[k] for k, r in candidates.items() if module_matches(r.module, [p])}
                raise UsageError(f"--target-modules {p!r} matches only weights that are not extracted: "
                                 f"{'; '.join(sorted(why))}")
    return TargetSelection(targets, excluded, layout)


# -- the driver -----------------------------------------------------------------------------------------------

def _rel_change(b: torch.Tensor, t: torch.Tensor) -> float:
    d = float(torch.linalg.vector_norm((t - b).double()))
    n = float(torch.linalg.vector_norm(b.double()))
    return d / n if n > 0 else math.inf


# Note: streaming and checks first.
#     Both headers are compared (key sets, shapes) and every option and pattern is checked before any
#     tensor is read; then BASE and TUNED are read in step, one tensor pair at a time, so memory is a
#     few tensors plus the adapter being built (rank r factors, small). The adapter is written at the end
#     through an atomic directory: an error at any point leaves no output.


@dataclass
class _Difference:
    """What reading BASE and TUNED side by side found."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # the LoRA modules made so far
    rows: list[dict] = field(default_factory=list)  # their report rows
    changed_other: dict[str, float] = field(default_factory=dict)  # key -> ‖Δ‖/‖W‖ of changed non-targets
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> Δb of a targeted module
    identical: int = 0  # tensors equal in BASE and TUNED
    tuned_bytes: int = 0  # stored size of the targeted TUNED weights


@dataclass
class _Carried:
    """What the adapter carries besides its LoRA modules, and what it cannot carry."""

    not_carried: list[dict]
    saved: dict[str, torch.Tensor]  # whole-module tensors (modules_to_save)
    whole_module_names: list[str]  # the modules saved whole
    use_bias: bool  # targeted modules' bias changes go to lora_B.bias


def _check_extract_options(rule: RankRule, alpha, svd: str, dtype: str) -> torch.dtype:
    """Every option checked (UsageError) before any file is read; returns the factors' dtype."""
    rule.check()
    if alpha is not None and not alpha > 0:
        raise UsageError(f"--alpha must be positive, got {alpha}")
    if svd not in ("auto", "full", "randomized"):
        raise UsageError(f"--svd must be auto, full or randomized, got {svd!r}")
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"--dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    return FLOAT_DTYPES[dtype]


def extract_checkpoint(base: str | Path, tuned: str | Path, output: str | Path, *, rank: int | None = None,
                       energy: float | None = None, sv_ratio: float | None = None, max_rank: int | None = None,
                       target_modules: list[str] | None = None, include_embeddings: bool = False,
                       modules_to_save: bool = False, alpha: float | None = None, svd: str = "auto",
                       device: str = "auto", dtype: str = "float32", force: bool = False,
                       on_tensor: Callable[[str], None] | None = None, report: str | None = None) -> dict:
    """Extract a PEFT LoRA adapter from the difference of two checkpoints, TUNED − BASE, with its error.

    Args:
        base, tuned: dense checkpoints of one architecture (same tensor names and shapes).
        output: adapter directory to write; written atomically, refused if it exists unless `force`.
        rank: fixed rank for every module; or choose it per module by `energy` (the fraction of ‖ΔW‖² kept,
            in (0, 1]) and/or `sv_ratio` (keep σ ≥ σ_max / R, R ≥ 1); `max_rank` caps either.
        target_modules: module names, dotted suffixes or globs to extract (default: every Linear/Conv1D).
        include_embeddings: also extract embeddings (LoRA Embedding) and the output head.
        modules_to_save: carry changed norms and biases exactly (modules_to_save, lora_bias).
        alpha: one lora_alpha for every module (default alpha = rank, scale 1).
        svd: "auto", "full" or "randomized".
        device: "auto", "cpu" or "cuda".
        dtype: dtype of the written factors: "float32", "float16" or "bfloat16".
        force: replace an existing output once the new one is complete.
        on_tensor: called with each tensor name as it is read.
        report: also write the returned report as JSON to this file.

    Returns:
        The report (docs/extract.md): per-module rank, retained energy and relative error, the tensors the
        adapter carries whole or not at all, totals, output files and bytes.

    Example:
        >>> rep = extract_checkpoint("fixtures/tiny-llama", "fixtures/tiny-llama-tuned", "/tmp/extracted", rank=8)
        >>> rep["r"], rep["totals"]["modules"] > 0
        (8, True)
    """
    rule = RankRule(rank, energy, sv_ratio, max_rank)
    out_dtype = _check_extract_options(rule, alpha, svd, dtype)
    dev = resolve_device(device)
    base_ck, tuned_ck = Checkpoint(base), Checkpoint(tuned)
    check_pair(base_ck, tuned_ck)
    check_output_path(output, [base, tuned], force)
    if report is not None:
        check_report_path(report, output, [base, tuned])
    layout = model_layout(base_ck)
    selection = plan_targets(layout, target_modules=target_modules, include_embeddings=include_embeddings)
    largest = max((min(base_ck.info(k).shape) for k in selection.targets if len(base_ck.info(k).shape) == 2),
                  default=0)
    if rank is not None and largest and rank > largest:
        # smaller modules are capped at their own min(dims); a rank no targeted matrix can hold is a typo
        raise UsageError(f"--rank {rank} is larger than every targeted matrix (the largest allows rank {largest})")
    options = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "max_rank": max_rank,
               "target_modules": list(target_modules) if target_modules else None,
               "include_embeddings": include_embeddings, "modules_to_save": modules_to_save, "alpha": alpha,
               "svd": svd, "dtype": dtype}
    meta = provenance("extract", options, {"base": base, "tuned": tuned})
    diff = _difference(base_ck, tuned_ck, layout, selection, rule, alpha=alpha, svd=svd, out_dtype=out_dtype,
                       dev=dev, keep_bias_deltas=modules_to_save, on_tensor=on_tensor)
    carried = _carry_rest(diff, layout, selection, tuned, tuned_ck, modules_to_save, out_dtype)
    modules, saved, rows, whole_module_names = diff.modules, carried.saved, diff.rows, carried.whole_module_names
    config, tie = _adapter_config_of(modules, carried, layout, rule, alpha, base)
    config["task_type"], task_note = adapter_task_type(base_ck.config, modules)  # the base's PEFT task
    nest_param_targets(modules)  # target_parameters keys nest as PEFT saves them (experts.base_layer.lora_A)
    tensors = adapter_tensors(modules, saved)

    def report_doc(summary: dict, sizes: dict[str, int]) -> dict:
        doc = _report(Path(summary["output"]), base, tuned, rows, carried.not_carried, whole_module_names, saved,
                      diff.identical, sizes[ADAPTER_WEIGHTS], diff.tuned_bytes, config, carried.use_bias, tie,
                      layout, svd, dev, dtype, summary["files"])
        return {**doc, "bytes": summary["bytes"], "stale_removed": summary["stale_removed"],
                "task_type": config["task_type"], "task_type_note": task_note}

    return write_adapter_dir(output, inputs=[base, tuned], force=force, config=config, tensors=tensors,
                             provenance=meta, report_doc=report_doc, report=report)


def _difference(base_ck: Checkpoint, tuned_ck: Checkpoint, layout: "CheckpointRoles", selection: "TargetSelection",
                rule: RankRule, *, alpha, svd: str, out_dtype: torch.dtype, dev, keep_bias_deltas: bool,
                on_tensor) -> _Difference:
    """Read BASE and TUNED in step, one tensor pair at a time: a LoRA module for every changed target, the
    relative change of every other changed tensor (and Δb of targeted modules' biases, when kept)."""
    found = _Difference()
    roles = layout.roles
    planned_modules = {r.module for r in selection.targets.values()}
    experts = _expert_params(layout, selection, rule, alpha=alpha, svd=svd, out_dtype=out_dtype, dev=dev)
    consumed: set[str] = set()  # stored expert slices already read with their expert

    def pairs_of(param: ExpertParam, e: int, held: dict) -> Pairs:
        """The stored tensors holding expert e: from `held` (a whole stored parameter), else read now."""
        return [(p, *(held.get(p.stored) or (base_ck.read(p.stored), tuned_ck.read(p.stored))))
                for p in param.parts_of(e)]

    order = {k: i for i, k in enumerate(base_ck.keys())}
    try:
        for key in base_ck.keys():  # on-disk order, as iter_tensors
            if key in consumed:
                continue
            role = roles[key]
            if role.kind == "experts" and key in selection.targets:
                # one expert at a time (expert_extract.py): read every stored slice of the experts this one holds
                param = experts[role.param_name]
                held = {key: (base_ck.read(key), tuned_ck.read(key))} if role.part.whole else {}
                for e in ([role.part.expert] if not role.part.whole else range(param.experts)):
                    pairs = pairs_of(param, e, held)
                    for p, b, t in pairs:
                        if p.stored not in consumed:
                            consumed.add(p.stored)
                            if on_tensor:
                                on_tensor(p.stored)
                            found.identical += _same(b, t)
                            param.tuned_bytes += tuned_ck.info(p.stored).nbytes
                    param.add(e, pairs)
                    del pairs
                if param.read_all:
                    made = param.finish(lambda e: pairs_of(param, e, held))
                    if made is not None:
                        found.modules[param.name], row = made
                        found.tuned_bytes += param.tuned_bytes
                        found.rows.append(row)
                del held
                continue
            b, t = base_ck.read(key), tuned_ck.read(key)
            if on_tensor:
                on_tensor(key)
            if torch.equal(b, t) if b.dtype == t.dtype else torch.equal(b.float(), t.float()):
                found.identical += 1
                continue
            if key in selection.targets:
                delta = t.to(dev, torch.float32).sub_(b.to(dev, torch.float32))
                B, A, r, a, stats = lowrank_module(delta, role.kind, rule, alpha=alpha, method=svd,
                                                   out_dtype=out_dtype)
                del delta
                kind, fan_in_fan_out = lora_kind_of(role.kind)
                name = role.param_name if role.kind == "router" else role.module
                found.modules[name] = LoraModule(name, kind, A, B, r, a, a / r, fan_in_fan_out=fan_in_fan_out,
                                                 param=role.param if role.kind == "router" else None)
                m, n = tuned_ck.info(key).shape
                found.tuned_bytes += tuned_ck.info(key).nbytes
                found.rows.append({"name": name, "kind": role.kind, "shape": [m, n], "rank": r, "alpha": a,
                                   **stats, "parameters": r * (m + n), "delta_parameters": m * n})
            else:
                if role.param == "bias" and role.module in planned_modules and keep_bias_deltas:
                    found.bias_deltas[role.module] = t.float() - b.float()
                found.changed_other[key] = _rel_change(b.float(), t.float())
            del b, t
    finally:
        base_ck.close()
        tuned_ck.close()
    # modules in the order of their last stored tensor (an expert parameter completes before its last slice
    # streams by): the adapter config's patterns and the report keep one order however experts are read
    last = {r.param_name if r.kind in PARAM_KINDS else r.module: order[k] for k, r in sorted(
        roles.items(), key=lambda kv: order.get(kv[0], -1)) if k in selection.targets}
    found.modules = dict(sorted(found.modules.items(), key=lambda kv: last[kv[0]]))
    found.rows.sort(key=lambda row: last[row["name"]])
    return found


def _expert_params(layout: "CheckpointRoles", selection: "TargetSelection", rule: RankRule, *, alpha, svd: str,
                   out_dtype: torch.dtype, dev) -> dict[str, ExpertParam]:
    """One per targeted fused expert parameter (expert_extract.py)."""
    keys = layout.keys
    out: dict[str, ExpertParam] = {}
    for r in selection.targets.values():
        if r.kind == "experts" and r.param_name not in out:
            name = r.param_name
            out[name] = ExpertParam(name, keys.shapes[name], name in keys.transposed, keys.params[name], rule,
                                    alpha, svd, out_dtype, SEED, dev)
    return out


def _same(b: torch.Tensor, t: torch.Tensor) -> bool:
    """BASE and TUNED hold the same values (a 3-D stored tensor compared one expert at a time in float32)."""
    if b.dtype == t.dtype:
        return torch.equal(b, t)
    return all(torch.equal(x.float(), y.float()) for x, y in zip(b, t)) if b.dim() == 3 else \
        torch.equal(b.float(), t.float())


# Note: tensors LoRA cannot carry.
#     Norms, biases, position tables of non-targeted embeddings, ... A changed one is listed (name, shape,
#     reason, ‖Δ‖/‖W‖). With `modules_to_save=True` they are carried exactly instead: a module that is not
#     a LoRA candidate (a norm) goes to PEFT's `modules_to_save` with all its TUNED parameters; the changed
#     bias of a LoRA-targeted module goes to `lora_B.bias` (PEFT's lora_bias, stored as Δb / scale), which
#     PEFT allows only when every targeted module has a base bias and none is an embedding; otherwise the
#     bias is listed. Modules excluded by choice (--target-modules, embeddings without
#     include_embeddings) are never carried whole behind the user's back: they are listed.


def _carry_rest(diff: _Difference, layout: "CheckpointRoles", selection: "TargetSelection", tuned, tuned_ck: Checkpoint,
                modules_to_save: bool, out_dtype: torch.dtype) -> _Carried:
    """What the LoRA modules do not carry: whole modules and lora_bias under --modules-to-save, else listed
    (see the module note). Refuses an extraction that would carry nothing."""
    roles, modules = layout.roles, diff.modules
    not_carried: list[dict] = []
    saved: dict[str, torch.Tensor] = {}
    bias_reason = "bias of a LoRA-targeted module (--modules-to-save carries it as PEFT's lora_bias)"
    use_bias = False
    if modules_to_save and any(m in modules for m in diff.bias_deltas):
        blocker = _lora_bias_blocker(modules, roles)
        if blocker is None:
            use_bias = True
            for name, m in modules.items():
                db = diff.bias_deltas.get(name, torch.zeros(m.B.shape[0]))
                m.bias = (db / m.scale).to(out_dtype)
        else:
            bias_reason = blocker
    excluded_modules = {roles[k].module for k in selection.excluded}
    # modules whose parameters carry LoRA as target_parameters (experts, routers): saving one whole as well
    # would replace the parameters the LoRA adapts; so would a module holding LoRA-targeted submodules
    # (GPT-OSS attention's own `sinks` beside q_proj...)
    param_modules = {m.name[: -len(m.param) - 1] for m in modules.values() if m.param}
    lora_paths = [n[: -len(m.param) - 1] if m.param else n for n, m in modules.items()]
    whole_modules = set()
    for key in sorted(diff.changed_other):
        r = roles[key]
        if r.param == "bias" and r.module in modules:
            if use_bias:
                continue
            why = bias_reason
        elif key in selection.excluded:
            why = selection.excluded[key]
        elif layout.keys is not None and key in layout.keys.unconverted:
            why = f"{layout.keys.unconverted[key]}; loratools does not follow that conversion"
        elif r.module in excluded_modules:
            why = "belongs to a module excluded from the LoRA targets"
        elif r.module in param_modules:
            why = (f"{r.param} of {r.module}, whose parameters carry LoRA (target_parameters, which has no "
                   f"lora_bias); saving the module whole would replace them")
        elif modules_to_save and any(n.startswith(r.module + ".") for n in lora_paths):
            why = (f"{r.param} of {r.module}, which holds LoRA-targeted modules; saving it whole "
                   f"(modules_to_save) would replace them")
        elif modules_to_save:
            whole_modules.add(r.module)  # norms, and biases of Linear modules whose weight did not change
            continue
        else:
            what = r.module_type if r.module_type != "?" else "tensor"
            why = f"{what} {r.param}: not a LoRA weight (--modules-to-save carries it whole)"
        not_carried.append({"name": key, "shape": list(tuned_ck.info(key).shape),
                            "rel_change": diff.changed_other[key], "reason": why})
    if whole_modules:
        with Checkpoint(tuned) as ck:
            for key, r in roles.items():
                if r.module in whole_modules:
                    saved[f"{r.module}.{r.param}"] = ck.read(key)
    if not modules and not saved:
        what = f"; {len(not_carried)} other tensor(s) differ but cannot be carried " \
               f"({_few([n['name'] for n in not_carried])})" if not_carried else ""
        raise InputError(f"nothing to extract: no targeted weight differs between BASE and TUNED{what}", path=tuned)
    return _Carried(not_carried, saved, sorted(whole_modules), use_bias)


# Note: tied heads.
#     A model with tie_word_embeddings stores no lm_head.weight; its head is the input embedding. When the
#     input embedding is targeted, the adapter sets PEFT's `ensure_weight_tying`, so the head gets the
#     same (transposed) LoRA and the forward pass matches TUNED, whose head moved with its embedding.


def _adapter_config_of(modules: dict[str, LoraModule], carried: _Carried, layout: "CheckpointRoles", rule: RankRule,
                       alpha, base) -> tuple[dict, bool]:
    """(adapter_config.json's dict, whether the head is tied to the extracted embedding)."""
    ranks = {n: m.r for n, m in modules.items()}
    r0 = most_common_rank(ranks.values(), default=rule.rank or 8)
    rank_pattern = {n: r for n, r in ranks.items() if r != r0}
    alpha_pattern = {n: r for n, r in rank_pattern.items()} if alpha is None else {}
    tie = layout.tied_head and any(m.kind == "embedding" and n == layout.input_embedding for n, m in modules.items())
    names = [n for n, m in modules.items() if not m.param]
    params = sorted(n for n, m in modules.items() if m.param)
    if tie and layout.head:
        # PEFT recognises a tied target by the leaf names embed_tokens / lm_head only; naming the head makes
        # it tie the head's LoRA to the embedding's (GPT-2's wte is not on its list). No head tensors are
        # saved: PEFT creates them as views of the embedding factors.
        names.append(layout.head)
    config = adapter_config(
        r=r0, lora_alpha=float(r0) if alpha is None else alpha, target_modules=names,
        base_model_name_or_path=str(base), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values()), lora_bias=carried.use_bias,
        modules_to_save=carried.whole_module_names or None, **({"ensure_weight_tying": True} if tie else {}),
        **({"target_parameters": params} if params else {}))
    return config, tie


def _lora_bias_blocker(modules: dict[str, LoraModule], roles) -> str | None:
    """Why PEFT's lora_bias cannot carry the targeted modules' bias changes, or None when it can."""
    if any(m.kind == "embedding" for m in modules.values()):
        return "bias of a LoRA-targeted module: PEFT's lora_bias cannot be combined with an embedding target"
    if any(m.param for m in modules.values()):
        return "bias of a LoRA-targeted module: PEFT's lora_bias cannot be combined with target_parameters"
    with_bias = {r.module for r in roles.values() if r.param == "bias"}
    lacking = sorted(n for n in modules if n not in with_bias)
    if lacking:
        return (f"bias of a LoRA-targeted module: PEFT's lora_bias needs a bias on every targeted module "
                f"({lacking[0]} has none)")
    return None


def _report(out, base, tuned, rows, not_carried, whole_module_names, saved, identical, adapter_bytes, delta_bytes, config, use_bias,
            tie, layout, svd, dev, dtype, files) -> dict:
    d2 = sum(r["delta_norm"] ** 2 for r in rows)
    e2 = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)
    ret = sum(r["retained_energy"] * r["delta_norm"] ** 2 for r in rows)
    adapter_params = sum(r["parameters"] for r in rows)
    delta_params = sum(r["delta_parameters"] for r in rows)
    totals = {
        "modules": len(rows),
        "adapter_parameters": adapter_params,
        "delta_parameters": delta_params,
        "adapter_bytes": adapter_bytes,
        "delta_bytes": delta_bytes,
        "size_ratio": adapter_bytes / delta_bytes if delta_bytes else None,
        "rel_error": math.sqrt(e2 / d2) if d2 > 0 else 0.0,
        "retained_energy": ret / d2 if d2 > 0 else 1.0,
        "identical_tensors": identical,
        "not_carried": len(not_carried),
        "carried_whole": len(saved),
    }
    return {
        "kind": "extract",
        "output": str(out),
        "files": sorted(files),
        "base": str(base),
        "tuned": str(tuned),
        "module_kinds_from": layout.source,
        "svd": svd,
        "device": str(dev),
        "dtype": dtype,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "lora_bias": use_bias,
        "ensure_weight_tying": tie,
        "modules": rows,
        "modules_to_save": whole_module_names,
        "carried_whole": [{"name": k, "shape": list(v.shape)} for k, v in sorted(saved.items())],
        "not_carried": not_carried,
        "totals": totals,
    }
