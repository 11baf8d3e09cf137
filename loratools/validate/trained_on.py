"""validate's answer to "which base did the adapter see?" (qlora_base.py holds the facts).

With adapters trained on a 4-bit base (detected, or `--trained-on nf4|fp4`) and a 16-bit BASE, a second
reference is built: BASE with every weight that was 4-bit in training replaced by deq(Q(W)), plus the
adapters through PEFT, unmerged. A merged candidate is then compared with both references: the one it
was merged into (named by the merge's provenance record, else the closer one) is gated at rounding
level, the other is reported beside it, and the two references' own gap says what the choice changes.
A 4-bit BASE needs no second reference: the usual one already computes with its dequantized weights.
"""
from __future__ import annotations

import time

import torch

from .. import forward as fw
from ..errors import LoratoolsError
from ..io import Checkpoint, read_provenance
from ..qlora_base import RequantizedView, TrainedOn, record_trained_on, requantize_model_, resolve

FP_REFERENCE = "base + adapters (PEFT, unmerged)"


def dequantized_label(trained: TrainedOn) -> str:
    return f"{trained.label}-dequantized base + adapters (PEFT, unmerged)"


def dequantized_reference(base: Checkpoint, adapter_paths, weights, ids: torch.Tensor, run, trained: TrainedOn
                          ) -> tuple[torch.Tensor | None, str | None]:
    """(logits, error) of BASE requantized as in training (qlora_base.requantize_model_) + the adapters."""
    run.say(f"forward: the base as the adapters saw it in training ({trained.label}, dequantized) + adapters")
    loaded = run.load(base.path)
    t0 = time.perf_counter()
    missing = requantize_model_(loaded.model, base, trained)
    logits, error = None, None
    if missing:
        error = (f"cannot rebuild the {trained.label}-dequantized base: {len(missing)} weight(s) that were 4-bit in "
                 f"training have no counterpart in the model (first: {missing[0]})")
    else:
        logits = fw.run_logits(fw.attach_adapters(loaded.model, adapter_paths, weights), ids)
    run.timings["forward_dequantized_reference"] = time.perf_counter() - t0
    del loaded
    fw.free_memory()
    return logits, error


def requantized_source(trained: TrainedOn):
    """For the streamed passes (streamed.py): a TensorSource factory reading BASE as the adapters saw it in
    training, each weight that was 4-bit as deq(Q(W)) (RequantizedView), the rest as stored."""
    from .streamed import TensorSource

    class RequantizedSource(TensorSource):
        def __init__(self, ck: Checkpoint, device):
            super().__init__(ck, "base", device)
            self.requantized = RequantizedView(ck, trained, device)

        def read_stored(self, stored: str) -> torch.Tensor:
            return self.requantized.read(stored)

    return RequantizedSource


def streamed_dequantized_reference(streamed, run, base: Checkpoint, trained: TrainedOn, device, say
                                   ) -> tuple[torch.Tensor | None, list, str | None]:
    """(logits, [(block, hidden states)], error) of the streamed model `streamed` (base with the adapters
    attached) run on BASE requantized as in training; `run(streamed, source, on_block, timing)` is
    streamed_forward_checks' pass runner."""
    say(f"streamed forward: the base as the adapters saw it in training ({trained.label}, dequantized) + adapters")
    blocks: list = []
    try:
        source = requantized_source(trained)(base, device)
    except LoratoolsError as e:
        return None, [], e.one_line()
    logits, _ = run(streamed, source, lambda i, n, h: blocks.append((n, h.detach().float().cpu())),
                    "stream_dequantized_reference")
    return logits, blocks, None


def streamed_merged(ck: Checkpoint, trained: TrainedOn, l_ref, l_deq, deq_error, l_cand, tol, loading, comparison,
                    rows: list[dict], rows_dq: list[dict], output: str) -> tuple[list[dict], dict]:
    """merged_comparisons for the streamed passes: the gated comparison also gets the per-block divergence
    against the reference it is gated on (`rows`: block metrics against base + adapters, `rows_dq`: against
    the dequantized one)."""
    from .streamed import divergence

    found, info = merged_comparisons(ck, trained, l_ref, l_deq, deq_error, l_cand, tol, loading, comparison)
    gated = next(c for c in found if c["name"] == "merged")
    dq = gated.get("merged_into") == "dequantized"
    gated["divergence"] = divergence(rows_dq if dq else rows, tol.rtol, l_deq if dq else l_ref, l_cand, output)
    gated["streamed"] = True
    return found, info


def recorded_base(ck: Checkpoint) -> str | None:
    """Which base a loratools merge folded into, from its provenance record: "dequantized" (merge
    --into-dequantized), "16-bit" (any other merge of a dense base), None (no merge record)."""
    rec = read_provenance(next(iter(ck.metadata.values()), {})) if ck.metadata else None
    if not rec or rec.get("command") != "merge":
        return None
    return "dequantized" if (rec.get("options") or {}).get("into_dequantized") else "16-bit"


def _gap(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("max_abs", "rel_err", "cosine", "top1")}


def merged_comparisons(ck: Checkpoint, trained: TrainedOn, l_ref, l_deq, deq_error: str | None, l_cand, tol,
                       loading, comparison) -> tuple[list[dict], dict]:
    """(comparisons, the report's "trained_on" object) for a merged candidate against both references.
    `comparison` is logits.comparison (passed in: this module is imported by logits.py)."""
    info = {**trained.to_json(), "merged_into": None, "known_from": None, "gap_to_16bit": None,
            "gap_to_dequantized": None, "references_gap": None, "matches_training_base": None, "line": None}
    m_fp = fw.logit_metrics(l_ref, l_cand)
    if l_deq is None:
        out = [comparison("merged", FP_REFERENCE, str(ck.path), m_fp, tol, loading=loading),
               comparison("merged_dequantized", dequantized_label(trained), str(ck.path), None, None, passed=False,
                          error=deq_error)]
        info["line"] = deq_error
        return out, info
    m_dq = fw.logit_metrics(l_deq, l_cand)
    into = recorded_base(ck)
    info["known_from"] = "the merge's provenance record" if into else "the closer reference"
    if into is None:
        into = "dequantized" if m_dq["rel_err"] < m_fp["rel_err"] else "16-bit"
    gated, other = (("merged", dequantized_label(trained), m_dq), ("merged_other_base", FP_REFERENCE, m_fp)) \
        if into == "dequantized" else (("merged", FP_REFERENCE, m_fp),
                                       ("merged_other_base", dequantized_label(trained), m_dq))
    refs = fw.logit_metrics(l_ref, l_deq)
    out = [comparison("bases", FP_REFERENCE, dequantized_label(trained), refs, None, gated=False,
                      note="what the choice of base changes in the logits (informational)"),
           comparison(gated[0], gated[1], str(ck.path), gated[2], tol, loading=loading, merged_into=into),
           comparison(other[0], other[1], str(ck.path), other[2], None, gated=False,
                      note="the merged checkpoint against the reference of the other base (informational)")]
    kind = trained.label
    info.update(merged_into=into, gap_to_16bit=_gap(m_fp), gap_to_dequantized=_gap(m_dq), references_gap=_gap(refs),
                matches_training_base=into == "dequantized")
    seen = (f"the {kind} dequantization the adapter was trained on" if into == "dequantized"
            else f"the 16-bit weights, not the {kind} dequantization the adapter was trained on")
    info["line"] = (f"trained on {kind} ({trained.source}): the merged checkpoint was folded into {seen} "
                    f"({info['known_from']}); logits gap to 16-bit base + adapters: rel {m_fp['rel_err']:.3g}, "
                    f"max |Δ| {m_fp['max_abs']:.3g}; to {kind}-dequantized base + adapters: rel {m_dq['rel_err']:.3g}, "
                    f"max |Δ| {m_dq['max_abs']:.3g}")
    return out, info


def references_only(trained: TrainedOn, l_ref, l_deq, deq_error: str | None, comparison) -> tuple[list[dict], dict]:
    """(comparisons, "trained_on" object) without a merged candidate: the two references' gap alone."""
    info = {**trained.to_json(), "merged_into": None, "known_from": None, "gap_to_16bit": None,
            "gap_to_dequantized": None, "references_gap": None, "matches_training_base": None, "line": deq_error}
    if l_deq is None:
        return [comparison("bases", FP_REFERENCE, dequantized_label(trained), None, None, passed=False,
                           error=deq_error)], info
    refs = fw.logit_metrics(l_ref, l_deq)
    info["references_gap"] = _gap(refs)
    info["line"] = (f"trained on {trained.label} ({trained.source}): base + adapters and {trained.label}-dequantized "
                    f"base + adapters differ by rel {refs['rel_err']:.3g}, max |Δ| {refs['max_abs']:.3g} (what the "
                    f"choice of base for a merge changes)")
    return [comparison("bases", FP_REFERENCE, dequantized_label(trained), refs, None, gated=False,
                       note="what the choice of base changes in the logits (informational)")], info


def resolve_trained_on(option: str | None, adapter_paths, base: Checkpoint, merged: Checkpoint | None) -> TrainedOn:
    """qlora_base.resolve, and with nothing detected ("auto"), what a loratools merge recorded in the merged
    checkpoint's provenance (merge --into-dequantized / a QLoRA merge)."""
    trained = resolve(option, adapter_paths, base)
    if trained.quantized or trained.source == "base" or (option or "auto") != "auto" or merged is None:
        return trained
    recorded = record_trained_on(read_provenance(next(iter(merged.metadata.values()), {})) if merged.metadata else None)
    return trained if recorded is None else TrainedOn(**{**recorded.__dict__, "notes": trained.notes})


def base_view_for_tensors(base: Checkpoint, trained: TrainedOn | None, merged: Checkpoint, merged_into: str | None):
    """The view of BASE a merged checkpoint's tensors are checked against: BASE requantized when it was
    merged into the dequantized base (forward passes' finding, else the merge's record), else None (BASE)."""
    if trained is None or not trained.quantized or base.is_quantized:
        return None
    into = merged_into or recorded_base(merged)
    return RequantizedView(base, trained) if into == "dequantized" else None


def quantized_base_info(trained: TrainedOn) -> dict:
    """The "trained_on" object when BASE is itself 4-bit."""
    return {**trained.to_json(), "merged_into": "4-bit base", "known_from": "BASE", "gap_to_16bit": None,
            "gap_to_dequantized": None, "references_gap": None, "matches_training_base": True,
            "line": "BASE is a 4-bit checkpoint: the reference computes with its dequantized weights (bitsandbytes), "
                    "what an adapter trained on it saw; the 16-bit weights are not given, so the gap to them is not "
                    "measured"}


__all__ = ["FP_REFERENCE", "base_view_for_tensors", "dequantized_label", "dequantized_reference", "merged_comparisons",
           "streamed_merged", "quantized_base_info", "recorded_base", "references_only", "requantized_source",
           "resolve_trained_on", "streamed_dequantized_reference"]
