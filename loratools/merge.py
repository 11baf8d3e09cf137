"""`loratools merge` / `loratools unmerge`: fold PEFT LoRA adapters into a base checkpoint, or take them out.

Pure tensor functions first (deltas, DoRA, one base tensor at a time), then the plan (which adapter
touches which base tensor), then `merge_checkpoint()` / `unmerge_checkpoint()`, which stream the base
through them: one base tensor in memory at a time, adapters whole (they are small).

Note: matching PEFT bit for bit.
    PEFT's `merge_and_unload()` (peft 0.21, tuners/lora/layer.py and variants.py) computes, per adapter,
    ΔW = transpose(B @ A, fan_in_fan_out) · scale in float32 (adapter weights are upcast to float32 on
    load) and adds it to the base weight in place, `W.data += ΔW`, which PyTorch evaluates in float32
    and rounds once into W's dtype. We compute the same expression with the same ops in float32 and
    round once, so for one plain LoRA adapter the result is bit-identical on the same device. PEFT
    deviates from "one rounding" in two places, both within one ulp of ours: an embedding delta is
    cast to the weight's dtype before the add (`W += ΔW.to(W.dtype)`), and several adapters are merged
    one after another, rounding after each.

Note: DoRA.
    PEFT's DoraLinearVariant.merge computes `norm = ||W₀ + ΔW||` per output feature with
    `torch.linalg.norm(transpose(W₀) + transpose(ΔW), dim=1)` (W₀ = the base weight in its own dtype,
    ΔW float32, so the sum is float32), then `W ← (m / norm) · (W + ΔW)`, and rounds once. The norm runs
    over the input axis of the [out, in] layout: for a Conv1D (fan_in_fan_out) weight [in, out] and for
    an embedding [num_embeddings, dim] that is axis 0 of the stored tensor, and m / norm scales columns.
    We replicate the expression literally (same transposes, same mixed-dtype add) to get the same bits.

Note: several adapters, and order.
    Plain LoRA deltas commute: they are summed in float32 and rounded once. DoRA does not commute:
    PEFT merges adapters in turn, each DoRA step rescaling everything merged so far, with the norm
    taken on the *unmerged* base W₀ plus that adapter's own ΔW. Its forward pass with several active
    adapters computes the same composition (each DoRA layer rescales the running result), so the
    sequential formula, applied in the order the adapters are given, is the exact merge. We apply it
    in float32 and round once.

Note: the DoRA record.
    A merged DoRA row is m · (W + ΔW) / ||W + ΔW||: the norm, one number per row, is not recoverable
    from the merged weights. `merge` therefore writes it (float32, a few KB per module) to
    `loratools-dora/norms.safetensors` inside the output, beside the identity (SHA-256) and weight of
    every adapter merged; `unmerge` reads it back and undoes each step as PEFT's `unmerge` does,
    W ← W / (m / norm) − ΔW, in reverse order. The record lives in a subdirectory so that tools that
    load every top-level `*.safetensors` file of a model directory never see it.

Note: tied output embeddings.
    A model with `tie_word_embeddings` (GPT-2) stores no `lm_head.weight`; the head is the input
    embedding. When an adapter changes only one of the two (LoRA or modules_to_save on `lm_head`, or
    on the embedding), PEFT's merge either writes the shared tensor for both or loses the change on
    reload, and PEFT warns about it. We keep what the adapted model computes: the output gets an
    explicit `lm_head.weight` (the head as the adapter sees it) and `tie_word_embeddings: false`.
    An adapter made with `ensure_weight_tying` changes both the same way, so the model stays tied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule, load_adapter
from .checks import HEAD_KEY, adapter_fit_problems, dense_shapes, first_problem_error, locate, \
    resolve_base_key, tied_embedding_key
from .device import resolve_device, torch_threads
from .errors import InputError, MismatchError, UnsupportedError, UsageError
from .io import Checkpoint, TensorSpec, config_with_dtype, provenance
from .io.output import write_checkpoint
from .io.provenance import sha256_file
from .io.safetensors_format import read_header, read_tensor
from .io.writer import save_tensors

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RECORD_DIR = "loratools-dora"
RECORD_FILE = "norms.safetensors"
RECORD_KEY = "loratools_dora"


# -- pure tensor functions ---------------------------------------------------------------------------

def transposed(m: LoraModule) -> bool:
    """True when the base tensor is stored [in, out] relative to B @ A (Conv1D, embeddings)."""
    return m.kind == "embedding" or m.fan_in_fan_out


def _t(x: torch.Tensor, flag: bool) -> torch.Tensor:
    return x.T if flag else x


class Workspace:
    """Reusable float32 buffers, one per role, grown to the largest tensor seen.

    Note: why reuse.
        A fresh 50 MB float32 tensor costs more in page faults (the kernel zeroes every page) than the
        rank-16 matmul that fills it; on CPU, reusing two buffers across tensors makes the plain merge
        about 1.5x faster. The buffers are a few tensors' worth of memory, whatever the model size."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape, device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = self._bufs[role] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(tuple(shape))


def lora_delta(m: LoraModule, weight: float = 1.0, device="cpu", ws: Workspace | None = None,
               rows: slice | None = None) -> torch.Tensor:
    """weight · scale · B @ A in float32, in the base tensor's layout (PEFT's get_delta_weight).

    The whole product in one matmul, as PEFT computes it; `rows` (a [out, in] layout only) gives those
    rows of it from B's rows alone, with the same bits (see Note: row blocks of B @ A). With a
    workspace the product lands in its "delta" buffer (valid until the next call)."""
    A = m.A.to(device=device, dtype=torch.float32)
    B = m.B.to(device=device, dtype=torch.float32)
    if rows is not None:
        assert not transposed(m), "row blocks of a transposed delta"
        B = B[rows]
    if ws is None:
        d = B @ A
    else:
        d = torch.mm(B, A, out=ws.get("delta", (B.shape[0], A.shape[1]), device))
    return _t(d.mul_(m.scale * weight), transposed(m))


def dora_weight_norm(base: torch.Tensor, delta: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """||W₀ + ΔW|| per output feature, as PEFT's DoraLinearLayer.get_weight_norm computes it.

    `base` stays in its own dtype: PEFT adds the float32 delta to the base weight as stored."""
    return torch.linalg.norm(_t(base, is_transposed) + _t(delta, is_transposed), dim=1).to(torch.float32)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """m / ||W₀ + ΔW||, shaped to scale the rows ([out, in]) or columns ([in, out]) of the base tensor."""
    f = magnitude.to(device=norm.device, dtype=torch.float32) / norm
    return f.view(1, -1) if is_transposed else f.view(-1, 1)


@dataclass
class Step:
    """One adapter's contribution to one base tensor."""

    module: LoraModule
    weight: float
    adapter: int  # position on the command line

    @property
    def dora(self) -> bool:
        return self.module.magnitude is not None


# Elementwise work on CPU runs in row blocks of about this many elements, so that the float32 sum of a
# plain merge is one small block, not a second full-size float32 tensor.
BLOCK_ELEMENTS = 1 << 20


# Row blocks are a multiple of this many rows, and a shorter remainder joins the block before it: a
# matmul of fewer than 4 rows takes another kernel and can differ in the last bit (Note: row blocks).
BLOCK_ROWS = 64


def _row_blocks(t: torch.Tensor) -> list[slice]:
    if t.dim() != 2 or t.device.type != "cpu":
        return [slice(None)]
    rows = t.shape[0]
    step = max(BLOCK_ROWS, BLOCK_ELEMENTS // max(1, t.shape[1]) // BLOCK_ROWS * BLOCK_ROWS)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < BLOCK_ROWS:
        starts.pop()
    return [slice(r, starts[i + 1] if i + 1 < len(starts) else rows) for i, r in enumerate(starts)]


def merge_weight(base: torch.Tensor, steps: list[Step], device="cpu", out_dtype=torch.float32,
                 ws: Workspace | None = None) -> tuple[torch.Tensor, list]:
    """Apply steps in order in float32: W += ΔW (LoRA), W = m/||W₀+ΔW|| · (W + ΔW) (DoRA); round once
    to `out_dtype`. Returns the result (a new tensor on `device`) and, per step, the DoRA norm (None for
    plain LoRA)."""
    ws = ws or Workspace()
    w0 = base.to(device)
    if len(steps) == 1 and not steps[0].dora:
        # The common case: W + ΔW and the cast, block by block
        m, weight = steps[0].module, steps[0].weight
        blocks = _row_blocks(w0)
        by_rows = len(blocks) > 1 and not transposed(m)
        if not by_rows:
            d = lora_delta(m, weight, device, ws)  # one whole-matrix product
        out = torch.empty(w0.shape, dtype=out_dtype, device=w0.device)
        for rows in blocks:
            blk = w0[rows]
            if by_rows:
                # Note: row blocks of B @ A.
                #     Each element of B @ A is one rank-long dot product. The CPU kernels compute it
                #     the same way whatever the number of rows in the call, except for calls of
                #     fewer than 4 rows (measured), which _row_blocks never makes; so a block's
                #     product has the bits of the whole product's rows (tests/test_merge.py checks it
                #     on awkward shapes; benchmarks/merge.py on all 84 weights against PEFT). The
                #     float32 delta then never exists at full size: 46 MB less memory and one pass
                #     less over it for a 5632 x 2048 weight.
                d_blk = lora_delta(m, weight, device, ws, rows)
            else:
                d_blk = d[rows]
            acc = ws.get("acc", blk.shape, device)
            acc.copy_(blk)
            acc += d_blk
            out[rows] = acc
        return out, [None]
    acc = ws.get("acc", w0.shape, device)
    acc.copy_(w0)
    norms = []
    for s in steps:
        d = lora_delta(s.module, s.weight, device, ws)
        if s.dora:
            tr = transposed(s.module)
            norm = dora_weight_norm(w0, d, tr)
            acc += d
            acc *= dora_factor(s.module.magnitude, norm, tr)
            norms.append(norm)
        else:
            acc += d
            norms.append(None)
    return acc.to(out_dtype, copy=True), norms


def unmerge_weight(merged: torch.Tensor, steps: list[Step], norms: list, device="cpu", out_dtype=torch.float32,
                   ws: Workspace | None = None) -> torch.Tensor:
    """Undo `merge_weight` in reverse order: W -= ΔW (LoRA), W = W / (m/norm) − ΔW (DoRA), in float32,
    rounded once to `out_dtype`."""
    ws = ws or Workspace()
    m = merged.to(device)
    acc = ws.get("acc", m.shape, device)
    acc.copy_(m)
    for s, norm in zip(reversed(steps), reversed(norms)):
        if s.dora:
            acc /= dora_factor(s.module.magnitude, norm.to(device), transposed(s.module))
        acc -= lora_delta(s.module, s.weight, device, ws)
    return acc.to(out_dtype, copy=True)


def bias_delta(steps: list[Step], device="cpu") -> torch.Tensor:
    """Σ weight · scale · lora_B.bias in float32 (PEFT: `bias += lora_B.bias * scaling`)."""
    total = None
    for s in steps:
        b = s.module.bias.to(device=device, dtype=torch.float32) * (s.module.scale * s.weight)
        total = b if total is None else total + b
    return total


# -- the plan -----------------------------------------------------------------------------------------

@dataclass
class TensorPlan:
    """What happens to one output tensor."""

    key: str  # output tensor name
    source: str  # base tensor to read (the input embedding, for an untied head)
    replace: torch.Tensor | None = None  # a saved tensor replacing the base's (modules_to_save / base layer)
    replace_kind: str | None = None  # "modules_to_save" or "base_layer"
    replace_adapter: int | None = None
    steps: list[Step] = field(default_factory=list)
    is_bias: bool = False


@dataclass
class Plan:
    tensors: dict[str, TensorPlan]
    untie_head: str | None  # the embedding a new explicit lm_head.weight is read from
    dora_steps: int


def _saved_kind(adapter: Adapter, name: str) -> str:
    # A LoRA-wrapped module saved whole is the embedding base layer PEFT saves beside embedding LoRA.
    return "base_layer" if name.rsplit(".", 1)[0] in adapter.modules else "modules_to_save"


def build_plan(base: Checkpoint, adapters: list[Adapter], weights: list[float], *, untie: bool = True) -> Plan:
    """Map every adapter tensor onto the base; refuse (MismatchError) before anything is written.

    `untie=False` (unmerge) keeps a tied head tied: its steps apply to the shared embedding."""
    for ad in adapters:
        err = first_problem_error(adapter_fit_problems(base, ad))
        if err is not None:
            raise err
    shapes = dense_shapes(base)
    tied = tied_embedding_key(base, shapes)
    plans: dict[str, TensorPlan] = {}

    def plan_for(key: str, source: str) -> TensorPlan:
        return plans.setdefault(key, TensorPlan(key, source))

    for i, (ad, w) in enumerate(zip(adapters, weights)):
        for name, t in ad.saved.items():
            target = locate(shapes, name, tied)
            p = plan_for(target.key, target.tied_to or target.key)
            if p.replace is not None and not torch.equal(p.replace, t.to(p.replace.dtype)):
                raise MismatchError(f"adapters {adapters[p.replace_adapter].path} and {ad.path} both replace this "
                                    f"tensor whole (modules_to_save) with different values; merge them one at a time",
                                    path=ad.path, tensor=target.key)
            if p.replace is None:
                p.replace, p.replace_kind, p.replace_adapter = t, _saved_kind(ad, name), i
        for m in ad.modules.values():
            target = locate(shapes, m.base_key, tied)
            plan_for(target.key, target.tied_to or target.key).steps.append(Step(m, w, i))
            if m.bias is not None:
                bias_key = resolve_base_key(shapes, m.bias_key)
                bp = plan_for(bias_key, bias_key)
                bp.is_bias = True
                bp.steps.append(Step(m, w, i))
    for p in plans.values():
        if p.replace_kind == "modules_to_save" and any(s.adapter != p.replace_adapter for s in p.steps):
            other = next(s.adapter for s in p.steps if s.adapter != p.replace_adapter)
            raise MismatchError(f"adapter {adapters[p.replace_adapter].path} replaces this tensor whole "
                                f"(modules_to_save) while {adapters[other].path} adapts it with LoRA; merge them "
                                f"one at a time", path=adapters[p.replace_adapter].path, tensor=p.key)
    untied_from = None
    if tied is not None:
        head, emb = plans.get(HEAD_KEY), plans.get(tied)
        keeps_tying = not untie or all(ad.config.get("ensure_weight_tying") for ad in adapters)
        if (head is not None or (emb is not None and (emb.steps or emb.replace_kind == "modules_to_save"))) \
                and not keeps_tying:
            untied_from = tied
            if head is None:
                head = plan_for(HEAD_KEY, tied)
            if emb is not None and emb.replace_kind == "base_layer" and head.replace is None:
                # PEFT loads a saved embedding base layer into the parameter the head shares.
                head.replace, head.replace_kind, head.replace_adapter = emb.replace, "base_layer", emb.replace_adapter
        elif head is not None:  # kept tied: the head's changes go to the shared embedding
            plans.pop(HEAD_KEY)
            target = plan_for(tied, tied)
            # With ensure_weight_tying PEFT saves the head's LoRA as a transposed copy of the embedding's
            # (lora_A = B_embᵀ, lora_B = A_embᵀ): the same ΔW, which the shared tensor must get once.
            on_embedding = {s.adapter for s in target.steps}
            target.steps += [s for s in head.steps if not (s.adapter in on_embedding and
                                                           adapters[s.adapter].config.get("ensure_weight_tying"))]
            if head.replace is not None and target.replace is None:
                target.replace, target.replace_kind, target.replace_adapter = \
                    head.replace, head.replace_kind, head.replace_adapter
    dora_steps = sum(1 for p in plans.values() if not p.is_bias for s in p.steps if s.dora)
    return Plan(dict(sorted(plans.items())), untied_from, dora_steps)


# -- reading the base ----------------------------------------------------------------------------------

class DenseBase:
    """A checkpoint seen as dense tensors: plain safetensors, or a bitsandbytes 4-bit checkpoint whose
    packed weights are dequantized on the fly."""

    def __init__(self, ck: Checkpoint, device):
        self.ck = ck
        self.quantized = ck.is_quantized
        self.device = device
        if self.quantized:
            from . import quantized

            self._q = quantized
            self.specs = quantized.dense_specs(ck)
        else:
            self.specs = {n: (i.dtype, tuple(i.shape)) for n, i in ck.tensors.items()}

    def stored_as_is(self, name: str, dtype: torch.dtype) -> bool:
        """True when the dense tensor is the stored one, in `dtype`: it can be copied file to file."""
        info = self.ck.tensors.get(name)
        return info is not None and info.dtype == dtype and tuple(info.shape) == self.specs[name][1] and \
            not (self.quantized and name in self.ck.quant_states)

    def iter_tensors(self, copy_as_is=lambda name: False):
        """(name, tensor) in file order; (name, TensorInfo) for names `copy_as_is` selects, which the
        writer copies without reading them into memory."""
        as_is = {name for name in self.specs if copy_as_is(name)}
        if not self.quantized:  # the next tensor is read while this one is merged
            reads = self.ck.prefetched(n for n in self.specs if n not in as_is)
        for name in self.specs:
            if name in as_is:
                yield name, self.ck.tensors[name]
            elif self.quantized:
                # Dequantized in the quant_state dtype, bit-identical to bitsandbytes' dequantize_4bit:
                # the weights the QLoRA adapter was trained against, what `model.dequantize()` gives.
                yield name, self._q.read_dense(self.ck, name, device=self.device)
            else:
                got, tensor = next(reads)
                assert got == name
                yield name, tensor
                del tensor
        self.ck.close()


def output_dtype(src: torch.dtype, dtype: str, quantized: bool) -> torch.dtype:
    if not src.is_floating_point:
        return src
    if dtype == "auto":
        return torch.float16 if quantized else src
    return FLOAT_DTYPES[dtype]


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


def _output_config(base: Checkpoint, dtype: str, dense: DenseBase, untie: bool) -> dict | None:
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


# -- merge ---------------------------------------------------------------------------------------------

def merge_checkpoint(base, adapters, output, *, weights=None, dtype: str = "auto", device: str = "auto",
                     max_shard_size: int, force: bool = False, on_tensor=None) -> dict:
    """Fold `adapters` (paths) into checkpoint `base` and write a dense checkpoint at `output`."""
    adapter_paths, weights, dev = _check_options(adapters, weights, dtype, device)
    ck = Checkpoint(base)
    ads = [load_adapter(p) for p in adapter_paths]
    plan = build_plan(ck, ads, weights)
    dense = DenseBase(ck, dev)

    specs = [TensorSpec(n, output_dtype(dt, dtype, dense.quantized), shape) for n, (dt, shape) in dense.specs.items()]
    if plan.untie_head:
        dt, shape = dense.specs[plan.untie_head]
        specs.append(TensorSpec(HEAD_KEY, output_dtype(dt, dtype, dense.quantized), shape))
    out_dtype = {s.name: s.dtype for s in specs}
    readers: dict[str, list[str]] = {}
    for s in specs:
        p = plan.tensors.get(s.name)
        readers.setdefault(p.source if p else s.name, []).append(s.name)

    norms: dict[str, torch.Tensor] = {}
    ws = Workspace()

    def compute(key: str, t: torch.Tensor) -> torch.Tensor:
        p = plan.tensors.get(key)
        if p is None:
            return t.to(out_dtype[key]).cpu()
        w = p.replace.to(t.dtype) if p.replace is not None else t  # as PEFT loads it into the base model
        checked = bool(p.is_bias or p.steps) and w.is_floating_point()
        if checked and not _all_finite(w):
            # a corrupt base tensor: adding a delta would hide where the NaN/Inf came from
            raise InputError("base tensor holds NaN/Inf values; refusing to merge into it", path=base, tensor=key)
        if p.is_bias:
            acc = w.to(dev).to(torch.float32, copy=True)
            acc += bias_delta(p.steps, dev)
            out = acc.to(out_dtype[key])
        elif p.steps:
            out, step_norms = merge_weight(w, p.steps, dev, out_dtype[key], ws)
            for s, n in zip(p.steps, step_norms):
                if n is not None:
                    norms[f"adapter{s.adapter}.{s.module.name}.weight_norm"] = n.cpu()
        else:
            out = w.to(out_dtype[key])
        _finite_or_fail(out, None if checked else w, key, base)
        return out.cpu()

    def untouched(name: str) -> bool:
        return readers.get(name) == [name] and name not in plan.tensors and dense.stored_as_is(name, out_dtype[name])

    def tensors():
        for name, t in dense.iter_tensors(untouched):
            if not isinstance(t, torch.Tensor):
                yield name, t  # copied file to file
                continue
            for key in readers.get(name, ()):
                yield key, compute(key, t)
            del t

    def record(tmp: Path) -> list[str]:
        if not norms:
            return []
        (tmp / RECORD_DIR).mkdir()
        meta = {RECORD_KEY: json.dumps({
            "adapters": [{"name": p.name, "sha256": _digest(a), "weight": w, "dora": a.use_dora or
                          any(m.magnitude is not None for m in a.modules.values())}
                         for p, a, w in zip(adapter_paths, ads, weights)],
            "device": dev.type}, sort_keys=True)}
        files = save_tensors(tmp / RECORD_DIR, dict(sorted(norms.items())), filename=RECORD_FILE,
                             allow_shards=False, metadata=meta)
        return [f"{RECORD_DIR}/{f}" for f in files]

    options = {"weights": weights, "dtype": dtype, "device": device, "max_shard_size": max_shard_size}
    with torch_threads(1, dev):
        summary = write_checkpoint(
            output, inputs=[base, *adapter_paths], force=force, specs=specs, tensors=tensors(),
            side_files=ck.non_weight_files(), config=_output_config(ck, dtype, dense, plan.untie_head is not None),
            metadata=provenance("merge", options, {"base": base, "adapters": [str(p) for p in adapter_paths]}),
            max_shard_size=max_shard_size, on_tensor=on_tensor, extra_files=record)
    summary.update(_summary(plan, ads, adapter_paths, weights, dev, specs, dense))
    summary["dora_record"] = f"{RECORD_DIR}/{RECORD_FILE}" if norms else None
    return summary


def _summary(plan: Plan, ads, paths, weights, dev, specs, dense) -> dict:
    dtypes = sorted({str(s.dtype).removeprefix("torch.") for s in specs if s.dtype.is_floating_point})
    return {
        "tensors": len(specs),
        "changed_tensors": len(plan.tensors),
        "adapters": [{"path": str(p), "weight": w, "modules": len(a.modules), "dora": any(
            m.magnitude is not None for m in a.modules.values()), "saved_tensors": sorted(a.saved)}
            for p, a, w in zip(paths, ads, weights)],
        "replaced_tensors": sorted(k for k, p in plan.tensors.items() if p.replace is not None),
        "untied_head": plan.untie_head is not None,
        "dequantized_base": dense.quantized,
        "dtypes": dtypes,
        "device": dev.type,
    }


# -- unmerge -------------------------------------------------------------------------------------------

def read_dora_record(ck: Checkpoint) -> tuple[dict, dict[str, torch.Tensor]] | None:
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


def _check_dora_unmerge(ck: Checkpoint, plan: Plan, ads: list[Adapter], paths, weights):
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


def unmerge_checkpoint(merged, adapters, output, *, weights=None, dtype: str = "auto", device: str = "auto",
                       max_shard_size: int, force: bool = False, on_tensor=None) -> dict:
    """Subtract `adapters` from a merged checkpoint (undoing DoRA with the record merge wrote)."""
    adapter_paths, weights, dev = _check_options(adapters, weights, dtype, device)
    ck = Checkpoint(merged)
    if ck.is_quantized:
        raise InputError("this is a 4-bit checkpoint; unmerge works on the dense checkpoint `merge` wrote", path=merged)
    ads = [load_adapter(p) for p in adapter_paths]
    plan = build_plan(ck, ads, weights, untie=False)
    for p in plan.tensors.values():
        if p.replace_kind == "modules_to_save":
            raise UnsupportedError(
                f"adapter {adapter_paths[p.replace_adapter]} replaced this tensor whole (modules_to_save); the "
                f"base's original values are not in the merged checkpoint, so unmerge cannot restore them",
                path=adapter_paths[p.replace_adapter], tensor=p.key)
    norms = _check_dora_unmerge(ck, plan, ads, adapter_paths, weights)
    dense = DenseBase(ck, dev)
    specs = [TensorSpec(n, output_dtype(dt, dtype, False), shape) for n, (dt, shape) in dense.specs.items()]
    out_dtype = {s.name: s.dtype for s in specs}
    ws = Workspace()

    def compute(key: str, t: torch.Tensor) -> torch.Tensor:
        p = plan.tensors.get(key)
        if p is None or not p.steps:
            return t.to(out_dtype[key]).cpu()
        if p.is_bias:
            acc = t.to(dev).to(torch.float32, copy=True)
            acc -= bias_delta(p.steps, dev)
            out = acc.to(out_dtype[key])
        else:
            step_norms = [norms[f"adapter{s.adapter}.{s.module.name}.weight_norm"] if s.dora else None
                          for s in p.steps]
            out = unmerge_weight(t, p.steps, step_norms, dev, out_dtype[key], ws)
        _finite_or_fail(out, t, key, merged)
        return out.cpu()

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
            metadata=provenance("unmerge", options, {"merged": merged, "adapters": [str(p) for p in adapter_paths]}),
            max_shard_size=max_shard_size, on_tensor=on_tensor)
    summary.update(_summary(plan, ads, adapter_paths, weights, dev, specs, dense))
    summary["dora_record_used"] = bool(norms)
    return summary


__all__ = ["FLOAT_DTYPES", "Plan", "Step", "TensorPlan", "bias_delta", "build_plan", "dora_factor",
           "dora_weight_norm", "lora_delta", "merge_checkpoint", "merge_weight", "output_dtype",
           "read_dora_record", "resolve_device", "unmerge_checkpoint", "unmerge_weight"]
