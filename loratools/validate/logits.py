"""validate's forward passes: base, base + adapters through PEFT (unmerged, the reference) and each
candidate, built by transformers from their own config.json and run on one deterministic batch; logits
compared (metrics and tolerances: forward.py). One model is held at a time."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import forward as fw
from ..dtypes import FLOAT_DTYPES
from ..errors import LoratoolsError
from ..io import Checkpoint
from .trained_on import dequantized_reference, merged_comparisons, quantized_base_info, references_only


@dataclass
class _Run:
    """What every pass of one validate run shares."""

    device: torch.device
    dtype: torch.dtype
    seed: int
    say: Callable[[str], None]
    timings: dict = field(default_factory=dict)
    output: str = "logits"  # what the models' natural output is (fw.run_outputs)

    def load(self, path) -> fw.Loaded:
        return fw.load_model(path, device=self.device, dtype=self.dtype, seed=self.seed)

    def logits(self, model, ids, timing: str) -> torch.Tensor:
        t0 = time.perf_counter()
        out, self.output = fw.run_outputs(model, ids)
        self.timings[timing] = time.perf_counter() - t0
        return out


def comparison(name: str, reference: str, candidate: str, metrics: dict | None, tol: fw.Tolerance | None,
               **extra) -> dict:
    """One comparison of the report: metrics judged against `tol` (or only for finiteness without one)."""
    out = {"name": name, "reference": reference, "candidate": candidate}
    if metrics is not None:
        out.update(fw.judge(metrics, tol) if tol is not None else {**metrics, "passed": metrics["finite"]})
    out.update(extra)
    return out


def forward_checks(base: Checkpoint, adapter_paths: list[Path], weights: list[float],
                   candidates: dict[str, Checkpoint], *, device: torch.device, dtype: torch.dtype, batch: int,
                   seq_len: int, seed: int, atol: float | None, rtol: float | None, min_carried: float,
                   log=None, trained_on=None) -> dict:
    """Logits of base, base + adapters (PEFT, unmerged) and each candidate on one batch, compared.

    Holds one model at a time (plus logits): the base (with the adapters attached) is dropped before
    any candidate is loaded. Returns {"comparisons", "batch_source", "seq_len", "timings", "peak_gpu_bytes",
    "trained_on"}. `trained_on` (a qlora_base.TrainedOn) of a 4-bit type adds the reference on the base the
    adapters saw in training, and a merged candidate is compared with both (trained_on.py).
    """
    run = _Run(device, dtype, seed, log or (lambda _m: None))
    ids, source, l_base, l_ref, comparisons = _reference_logits(base, adapter_paths, weights, batch, seq_len, run)
    l_qref, qref_error = None, None
    quant = candidates.get("quantized")
    if quant is not None and quant.is_quantized and base.is_quantized:
        l_qref = l_base  # a 4-bit BASE is its own quantized reference
    elif quant is not None and quant.is_quantized:
        l_qref, qref_error = _quantized_reference(base, quant, ids, run)
    l_deq, deq_error, qlora_info = None, None, None
    if trained_on is not None and base.is_quantized and adapter_paths:
        qlora_info = quantized_base_info(trained_on)
    elif trained_on is not None and trained_on.quantized and adapter_paths:
        l_deq, deq_error = dequantized_reference(base, adapter_paths, weights, ids, run, trained_on)
    for role, ck in candidates.items():
        run.say(f"forward: loading the {role} checkpoint")
        try:
            cl = run.load(ck.path)
        except LoratoolsError as e:
            comparisons.append(comparison(role, "", str(ck.path), None, None, passed=False, error=e.one_line()))
            continue
        l_cand = run.logits(cl.model, ids, f"forward_{role}")
        run.timings[f"load_{role}"] = cl.seconds
        loading = {k: v for k, v in (("missing", cl.missing), ("unexpected", cl.unexpected),
                                     ("mismatched", cl.mismatched)) if v} or None
        del cl
        fw.free_memory()
        if role == "merged":
            storage = {i.dtype for n, i in ck.tensors.items() if i.dtype.is_floating_point and n not in ck.quant_states}
            tol = fw.quantized_tolerance(atol=atol, rtol=rtol) if ck.is_quantized else \
                fw.exact_tolerance(dtype, fw.coarsest(storage), atol=atol, rtol=rtol)
            if l_deq is not None or deq_error is not None:  # which base did the adapters see? (trained_on.py)
                rows, qlora_info = merged_comparisons(ck, trained_on, l_ref, l_deq, deq_error, l_cand, tol, loading,
                                                      comparison)
                comparisons += rows
                continue
            comparisons.append(comparison("merged", "base + adapters (PEFT, unmerged)", str(ck.path),
                                          fw.logit_metrics(l_ref, l_cand), tol, loading=loading))
        elif role == "tuned":
            metrics = fw.logit_metrics(l_cand, l_ref)
            carried = fw.carried_fraction(l_base, l_ref, l_cand)
            passed = metrics["finite"] and carried["carried"] >= min_carried
            comparisons.append(comparison("tuned", str(ck.path), "base + adapters (PEFT, unmerged)", None, None,
                                          **metrics, **carried, min_carried=min_carried, passed=passed,
                                          loading=loading))
        elif role == "quantized":
            comparisons += _quantized_comparisons(base, ck, l_base, l_cand, l_qref, qref_error, dtype, atol, rtol,
                                                  loading)
    if qlora_info is None and (l_deq is not None or deq_error is not None):  # no merged candidate
        rows, qlora_info = references_only(trained_on, l_ref, l_deq, deq_error, comparison)
        comparisons += rows
    return {"comparisons": comparisons, "batch_source": source, "seq_len": ids.shape[1], "timings": run.timings,
            "peak_gpu_bytes": fw.peak_memory(device), "output": run.output, "trained_on": qlora_info}


def _reference_logits(base: Checkpoint, adapter_paths: list[Path], weights: list[float], batch: int, seq_len: int,
                      run: _Run) -> tuple:
    """(ids, batch source, base logits, base + adapters logits or None, [the adapters' effect])."""
    run.say("forward: loading the base with transformers")
    loaded = run.load(base.path)
    run.timings["load_base"] = loaded.seconds
    model = loaded.model
    vocab = model.get_input_embeddings().num_embeddings
    limit = fw.usable_positions(model, base.config)
    used_len = min(seq_len, limit) if limit else seq_len
    ids, source = fw.make_batch(fw.model_dir(base.path), vocab, batch, used_len, run.seed)
    l_base = run.logits(model, ids, "forward_base")
    comparisons, l_ref = [], None
    if adapter_paths:
        run.say("forward: attaching the adapters through PEFT (unmerged)")
        t0 = time.perf_counter()
        model = fw.attach_adapters(model, adapter_paths, weights)
        l_ref = fw.run_logits(model, ids)
        run.timings["forward_adapters"] = time.perf_counter() - t0
        effect = comparison("adapters", "base", "base + adapters (PEFT, unmerged)", fw.logit_metrics(l_base, l_ref),
                            None, gated=False, note="the adapters' effect on the logits (informational)")
        if torch.equal(l_base, l_ref) and any(w != 0 for w in weights) and _nonzero_B(adapter_paths):
            # Note: an adapter with non-zero B that changes nothing did not attach (or is masked by one that
            # is not the model's): a reference equal to the base would pass any merge of nothing.
            effect.update(gated=True, passed=False,
                          error="the PEFT reference computes exactly the base's outputs although the adapters' "
                                "lora_B factors are non-zero: the adapters did not attach")
        comparisons.append(effect)
    del model, loaded
    fw.free_memory()
    return ids, source, l_base, l_ref, comparisons


def _nonzero_B(adapter_paths: list[Path]) -> bool:
    """Whether any adapter has a non-zero lora_B (or lora_embedding_B) factor: it should change the outputs."""
    from safetensors import safe_open

    for path in adapter_paths:
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            if any(bool(f.get_tensor(k).any()) for k in f.keys() if ".lora_B." in k or k.endswith(".lora_embedding_B")):
                return True
    return False


def _quantized_reference(base: Checkpoint, quant: Checkpoint, ids: torch.Tensor, run: _Run
                         ) -> tuple[torch.Tensor | None, str | None]:
    """(logits, error) of BASE quantized by bitsandbytes' rule as `quant` records, dequantized.

    Note: the quantized reference.
        How far a 4-bit model's logits move from its base depends on the model (a correct NF4 copy of the
        generated random 0.1B Llama moves 42%, the fixtures 3-8%), so no threshold against the base tells
        a correct quantization from a broken one. The gate compares the candidate with BASE itself
        quantized by bitsandbytes' rule (bnb4bit, the same bytes) and dequantized: what a correct 4-bit
        copy computes, up to the 4-bit layers' compute dtype.
    """
    run.say("forward: the base quantized as the candidate records (bitsandbytes' rule, dequantized)")
    loaded = run.load(base.path)
    t0 = time.perf_counter()
    missing = fw.fake_quantize_(loaded.model, base, quant)
    logits, error = None, None
    if missing:
        error = (f"cannot rebuild the quantized reference: {len(missing)} 4-bit weight(s) have no "
                 f"counterpart in the base model (first: {missing[0]})")
    else:
        logits = fw.run_logits(loaded.model, ids)
    run.timings["forward_quantized_reference"] = time.perf_counter() - t0
    del loaded
    fw.free_memory()
    return logits, error


def _quantized_comparisons(base: Checkpoint, ck: Checkpoint, l_base, l_cand, l_qref, qref_error, dtype, atol, rtol,
                           loading) -> list[dict]:
    """The quantization's effect (informational) and the gated comparison with the quantized reference."""
    out = [comparison("quantization", "base", str(ck.path), fw.logit_metrics(l_base, l_cand), None, gated=False,
                      note="the 4-bit quantization's effect on the logits (informational)")]
    reference = "base quantized by bitsandbytes' rule (dequantized)"
    if qref_error is not None:
        out.append(comparison("quantized", reference, str(ck.path), None, None, passed=False, error=qref_error))
    elif l_qref is not None:  # (a dense candidate is a static problem already)
        tol = fw.exact_tolerance(dtype, compute_dtype_4bit(ck), atol=atol, rtol=rtol)
        out.append(comparison("quantized", "base (4-bit)" if base.is_quantized else reference, str(ck.path),
                              fw.logit_metrics(l_qref, l_cand), tol, loading=loading))
    return out


def compute_dtype_4bit(ck: Checkpoint) -> torch.dtype:
    """The coarsest dtype bitsandbytes' 4-bit layers round to: their compute dtype (quantization_config's
    bnb_4bit_compute_dtype) or the dtype the weights are dequantized to (the quant_states')."""
    from ..quantized import quant_states

    qc = (ck.config or {}).get("quantization_config") or {}
    compute = FLOAT_DTYPES.get(str(qc.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."), torch.float32)
    return fw.coarsest({compute, *(qs.torch_dtype for qs in quant_states(ck).values())})
