"""validate's layer-streamed forward passes: the reference (base + adapters through PEFT, unmerged) and each
candidate, run block by block with one block's weights in memory at a time.

How (one mechanism for every family transformers builds):

- The class the checkpoint was saved from is built from its config.json with every parameter on the meta
  device (buffers, e.g. rotary tables, are real: they are computed, not stored). Each parameter then gets a
  placeholder on the compute device: one NaN element expanded to the parameter's shape, so PEFT sees the
  device and dtype it attaches to, and a weight used without being loaded poisons the output (caught)
  instead of being silently random.
- The repeated blocks are the children of the outermost `nn.ModuleList`s holding parameters (decoder layers;
  an encoder-decoder's encoder then decoder layers). The large non-block weights (embeddings, head) load
  only while their own module runs, the small ones (norms) for the pass (Note: lazy non-block weights). A
  forward pre-hook on each block reads that block's tensors from disk (`TensorSource`), a
  forward hook hands its output hidden states on and puts the placeholders back, so the block's weights are
  freed before the next block loads: never two blocks resident (`Streamed.max_resident` says so).
- The model's own forward runs (fw.run_outputs), so every family's wiring (rotary, masks, cross-attention,
  MoE routing, tied heads) is transformers' own. The adapters are attached by PEFT itself to the placeholder
  model (fw.attach_adapters, low_cpu_mem_usage: the adapter tensors are assigned from the file, whole; they
  are small), so the reference is PEFT's unmerged forward, x·Wᵀ + s·(x·Aᵀ)·Bᵀ, not a merged weight.

Stored names reach model parameters through key_layout (renamed and fused-expert layouts); a 4-bit checkpoint
is read through quantized.DenseView (dequantized as bitsandbytes does). `TensorSource.read_stored` is the one
place a stored tensor is read: a subclass changes where a reference's base weights come from (trained_on.py's
NF4-dequantized base; docs/validate.md, "Streamed forward passes").
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import forward as fw
from ..errors import InputError, LoratoolsError
from ..io import Checkpoint
from .divergence import block_metrics, first_divergence, logits_agreement


# -- the model skeleton ----------------------------------------------------------------------------------

@contextmanager
def _parameters_on_meta():
    """Every parameter a module registers is created on the meta device; buffers stay real (accelerate's
    init_empty_weights(include_buffers=False), without needing accelerate's own import path)."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(path, dtype: torch.dtype) -> torch.nn.Module:
    """The class fw.load_model would build for the checkpoint at `path` (config.json's architectures[0]),
    parameters on the meta device in `dtype`, eval mode. A 4-bit checkpoint's quantization_config is dropped:
    its weights are read dequantized."""
    from transformers import AutoConfig

    from ..task_types import model_class

    d = fw.model_dir(path)
    with fw.quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(d, trust_remote_code=False, local_files_only=True)
            if getattr(config, "quantization_config", None) is not None:
                del config.quantization_config
            cls = model_class(config.to_dict())
            with _parameters_on_meta():
                model = cls._from_config(config, dtype=dtype)
        except Exception as e:  # as fw.load_model: transformers raises many kinds for a bad config
            raise InputError(f"transformers cannot build this model: {type(e).__name__}: {e}", path=d) from None
    return model.eval()


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each repeated block: the children of the outermost ModuleLists that hold parameters,
    in module order (an encoder-decoder: encoder layers, then decoder layers)."""
    out = []

    def walk(prefix: str, module: torch.nn.Module):
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, torch.nn.ModuleList) and any(True for _ in child.parameters()):
                out.extend((f"{full}.{i}", block) for i, block in enumerate(child))
            else:
                walk(full, child)

    walk("", model)
    return out


@dataclass
class _Group:
    """One model parameter (tied aliases share it): its names, where it is held, its placeholder."""

    names: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    placeholder: torch.nn.Parameter | None = None
    holders: list[tuple[torch.nn.Module, str]] = field(default_factory=list)

    def set(self, p: torch.nn.Parameter) -> None:
        for module, attr in self.holders:
            module._parameters[attr] = p

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _groups(model: torch.nn.Module, device: torch.device) -> list[_Group]:
    """The model's parameters grouped by identity (tied ones once), each replaced by its placeholder."""
    by_id: dict[int, _Group] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        g = by_id.get(id(p))
        if g is None:
            g = by_id[id(p)] = _Group([], tuple(p.shape), p.dtype)
        g.names.append(name)
    _find_holders(model, by_id)
    nan = {}
    for g in by_id.values():
        if g.dtype not in nan:
            nan[g.dtype] = torch.full((), float("nan") if g.dtype.is_floating_point else 0, dtype=g.dtype,
                                      device=device)
        g.placeholder = torch.nn.Parameter(nan[g.dtype].expand(g.shape), requires_grad=False)
        g.set(g.placeholder)
    for module in model.modules():  # buffers (rotary tables, position ids) to the compute device
        for k, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[k] = b.to(device)
    return list(by_id.values())


def _find_holders(root: torch.nn.Module, owner: dict[int, _Group]) -> None:
    """Each group's holders (module, attribute), found by the identity of the parameter object they hold."""
    for g in owner.values():
        g.holders = []
    for module in root.modules():
        for attr, p in module._parameters.items():
            g = owner.get(id(p)) if p is not None else None
            if g is not None:
                g.holders.append((module, attr))


# -- where tensors come from -------------------------------------------------------------------------------

class TensorSource:
    """A model's parameters read from checkpoint `ck`, one at a time, through its key layout (renamed and
    fused-expert layouts) and its dense view (a 4-bit weight dequantized as bitsandbytes does).

    `read_stored(stored_name)` is the one read: a subclass that overrides it changes where the values come
    from (e.g. the dense base quantized to NF4 and dequantized, for a QLoRA reference) and keeps the layout,
    checks and placement. `role` names the checkpoint in errors ("base", "merged", ...)."""

    def __init__(self, ck: Checkpoint, role: str, device: torch.device):
        from ..key_layout import checkpoint_layout
        from ..quantized import DenseView

        self.ck, self.role, self.device = ck, role, device
        self.view = DenseView(ck, device)
        self.layout = checkpoint_layout(ck)

    def read_stored(self, stored: str) -> torch.Tensor:
        """One stored tensor of the dense view (override point)."""
        return self.view.read(stored)

    def parts(self, g: _Group, model_name: str) -> list:
        """The stored parts of group `g` (whichever of its tied names the checkpoint stores), checked against
        the parameter's shape; a missing or misshapen tensor is an InputError naming it."""
        params = self.layout.params
        name = next((n for n in g.names if n in params), None)
        if name is None:  # as transformers, a tied alias is looked up under every name
            name = next((n for n in (_strip(x) for x in g.names) if n in params), None)
        if name is None:
            stored = self.layout.stored_name(_strip(g.names[0]))
            raise InputError(f"missing tensor {stored} ({model_name} builds {_strip(g.names[0])} from it, "
                             f"shape {list(g.shape)})", path=self.ck.path, tensor=stored)
        parts = params[name]
        for part in parts:
            found = tuple(self.layout.stored_shapes.get(part.stored, self.layout.shapes.get(name, ())))
            want = tuple(torch.empty(g.shape, device="meta")[part.index].shape)
            if found != want:
                raise InputError(f"shape {list(found)} does not fit {model_name}'s {part.describe()}, "
                                 f"{list(want)} as built from config.json (a config of another model?)",
                                 path=self.ck.path, tensor=part.stored)
        return parts

    def load(self, g: _Group, parts: list) -> torch.Tensor:
        """The parameter's value on the device in its dtype, assembled from its stored parts."""
        if len(parts) == 1 and parts[0].whole:
            return self.read_stored(parts[0].stored).to(device=self.device, dtype=g.dtype)
        out = torch.empty(g.shape, dtype=g.dtype, device=self.device)
        for part in parts:
            out[part.index] = self.read_stored(part.stored).to(device=self.device, dtype=g.dtype)
        return out

    def unused(self, planned: set[str]) -> list[str]:
        """Stored tensors no model parameter reads (transformers' 'unexpected' keys)."""
        return sorted(s for s in self.layout.parts if s not in planned)


def _strip(name: str) -> str:
    """A model name without what PEFT adds around a base parameter."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer.", ".original_module."):
        name = name.replace(wrapper, ".")
    return name.replace(".parametrizations.", ".").removesuffix(".original")


# -- the streamed model ----------------------------------------------------------------------------------

LAZY_BYTES = 1 << 20  # non-block weights this large load only while their module runs (Streamed._plan)

class Streamed:
    """A model whose parameters are placeholders, loaded from `source` block by block while it runs.

    Use: `s = Streamed(skeleton(path, dtype), device)`; optionally `s.model = fw.attach_adapters(s.model, ...)`
    then `s.rebind()`; then `with s.run(source, on_block): out = fw.run_outputs(s.model, ids)`.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.blocks = find_blocks(model)
        self.groups = _groups(model, device)
        self.max_resident = 0  # most blocks ever loaded at once (1 by construction)
        self.peak_block_bytes = 0
        self.model_name = type(model).__name__
        self.lazy = True  # large non-block weights (embeddings, head) loaded only while their module runs
        self.allocated_at_load: list[int] = []  # CUDA: bytes allocated as each block starts loading

    def rebind(self) -> None:
        """Find the placeholders again after PEFT wrapped the model; those PEFT replaced (a base layer the
        adapter file stores whole) are no longer streamed."""
        _find_holders(self.model, {id(g.placeholder): g for g in self.groups})

    def _plan(self, source: TensorSource):
        """(non-block groups with parts, per block [(group, parts)], lazy {module id: (module, [(group, parts)])},
        stored names read): every read checked before any compute.

        Note: lazy non-block weights.
            The embeddings and the head are each as large as a block or larger (2 x 0.5 GB in float32 at 7B):
            held for the whole pass they would double the peak. A non-block weight of 1 MiB or more is loaded
            by a hook on the module that holds it, for that module's call only (a tied embedding loads for the
            embedding and again for the head). A weight read outside its module's call (none in the zoo) meets
            the NaN placeholder: the pass is run again with `lazy` off (streamed_forward_checks)."""
        block_of = {}
        for i, (_, block) in enumerate(self.blocks):
            for m in block.modules():
                block_of[id(m)] = i
        upfront, per_block, lazy, planned = [], [[] for _ in self.blocks], {}, set()
        for g in self.groups:
            if not g.holders:
                continue
            owners = {block_of.get(id(m)) for m, _ in g.holders}
            parts = source.parts(g, self.model_name)
            planned.update(p.stored for p in parts)
            if len(owners) == 1 and None not in owners:
                per_block[owners.pop()].append((g, parts))
            elif self.lazy and g.nbytes >= LAZY_BYTES and None in owners and len(owners) == 1:
                for m, _ in g.holders:
                    lazy.setdefault(id(m), (m, []))[1].append((g, parts))
            else:
                upfront.append((g, parts))
        return upfront, per_block, lazy, planned

    @contextmanager
    def run(self, source: TensorSource, on_block: Callable[[int, str, torch.Tensor], None] | None = None):
        """Hooks that stream `source`'s tensors into the blocks while the body runs the model; the non-block
        parameters are loaded for the duration. Yields the stored names no parameter reads."""
        upfront, per_block, lazy, planned = self._plan(source)
        resident = [0]

        def load(entries):
            nbytes = 0
            for g, parts in entries:
                g.set(torch.nn.Parameter(source.load(g, parts), requires_grad=False))
                nbytes += g.nbytes
            return nbytes

        def release(entries):
            for g, _ in entries:
                g.set(g.placeholder)

        hooks = []
        for i, (name, block) in enumerate(self.blocks):
            def pre(_m, _args, i=i):
                if self.device.type == "cuda":  # the previous block must be gone by now (tests/test_validate_streamed)
                    self.allocated_at_load.append(torch.cuda.memory_allocated(self.device))
                resident[0] += 1
                self.max_resident = max(self.max_resident, resident[0])
                self.peak_block_bytes = max(self.peak_block_bytes, load(per_block[i]))

            def post(_m, _args, out, i=i, name=name):
                release(per_block[i])
                resident[0] -= 1
                if on_block is not None:
                    hidden = out[0] if isinstance(out, (tuple, list)) else out
                    if torch.is_tensor(hidden):
                        on_block(i, name, hidden)

            hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        for module, entries in lazy.values():
            hooks += [module.register_forward_pre_hook(lambda _m, _a, e=entries: load(e) and None),
                      module.register_forward_hook(lambda _m, _a, _o, e=entries: release(e))]
        try:
            load(upfront)
            yield source.unused(planned)
        finally:
            for h in hooks:
                h.remove()
            for entries in per_block:
                release(entries)
            release(upfront)
            for _, entries in lazy.values():
                release(entries)


# -- whole or streamed -----------------------------------------------------------------------------------

# Note: when validate streams.
#     The whole-model path (logits.py) holds one model built by transformers in the compute dtype: its peak is
#     the model's bytes times a load transient, measured 1.6x on the CPU (4.9 GB for the 3.0 GB float32 0.75B
#     Llama, docs/validate.md "Cost") and taken as 1.2x on CUDA (loaded straight onto the device). `auto`
#     streams when that estimate exceeds what is available now: MemAvailable on the CPU, the device's free
#     memory on CUDA. Streaming costs time (each pass reads every block from disk), so a model that fits
#     runs whole. --plot needs the per-block rows, which only the streamed passes produce.
WHOLE_PEAK_FACTOR = {"cpu": 1.6, "cuda": 1.2}


def model_bytes(ck: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint's dense weights in the compute dtype (a 4-bit one as dequantized)."""
    from ..quantized import dense_shapes

    n = 0
    for shape in dense_shapes(ck).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n * dtype.itemsize


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a model now: the CUDA device's free memory, or the CPU's MemAvailable (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_stream(stream: bool | None, checkpoints: list[Checkpoint], device: torch.device, dtype: torch.dtype,
                  plot: bool = False, quantized: bool = False) -> tuple[bool, str]:
    """(stream?, why) for validate's forward passes: `stream` True/False is the user's --stream/--no-stream;
    None decides (see Note: when validate streams). Contradictory options are a UsageError."""
    from ..errors import UsageError

    if plot and stream is False:
        raise UsageError("--plot draws the per-block divergence, which only the streamed passes measure: "
                         "drop --no-stream")
    if quantized and stream:
        raise UsageError("--quantized is compared by whole-model forward passes only: drop --stream"
                         + (" and --plot" if plot else "") + ", or run --quantized separately")
    if stream is not None:
        return stream, "--stream" if stream else "--no-stream"
    if quantized:
        return False, "--quantized runs whole-model forward passes"
    if plot:
        return True, "--plot needs the per-block divergence"
    sizes = []
    for ck in checkpoints:
        try:
            sizes.append(model_bytes(ck, dtype))
        except LoratoolsError:  # an unreadable quant_state: the static checks report it in their table
            continue
    need = max(sizes, default=0) * WHOLE_PEAK_FACTOR.get(device.type, 1.6)
    free = available_bytes(device)
    if free is not None and need > free:
        return True, (f"the whole model would need about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is "
                      f"available on {device.type}")
    return False, f"the whole model fits (about {need / 2**30:.2g} GiB needed" + \
        (f", {free / 2**30:.1f} GiB available)" if free is not None else ")")


# -- validate's streamed forward checks ------------------------------------------------------------------

def block_allowance(compute: torch.dtype, storage: torch.dtype) -> float:
    """The relative error a block's hidden states may show from rounding alone: the logits' rtol for the same
    dtypes (fw.exact_tolerance), since the same weight rounding is what moves both."""
    return fw.exact_tolerance(compute, storage).rtol


def stored_float_dtype(ck: Checkpoint) -> torch.dtype:
    """The coarsest floating-point dtype of a checkpoint's (dense) weights, as logits.py derives it."""
    storage = {i.dtype for n, i in ck.tensors.items() if i.dtype.is_floating_point and n not in ck.quant_states}
    return fw.coarsest(storage)


def divergence(rows: list[dict], allowance: float, l_ref: torch.Tensor, l_cand: torch.Tensor, output: str) -> dict:
    """The per-block rows with the first block beyond `allowance`, and the logits' agreement."""
    first = first_divergence(rows, allowance)
    out = {"allowance": allowance, "blocks": rows, "first_divergence": None if first is None else rows[first]["block"],
           "first_divergence_index": first}
    if output == "logits" and l_ref.shape == l_cand.shape and l_ref.shape[-1] > 1:
        out["logits"] = logits_agreement(l_ref, l_cand)
    return out


def streamed_forward_checks(base: Checkpoint, adapter_paths: list[Path], weights: list[float],
                            candidates: dict[str, Checkpoint], *, device: torch.device, dtype: torch.dtype,
                            batch: int, seq_len: int, seed: int, atol: float | None, rtol: float | None,
                            min_carried: float, log=None,
                            base_source: Callable[[Checkpoint, torch.device], TensorSource] | None = None,
                            trained_on=None) -> dict:
    """logits.forward_checks' comparisons, computed by streamed passes, plus per-block divergence.

    Passes: base, base + adapters (PEFT, unmerged; its block outputs kept, float32 on the CPU), then each
    candidate (its blocks compared with the reference's as they come). `base_source(ck, device)` gives the
    reference's base weights (default: the checkpoint itself, a 4-bit one dequantized). Returns the dict
    forward_checks returns; each merged/tuned comparison gains "divergence" (divergence()) and "streamed": True.
    `trained_on` (qlora_base.TrainedOn) of a 4-bit type adds a second reference, BASE as the adapters saw it in
    training, and a merged candidate is compared with both, as logits.forward_checks does (trained_on.py).
    """
    from .logits import comparison
    from .trained_on import quantized_base_info, references_only, streamed_dequantized_reference, streamed_merged

    say = log or (lambda _m: None)
    make_source = base_source or (lambda ck, dev: TensorSource(ck, "base", dev))
    timings: dict = {}
    say("streamed forward: building the base model on the meta device")
    s = Streamed(skeleton(base.path, dtype), device)
    vocab = s.model.get_input_embeddings().num_embeddings
    limit = fw.usable_positions(s.model, base.config)
    ids, source = fw.make_batch(fw.model_dir(base.path), vocab, batch, min(seq_len, limit) if limit else seq_len, seed)
    src = make_source(base, device)
    output = "logits"

    def run(streamed, source, on_block, timing, retry=None):
        """One streamed pass. `retry` (a reference pass: resets what on_block collected): a non-finite output
        is run again with every non-block weight held for the pass (Note: lazy non-block weights)."""
        nonlocal output
        t0 = time.perf_counter()
        with streamed.run(source, on_block) as unused:
            out, output = fw.run_outputs(streamed.model, ids)
        if retry is not None and streamed.lazy and not bool(torch.isfinite(out).all()):
            streamed.lazy = False
            retry()
            with streamed.run(source, on_block) as unused:
                out, output = fw.run_outputs(streamed.model, ids)
        timings[timing] = time.perf_counter() - t0
        return out, unused

    say("streamed forward: base")
    l_base, _ = run(s, src, None, "stream_base", retry=lambda: None)
    _check_loaded(l_base, base)
    comparisons, l_ref, ref_blocks = [], None, []
    if adapter_paths:
        say("streamed forward: base + adapters through PEFT (unmerged)")
        s.model = fw.attach_adapters(s.model, adapter_paths, weights, low_cpu_mem_usage=True)
        s.rebind()
        l_ref, _ = run(s, src, lambda i, n, h: ref_blocks.append((n, h.detach().float().cpu())), "stream_reference",
                       retry=ref_blocks.clear)
        _check_loaded(l_ref, base)
        effect = comparison("adapters", "base", "base + adapters (PEFT, unmerged)", fw.logit_metrics(l_base, l_ref),
                            None, gated=False, note="the adapters' effect on the logits (informational)")
        if torch.equal(l_base, l_ref) and any(w != 0 for w in weights):
            from .logits import _nonzero_B

            if _nonzero_B(adapter_paths):  # see logits._reference_logits
                effect.update(gated=True, passed=False,
                              error="the PEFT reference computes exactly the base's outputs although the adapters' "
                                    "lora_B factors are non-zero: the adapters did not attach")
        comparisons.append(effect)
    # Note: no gc.collect between passes (fw.free_memory): a skeleton holds placeholders only, and every loaded
    # tensor is freed by reference count when its block's hook puts the placeholders back; a full collection
    # costs ~0.7 s with transformers imported.
    l_deq, deq_blocks, deq_error, qlora_info = None, [], None, None  # which base did the adapters see?
    if trained_on is not None and adapter_paths and base.is_quantized:
        qlora_info = quantized_base_info(trained_on)
    elif trained_on is not None and trained_on.quantized and adapter_paths:
        l_deq, deq_blocks, deq_error = streamed_dequantized_reference(s, run, base, trained_on, device, say)
    resident = s.max_resident
    del s
    for role, ck in candidates.items():
        if role == "quantized":  # (validate() refuses --stream with --quantized)
            continue
        say(f"streamed forward: the {role} checkpoint")
        rows: list[dict] = []
        rows_dq: list[dict] = []  # against the dequantized reference, when there is one

        def on_block(i, name, h, rows=rows, rows_dq=rows_dq):
            for ref, out in ((ref_blocks, rows), (deq_blocks, rows_dq)):
                if i < len(ref) and ref[i][0] == name:
                    out.append({"block": name, **block_metrics(ref[i][1], h.detach().float().cpu())})

        try:
            c = Streamed(skeleton(ck.path, dtype), device)
            l_cand, unused = run(c, TensorSource(ck, role, device), on_block, f"stream_{role}")
            resident = max(resident, c.max_resident)
            del c
        except LoratoolsError as e:
            comparisons.append(comparison(role, "", str(ck.path), None, None, passed=False, error=e.one_line()))
            continue
        loading = {"unexpected": unused} if unused else None
        if role == "merged":
            storage = stored_float_dtype(ck)
            tol = fw.quantized_tolerance(atol=atol, rtol=rtol) if ck.is_quantized else \
                fw.exact_tolerance(dtype, storage, atol=atol, rtol=rtol)
            c = comparison("merged", "base + adapters (PEFT, unmerged)", str(ck.path), fw.logit_metrics(l_ref, l_cand),
                           tol, loading=loading)
            allowance = tol.rtol
            if l_deq is not None or deq_error is not None:  # both bases (trained_on.py)
                found, qlora_info = streamed_merged(ck, trained_on, l_ref, l_deq, deq_error, l_cand, tol, loading,
                                                    comparison, rows, rows_dq, output)
                comparisons += found
                continue
        else:  # tuned
            metrics = fw.logit_metrics(l_cand, l_ref)
            carried = fw.carried_fraction(l_base, l_ref, l_cand)
            c = comparison("tuned", str(ck.path), "base + adapters (PEFT, unmerged)", None, None, **metrics, **carried,
                           min_carried=min_carried, passed=metrics["finite"] and carried["carried"] >= min_carried,
                           loading=loading)
            allowance = block_allowance(dtype, stored_float_dtype(ck))
        c["divergence"] = divergence(rows, allowance, l_ref, l_cand, output)
        c["streamed"] = True
        comparisons.append(c)
    if qlora_info is None and (l_deq is not None or deq_error is not None):  # no merged candidate
        found, qlora_info = references_only(trained_on, l_ref, l_deq, deq_error, comparison)
        comparisons += found
    return {"comparisons": comparisons, "batch_source": source, "seq_len": ids.shape[1], "timings": timings,
            "peak_gpu_bytes": fw.peak_memory(device), "output": output, "max_resident_blocks": resident,
            "trained_on": qlora_info}


def _check_loaded(out: torch.Tensor, ck: Checkpoint) -> None:
    """A reference that is not finite used a placeholder (a weight no block hook loaded) or a non-finite
    stored weight: either way the streamed pass cannot serve as a reference."""
    if not bool(torch.isfinite(out).all()):
        raise InputError("the streamed reference forward is not finite: a weight was used outside the block that "
                         "holds it, or the checkpoint holds NaN/Inf (run validate with --no-stream to tell)",
                         path=ck.path)


__all__ = ["Streamed", "TensorSource", "block_allowance", "divergence", "find_blocks", "skeleton",
           "streamed_forward_checks"]
