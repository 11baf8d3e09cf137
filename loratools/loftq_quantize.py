"""`loratools quantize --nf4 --loftq --rank R`: the NF4 base and its LoftQ adapter, one weight at a time.

quantize.py streams the checkpoint as usual; for each weight this run targets it calls `quantizer(name)`
instead of its plain quantization, which runs loftq.py's alternation with the base's own 4-bit format
and keeps the (small) factors. After the last tensor, `write_adapter` puts the PEFT adapter into the same
atomic output, so base and adapter appear together or not at all.

Note: where the adapter goes.
    `OUT/loftq_init/` (adapter_config.json + adapter_model.safetensors): the subfolder PEFT's LoftQ
    recipe and the published LoftQ checkpoints use (`PeftModel.from_pretrained(base, OUT,
    subfolder="loftq_init")`). transformers ignores the subfolder when it loads OUT.
Note: the pair.
    The written base is the last quantization of the alternation, in the format the command writes
    (blocksize, double quantization, the checkpoint dtype): B·A is the rank-r SVD of exactly the error
    a user's `from_pretrained(OUT)` has. PEFT's loftq_init quantizes without double quantization in
    float32; with a float32 checkpoint and --no-double-quant ours is that computation (same A, B and
    dequantized base, tested), otherwise it is the same alternation with the format actually written.
    lora_alpha = r, since PEFT's factors are unscaled (scaling 1).
Note: memory.
    One weight is worked on at a time (float32, plus its SVD). The factors, r·(out + in) floats per
    module, are kept until the end and written then: for r = 16 on a 2048 x 5632 projection that is
    0.4 % of the weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import LoraModule, adapter_config, adapter_tensors
from .bnb4bit import dequantize_weight, quantize_weight_measured
from .device import torch_threads
from .errors import InputError, UsageError
from .extract import module_matches
from .hf_layout import CONV1D
from .io.output import write_adapter_files
from .loftq import loftq
from .task_types import adapter_task_type

ADAPTER_DIR = "loftq_init"


@dataclass(frozen=True)
class LoftQOptions:
    """--rank, --iters and --target-modules of `quantize --loftq`."""

    rank: int
    iters: int = 1
    target_modules: tuple[str, ...] | None = None  # PEFT's list semantics + globs; None: every 4-bit weight

    def to_json(self) -> dict:
        return {"rank": self.rank, "iters": self.iters,
                "target_modules": list(self.target_modules) if self.target_modules else None}


def check_options(options: LoftQOptions, quant_type: str) -> None:
    """Usage errors that need no checkpoint."""
    if quant_type != "nf4":
        raise UsageError(f"--loftq needs --nf4 (LoftQ's initialisation is defined for NF4), not --{quant_type}")
    if options.rank < 1:
        raise UsageError(f"--rank must be at least 1, not {options.rank}")
    if options.iters < 1:
        raise UsageError(f"--iters must be at least 1, not {options.iters}")


@dataclass
class _Row:
    name: str  # stored weight name
    module: str
    shape: tuple[int, ...]
    before_sq: float
    base_sq: float
    after_sq: float
    ref_sq: float

    def to_json(self) -> dict:
        rel = (lambda sq: (sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0)
        return {"name": self.name, "module": self.module, "shape": list(self.shape),
                "rel_error_before": rel(self.before_sq), "rel_error_base": rel(self.base_sq),
                "rel_error_after": rel(self.after_sq)}


@dataclass
class LoftQRun:
    """The LoftQ side of one quantize run: targets, the per-weight quantizer, the factors, the report."""

    options: LoftQOptions
    targets: dict[str, str]  # stored weight name -> module name (PEFT's key path)
    conv1d: bool  # the targets are GPT-2 Conv1D weights (fan_in_fan_out adapter)
    task_type: str | None
    base_name: str
    source: str  # the input checkpoint, named in errors
    provenance: object = None  # the base's io.provenance.Provenance: the adapter file carries the same record
    modules: dict[str, LoraModule] = field(default_factory=dict)
    rows: list[_Row] = field(default_factory=list)

    def quantizer(self, name: str):
        """A stand-in for quantize.quantize_tensor for weight `name`: same arguments, same return value
        (stored tensors, QuantState, err_sq and ref_sq of the written base against the weight)."""
        def run(w: torch.Tensor, fmt, *, conv1d: bool, device: torch.device, threads: int):
            x = w.to(device)
            if not bool(torch.isfinite(x).all()):  # the SVD would fail with a LAPACK error
                raise InputError("non-finite values (inf or NaN): LoftQ's SVD needs a finite weight",
                                 path=self.source, tensor=name)
            if conv1d:
                x = x.t().contiguous()  # the [out, in] weight transformers quantizes (quantize.quantize_tensor)

            def quantize(res: torch.Tensor):
                # Each step is the written format's exact bytes; its chunks spread over threads with torch
                # single-threaded (quantize.single_threaded_torch), as in a plain quantize.
                with torch_threads(1, device):
                    stored, qs, _ = quantize_weight_measured(
                        res.to(x.dtype), quant_type=fmt.quant_type, blocksize=fmt.blocksize,
                        double_quant=fmt.double_quant, workers=threads if device.type == "cpu" else 1,
                        mean_threads=threads)
                    return (stored, qs), dequantize_weight(stored, qs).float()

            with torch_threads(threads, device):  # the SVD and the matmuls use every core
                result = loftq(x, self.options.rank, self.options.iters, quantize)
            stored, qs = result.stored
            module = self.targets[name]
            r = self.options.rank
            self.modules[module] = LoraModule(module, "linear", result.A.cpu(), result.B.cpu(), r, float(r), 1.0,
                                              fan_in_fan_out=conv1d)
            self.rows.append(_Row(name, module, tuple(w.shape), result.before_sq, result.base_sq, result.after_sq,
                                  result.ref_sq))
            return {k: v.cpu() for k, v in stored.items()}, qs, result.base_sq, result.ref_sq
        return run

    def adapter_config(self) -> dict:
        r = self.options.rank
        return adapter_config(r=r, lora_alpha=r, target_modules=list(self.modules),
                              base_model_name_or_path=self.base_name, fan_in_fan_out=self.conv1d,
                              task_type=self.task_type)

    def write_adapter(self, tmp: Path, durability) -> list[str]:
        """write_checkpoint's extra_files: the adapter into OUT/loftq_init (float32 factors, as PEFT's)."""
        directory = Path(tmp) / ADAPTER_DIR
        directory.mkdir()
        # the provenance record (options, loftq's included, and input digests) is the base's
        files = write_adapter_files(directory, self.adapter_config(), adapter_tensors(self.modules),
                                    provenance=self.provenance, durability=durability)
        return [f"{ADAPTER_DIR}/{f}" for f in files]

    def report(self) -> dict:
        """The summary's "loftq" block: options, the adapter's place and the per-module errors."""
        tot = {k: sum(getattr(r, k) for r in self.rows) for k in ("before_sq", "base_sq", "after_sq", "ref_sq")}
        rel = (lambda sq: (sq / tot["ref_sq"]) ** 0.5 if tot["ref_sq"] > 0 else 0.0)
        return {**self.options.to_json(), "adapter": ADAPTER_DIR, "lora_alpha": self.options.rank,
                "modules": [r.to_json() for r in self.rows],
                "total": {"modules": len(self.rows), "rel_error_before": rel(tot["before_sq"]),
                          "rel_error_base": rel(tot["base_sq"]), "rel_error_after": rel(tot["after_sq"])}}


def plan_loftq(options: LoftQOptions, ck, targets: dict[str, str], modules: dict[str, str], *,
               base_name: str, provenance=None) -> LoftQRun:
    """Which 4-bit weights get a LoftQ pair, checked before anything is written.

    Args:
        options: rank, iters, target patterns.
        ck: the dense input checkpoint.
        targets: the quantize plan's weights (stored name -> "linear" | "conv1d").
        modules: stored weight name -> the model's module name (quantize._stored_modules).
        base_name: recorded as the adapter's base_model_name_or_path.
        provenance: the output's provenance record, written into the adapter's file too.
    """
    chosen = {n: modules[n] for n in targets}
    if options.target_modules:
        for p in options.target_modules:
            if not any(module_matches(m, [p]) for m in chosen.values()):
                raise UsageError(f"--target-modules {p!r} matches no weight that quantize writes in 4 bits "
                                 f"(e.g. {sorted(chosen.values())[0]})", path=ck.path)
        chosen = {n: m for n, m in chosen.items() if module_matches(m, options.target_modules)}
    for name in chosen:
        shape = tuple(ck.tensors[name].shape)
        if options.rank > min(shape):
            raise UsageError(f"--rank {options.rank} is larger than this weight allows: LoftQ's rank is at most "
                             f"min(out, in) = {min(shape)} for {list(shape)}", path=ck.path, tensor=name)
    conv = {targets[n] == CONV1D for n in chosen}
    task, _ = adapter_task_type(ck.config, list(chosen.values()))
    return LoftQRun(options, chosen, conv == {True}, task, base_name, str(ck.path), provenance)
