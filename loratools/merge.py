"""`loratools merge` / `loratools unmerge`: fold PEFT LoRA adapters into a base checkpoint, or take them out.

The arithmetic is lora_math's, the plan (what each output tensor is made of) plan.py's; this module streams
the base through them: one base tensor in memory at a time, adapters whole (they are small).

Note: the DoRA record.
    A merged DoRA row is m · (W + ΔW) / ||W + ΔW||: the norm, one number per row, is not recoverable
    from the merged weights. `merge` therefore writes it (float32, a few KB per module) to
    `loratools-dora/norms.safetensors` inside the output, beside the identity (SHA-256) and weight of
    every adapter merged; `unmerge` reads it back and undoes each step as PEFT's `unmerge` does,
    W ← W / (m / norm) − ΔW, in reverse order. The record lives in a subdirectory so that tools that
    load every top-level `*.safetensors` file of a model directory never see it.

Note: per-expert numbers.
    A step on a MoE expert parameter (PEFT target_parameters, or Linear LoRA on one stored expert slice such as
    Mixtral's `experts.e.w1`) changes E matrices at once; the summary's `experts` lists, per expert parameter
    (the model's name, key_layout.py), ‖W'_e − W_e‖_F and ‖W_e‖_F of each expert, measured on the tensors as
    written against the base as read (dequantized, or replaced by a saved tensor), summed over the stored
    tensors the steps change, one expert at a time; `expert_rel_changes` is their ratio.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapter import Adapter, load_adapter
from .device import resolve_device, torch_threads
from .dtypes import FLOAT_DTYPES, cast_floats
from .errors import InputError, MismatchError, UnsupportedError, UsageError
from .init_methods import notes as init_notes
from .io import Checkpoint, TensorSpec, config_with_dtype, provenance
from .io.output import write_checkpoint
from .io.provenance import sha256_file
from .io.safetensors_format import read_header, read_tensor
from .io.durability import Durability
from .io.writer import save_tensors
from .key_layout import KeyLayout, Part, checkpoint_layout
from .lora_math import Step, Workspace
from .peft_types import refuse_mixed
from .plan import MODULES_TO_SAVE, MergePlan, TensorPlan, build_plan
from .qlora_base import MergeBase
from .quantized import DenseView

RECORD_DIR = "loratools-dora"
RECORD_FILE = "norms.safetensors"
RECORD_KEY = "loratools_dora"

PathLike = str | Path


# -- options and output dtypes --------------------------------------------------------------------------

def output_dtype(src: torch.dtype, dtype: str, quantized: bool) -> torch.dtype:
    """The output dtype of a tensor stored as `src`: --dtype for floats (auto: the stored one, float16 for a
    4-bit base), integer tensors unchanged."""
    if dtype == "auto":
        return cast_floats(src, torch.float16 if quantized else None)
    return cast_floats(src, FLOAT_DTYPES[dtype])


def _check_weights(adapters: list, weights) -> list[float]:
    if not weights:
        return [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UsageError(f"--weight given {len(weights)} times for {len(adapters)} adapter(s); give one per "
                         f"adapter, in the same order, or none (each then weighs 1.0)")
    return weights


def _digest(adapter: Adapter) -> str:
    return sha256_file(adapter.path / "adapter_model.safetensors")


def _output_config(base: Checkpoint, dtype: str, dense: DenseView, untie: bool) -> dict | None:
    if base.config is None:
        return None
    cfg = dict(base.config)
    changed = False
    if dense.quantized:
        cfg.pop("quantization_config", None)
        changed = True
    if dtype != "auto" or dense.quantized:
        cfg = config_with_dtype(cfg, "float16" if dtype == "auto" else dtype)
        changed = True
    if untie:
        cfg["tie_word_embeddings"] = False
        changed = True
    return cfg if changed else None


def _all_finite(t: torch.Tensor) -> bool:
    # aminmax propagates NaN and is one fast pass (isfinite is slow on CPU float16)
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _finite_or_fail(out: torch.Tensor, inputs: torch.Tensor | None, key: str, path):
    """Refuse a merge that overflows the output dtype (e.g. a bf16-trained model written as float16).
    `inputs=None`: the inputs are known to be finite."""
    dtype = out.dtype
    if out.is_floating_point() and not _all_finite(out) and (inputs is None or _all_finite(inputs)):
        hint = " (use --dtype bfloat16 or float32)" if dtype == torch.float16 else ""
        raise MismatchError(f"the merged tensor has values outside the {str(dtype).removeprefix('torch.')} "
                            f"range{hint}; nothing was written", path=path, tensor=key)


def _check_options(adapters, weights, dtype: str, device: str):
    """The checks merge and unmerge share, before any file is opened: (adapter paths, weights, device)."""
    adapter_paths = [Path(a) for a in adapters]
    if not adapter_paths:
        raise UsageError("give at least one adapter")
    if dtype not in ("auto", *FLOAT_DTYPES):
        raise UsageError(f"--dtype must be auto, float16, bfloat16 or float32, not {dtype!r}")
    return adapter_paths, _check_weights(adapter_paths, weights), resolve_device(device)


def _norm_key(s: Step) -> str:
    """The DoRA record's name for the norm of step `s`."""
    return f"adapter{s.adapter_index}.{s.module.name}.weight_norm"


# -- merge ---------------------------------------------------------------------------------------------

def merge_checkpoint(base: PathLike, adapters: Sequence[PathLike], output: PathLike, *,
                     weights: Sequence[float] | None = None, dtype: str = "auto", device: str = "auto",
                     max_shard_size: int, force: bool = False,
                     on_tensor: Callable[[str], None] | None = None, trained_on: str | None = None,
                     into_dequantized: str | None = None) -> dict:
    """Fold PEFT LoRA adapters into a base checkpoint and write a dense checkpoint, as PEFT's
    `merge_and_unload()` computes it (float32, rounded once; DoRA norms recorded for `unmerge`).

    Args:
        base: checkpoint directory or .safetensors file (dense, or a bitsandbytes 4-bit checkpoint, which is
            dequantized on the fly).
        adapters: PEFT adapter directories, applied in this order.
        output: directory to write; written atomically, refused if it exists unless `force`.
        weights: one factor per adapter on its delta (default 1.0 each).
        dtype: output float dtype: "auto" (the base's; float16 for a 4-bit base), "float16", "bfloat16"
            or "float32".
        device: "auto", "cpu" or "cuda".
        max_shard_size: largest output shard in bytes.
        force: replace an existing output once the new one is complete.
        on_tensor: called with each output tensor's name as it is written.
        trained_on: what the adapters were trained on, "auto" (detected), "fp", "nf4" or "fp4" (qlora_base.py).
        into_dequantized: "nf4"/"fp4": merge into BASE's 4-bit dequantization, deq(Q(W)) + ΔW.

    Returns:
        The summary: output path, files, bytes, tensors and changed_tensors, per-adapter details,
        replaced_tensors, untied_head, dequantized_base, dtypes, device, dora_record (or None) and qlora
        (None, or which base a QLoRA adapter was folded into and what the other would have cost).

    Example:
        >>> summary = merge_checkpoint("fixtures/tiny-llama", ["fixtures/llama-lora"], "/tmp/merged",
        ...                            max_shard_size=5 << 30)
        >>> summary["changed_tensors"]
        8
    """
    adapter_paths, weights, dev = _check_options(adapters, weights, dtype, device)
    ck = Checkpoint(base)
    ads = [load_adapter(p, base=base, typed=True) for p in adapter_paths]  # any format: the base names kohya/GGUF modules
    refuse_mixed(ads, weights)  # a LoHa, LoKr, ... adapter (peft_types) merges alone
    plan = build_plan(ck, ads, weights)
    qlora = MergeBase(ck, adapter_paths, trained_on, into_dequantized, dev)  # which base: 16-bit or deq(Q(W))
    dense = qlora.view
    specs = [TensorSpec(n, output_dtype(dt, dtype, dense.quantized), shape) for n, (dt, shape) in dense.specs.items()]
    if plan.untied_head_source:
        dt, shape = dense.specs[plan.untied_head_source]
        specs.append(TensorSpec(plan.untied_head_key, output_dtype(dt, dtype, dense.quantized), shape))
    out_dtype = {s.name: s.dtype for s in specs}
    readers: dict[str, list[str]] = {}  # base tensor -> the output tensors computed from it
    for s in specs:
        p = plan.tensors.get(s.name)
        readers.setdefault(p.source if p else s.name, []).append(s.name)
    norms: dict[str, torch.Tensor] = {}
    ws = Workspace()
    experts = ExpertChanges(plan, checkpoint_layout(ck))

    def untouched(name: str) -> bool:
        return readers.get(name) == [name] and name not in plan.tensors and dense.stored_as_is(name, out_dtype[name])

    def tensors():
        for name, t in dense.iter_tensors(untouched):
            if not isinstance(t, torch.Tensor):
                yield name, t  # copied file to file
                continue
            for key in readers.get(name, ()):
                out = _merged_tensor(plan.tensors.get(key), key, t, out_dtype[key], dev, ws, norms, base)
                qlora.observe(plan.tensors.get(key), t, ws)
                if key in experts.parts:  # against the base as PEFT loads it (a saved replacement included)
                    p = plan.tensors[key]
                    experts.add(key, p.replacement.to(t.dtype) if p.replacement is not None else t, out)
                yield key, out
            del t

    def record(tmp: Path, durability: Durability) -> list[str]:
        return _write_dora_record(tmp, norms, adapter_paths, ads, weights, dev, durability) if norms else []

    options = {"weights": weights, "dtype": dtype, "device": device, "max_shard_size": max_shard_size,
               **qlora.options()}
    with torch_threads(1, dev):
        summary = write_checkpoint(
            output, inputs=[base, *adapter_paths], force=force, specs=specs, tensors=tensors(),
            side_files=ck.non_weight_files(),
            config=_output_config(ck, dtype, dense, plan.untied_head_source is not None),
            provenance=provenance("merge", options, {"base": base, "adapters": [str(p) for p in adapter_paths]}),
            max_shard_size=max_shard_size, on_tensor=on_tensor, extra_files=record)
    summary.update(_summary(plan, ads, adapter_paths, weights, dev, specs, dense))
    summary["dora_record"] = f"{RECORD_DIR}/{RECORD_FILE}" if norms else None
    summary["experts"] = experts.rows()
    summary["qlora"] = qlora.summary()
    return summary


def _merged_tensor(p: TensorPlan | None, key: str, t: torch.Tensor, out_dtype: torch.dtype, dev, ws: Workspace,
                   norms: dict[str, torch.Tensor], base) -> torch.Tensor:
    """Output tensor `key` from base tensor `t` (on the CPU); DoRA norms go into `norms`."""
    if p is None:
        return t.to(out_dtype).cpu()
    w = p.replacement.to(t.dtype) if p.replacement is not None else t  # as PEFT loads it into the base model
    checked = bool(p.steps) and w.is_floating_point()
    if checked and not _all_finite(w):
        # a corrupt base tensor: adding a delta would hide where the NaN/Inf came from
        raise InputError("base tensor holds NaN/Inf values; refusing to merge into it", path=base, tensor=key)
    if p.steps:
        out, step_norms = p.part.merge(w, p.steps, dev, out_dtype, ws)
        norms.update((_norm_key(s), n.cpu()) for s, n in zip(p.steps, step_norms) if n is not None)
    else:
        out = w.to(out_dtype)
    _finite_or_fail(out, None if checked else w, key, base)
    return out.cpu()


def _write_dora_record(tmp: Path, norms: dict[str, torch.Tensor], adapter_paths: list[Path], ads: list[Adapter],
                       weights: list[float], dev: torch.device, durability: Durability) -> list[str]:
    """The DoRA record (see the module note) inside the temporary output; returns its files."""
    (tmp / RECORD_DIR).mkdir()
    meta = {RECORD_KEY: json.dumps({
        "adapters": [{"name": p.name, "sha256": _digest(a), "weight": w, "dora": a.use_dora or
                      any(m.magnitude is not None for m in a.modules.values())}
                     for p, a, w in zip(adapter_paths, ads, weights)],
        "device": dev.type}, sort_keys=True)}
    files = save_tensors(tmp / RECORD_DIR, dict(sorted(norms.items())), filename=RECORD_FILE,
                         allow_shards=False, metadata=meta, durability=durability)
    return [f"{RECORD_DIR}/{f}" for f in files]


def expert_change_norms(before: torch.Tensor, after: torch.Tensor, part: Part) -> list[tuple[int, float, float]]:
    """(expert, ‖after_e − before_e‖², ‖before_e‖²) for the experts a stored tensor holds (a whole [E, ...]
    parameter, or one expert's slice), in float64 sums, one expert at a time."""
    def sq(x: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2

    pairs = zip(range(before.shape[0]), before, after) if part.whole else [(part.expert, before, after)]
    return [(e, sq(a.float() - b.float()), sq(b)) for e, b, a in pairs]


class ExpertChanges:
    """Per-expert change of the expert parameters a merge or unmerge writes (see Note: per-expert numbers)."""

    def __init__(self, plan: MergePlan, layout: KeyLayout):
        self.parts: dict[str, Part] = {}  # stored key -> its place in an expert parameter
        for key, p in plan.tensors.items():
            part = layout.parts.get(key)
            if part is None or not p.steps or p.is_bias or part.param not in layout.shapes:
                continue
            if part.expert is not None or any(s.module.kind == "experts" for s in p.steps):
                self.parts[key] = part
        self.experts = {part.param: layout.shapes[part.param][0] for part in self.parts.values()}
        self.sums: dict[str, list[list[float]]] = {n: [[0.0, 0.0] for _ in range(E)] for n, E in self.experts.items()}
        self.stored: dict[str, list[str]] = {n: [] for n in self.experts}

    def add(self, key: str, before: torch.Tensor, after: torch.Tensor) -> None:
        part = self.parts.get(key)
        if part is None:
            return
        self.stored[part.param].append(key)
        for e, d2, w2 in expert_change_norms(before, after, part):
            self.sums[part.param][e][0] += d2
            self.sums[part.param][e][1] += w2

    def rows(self) -> list[dict]:
        out = []
        for name in sorted(self.sums):
            d = [math.sqrt(x) for x, _ in self.sums[name]]
            w = [math.sqrt(y) for _, y in self.sums[name]]
            # None: a zero base expert that changed has no ratio (and JSON has no Infinity)
            rel = [x / y if y > 0 else (0.0 if x == 0 else None) for x, y in zip(d, w)]
            out.append({"name": name, "experts": self.experts[name], "stored": sorted(self.stored[name]),
                        "expert_delta_norms": d, "expert_base_norms": w, "expert_rel_changes": rel})
        return out


def _summary(plan: MergePlan, ads, paths, weights, dev, specs, dense) -> dict:
    dtypes = sorted({str(s.dtype).removeprefix("torch.") for s in specs if s.dtype.is_floating_point})
    return {
        "tensors": len(specs),
        "changed_tensors": len(plan.tensors),
        "adapters": [{"path": str(p), "weight": w, "modules": len(a.modules), "dora": any(
            m.magnitude is not None for m in a.modules.values()), "saved_tensors": sorted(a.saved)}
            for p, a, w in zip(paths, ads, weights)],
        "replaced_tensors": sorted(k for k, p in plan.tensors.items() if p.replacement is not None),
        "untied_head": plan.untied_head_source is not None,
        "dequantized_base": dense.quantized,
        "dtypes": dtypes,
        "device": dev.type,
        "notes": init_notes(ads),  # an adapter that belongs to a residual base (PiSSA, LoftQ, ...): init_methods.py
    }


# -- unmerge -------------------------------------------------------------------------------------------

def read_dora_record(ck: Checkpoint) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The DoRA record `merge` wrote into checkpoint `ck`: (its metadata, the norms), or None."""
    path = ck.dir / RECORD_DIR / RECORD_FILE
    if not path.is_file():
        return None
    infos, meta = read_header(str(path))
    try:
        info = json.loads(meta[RECORD_KEY])
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"DoRA record has no readable {RECORD_KEY!r} metadata", path=path) from None
    with open(path, "rb", buffering=0) as fh:
        return info, {k: read_tensor(i, fh) for k, i in infos.items()}


def _check_dora_unmerge(ck: Checkpoint, plan: MergePlan, ads: list[Adapter], paths, weights):
    """Norms for the DoRA steps, or a clear refusal when they cannot be known."""
    rec = read_dora_record(ck)
    touched = {s.module.name for p in plan.tensors.values() for s in p.steps}
    if rec is None:
        if plan.dora_steps:
            dora = next(p for p, a in zip(paths, ads) if any(m.magnitude is not None for m in a.modules.values()))
            raise UnsupportedError(
                f"adapter {dora} is a DoRA adapter and this checkpoint carries no {RECORD_DIR}/{RECORD_FILE} "
                f"record: a DoRA merge cannot be undone from the merged weights alone (each merged row is "
                f"m·(W+ΔW)/||W+ΔW|| and the norm is lost). Unmerge works on outputs of `loratools merge`, "
                f"which records the norms", path=ck.path)
        return {}
    info, norms = rec
    recorded_modules = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in norms}
    if not plan.dora_steps and not (touched & recorded_modules):
        return {}
    want = [(a["sha256"], float(a["weight"])) for a in info["adapters"]]
    given = [(_digest(a), w) for a, w in zip(ads, weights)]
    if want != given:
        names = ", ".join(f"{a['name']} (weight {a['weight']})" for a in info["adapters"])
        raise MismatchError(f"this checkpoint was merged with DoRA: its record says the adapters were {names}, in "
                            f"that order; DoRA merges are undone exactly only in one go, so give the same adapters "
                            f"(same files) in the same order with the same --weight", path=ck.path)
    return norms


def _refuse_replaced(plan: MergePlan, adapter_paths: list[Path]) -> None:
    for p in plan.tensors.values():
        if p.replacement_kind == MODULES_TO_SAVE:
            holder = adapter_paths[p.replacement_adapter_index]
            raise UnsupportedError(
                f"adapter {holder} replaced this tensor whole (modules_to_save); the base's original values are "
                f"not in the merged checkpoint, so unmerge cannot restore them", path=holder, tensor=p.key)


def unmerge_checkpoint(merged: PathLike, adapters: Sequence[PathLike], output: PathLike, *,
                       weights: Sequence[float] | None = None, dtype: str = "auto", device: str = "auto",
                       max_shard_size: int, force: bool = False,
                       on_tensor: Callable[[str], None] | None = None) -> dict:
    """Take adapters back out of a merged checkpoint: subtract the deltas `merge_checkpoint` added, in
    reverse order, undoing DoRA steps with the norms merge recorded.

    Args:
        merged: a dense checkpoint (an output of `merge_checkpoint` for DoRA adapters).
        adapters: the adapters the merge used, in the same order.
        output: directory to write; written atomically, refused if it exists unless `force`.
        weights: the weights the merge used (default 1.0 each).
        dtype: output float dtype: "auto" (the merged checkpoint's), "float16", "bfloat16" or "float32".
        device: "auto", "cpu" or "cuda".
        max_shard_size: largest output shard in bytes.
        force: replace an existing output once the new one is complete.
        on_tensor: called with each output tensor's name as it is written.

    Returns:
        The summary (as `merge_checkpoint`'s), with dora_record_used.

    Example:
        >>> _ = merge_checkpoint("fixtures/tiny-llama", ["fixtures/llama-dora"], "/tmp/m", max_shard_size=5 << 30)
        >>> unmerge_checkpoint("/tmp/m", ["fixtures/llama-dora"], "/tmp/base",
        ...                    max_shard_size=5 << 30)["dora_record_used"]
        True
    """
    adapter_paths, weights, dev = _check_options(adapters, weights, dtype, device)
    ck = Checkpoint(merged)
    if ck.is_quantized:
        raise InputError("this is a 4-bit checkpoint; unmerge works on the dense checkpoint `merge` wrote", path=merged)
    ads = [load_adapter(p, base=merged, typed=True) for p in adapter_paths]  # the merged checkpoint has the base's names
    refuse_mixed(ads, weights)
    plan = build_plan(ck, ads, weights, untie=False)
    _refuse_replaced(plan, adapter_paths)
    norms = _check_dora_unmerge(ck, plan, ads, adapter_paths, weights)
    dense = DenseView(ck, dev)
    specs = [TensorSpec(n, output_dtype(dt, dtype, False), shape) for n, (dt, shape) in dense.specs.items()]
    out_dtype = {s.name: s.dtype for s in specs}
    ws = Workspace()
    experts = ExpertChanges(plan, checkpoint_layout(ck))

    def compute(key: str, t: torch.Tensor) -> torch.Tensor:
        p = plan.tensors.get(key)
        if p is None or not p.steps:
            return t.to(out_dtype[key]).cpu()
        step_norms = [norms[_norm_key(s)] if s.variant.records_norm and not p.is_bias else None for s in p.steps]
        out = p.part.unmerge(t, p.steps, step_norms, dev, out_dtype[key], ws)
        _finite_or_fail(out, t, key, merged)
        out = out.cpu()
        experts.add(key, t, out)  # the change unmerge makes to each expert (of the merged one)
        return out

    def untouched(name: str) -> bool:
        p = plan.tensors.get(name)
        return (p is None or not p.steps) and dense.stored_as_is(name, out_dtype[name])

    def tensors():
        for name, t in dense.iter_tensors(untouched):
            yield name, compute(name, t) if isinstance(t, torch.Tensor) else t
            del t

    config = config_with_dtype(ck.config, dtype) if ck.config is not None and dtype != "auto" else None
    options = {"weights": weights, "dtype": dtype, "device": device, "max_shard_size": max_shard_size}
    with torch_threads(1, dev):
        summary = write_checkpoint(
            output, inputs=[merged, *adapter_paths], force=force, specs=specs, tensors=tensors(),
            side_files=ck.non_weight_files(), config=config,
            provenance=provenance("unmerge", options, {"merged": merged, "adapters": [str(p) for p in adapter_paths]}),
            max_shard_size=max_shard_size, on_tensor=on_tensor)
    summary.update(_summary(plan, ads, adapter_paths, weights, dev, specs, dense))
    summary["dora_record_used"] = bool(norms)
    summary["experts"] = experts.rows()
    return summary


__all__ = ["RECORD_DIR", "RECORD_FILE", "ExpertChanges", "expert_change_norms", "merge_checkpoint", "output_dtype",
           "read_dora_record", "unmerge_checkpoint"]
