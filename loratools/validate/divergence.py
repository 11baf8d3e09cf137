"""Where a candidate parts from its reference: per-block hidden-state metrics, the first block beyond the
rounding allowance, and the logits' agreement (KL, top-k). Pure tensor functions; the streamed forward
passes (streamed.py) feed them."""
from __future__ import annotations

import torch

TOP_K = 5


def block_metrics(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    """One block's output hidden states, candidate C against reference R (same shape, compared in float32):
    rel_err ‖C − R‖_F / ‖R‖_F, cosine (mean over positions of cos(R[b, t], C[b, t])), max_abs max |C − R|,
    finite (every value of C finite)."""
    if ref.shape != cand.shape:
        raise ValueError(f"hidden states of shape {list(cand.shape)} cannot be compared with {list(ref.shape)}")
    ref, cand = ref.float(), cand.float()
    finite = bool(torch.isfinite(cand).all())
    d = torch.nan_to_num(cand - ref, nan=float("inf"))
    ref_norm = float(ref.norm())
    flat = ref.reshape(-1, ref.shape[-1]) if ref.dim() > 1 else ref.reshape(1, -1)
    cflat = torch.nan_to_num(cand).reshape(flat.shape)
    cos = torch.nn.functional.cosine_similarity(flat, cflat, dim=-1, eps=1e-12)
    return {"rel_err": float(d.norm()) / ref_norm if ref_norm > 0 else float(d.norm()),
            "cosine": float(cos.mean()), "max_abs": float(d.abs().max()) if d.numel() else 0.0,
            "finite": finite}


def first_divergence(rows: list[dict], allowance: float) -> int | None:
    """Index of the first row whose rel_err exceeds `allowance` (or whose values are not finite); None if none."""
    for i, r in enumerate(rows):
        if not r["finite"] or not r["rel_err"] <= allowance:
            return i
    return None


def logits_agreement(ref: torch.Tensor, cand: torch.Tensor, k: int = TOP_K) -> dict:
    """How far the candidate's next-token distributions are from the reference's, per position [.., vocab]:
    kl the mean of KL(softmax R ‖ softmax C) (nats), max_kl its largest value, topk the mean overlap of the
    two top-k token sets (k capped at the vocabulary), top1 the share of positions whose arg-max agrees.
    Only meaningful for logits (a bare model's hidden states have no distribution)."""
    ref = ref.float().reshape(-1, ref.shape[-1])
    cand = torch.nan_to_num(cand.float(), nan=0.0).reshape(ref.shape)
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
    k = max(1, min(k, ref.shape[-1]))
    tr, tc = ref.topk(k, -1).indices, cand.topk(k, -1).indices
    overlap = (tr.unsqueeze(-1) == tc.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return {"kl": float(kl.mean()), "max_kl": float(kl.max()), "topk": float(overlap.mean()), "k": k,
            "top1": float((ref.argmax(-1) == cand.argmax(-1)).float().mean())}


__all__ = ["TOP_K", "block_metrics", "first_divergence", "logits_agreement"]
