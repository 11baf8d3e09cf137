"""`loratools validate`: is a merged, extracted or quantized checkpoint what it claims to be?

Three layers of evidence, cheapest first, all reported together (one module each):

1. static.py: headers and the adapters' small tensors (fit, ranks, NaN/Inf, layouts, provenance).
2. tensors.py: each candidate tensor, streamed, against what it should be, with a diagnosis.
3. logits.py: reference forward passes (transformers + PEFT, unmerged), logits compared.

report.py turns the findings into the report (the `--json` document) and the error to raise.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from .. import forward as fw
from ..adapter import load_adapter
from ..errors import LoratoolsError, UnsupportedError, UsageError
from ..io import Checkpoint
from ..peft_types import refuse_mixed
from .logits import forward_checks
from .report import comparison_problem, environment, failure, finite_numbers, row, summary
from .static import provenance_checks, static_checks
from .streamed import choose_stream, streamed_forward_checks
from .trained_on import base_view_for_tensors, resolve_trained_on
from .tensors import (QUANT_WEIGHT_RTOL, TensorCheck, check_tensor, lsq_coefficients, lsq_scale, merged_tensor_checks,
                      quantized_tensor_checks, tuned_tensor_report, ulp, wrong_layout)

PathLike = str | Path


def validate(base: PathLike, adapters: Sequence[PathLike] = (), *, merged: PathLike | None = None,
             tuned: PathLike | None = None, quantized: PathLike | None = None,
             weights: Sequence[float] | None = None, device: str = "auto", dtype: str = "auto", batch: int = 4,
             seq_len: int = 128, seed: int = 0, atol: float | None = None, rtol: float | None = None,
             min_carried: float = 0.0, static_only: bool = False, trained_on: str | None = "auto",
             stream: bool | None = None, plot: bool = False,
             log: Callable[[str], None] | None = None) -> dict:
    """Run every check and return the report. Never raises for a failed check.

    Args:
        base: the base checkpoint (dense or bitsandbytes 4-bit).
        adapters: LoRA adapters in any format loratools.formats reads (PEFT, MLX-LM, kohya, GGUF LoRA; read
            against `base`), applied together (base + Σ wᵢ·ΔWᵢ).
        merged: a checkpoint that should equal base + adapters (tensor by tensor and by logits).
        tuned: a fine-tuned checkpoint; reports how much of base -> tuned the adapters carry.
        quantized: a 4-bit checkpoint that should be BASE quantized.
        weights: one weight per adapter (default 1.0 each), as `merge --weight`.
        device: "auto", "cpu" or "cuda[:N]" for the forward passes and tensor checks.
        dtype: compute dtype of the forward passes ("auto": the model's on CUDA, float32 on the CPU).
        batch, seq_len, seed: the deterministic test batch.
        atol, rtol: logits tolerances overriding the defaults derived from the dtypes (forward.py).
        min_carried: `tuned` passes when base + adapters carry at least this fraction of its logit change.
        static_only: header and tensor checks only; build no model.
        stream: run the forward passes block by block from disk (streamed.py; per-block divergence) when True,
            whole models when False, and decide by the model's size against free memory when None.
        plot: the caller will draw the per-block divergence (--plot): streams unless stream is False (refused).
        trained_on: what the adapters were trained on: "auto" (detected: qlora_base.py), "fp", "nf4" or
            "fp4". A 4-bit type adds the reference on BASE dequantized through it (validate/trained_on.py).
        log: called with a line before each stage (progress).

    Returns:
        The report, the `--json` document: "passed", "summary", "problems", "notes", "tensors",
        "comparisons", ... (docs/validate.md). `failure(report)` gives the ValidationFailed to raise.

    Raises:
        UsageError: inconsistent options. LoratoolsError: an input that cannot be read at all.

    Example:
        >>> report = validate("fixtures/tiny-llama", ["fixtures/llama-lora"], merged="merged/", batch=2)
        >>> report["passed"], report["summary"]
        (True, 'all checks passed: 1 adapter fits the base; 8 merged tensors within allowance; ...')
    """
    adapter_paths = [Path(a) for a in adapters]
    weights = _check_options(adapter_paths, weights, merged, tuned, batch, seq_len, atol, rtol)
    dev = fw.resolve_device(device)
    base_ck = Checkpoint(base)
    compute = fw.resolve_compute_dtype(dtype, dev, base_ck.config)
    candidates = {role: Checkpoint(p) for role, p in (("merged", merged), ("tuned", tuned), ("quantized", quantized))
                  if p is not None}
    say = log or (lambda _m: None)
    streaming = (False, "--static-only") if static_only else choose_stream(
        stream, [base_ck, *candidates.values()], dev, compute, plot=plot, quantized=quantized is not None)
    t_start = time.perf_counter()
    say("static checks: headers and adapter tensors")
    with _peft_dirs(adapter_paths, base) as work:
        trained = resolve_trained_on(trained_on, adapter_paths, base_ck, candidates.get("merged"))
        report = _validate(base, adapter_paths, work, weights, merged, tuned, quantized, dev, base_ck, compute,
                           candidates, say, t_start, static_only, batch, seq_len, seed, atol, rtol, min_carried,
                           trained, streaming=streaming)
        return _named_as_given(report, dict(zip(map(str, work), map(str, adapter_paths))))


@contextmanager
def _peft_dirs(paths: list[Path], base: PathLike):
    """PEFT directories holding the adapters at `paths` (each PEFT one itself). validate's header checks and PEFT's own loader
    (the logits reference) read PEFT directories: an adapter in another format (MLX-LM, kohya, GGUF LoRA) is
    read once into PEFT's form (formats.read, against the base) and written to a temporary PEFT directory
    for the run; one that cannot be read at all raises its one-line error, as an unreadable base does."""
    from .. import formats
    from ..adapter import _is_peft_dir
    from ..io.durability import Durability

    with tempfile.TemporaryDirectory(prefix="loratools-validate-") as tmp:
        work = []
        for i, p in enumerate(paths):
            fmt = None if _is_peft_dir(p) or not p.exists() else formats.detect(p)
            if fmt is None or fmt.name == "peft":
                work.append(p)
                continue
            files = formats.read(p, base)
            out = Path(tmp) / f"adapter{i}-peft"
            out.mkdir()
            formats.get("peft").write(files, out, durability=Durability(sync=False))
            work.append(out)
        yield work


def _named_as_given(doc, names: dict[str, str]):
    """The report with every temporary PEFT directory of _peft_dirs named as the adapter the user gave."""
    names = {k: v for k, v in names.items() if k != v}
    if not names:
        return doc
    if isinstance(doc, str):
        for k, v in names.items():
            doc = doc.replace(k, v)
        return doc
    if isinstance(doc, dict):
        return {k: _named_as_given(v, names) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_named_as_given(v, names) for v in doc]
    return doc


def _validate(base, given, adapter_paths, weights, merged, tuned, quantized, dev, base_ck, compute, candidates, say,
              t_start, static_only, batch, seq_len, seed, atol, rtol, min_carried, trained=None,
              streaming=(False, "")) -> dict:
    """validate() on adapters that are PEFT directories (`given`: the paths as the user gave them)."""
    problems, notes, adapter_ok = static_checks(base_ck, adapter_paths, candidates, given=given)
    adapters_ok = all(adapter_ok)
    loaded = [load_adapter(p, typed=True) for p in adapter_paths] if adapters_ok else []
    refuse_mixed(loaded, weights)  # a LoHa, LoKr, ... adapter (peft_types) is checked alone, as merge takes it
    if tuned is not None and any(a.peft_type != "LORA" for a in loaded):
        raise UnsupportedError(f"--tuned compares LoRA deltas with a fine-tune; convert the {loaded[0].peft_type} "
                               f"adapter first: `loratools convert ADAPTER --to lora --rank R`")
    # Note: order of work. The forward passes run before the tensor checks: the tensor checks' many
    # chunk-sized temporaries can stay in the allocator's heap afterwards, and should not add to the
    # peak of the model loads. The problems are listed static, tensor, logits whatever the order.
    skipped = _forward_skipped(base_ck, static_only, adapters_ok, problems)
    fwd = None
    if skipped is None and streaming[0]:
        fwd = streamed_forward_checks(base_ck, adapter_paths, weights, candidates, device=dev, dtype=compute,
                                      batch=batch, seq_len=seq_len, seed=seed, atol=atol, rtol=rtol,
                                      min_carried=min_carried, log=say, trained_on=trained)
    elif skipped is None:
        fwd = forward_checks(base_ck, adapter_paths, weights, candidates, device=dev, dtype=compute, batch=batch,
                             seq_len=seq_len, seed=seed, atol=atol, rtol=rtol, min_carried=min_carried, log=say,
                             trained_on=trained)
    qlora = (fwd or {}).get("trained_on")
    notes += [row("trained_on", f"trained on: {n}") for n in (trained.notes if trained else ())]
    bview = base_view_for_tensors(base_ck, trained, candidates["merged"], (qlora or {}).get("merged_into")) \
        if "merged" in candidates else None
    tensors = _tensor_checks(base_ck, candidates, loaded, weights, dev, adapters_ok, problems, notes, say, bview)
    problems += [comparison_problem(c) for c in (fwd["comparisons"] if fwd else []) if not c["passed"]]
    report = {
        "kind": "validate",
        "passed": not problems,
        "summary": None,
        "base": str(base),
        "adapters": [{"path": str(p), "weight": w} for p, w in zip(given, weights)],
        "merged": None if merged is None else str(merged),
        "tuned": None if tuned is None else str(tuned),
        "quantized": None if quantized is None else str(quantized),
        "device": fw.device_description(dev),
        "dtype": str(compute).removeprefix("torch."),
        "batch": batch,
        "seq_len": fwd["seq_len"] if fwd else seq_len,
        "seed": seed,
        "batch_source": fwd["batch_source"] if fwd else None,
        "output": fwd["output"] if fwd else None,
        "forward_skipped": skipped,
        "problems": problems,
        "notes": notes,
        "tensors": tensors,
        "comparisons": fwd["comparisons"] if fwd else [],
        "timings": {**(fwd["timings"] if fwd else {}), "total": time.perf_counter() - t_start},
        "peak_gpu_bytes": fwd["peak_gpu_bytes"] if fwd else None,
        "stream": {"streamed": bool(fwd and streaming[0]), "reason": streaming[1],
                   "max_resident_blocks": (fwd or {}).get("max_resident_blocks")},
        "trained_on": qlora or (trained.to_json() if trained is not None else None),
        "environment": environment(),
    }
    report["summary"] = summary(report)
    return finite_numbers(report)


def _check_options(adapters, weights, merged, tuned, batch, seq_len, atol, rtol) -> list[float]:
    if (merged or tuned) and not adapters:
        raise UsageError(f"--{'merged' if merged else 'tuned'} is compared with base + ADAPTER(s): give the "
                         f"adapter(s) after BASE")
    if weights:
        if len(weights) != len(adapters):
            raise UsageError(f"--weight given {len(weights)} times for {len(adapters)} adapter(s); give one per "
                             f"adapter, in the same order, or none (each then weighs 1.0)")
        weights = [float(w) for w in weights]
    else:
        weights = [1.0] * len(adapters)
    if batch < 1 or seq_len < 1:
        raise UsageError("--batch and --seq-len must be at least 1")
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"{name} must be a finite number >= 0, not {v}")
    return weights


def _forward_skipped(base: Checkpoint, static_only: bool, adapters_ok: bool, problems: list[dict]) -> str | None:
    """Why the forward passes are skipped (None: they run); a base transformers cannot build is a problem."""
    if static_only:
        return "--static-only"
    if not adapters_ok:
        return "the adapters have static problems (PEFT could not load them)"
    try:
        fw.model_dir(base.path)
    except LoratoolsError as e:
        problems.append(row("base", e.one_line(), path=base.path))
        return e.message
    return None


def _tensor_checks(base: Checkpoint, candidates: dict[str, Checkpoint], loaded: list, weights: list[float], dev,
                   adapters_ok: bool, problems: list[dict], notes: list[dict], say, base_view=None) -> dict:
    """The streamed tensor checks of each candidate that passed its layout check; appends to problems/notes."""
    layout_ok = {role: not any(p["check"] == role for p in problems) for role in candidates}
    tensors: dict = {}
    if "merged" in candidates and adapters_ok:
        if candidates["merged"].is_quantized:
            notes.append(row("merged", "merged: a 4-bit merged checkpoint is compared by logits only",
                             path=candidates["merged"].path))
        else:
            say("tensor checks: merged against base + adapter deltas")
            rows, probs = merged_tensor_checks(base, candidates["merged"], loaded, weights, dev, base_view)
            tensors["merged"] = {"checked": len(rows), "failed": sum(not r["passed"] for r in rows), "rows": rows}
            problems += probs
    if "tuned" in candidates and adapters_ok and layout_ok["tuned"]:
        say("tensor checks: tuned against base + adapter deltas")
        tensors["tuned"] = tuned_tensor_report(base, candidates["tuned"], loaded, weights, dev)
    if "quantized" in candidates and layout_ok["quantized"] and candidates["quantized"].is_quantized:
        say("tensor checks: quantized against the base")
        rows, probs = quantized_tensor_checks(base, candidates["quantized"], dev)
        tensors["quantized"] = {"checked": len(rows), "failed": sum(not r["passed"] for r in rows), "rows": rows}
        problems += probs
    return tensors


__all__ = ["QUANT_WEIGHT_RTOL", "TensorCheck", "check_tensor", "failure", "forward_checks", "lsq_coefficients",
           "lsq_scale", "merged_tensor_checks", "provenance_checks", "quantized_tensor_checks", "static_checks",
           "tuned_tensor_report", "ulp", "validate", "wrong_layout"]
