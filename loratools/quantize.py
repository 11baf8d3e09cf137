"""`loratools quantize` and `loratools dequantize`: bitsandbytes 4-bit checkpoints, streamed.

quantize writes what `AutoModelForCausalLM.from_pretrained(BASE, quantization_config=
BitsAndBytesConfig(load_in_4bit=True, ...))` + `save_pretrained` writes, tensor for tensor and byte for
byte, without building the model: one weight is read, quantized (bnb4bit.py), measured and written
before the next is read. dequantize is the inverse view (quantized.py) written out as a dense checkpoint.

Which weights are quantized (Note: selection).
    Exactly the modules transformers converts to `Linear4bit`: every `nn.Linear` (exact class) and
    GPT-2 `Conv1D` of the model class named in config.json (hf_layout.py), except transformers'
    default skips (tied weights, the output embedding, the module of the last parameter) and
    `_keep_in_fp32_modules`; `--skip-modules` adds patterns to those defaults. Biases, norms and
    embeddings stay dense, and so do MoE expert tensors (3-D parameters of no nn.Linear: transformers +
    bitsandbytes leave them dense, and write Mixtral's back per expert) and routers that are not an
    nn.Linear. Stored names are matched to the model's modules through key_layout.py (LLaVA's
    `language_model.model.` is the model's `model.language_model.`); the output keeps the stored names.
Note: the written skip list.
    At load time a non-null `llm_int8_skip_modules` REPLACES transformers' defaults (so `lm_head`
    would be expected 4-bit unless listed). With no `--skip-modules` we write null, as transformers
    does, and the load recomputes the same defaults; with `--skip-modules` we write defaults + the
    given patterns, so that the load converts exactly the modules we quantized.
Note: dtype.
    transformers loads the checkpoint in the dtype of config.json (`dtype="auto"`) before it
    quantizes, so weights are cast to that dtype first (the quant_state records it) and the other
    floating-point tensors are written in it too; without a config dtype, tensors keep their own.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from . import parallel
from .bnb4bit import BLOCKSIZES, QUANT_STATE_PREFIX, QUANT_TYPES, QuantState, quantize_weight_measured
from .device import resolve_device, torch_threads
from .dtypes import FLOAT_DTYPES, cast_floats
from .errors import InputError, UnsupportedError, UsageError
from .hf_layout import CONV1D, layout_for, should_convert
from .io import Checkpoint, TensorSpec, config_with_dtype
from .io.output import write_checkpoint
from .io.provenance import provenance
from .io.safetensors_format import element_size
from .key_layout import checkpoint_layout, identity_layout
from .quantized import DenseView

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Longest spelling json.dumps gives a float (17 significant digits, sign, exponent): bounds the
# quant_state JSON length before the double-quant offset is known (see ShardWriter shrinkable).
_LONGEST_FLOAT = -1.2345678901234567e-300


def single_threaded_torch(device: torch.device) -> ContextManager[None]:
    """Run the CPU maths with one intra-op thread (restored afterwards).

    Note: threads.
        The 4-bit maths runs as a dozen short torch ops per 2^18-element chunk (bnb4bit CHUNK). With
        several intra-op threads each op is a fork/join whose cost dominates, and on a busy machine a
        descheduled worker stalls every op (measured in docs/quantize.md). The cores are used instead
        by whole chunks on separate threads (bnb4bit._map_chunks), the read-ahead
        (Checkpoint.prefetched) and the write-behind (io/output.py).
    """
    return torch_threads(1, device)


@dataclass(frozen=True)
class QuantFormat:
    """What a quantized weight is: the 4-bit type, values per absmax scale, absmax in 8 bits or not."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True


# -- per-tensor maths -----------------------------------------------------------------------------

@dataclass
class TensorReport:
    """One quantized weight's line of the report: sizes and the squared error sums it came from."""

    name: str
    shape: tuple[int, ...]  # dense shape, as in the checkpoint
    params: int
    bytes_before: int
    bytes_after: int
    err_sq: float  # sum of squared errors, float64
    ref_sq: float  # sum of squares of the dense weight

    @property
    def rel_rms(self) -> float:
        """sqrt(err_sq / ref_sq): the RMS error relative to the weight's RMS."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0

    def to_json(self) -> dict:
        """The row of the report's "tensors" list."""
        return {"name": self.name, "shape": list(self.shape), "parameters": self.params,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "bits_per_parameter": 8 * self.bytes_after / self.params, "rel_rms_error": self.rel_rms}


def quantize_tensor(w: torch.Tensor, fmt: QuantFormat, *, conv1d: bool, device: torch.device,
                    threads: int) -> tuple[dict[str, torch.Tensor], QuantState, float, float]:
    """One dense weight (already in the model dtype) -> (stored tensors on CPU, state, err_sq, ref_sq).

    The error is measured against what bitsandbytes will compute at load: the dequantized weight in
    the quant_state dtype. `threads` is torch's thread count when the command started: the chunks are
    spread over that many threads while torch itself runs single-threaded, and the double-quant
    offset is the mean bitsandbytes takes with that many (bnb4bit.quantize_absmax).
    """
    x = w.to(device)
    if conv1d:
        x = x.t().contiguous()  # Conv1D [in, out] is quantized as the Linear it becomes, [out, in]
    workers = parallel.cpu_workers(x.device, threads)  # LORATOOLS_THREADS caps it; the offset keeps `threads`
    stored, qs, (err, ref) = quantize_weight_measured(x, quant_type=fmt.quant_type, blocksize=fmt.blocksize,
                                                      double_quant=fmt.double_quant, workers=workers,
                                                      mean_threads=threads)
    return {k: v.cpu() for k, v in stored.items()}, qs, err, ref


# -- planning -------------------------------------------------------------------------------------

@dataclass
class QuantPlan:
    """Which tensors get quantized (name -> "linear" | "conv1d") and the written skip list."""

    targets: dict[str, str]
    skip_list: list[str] | None  # llm_int8_skip_modules to write
    dtype: torch.dtype | None  # the model dtype (cast target for floating tensors), None = as stored
    selection: str  # "transformers" | "fallback"
    skipped: list[str] = field(default_factory=list)  # 2-D float weights left dense, for the report


_FALLBACK_DENSE = ("embed", "wte", "wpe", "lm_head", "embed_out", "output", "norm", "ln_")


def plan_quantization(ck: Checkpoint, skip_modules: list[str] | None) -> QuantPlan:
    """Which weights transformers would quantize (see `Note: selection`), from config.json alone."""
    layout = layout_for(ck.config)
    user = list(skip_modules) if skip_modules else None
    if layout.source == "transformers":
        defaults = list(layout.default_skips)
        kinds = layout.kinds
    else:
        # Note: fallback selection when transformers cannot build the model class: 2-D float
        # `.weight` tensors whose module name does not look like an embedding, head or norm.
        defaults = ["lm_head"]
        kinds = {n.removesuffix(".weight"): "linear" for n, i in ck.tensors.items()
                 if n.endswith(".weight") and len(i.shape) == 2 and i.dtype.is_floating_point
                 and not any(k in n.rsplit(".", 2)[-2] for k in _FALLBACK_DENSE)}
    patterns = defaults + list(layout.keep_in_fp32) + (user or [])
    if layout.source == "transformers":
        _refuse_unfollowed(ck, kinds, patterns)
    targets, skipped = {}, []
    for name, module in _stored_modules(ck, layout.source).items():
        kind = kinds.get(module)
        info = ck.tensors[name]
        if kind is None or not info.dtype.is_floating_point or len(info.shape) != 2:
            continue
        if should_convert(module, patterns):
            targets[name] = kind
        else:
            skipped.append(name)
    if not targets:
        raise InputError("no weight to quantize: found no nn.Linear/Conv1D weight that transformers would "
                         "quantize (check --skip-modules and config.json)", path=ck.path)
    dtype = FLOAT_DTYPES.get(layout.dtype) if layout.dtype else None
    skip_list = sorted(set(defaults + user)) if user else None
    return QuantPlan(targets, skip_list, dtype, layout.source, sorted(skipped))


def _refuse_unfollowed(ck: Checkpoint, kinds: dict[str, str], patterns: list[str]) -> None:
    """Refuse a stored tensor that transformers converts in a way key_layout does not follow (nomic-bert's
    `Wqkv` chunked into q/k/v_proj) into a weight it would quantize: left dense here, the output's 4-bit
    modules would get dense weights on load (bitsandbytes then fails in forward)."""
    layout = checkpoint_layout(ck)
    for stored, names in layout.unconverted_into.items():
        for module in (n.removesuffix(".weight") for n in names if n.endswith(".weight")):
            if module in kinds and should_convert(module, patterns):
                raise UnsupportedError(f"{layout.unconverted[stored]}, and transformers quantizes {module}: this "
                                       f"checkpoint cannot be quantized as transformers does", path=ck.path,
                                       tensor=stored)


def _stored_modules(ck: Checkpoint, source: str) -> dict[str, str]:
    """Stored weight name -> the module transformers builds it into (key_layout.py: LLaVA's stored
    `language_model.model.layers.0.mlp.up_proj.weight` is `model.language_model.layers.0.mlp.up_proj`), for
    every stored `.weight` that is a whole model parameter. A slice of a fused expert parameter is no
    module's weight: transformers keeps those 3-D parameters dense, and so do we."""
    layout = checkpoint_layout(ck) if source == "transformers" else identity_layout(
        {n: i.shape for n, i in ck.tensors.items()})
    return {name: p.param.removesuffix(".weight") for name, p in layout.parts.items()
            if p.whole and name.endswith(".weight") and p.param.endswith(".weight")}


def quantization_config(*, quant_type: str, double_quant: bool, compute_dtype: str,
                        skip_list: list[str] | None) -> dict:
    """The block transformers' BitsAndBytesConfig.to_dict() writes into config.json (sorted keys)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_list,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _out_dtype(info_dtype: torch.dtype, plan: QuantPlan) -> torch.dtype:
    return cast_floats(info_dtype, plan.dtype)


def _check_options(fmt: QuantFormat, compute_dtype: str) -> None:
    if fmt.quant_type not in QUANT_TYPES:
        raise UsageError(f"quant type must be one of {', '.join(QUANT_TYPES)}, not {fmt.quant_type!r}")
    if fmt.blocksize not in BLOCKSIZES:
        raise UsageError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, not {fmt.blocksize}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")


# -- the commands ---------------------------------------------------------------------------------

def quantize_checkpoint(src: str | os.PathLike, output: str | os.PathLike, *, quant_type: str = "nf4",
                        blocksize: int = 64, double_quant: bool = True, compute_dtype: str = "bfloat16",
                        skip_modules: list[str] | None = None, device: str = "auto", max_shard_size: int,
                        force: bool = False, on_tensor: Callable[[str], None] | None = None,
                        loftq=None) -> dict:
    """Quantize a dense checkpoint to a bitsandbytes 4-bit one (what transformers' load_in_4bit +
    save_pretrained writes); returns the summary and error report.

    Args:
        src: a dense checkpoint with its config.json.
        output: the directory to create (an io.OutputPath carries its durability).
        quant_type, blocksize, double_quant: the 4-bit format ("nf4"/"fp4", 32..4096, absmax in 8 bits).
        compute_dtype: bnb_4bit_compute_dtype written to config.json.
        skip_modules: patterns kept dense on top of transformers' default skips.
        device: "auto", "cpu" or "cuda" (same bytes on each).
        max_shard_size, force, on_tensor: as for io.output.write_checkpoint.
        loftq: a loftq_quantize.LoftQOptions: also write the LoftQ adapter of the base into
            OUT/loftq_init (see loftq_quantize.py); None for a plain quantization.
    Returns:
        write_checkpoint's summary plus the format, per-tensor "tensors" rows and "total" (and with
        `loftq`, a "loftq" block: per-module errors before and after the correction).
    Example:
        >>> summary = quantize_checkpoint("fixtures/tiny-llama", "/tmp/tiny-nf4", max_shard_size=2**30)
        >>> summary["total"]["rel_rms_error"]
    """
    fmt = QuantFormat(quant_type, blocksize, double_quant)
    _check_options(fmt, compute_dtype)
    if loftq is not None:
        from .loftq_quantize import check_options
        check_options(loftq, quant_type)
    ck = Checkpoint(src)
    _check_dense_source(ck, src)
    dev = resolve_device(device)
    threads = torch.get_num_threads()  # before the maths goes single-threaded (quantize_tensor)
    options = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
               "compute_dtype": compute_dtype, "skip_modules": skip_modules or None,
               "max_shard_size": max_shard_size, "loftq": loftq.to_json() if loftq else None}
    # Started first: the input digests are computed by a background thread (hashlib releases the
    # GIL) while transformers builds the meta model below, instead of competing with the maths.
    record = provenance("quantize", options, {"checkpoint": src})
    plan = plan_quantization(ck, skip_modules)
    run = None
    if loftq is not None:
        from .loftq_quantize import plan_loftq
        run = plan_loftq(loftq, ck, plan.targets, _stored_modules(ck, plan.selection), base_name=str(output),
                         provenance=record)
    for name in plan.targets:
        info = ck.tensors[name]
        if (plan.dtype or info.dtype) not in FLOAT_DTYPES.values():
            raise UnsupportedError(f"only float16/bfloat16/float32 weights can be quantized, not {info.dtype_name}",
                                   path=src, tensor=name)
    specs, shrinkable = _quantized_specs(ck, plan, fmt)
    config = dict(ck.config)
    config["quantization_config"] = quantization_config(quant_type=quant_type, double_quant=double_quant,
                                                        compute_dtype=compute_dtype, skip_list=plan.skip_list)
    reports: list[TensorReport] = []
    with single_threaded_torch(dev):
        summary = write_checkpoint(
            output, inputs=[src], force=force, specs=specs + shrinkable,
            tensors=_quantized_tensors(ck, plan, fmt, dev, threads, reports, run),
            side_files=ck.non_weight_files(), config=config, provenance=record, max_shard_size=max_shard_size, on_tensor=on_tensor,
            shrinkable=[s.name for s in shrinkable], extra_files=run.write_adapter if run else None)
    summary.update({
        "quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
        "compute_dtype": compute_dtype, "device": dev.type, "selection": plan.selection,
        "skip_modules": plan.skip_list, "dense_weights_kept": plan.skipped,
        "tensors": [r.to_json() for r in reports],
        "total": _totals(ck, reports, _weight_bytes(summary)),
    })
    if run is not None:
        summary["loftq"] = run.report()
    return summary


def _check_dense_source(ck: Checkpoint, src) -> None:
    if ck.is_quantized:
        raise InputError("already a 4-bit checkpoint; quantize takes a dense one (see `loratools dequantize`)",
                         path=src)
    if ck.config is None:
        raise InputError("no config.json beside the weights: transformers needs it (and its "
                         "quantization_config) to load a 4-bit checkpoint", path=src)


def _quantized_specs(ck: Checkpoint, plan: QuantPlan, fmt: QuantFormat) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The plan: dense tensors as they are (cast to the model dtype) and each target's stored tensors in
    its place; separately, every quant_state JSON, planned last at its longest possible length."""
    specs, shrinkable = [], []
    for name, info in ck.tensors.items():
        if name not in plan.targets:
            specs.append(TensorSpec(name, _out_dtype(info.dtype, plan), info.shape))
            continue
        shape = info.shape[::-1] if plan.targets[name] == CONV1D else info.shape
        # "bfloat16" is the longest dtype name and _LONGEST_FLOAT the longest offset: an upper bound
        probe = QuantState(fmt.quant_type, fmt.blocksize, "bfloat16", tuple(shape),
                           nested_offset=_LONGEST_FLOAT if fmt.double_quant else None)
        for suffix, (dtype, sh) in probe.aux_specs().items():
            (shrinkable if suffix.startswith(QUANT_STATE_PREFIX) else specs).append(TensorSpec(name + suffix, dtype, sh))
    return specs, shrinkable


def _quantized_tensors(ck: Checkpoint, plan: QuantPlan, fmt: QuantFormat, dev: torch.device, threads: int,
                       reports: list[TensorReport], loftq=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors in plan order (quant_state JSONs last), appending a report per target; the
    weights a loftq_quantize.LoftQRun targets are quantized by it (same arguments and results)."""
    states = []
    for name, t in ck.prefetched(ck.tensors):
        out_dtype = _out_dtype(t.dtype, plan)
        if name not in plan.targets:
            yield name, t.to(out_dtype)
            continue
        w = t.to(out_dtype)
        quantize = loftq.quantizer(name) if loftq is not None and name in loftq.targets else quantize_tensor
        stored, qs, err, ref = quantize(w, fmt, conv1d=plan.targets[name] == CONV1D, device=dev, threads=threads)
        del t, w
        after = 0
        for suffix, tensor in stored.items():
            after += tensor.numel() * tensor.element_size()
            if suffix.startswith(QUANT_STATE_PREFIX):
                states.append((name + suffix, tensor))
            else:
                yield name + suffix, tensor
        info = ck.tensors[name]
        reports.append(TensorReport(name, info.shape, info.numel, info.numel * element_size(out_dtype),
                                    after, err, ref))
    yield from states


def _totals(ck: Checkpoint, reports: list[TensorReport], bytes_after: int) -> dict:
    q_params = sum(r.params for r in reports)
    total_params = sum(i.numel for i in ck.tensors.values())
    err = sum(r.err_sq for r in reports)
    ref = sum(r.ref_sq for r in reports)
    data_before = sum(i.nbytes for i in ck.tensors.values())
    data_after = data_before - sum(r.bytes_before - r.bytes_after for r in reports)
    return {
        "quantized_tensors": len(reports),
        "quantized_parameters": q_params,
        "parameters": total_params,
        "rel_rms_error": math.sqrt(err / ref) if ref > 0 else 0.0,
        "quantized_bytes_before": sum(r.bytes_before for r in reports),
        "quantized_bytes_after": sum(r.bytes_after for r in reports),
        "bits_per_quantized_parameter": 8 * sum(r.bytes_after for r in reports) / q_params,
        "bytes_before": ck.bytes_on_disk(),
        "bytes_after": bytes_after,
        "tensor_bytes_before": data_before,
        "tensor_bytes_after": data_after,
        "bits_per_parameter": 8 * data_after / total_params,
    }


def _weight_bytes(summary: dict) -> int:
    """Bytes of the written weight files (shards + index), as Checkpoint.bytes_on_disk counts them (not
    the LoftQ adapter's, in a subfolder)."""
    out = Path(summary["output"])
    return sum((out / f).stat().st_size for f in summary["files"]
               if "/" not in f and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")))


def dequantize_checkpoint(src: str | os.PathLike, output: str | os.PathLike, *, dtype: str | None = None,
                          device: str = "auto", max_shard_size: int, force: bool = False,
                          on_tensor: Callable[[str], None] | None = None) -> dict:
    """Write the dense view of a 4-bit checkpoint (quantized.DenseView) as an ordinary checkpoint.

    Args:
        src: a bitsandbytes 4-bit checkpoint.
        output: the directory to create (an io.OutputPath carries its durability).
        dtype: "float16", "bfloat16" or "float32" for the floating tensors; None keeps the dtype each
            quant_state records (and each dense tensor's own).
        device, max_shard_size, force, on_tensor: as for quantize_checkpoint.
    Returns:
        write_checkpoint's summary plus "tensors", "dequantized_tensors", "device" and "dtype".
    Example:
        >>> dequantize_checkpoint("/tmp/tiny-nf4", "/tmp/tiny-dense", dtype="float16", max_shard_size=2**30)
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, not {dtype!r}")
    ck = Checkpoint(src)
    if not ck.is_quantized:
        raise InputError("not a 4-bit checkpoint (no bitsandbytes quant_state); dequantize takes the output "
                         "of `loratools quantize` or of transformers' save_pretrained with load_in_4bit", path=src)
    dev = resolve_device(device)
    view = DenseView(ck, device=str(dev))
    target = FLOAT_DTYPES[dtype] if dtype else None
    specs = [TensorSpec(n, cast_floats(d, target), s) for n, (d, s) in view.specs.items()]
    config = dict(ck.config) if ck.config is not None else None
    if config is not None:
        config.pop("quantization_config", None)
        if dtype:
            config = config_with_dtype(config, dtype)

    def read(name: str) -> torch.Tensor:
        if view.quant_state(name) is not None:
            return view.read(name, dtype=target).cpu()
        t = view.read(name)
        return t.to(cast_floats(t.dtype, target))

    def tensors():
        # the next tensor is read and dequantized on a reader thread while this one is written
        yield from parallel.prefetch(read, view.specs)
        view.close()

    with single_threaded_torch(dev):
        summary = write_checkpoint(
            output, inputs=[src], force=force, specs=specs, tensors=tensors(), side_files=ck.non_weight_files(),
            config=config, provenance=provenance("dequantize", {"dtype": dtype, "max_shard_size": max_shard_size},
                                                 {"checkpoint": src}),
            max_shard_size=max_shard_size, on_tensor=on_tensor)
    summary.update({"tensors": len(specs), "dequantized_tensors": len(view.packed), "device": dev.type,
                    "dtype": dtype or "as quantized"})
    return summary
