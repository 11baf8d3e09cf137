"""`loratools combine`: several LoRA adapters of one base model → one PEFT adapter.

The per-module maths lives in combine_methods.py (one small function per method); this file checks the
inputs against each other, runs a method module by module and writes the result. Adapters are small, so
they are read whole; no base model is needed.

Note: what is refused, before anything is written.
    Options that do not fit the method (usage, exit 2); DoRA adapters (the magnitude vector renormalizes
    W + ΔW as a whole, so DoRA updates do not add); a module adapted with different base shapes, kinds
    (linear vs embedding) or layouts (fan_in_fan_out); adapters naming different base models (see
    `base_model_of`); whole-module tensors (modules_to_save, saved embedding base layers) that differ
    between adapters, or that one adapter saves whole while another puts LoRA on the same module;
    lora_bias with the task-arithmetic methods (their pruning is defined on weights; the bias of `cat` and
    `linear` is exact: Σ wᵢ·sᵢ·biasᵢ in lora_B.bias at scale 1) and lora_bias next to an embedding module
    (PEFT cannot load that).

Note: what is carried through.
    Whole-module tensors held by one adapter, or bit-identical in all that hold them, are copied as they
    are; a weight cannot apply to a replacement, so a weight other than 1 on their holder is a warning.

Note: the output's shape.
    Scale 1 everywhere (lora_alpha = r, no rsLoRA), so B·A is the combined delta itself. `r` is the most
    common output rank (ranks.most_common_rank: the larger on a tie); other modules get their rank (and alpha = rank) in rank_pattern / alpha_pattern
    under their full name, which under PEFT's `(.*\\.)?(key)$` rule matches that module only.
    target_modules is the union of the inputs' lists of names when every input gives a plain list (those
    match exactly the union of the modules the inputs adapt); otherwise the full module names.
    Factors are written in the inputs' common float dtype (float32 when they differ).

Note: MoE experts (PEFT target_parameters).
    A targeted 3-D expert parameter is combined expert by expert: each method sees expert e's deltas
    B_e·A_e·scale exactly as it sees a module's (so cat and linear stay exact sums, and ties / dare_* /
    magnitude_prune prune and elect signs within each expert, as they would on per-expert Linear modules;
    DARE masks are seeded by `<parameter>.<e>`). PEFT has one r per parameter, so the output rank of a
    parameter is the largest any expert needs and every expert keeps that many components
    (lowrank.truncate_experts). target_parameters is the union of the inputs'; each parameter keeps its
    saved nesting (`...experts.base_layer.lora_A`), recomputed as PEFT nests the union when the inputs
    target different parameters of one module. rank_pattern entries are keyed by the parameter's path,
    which is what PEFT matches them against (PEFT 0.21 then warns that they "did not match any targeted
    module"; its check looks at module names only, and it applies them).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapter import Adapter, LoraModule, adapter_config, adapter_tensors, load_adapter, nest_param_targets
from .combine_methods import METHODS, CombineOptions, ModuleJob, Term, names
from .device import resolve_device, torch_threads
from .errors import InputError, MismatchError, UnsupportedError, UsageError
from .init_methods import notes as init_notes
from .io import check_output_path, provenance
from .io.output import check_report_path, write_adapter_dir
from .lora_math import pack_expert_factors, stored_transposed, variant_of
from .lowrank import truncate_experts
from .ranks import check_ranges, most_common_rank
from .task_types import common_task_type

log = logging.getLogger("loratools")

# Note: one CPU thread for small work.
#     cat and linear only touch thin matrices ([out, Σr], a Σr×Σr core). There the thread pool costs more
#     than it gives: measured here, a 704×32 QR + 32×32 SVD took 0.6 ms on one thread and 250-300 ms on
#     two when the cores were shared with other work (OpenMP workers waiting on each other). The same holds
#     for the task-arithmetic methods on small modules (ties + rank-16 SVD of a 256×704 delta: 90 ms on one
#     thread, 1.5 s on two, under load). So on CPU the factored methods, and the dense ones for modules
#     under 2^20 elements, run with torch.set_num_threads(1), restored afterwards; larger dense modules keep
#     the pool, where an idle machine's cores pay off for the SVD.
SMALL_DENSE = 2**20  # elements; below it a dense module's maths runs on one CPU thread (see the note)


def check_options(n_adapters: int, method: str, *, weights=None, rank=None, energy=None, density=None,
                  majority_sign=None, seed=None) -> CombineOptions:
    """Every option checked against the method (UsageError, exit 2) before any file is read."""
    spec = METHODS.get(method)
    if spec is None:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if n_adapters < 2:
        raise UsageError(f"combine needs at least two adapters, got {n_adapters}")
    weights = [1.0] * n_adapters if not weights else [float(w) for w in weights]
    if len(weights) != n_adapters:
        raise UsageError(f"{len(weights)} --weight values for {n_adapters} adapters: give one per adapter, in "
                         f"order, or none (all 1)")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("--weight values must be finite numbers")
    if not spec.truncates and (rank is not None or energy is not None):
        raise UsageError(f"--method {method} is the exact sum (rank Σ rᵢ); use --method linear to truncate with "
                         f"--rank / --energy")
    check_ranges(rank=rank, energy=energy)
    if spec.needs_density:
        if density is None:
            raise UsageError(f"--method {method} needs --density (the fraction of each delta to keep, in (0, 1])")
        if not (0 < density <= 1):
            raise UsageError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise UsageError(f"--density applies to {', '.join(names('needs_density'))}, not to --method {method}")
    if majority_sign is not None:
        if not spec.elects_sign:
            raise UsageError(f"--majority-sign applies to {', '.join(names('elects_sign'))}, not to --method {method}")
        if majority_sign not in ("total", "frequency"):
            raise UsageError(f"--majority-sign must be total or frequency, not {majority_sign!r}")
    elif spec.elects_sign:
        majority_sign = "total"
    if seed is not None and not spec.random_masks:
        raise UsageError(f"--seed applies to {', '.join(names('random_masks'))} (random masks), not to --method "
                         f"{method}")
    if spec.random_masks and seed is None:
        seed = 0
    return CombineOptions(method, weights, None if rank is None else int(rank), energy, density, majority_sign,
                          None if seed is None else int(seed))


# -- checking the adapters against each other -------------------------------------------------------------

@dataclass
class ModulePlan:
    name: str
    kind: str
    fan_in_fan_out: bool
    base_shape: tuple[int, ...]
    sources: list[tuple[int, LoraModule]] = field(default_factory=list)
    param: str | None = None  # a target_parameters entry (LoraModule.param)
    experts: int = 1

    @property
    def transposed(self) -> bool:
        """Whether the base weight is (B·A)ᵀ: Conv1D (fan_in_fan_out) and embeddings."""
        return stored_transposed(self.kind, self.fan_in_fan_out)


def plan_modules(adapters: list[Adapter]) -> dict[str, ModulePlan]:
    plans: dict[str, ModulePlan] = {}
    for i, ad in enumerate(adapters):
        if ad.use_dora or not all(variant_of(m).additive for m in ad.modules.values()):
            raise UnsupportedError("DoRA adapters cannot be combined: the magnitude vector rescales W + ΔW as a "
                                   "whole, so DoRA updates do not add", path=ad.path)
        for name, m in ad.modules.items():
            p = plans.setdefault(name, ModulePlan(name, m.kind, m.fan_in_fan_out, m.base_shape, param=m.param,
                                                  experts=m.experts))
            first = adapters[p.sources[0][0]].path if p.sources else ad.path
            if m.kind != p.kind:
                raise MismatchError(f"this is a {m.kind} LoRA here but a {p.kind} LoRA in {first}",
                                    path=ad.path, tensor=name)
            if (m.param is None) != (p.param is None):
                raise MismatchError(f"is a {'target_parameters' if m.param else 'target_modules'} entry here but a "
                                    f"{'target_parameters' if p.param else 'target_modules'} entry in {first}",
                                    path=ad.path, tensor=name)
            if m.base_shape != p.base_shape:
                raise MismatchError(f"adapts a base weight of shape {list(m.base_shape)}, but {first} adapts "
                                    f"{list(p.base_shape)}: the adapters are for different base models",
                                    path=ad.path, tensor=name)
            if m.fan_in_fan_out != p.fan_in_fan_out:
                raise MismatchError(f"fan_in_fan_out={m.fan_in_fan_out} here but {p.fan_in_fan_out} in {first}: "
                                    f"the factors are in different layouts", path=ad.path, tensor=name)
            p.sources.append((i, m))
    if not plans:
        raise InputError("the adapters hold no LoRA modules to combine", path=adapters[0].path)
    for p in plans.values():  # PEFT cannot wrap a module's parameter and the module itself
        module = p.name[: -len(p.param) - 1] if p.param else None
        if module in plans:
            i, j = p.sources[0][0], plans[module].sources[0][0]
            raise MismatchError(f"{adapters[i].path} adapts parameter {p.name} (target_parameters) but "
                                f"{adapters[j].path} adapts its module {module} (target_modules); one adapter "
                                f"cannot hold both", path=adapters[i].path, tensor=p.name)
    layouts = {}  # fan_in_fan_out -> first adapter with such linear modules
    for p in plans.values():
        if p.kind == "linear":
            layouts.setdefault(p.fan_in_fan_out, (adapters[p.sources[0][0]].path, p.name))
    if len(layouts) > 1:
        (a, ma), (b, mb) = layouts[True], layouts[False]
        raise MismatchError(f"uses fan_in_fan_out (Conv1D layout, e.g. {ma}) but {b} does not (e.g. {mb}); "
                            f"one adapter config cannot hold both", path=a)
    return dict(sorted(plans.items()))


def base_model_of(adapters: list[Adapter], warnings: list[str]) -> str | None:
    """The common base_model_name_or_path. Different names are refused, unless they differ only in where the
    model lives (same last path component, e.g. a hub id and a local copy): that is a warning."""
    named = [(ad.base_model, ad.path) for ad in adapters if ad.base_model]
    if not named:
        return None
    first, first_path = named[0]
    for name, path in named[1:]:
        if name == first:
            continue
        if Path(name.rstrip("/")).name == Path(first.rstrip("/")).name:
            warnings.append(f"{path} names base model {name!r}, {first_path} names {first!r}; taking {first!r}")
            continue
        raise MismatchError(f"adapter is for base model {name!r} but {first_path} is for {first!r}", path=path)
    return first


def common_value(adapters: list[Adapter], key: str, warnings: list[str] | None = None):
    values = [ad.config.get(key) for ad in adapters]
    if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
        if warnings is None:
            raise MismatchError(f"adapters disagree on {key}: " + ", ".join(f"{ad.path.name}={v!r}"
                                                                            for ad, v in zip(adapters, values)),
                                path=adapters[0].path)
        warnings.append(f"adapters disagree on {key} ({', '.join(repr(v) for v in values)}); taking {values[0]!r}")
    return values[0]


def carried_tensors(adapters: list[Adapter], plans: dict[str, ModulePlan], weights: list[float],
                    warnings: list[str]) -> dict[str, torch.Tensor]:
    """Whole-module tensors (modules_to_save, saved embedding base layers): carried through if unique."""
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for i, ad in enumerate(adapters):
        for key, t in sorted(ad.saved.items()):
            module = key.rsplit(".", 1)[0]
            if module in plans and module not in ad.modules:
                raise MismatchError(f"{module} is saved whole (modules_to_save) by this adapter but adapted with "
                                    f"LoRA by {adapters[plans[module].sources[0][0]].path}", path=ad.path,
                                    tensor=key)
            if key in out:
                j, prev = out[key]
                if prev.dtype != t.dtype or prev.shape != t.shape or not torch.equal(prev, t):
                    raise MismatchError(f"saved whole by two adapters with different values (also in "
                                        f"{adapters[j].path}); whole-module replacements cannot be combined",
                                        path=ad.path, tensor=key)
                continue
            out[key] = (i, t)
            if weights[i] != 1:
                warnings.append(f"{key} is carried from {ad.path} unchanged; its weight {weights[i]:g} does not "
                                f"apply to a whole-module tensor")
    return {k: t for k, (_, t) in sorted(out.items())}


def check_bias(plans: dict[str, ModulePlan], method: str) -> bool:
    with_bias = [p for p in plans.values() if any(m.bias is not None for _, m in p.sources)]
    if not with_bias:
        return False
    if not METHODS[method].exact:
        raise UnsupportedError(f"lora_bias adapters can be combined with cat or linear only (their bias sum is "
                               f"exact); --method {method} prunes weights", tensor=with_bias[0].name)
    emb = [p.name for p in plans.values() if p.kind == "embedding"]
    if emb:
        raise UnsupportedError("one adapter uses lora_bias and another adapts an embedding: PEFT cannot load "
                               "lora_bias on embeddings", tensor=emb[0])
    return True


def target_modules_of(adapters: list[Adapter], plans: dict[str, ModulePlan]) -> list[str]:
    """target_modules of the output (see Note: the output's shape); target_parameters entries are not modules."""
    names: set[str] = set()
    for ad in adapters:
        t = ad.config.get("target_modules")
        if any(m.param is None for m in ad.modules.values()) and (
                not isinstance(t, list) or ad.config.get("layers_to_transform") is not None
                or ad.config.get("layers_pattern") or ad.config.get("exclude_modules")):
            return sorted(n for n, p in plans.items() if p.param is None)
        names.update(t if isinstance(t, list) else [])
    return sorted(names)


def target_parameters_of(adapters: list[Adapter]) -> list[str] | None:
    """The union of the inputs' target_parameters (PEFT loads one set for all wrappers), or None."""
    names = sorted({t for ad in adapters for t in (ad.config.get("target_parameters") or [])})
    return names or None


# -- the work --------------------------------------------------------------------------------------------


def combine_module(plan: ModulePlan, opts: CombineOptions, device: torch.device, default_rank: int):
    """One module: (lora_B, lora_A at scale 1, bias or None, Truncation).

    MoE experts: the method runs on each expert's delta B_e·A_e·scale as on a module of its own (DARE masks
    seeded by `<name>.<e>`), at one rank for the parameter (lowrank.truncate_experts), packed back into
    PEFT's A (R·E, in), B (out, R·E)."""
    if plan.kind == "experts":
        factors = [m.expert_factors() for _, m in plan.sources]  # (A_e, B_e) per source

        def run(e: int, criteria: dict):
            terms = [Term(B_e[e].to(device), A_e[e].to(device), m.scale, opts.weights[i])
                     for (i, m), (A_e, B_e) in zip(plan.sources, factors)]
            return METHODS[opts.method].run(terms, dataclasses.replace(opts, **criteria),
                                            ModuleJob(f"{plan.name}.{e}", False, default_rank))

        tr = truncate_experts(run, plan.experts, {"rank": opts.rank, "energy": opts.energy})
        B_e, A_e = tr.factors(1.0)
        A, B = pack_expert_factors(A_e, B_e)
        return B.cpu(), A.cpu(), None, tr
    terms = [Term(m.B.to(device), m.A.to(device), m.scale, opts.weights[i]) for i, m in plan.sources]
    tr = METHODS[opts.method].run(terms, opts, ModuleJob(plan.name, plan.transposed, default_rank))
    B, A = tr.factors(1.0)
    bias = None
    if any(m.bias is not None for _, m in plan.sources):
        bias = sum(m.bias.float() * (opts.weights[i] * m.scale) for i, m in plan.sources if m.bias is not None)
    return B.cpu(), A.cpu(), bias, tr


def combine_loaded(adapters: list[Adapter], opts: CombineOptions, *, device: str | torch.device = "cpu",
                   on_module: Callable[[str], None] | None = None, release_inputs: bool = False):
    """Check and combine loaded adapters. Returns (modules, saved tensors, config, report rows, warnings).

    release_inputs: drop each input module from its Adapter once combined, so the peak memory is about the
    inputs' size rather than inputs + output (for callers that loaded the adapters only for this).
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    warnings: list[str] = []
    base = base_model_of(adapters, warnings)
    plans = plan_modules(adapters)
    renest = _inconsistent_nesting(adapters)  # before release_inputs empties the inputs
    lora_bias = check_bias(plans, opts.method)
    saved = carried_tensors(adapters, plans, opts.weights, warnings)
    task_type, disagreement = common_task_type([ad.config.get("task_type") for ad in adapters])
    warnings += [disagreement] if disagreement else []
    # a PiSSA/LoftQ/... input belongs to its residual base; the output's config (init_lora_weights true) forgets it
    warnings += [f"{n}; the combined adapter no longer records it" for n in init_notes(adapters)]
    layer_replication = common_value(adapters, "layer_replication")
    modules_to_save = sorted({n for ad in adapters for n in (ad.config.get("modules_to_save") or [])}) or None
    dtypes = {t.dtype for ad in adapters for m in ad.modules.values() for t in (m.A, m.B)}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    default_rank = max(m.r for ad in adapters for m in ad.modules.values())
    targets = target_modules_of(adapters, plans)

    modules: dict[str, LoraModule] = {}
    rows = []
    for name, plan in plans.items():
        small = METHODS[opts.method].exact or math.prod(plan.base_shape) < SMALL_DENSE
        with (torch_threads(1, device) if small else nullcontext()):
            B, A, bias, tr = combine_module(plan, opts, device, default_rank)
        if lora_bias and bias is None:
            bias = torch.zeros(B.shape[0])  # every module gets a lora_B.bias under lora_bias=True
        first = plan.sources[0][1]
        modules[name] = LoraModule(name=name, kind=plan.kind, A=A, B=B, r=tr.rank, alpha=float(tr.rank), scale=1.0,
                                   fan_in_fan_out=plan.fan_in_fan_out,
                                   bias=None if bias is None else bias.cpu(), param=plan.param,
                                   experts=plan.experts, saved_path=first.saved_path)
        rows.append({"name": name, "kind": plan.kind, "sources": [i for i, _ in plan.sources],
                     "input_ranks": [m.r for _, m in plan.sources], "rank": tr.rank,
                     "retained_energy": tr.retained_energy, "rel_error": tr.rel_error, "svd": tr.method})
        if plan.kind == "experts":
            rows[-1] |= {"experts": plan.experts, "expert_rel_errors": [t.rel_error for t in tr.experts],
                         "expert_delta_norms": [t.norm for t in tr.experts]}
        if release_inputs:
            for i, _ in plan.sources:
                adapters[i].modules.pop(name, None)
            plan.sources.clear()
        if on_module:
            on_module(name)

    if renest:
        nest_param_targets(modules)  # the inputs target different parameters: nest the union as PEFT would
    r = most_common_rank((m.r for m in modules.values()), default=default_rank)
    pattern = {n: m.r for n, m in modules.items() if m.r != r}
    extra = {"layer_replication": layer_replication} if layer_replication is not None else {}
    target_parameters = target_parameters_of(adapters)
    if target_parameters:
        extra["target_parameters"] = target_parameters
    config = adapter_config(r=r, lora_alpha=r, target_modules=targets,
                            base_model_name_or_path=base, rank_pattern=pattern, alpha_pattern=pattern,
                            fan_in_fan_out=any(p.fan_in_fan_out for p in plans.values()), lora_bias=lora_bias,
                            modules_to_save=modules_to_save, task_type=task_type, **extra)
    for m in modules.values():
        m.A, m.B = m.A.to(out_dtype), m.B.to(out_dtype)
        if m.bias is not None:
            m.bias = m.bias.to(out_dtype)
    return modules, saved, config, rows, warnings


def _inconsistent_nesting(adapters: list[Adapter]) -> bool:
    """Whether some input targets fewer of a module's parameters than the inputs together do: its wrappers
    are nested (numbered) for its own set, not the union's (two inputs on gate_up_proj alone and down_proj
    alone both save under `experts.lora_A`). Inputs that each target the union nest it as PEFT would."""
    per_input: list[dict[str, set[str]]] = []
    union: dict[str, set[str]] = {}
    for ad in adapters:
        mine: dict[str, set[str]] = {}
        for m in ad.modules.values():
            if m.param:
                mine.setdefault(m.name[: -len(m.param) - 1], set()).add(m.param)
        per_input.append(mine)
        for module, params in mine.items():
            union.setdefault(module, set()).update(params)
    return any(params != union[module] for mine in per_input for module, params in mine.items())


def combine_adapters(adapters: list[str | Path], output: str | Path, *, method: str,
                     weights: list[float] | None = None, rank: int | None = None, energy: float | None = None,
                     density: float | None = None, majority_sign: str | None = None, seed: int | None = None,
                     device: str = "auto", force: bool = False, report: str | None = None,
                     on_module: Callable[[str], None] | None = None, base: str | Path | None = None) -> dict:
    """Combine PEFT LoRA adapters of one base model into one adapter (see the module notes).

    Args:
        adapters: two or more adapters, in any format loratools.formats reads (PEFT, MLX-LM, kohya, GGUF LoRA).
        output: adapter directory to write; written atomically, refused if it exists unless `force`.
        method: a registered method (combine_methods.METHODS): "cat", "linear", "ties", "dare_linear",
            "dare_ties" or "magnitude_prune".
        weights: one weight per adapter (default 1 each; negative subtracts).
        rank: output rank (linear: a cap; task-arithmetic methods: default the largest input rank).
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖², in (0, 1].
        density: fraction of each delta the task-arithmetic methods keep, in (0, 1].
        majority_sign: sign election of ties / dare_ties: "total" (default) or "frequency".
        seed: seed of the DARE masks (default 0).
        device: "auto", "cpu" or "cuda".
        force: replace an existing output once the new one is complete.
        report: also write the returned report as JSON to this file.
        on_module: called with each module's name once it is combined.
        base: the base checkpoint, which kohya and GGUF LoRA inputs need to be read back (their module names).

    Returns:
        The report: output, files, bytes, the options, r and rank_pattern, per-module rows (input ranks, rank,
        retained energy, relative error), max_rel_error, saved_tensors, warnings, stale_removed.

    Example:
        >>> doc = combine_adapters(["fixtures/llama-lora", "fixtures/llama-rslora"], "/tmp/mix", method="linear",
        ...                        rank=8)
        >>> doc["r"]
        8
    """
    opts = check_options(len(adapters), method, weights=weights, rank=rank, energy=energy, density=density,
                         majority_sign=majority_sign, seed=seed)
    dev = resolve_device(device)
    paths = [str(a) for a in adapters]
    inputs = paths + ([str(base)] if base is not None else [])
    check_output_path(output, inputs, force)
    if report is not None:
        check_report_path(report, output, inputs)
    loaded = [load_adapter(p, base=base) for p in paths]  # any format; kohya/GGUF need `base` for module names
    modules, saved, config, rows, warnings = combine_loaded(loaded, opts, device=dev, on_module=on_module,
                                                            release_inputs=True)
    for w in warnings:
        log.warning("%s", w)
    meta = provenance("combine", opts.record(), {"adapters": paths, **({"base": str(base)} if base is not None else {})})
    errors = [row["rel_error"] for row in rows]

    def report_doc(summary: dict, sizes: dict[str, int]) -> dict:
        return {
            "output": summary["output"], "files": summary["files"], "bytes": summary["bytes"],
            "adapters": paths, **opts.record(), "device": str(dev),
            "r": config["r"], "rank_pattern": config["rank_pattern"],
            "modules": rows, "max_rel_error": max(errors), "saved_tensors": sorted(saved),
            "warnings": warnings, "stale_removed": summary["stale_removed"],
        }

    return write_adapter_dir(output, inputs=inputs, force=force, config=config,
                             tensors=adapter_tensors(modules, saved), provenance=meta, report_doc=report_doc,
                             report=report)
