"""validate's tensor checks, streamed one tensor at a time (float32 temporaries in chunks).

`--merged` against base + Σ wᵢ·ΔWᵢ (lora_math: PEFT's merge arithmetic in float32), element by element
within rounding of the merged dtype, with a diagnosis for each failing tensor; `--tuned` a per-module
account of how much of the weight change the adapters carry; `--quantized` a per-tensor dequantization
error. Logits say *whether* a merged model is wrong, not *where*, and in bfloat16 a wrong scale on one
module can hide under the logits' allowance: comparing each tensor names the module.

Note: the per-element allowance.
    A correct merge rounds W₀ + ΔW once (or once per adapter, as PEFT does) into the merged dtype, and
    may round ΔW on its own first (PEFT casts an embedding delta before adding it). So for each element
    |merged − expected| ≤ k·ulp(expected) + slack, with ulp taken in the merged tensor's dtype,
    k = 1 + (number of adapters touching it) (+2 with DoRA, whose norm is rounded too) and slack =
    Σ (2·ulp(max|ΔWᵢ|) + 2·r·eps₃₂·max|ΔWᵢ|): the delta's own rounding and a float32 matmul's error
    (max|ΔW| bounded by max‖Bᵢ‖·max‖Aⱼ‖·scale, no matmul needed). An untouched tensor may only be cast:
    k = 1, slack = 0.

Note: diagnoses.
    For a failing adapted tensor, R = merged − start (start = the base tensor, or the saved one for
    modules_to_save / an embedding base layer) is fitted against hypotheses H by least squares
    (c = ⟨R, H⟩ / ⟨H, H⟩), each accepted when start + c·H passes the same allowance: H = ΔW (c ≈ 0:
    delta missing; c ≈ −1: subtracted; else a wrong scale), ΔW laid out transposed (fan_in_fan_out
    ignored), the plain LoRA delta of a DoRA module (magnitude not applied). Failing tensors are also
    matched against every other tensor's expected value (first 256 elements and norm): swapped modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import Adapter
from ..checks import resolve_base_key
from ..io import Checkpoint
from ..quantized import DenseView
from .report import row

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}
EPS32 = 2.0 ** -23
CHUNK = 1 << 20  # elements per chunk in element-wise checks: bounds the float32 temporaries
HEAD = 256  # elements in a tensor fingerprint
QUANT_WEIGHT_RTOL = 0.25  # per-tensor ‖Q − W‖/‖W‖ allowed for a 4-bit weight (NF4 ≈ 0.09, FP4 ≈ 0.12)


# -- pure tensor functions -------------------------------------------------------------------------------

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (x float32): 2^(exponent − mantissa bits), at least the subnormal step."""
    if dtype not in MANTISSA_BITS:
        return torch.zeros_like(x, dtype=torch.float32)
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.abs().float().clamp_min(fi.tiny))
    out = torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 1 - MANTISSA_BITS[dtype])
    return out.clamp_min(fi.tiny * fi.eps)


def ulp_scalar(x: float, dtype: torch.dtype) -> float:
    """ulp() of one number."""
    return float(ulp(torch.tensor([abs(x)], dtype=torch.float32), dtype)[0])


@dataclass
class TensorCheck:
    """Element-wise comparison of a candidate tensor with its expected value."""

    numel: int
    n_bad: int  # elements beyond the allowance (non-finite ones included)
    max_ratio: float  # max |cand − expected| / allowance
    max_abs: float
    err_norm: float
    ref_norm: float

    @property
    def passed(self) -> bool:
        return self.n_bad == 0


def check_tensor(cand: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, k: float = 1.0,
                 slack: float = 0.0, device: torch.device | str = "cpu") -> TensorCheck:
    """|cand − expected| ≤ k·ulp_dtype(expected) + slack for every element, in chunks of CHUNK elements.
    A non-float dtype allows only equality; a NaN or Inf in the candidate always fails."""
    c_flat, e_flat = cand.reshape(-1), expected.reshape(-1)
    n_bad, max_ratio, max_abs, err_sq, ref_sq = 0, 0.0, 0.0, 0.0, 0.0
    exact = dtype not in MANTISSA_BITS
    for i in range(0, c_flat.numel(), CHUNK):
        c = c_flat[i:i + CHUNK].to(device=device, dtype=torch.float32)
        e = e_flat[i:i + CHUNK].to(device=device, dtype=torch.float32)
        err = (c - e).abs_().nan_to_num_(nan=float("inf"))
        if exact:
            ratio = torch.where(err > 0, float("inf"), 0.0)
        else:
            ratio = err / ulp(e, dtype).mul_(k).add_(slack)
        n_bad += int((ratio > 1).sum())
        max_ratio = max(max_ratio, float(ratio.max()))
        max_abs = max(max_abs, float(err.max()))
        err_sq += float(torch.linalg.vector_norm(err)) ** 2
        ref_sq += float(torch.linalg.vector_norm(e)) ** 2
    return TensorCheck(int(c_flat.numel()), n_bad, max_ratio, max_abs, math.sqrt(err_sq), math.sqrt(ref_sq))


def lsq_scale(r: torch.Tensor, h: torch.Tensor) -> float:
    """The c minimising ‖r − c·h‖ (0 when h is zero)."""
    hh = float(h.double().square().sum())
    return float((r.double() * h.double()).sum()) / hh if hh > 0 else 0.0


def lsq_coefficients(r: torch.Tensor, parts: list[torch.Tensor]) -> list[float]:
    """The cᵢ minimising ‖r − Σ cᵢ·partsᵢ‖ (normal equations in float64; parts are few)."""
    flat = [p.reshape(-1).double() for p in parts]
    gram = torch.tensor([[float(a @ b) for b in flat] for a in flat], dtype=torch.float64)
    rhs = torch.tensor([float(a @ r.reshape(-1).double()) for a in flat], dtype=torch.float64)
    return [float(x) for x in torch.linalg.lstsq(gram, rhs.unsqueeze(1)).solution.squeeze(1)]


def wrong_layout(delta: torch.Tensor) -> torch.Tensor:
    """ΔW as a merge that ignores fan_in_fan_out lays it out: B @ A ([out, in]) poured into the stored
    [in, out] shape (its transpose when square, a reshape otherwise)."""
    return delta.T.contiguous().reshape(delta.shape)


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """The first HEAD elements, float32 on the CPU: enough to tell which tensor a value belongs to."""
    return t.reshape(-1)[:HEAD].detach().to("cpu", torch.float32).clone()


def nice(c: float) -> str:
    """A coefficient as a message shows it (3 significant digits)."""
    return f"{c:.3g}"


# -- merged: tensor by tensor ----------------------------------------------------------------------------

def _step_slack(steps, dtype: torch.dtype, is_bias: bool) -> float:
    """Scalar part of the allowance for one tensor: each delta's own rounding and matmul error."""
    slack = 0.0
    for s in steps:
        m = s.module
        if s.variant.typed:  # a peft_types module: merged with PEFT's own ops in float32, as the expectation is
            continue
        sw = abs(m.scale * s.weight)
        if is_bias:
            dmax = float(m.bias.float().abs().max()) * sw if m.bias.numel() else 0.0
            slack += 2 * ulp_scalar(dmax, dtype)
            continue
        # max|B @ A| ≤ max_i ‖B[i, :]‖ · max_j ‖A[:, j]‖ (Cauchy-Schwarz): no dense matmul needed
        dmax = float(m.B.float().norm(dim=1).max()) * float(m.A.float().norm(dim=0).max()) * sw
        slack += 2 * ulp_scalar(dmax, dtype) + 2 * m.r * EPS32 * dmax
    return slack


def _diagnose(cand: torch.Tensor, start: torch.Tensor, expected: torch.Tensor, plan, base_src: torch.Tensor,
              dtype: torch.dtype, k: float, slack: float, device, adapter_names: list[str]) -> str | None:
    """Name what is wrong with a failing merged tensor, or None when no hypothesis fits."""
    from ..lora_math import lora_delta

    if plan is not None and any(st.variant.typed for st in plan.steps):  # the hypotheses below are LoRA's
        return None
    c = cand.to(device=device, dtype=torch.float32)
    s = start.to(device=device, dtype=torch.float32)
    r = c - s
    d = expected - s

    def fits(h: torch.Tensor) -> float | None:
        coef = lsq_scale(r, h)
        return coef if check_tensor(c, s + coef * h, dtype, k=k, slack=slack, device=device).passed else None

    if plan is not None and plan.replacement is not None and not plan.steps:
        if check_tensor(c, base_src, dtype, k=1, device=device).passed:
            return f"still the base's tensor: the adapter's {plan.replacement_kind} replacement was not applied"
    if float(d.abs().max()) == 0:
        return None
    steps = plan.steps if plan is not None else []
    plain_steps = [st for st in steps if st.module.magnitude is None]
    if len(steps) > 1 and len(plain_steps) == len(steps) and not plan.is_bias:
        # several adapters on one tensor: fit one coefficient per adapter, R ≈ Σ cᵢ·ΔWᵢ
        parts = [lora_delta(st.module, st.weight, device) for st in steps]
        coefs = lsq_coefficients(r, parts)
        guess = s + sum(c_i * h for c_i, h in zip(coefs, parts))
        if check_tensor(c, guess, dtype, k=k, slack=slack, device=device).passed:
            off = [(st, c_i) for st, c_i in zip(steps, coefs) if abs(c_i - 1) >= 0.05]
            if off:
                return "wrong scale: " + "; ".join(
                    f"the delta of adapter {adapter_names[st.adapter_index]} is {nice(c_i)}x the expected one"
                    for st, c_i in off)
    coef = fits(d)
    if coef is not None and abs(coef - 1) >= 0.01:  # (≈ 1: right delta, errors elsewhere: no diagnosis)
        if abs(coef) < 0.05:
            return "the adapter delta is missing: the tensor equals the base"
        if abs(coef + 1) < 0.05:
            return "the adapter delta was subtracted, not added (an unmerge instead of a merge?)"
        scales = sorted({nice(st.module.scale * st.weight) for st in plan.steps}) if plan and plan.steps else []
        return (f"wrong scale: the merged delta is {nice(coef)}x the expected one"
                + (f" (expected scale {', '.join(scales)}, found {', '.join(nice(float(x) * coef) for x in scales)})"
                   if scales else ""))
    if d.dim() == 2 and not (plan and plan.is_bias):
        coef = fits(wrong_layout(d))
        if coef is not None:
            conv1d = any(st.module.fan_in_fan_out for st in plan.steps) if plan else False
            what = ("transposed Conv1D factor: the delta was added as B @ A, not (B @ A)^T (fan_in_fan_out "
                    "ignored)" if conv1d else "transposed factor: the merged delta is laid out as ΔW^T")
            return what + ("" if abs(coef - 1) < 0.05 else f", and scaled {nice(coef)}x")
    if plan is not None and any(st.module.magnitude is not None for st in plan.steps):
        plain = sum(lora_delta(st.module, st.weight, device) for st in plan.steps if not plan.is_bias)
        if isinstance(plain, torch.Tensor):
            coef = fits(plain)
            if coef is not None and abs(coef - 1) < 0.05:
                return "DoRA magnitude not applied: merged as plain LoRA (W + ΔW without m / ||W + ΔW||)"
    return None


def merged_tensor_checks(base: Checkpoint, merged: Checkpoint, adapters: list[Adapter], weights: list[float],
                         device: torch.device | str, base_view: DenseView | None = None
                         ) -> tuple[list[dict], list[dict]]:
    """Every tensor of `merged` against base + Σ wᵢ·ΔWᵢ within rounding. `base_view`: how BASE is read
    (default its DenseView; a qlora_base.RequantizedView for a merge into the dequantized base).

    Returns:
        (rows, problems): a row for every tensor the adapters touch and every failing one (with a
        diagnosis), and a problem row for each failing tensor.
    """
    from ..plan import build_plan

    plan = build_plan(base, adapters, weights)
    bview, cview = base_view or DenseView(base), DenseView(merged)
    keys = list(bview.shapes) + [k for k in plan.tensors if k not in bview.shapes]
    adapter_names = [Path(a.path).name for a in adapters]
    expected_fp: dict[str, tuple] = {}
    rows, problems, failing = [], [], []
    for key in keys:
        ckey = resolve_base_key(cview.shapes, key)
        p = plan.tensors.get(key)
        if ckey is None:
            if key not in bview.shapes:  # a tensor the merge adds (an untied head): not a layout problem
                problems.append(row("merged", f"merged: missing tensor {key} (the adapters change the tied head "
                                    f"{p.source} on its own, so the merge must store it)",
                                    module=key.rsplit(".", 1)[0],
                                    tensor=key, path=merged.path, expected="present", found="missing"))
            continue
        if tuple(cview.shapes[ckey]) != tuple(bview.shapes.get(key, cview.shapes[ckey])):
            continue  # reported by the layout check
        src = bview.read(p.source if p is not None else key)
        start = p.replacement if p is not None and p.replacement is not None else src
        dtype = cview.dtype(ckey)
        e, k, slack = _expected_merged(p, start, dtype, device)
        cand = cview.read(ckey)
        chk = check_tensor(cand, e, dtype, k=k, slack=slack, device=device)
        expected_fp[key] = (tuple(e.shape), fingerprint(e), dtype, k, slack, chk.ref_norm)
        adapted = p is not None and (bool(p.steps) or p.replacement is not None)
        entry = {"tensor": key, "module": key.rsplit(".", 1)[0], "adapted": adapted,
                 "dtype": str(dtype).removeprefix("torch."), "max_abs_err": chk.max_abs,
                 "max_err_over_allowance": chk.max_ratio, "bad_elements": chk.n_bad,
                 "rel_err": chk.err_norm / chk.ref_norm if chk.ref_norm else chk.err_norm, "passed": chk.passed,
                 "diagnosis": None}
        if not chk.passed:
            entry["diagnosis"] = _diagnose(cand, start, e, p, src, dtype, k, slack, device, adapter_names)
            failing.append((key, entry, fingerprint(cand), float(cand.float().norm())))
        if adapted or not chk.passed:
            rows.append(entry)
        del src, start, e, cand
    bview.close()
    cview.close()
    _name_swapped(failing, expected_fp)
    problems += [_merged_problem(key, entry, merged.path) for key, entry, _, _ in failing]
    return rows, problems


def _expected_merged(p, start: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, float, float]:
    """(expected float32 value, k, slack) of one merged tensor: see Note: the per-element allowance."""
    from ..lora_math import bias_delta, merge_weight

    if p is None or not p.steps:
        return start.to(device), 1.0, 0.0
    if p.is_bias and p.steps[0].variant.typed:  # a bias a peft_types module scales (IA3)
        e, _ = p.part.merge(start, p.steps, device, torch.float32)
    elif p.is_bias:
        e = start.to(device=device, dtype=torch.float32) + bias_delta(p.steps, device)
    else:
        e, _ = merge_weight(start.to(device), p.steps, device)
    n_dora = sum(1 for st in p.steps if st.module.magnitude is not None and not p.is_bias)
    k = 1 + len(p.steps) + 2 * n_dora
    slack = _step_slack(p.steps, dtype, p.is_bias)
    if n_dora:
        slack += 4 * math.sqrt(e.shape[-1]) * EPS32 * float(e.abs().max())
    return e, k, slack


def _name_swapped(failing: list[tuple], expected_fp: dict[str, tuple]) -> None:
    """Diagnose a failing tensor that holds what another tensor should hold (modules swapped)."""
    for key, entry, fp, norm in failing:
        shape = expected_fp[key][0]
        for other, (oshape, ofp, odtype, ok, oslack, onorm) in expected_fp.items():
            if other == key or oshape != shape:
                continue
            same_norm = abs(norm - onorm) <= 1e-2 * max(onorm, 1e-30)
            if same_norm and check_tensor(fp, ofp, odtype, k=ok, slack=oslack).passed:
                entry["diagnosis"] = f"holds the weights meant for {other} (modules swapped?)"
                entry["swapped_with"] = other
                break


def _merged_problem(key: str, entry: dict, path) -> dict:
    what = entry["diagnosis"] or (f"differs from base + adapter delta by up to {entry['max_abs_err']:.3g} "
                                  f"({entry['max_err_over_allowance']:.3g}x the rounding allowance, "
                                  f"{entry['bad_elements']} elements beyond it)")
    return row("merged tensors", f"merged: {key}: {what}", module=entry["module"], tensor=key, path=path,
               expected="base + Σ w·ΔW within rounding",
               found=f"max |err| {entry['max_abs_err']:.3g} ({entry['max_err_over_allowance']:.3g}x)")


# -- tuned: how much of the fine-tune's weight change the adapters carry ---------------------------------------

def tuned_tensor_report(base: Checkpoint, tuned: Checkpoint, adapters: list[Adapter], weights: list[float],
                        device: torch.device | str) -> dict:
    """How much of base -> tuned the adapters carry, weight by weight.

    Per adapted tensor, carried = 1 − ‖(T − W) − ΔW‖ / ‖T − W‖; overall, the same over every tensor (an
    untouched tensor carries none of its change); and the share of the weight change inside adapted
    tensors.
    """
    from ..lora_math import merge_weight
    from ..plan import build_plan

    plan = build_plan(base, adapters, weights)
    bview, tview = DenseView(base), DenseView(tuned)
    total_sq = resid_sq = covered_sq = 0.0
    rows = []
    for key in bview.shapes:
        tkey = resolve_base_key(tview.shapes, key)
        if tkey is None or tuple(tview.shapes[tkey]) != tuple(bview.shapes[key]):
            continue
        w = bview.read(key).to(device=device, dtype=torch.float32)
        change = tview.read(tkey).to(device=device, dtype=torch.float32) - w
        p = plan.tensors.get(key)
        csq = float(change.double().square().sum())
        total_sq += csq
        if p is not None and p.steps and not p.is_bias:
            merged, _ = merge_weight(w, p.steps, device)
            rsq = float((change - (merged - w)).double().square().sum())
            covered_sq += csq
            resid_sq += rsq
            rows.append({"tensor": key, "module": key.rsplit(".", 1)[0], "change_norm": math.sqrt(csq),
                         "carried": 1 - math.sqrt(rsq / csq) if csq > 0 else 0.0})
        else:
            resid_sq += csq
    bview.close()
    tview.close()
    return {"weights_carried": 1 - math.sqrt(resid_sq / total_sq) if total_sq > 0 else 0.0,
            "covered_share": covered_sq / total_sq if total_sq > 0 else 0.0, "tensors": rows}


# -- quantized: per-tensor dequantization error -------------------------------------------------------------

def quantized_tensor_checks(base: Checkpoint, quant: Checkpoint, device: torch.device | str
                            ) -> tuple[list[dict], list[dict]]:
    """Each 4-bit weight dequantized against the base (‖Q − W‖/‖W‖ ≤ QUANT_WEIGHT_RTOL); each tensor left
    dense must equal the base's up to a cast. Both are read through the dense view, so a GPT-2 Conv1D
    weight is [in, out] on both sides. Returns (rows, problems)."""
    bview, qview = DenseView(base), DenseView(quant)
    rows, problems = [], []
    for key in bview.shapes:
        qkey = resolve_base_key(qview.shapes, key)
        if qkey is None or tuple(qview.shapes[qkey]) != tuple(bview.shapes[key]):
            continue
        q = qview.read(qkey).to(device)
        w = bview.read(key).to(device)
        qs = qview.quant_state(qkey)
        if qs is not None:
            wf = w.float()
            rel = float((q.float() - wf).norm() / wf.norm().clamp_min(1e-30))
            ok = math.isfinite(rel) and rel <= QUANT_WEIGHT_RTOL
            rows.append({"tensor": key, "quant_type": qs.quant_type, "rel_err": rel, "passed": ok})
            if not ok:
                problems.append(row("quantized tensors", f"quantized: {key}: dequantized weight is {rel:.3g} away "
                                    f"from the base's (relative; {QUANT_WEIGHT_RTOL} allowed for {qs.quant_type})",
                                    module=key.rsplit(".", 1)[0], tensor=qkey, path=quant.path,
                                    expected=f"rel err <= {QUANT_WEIGHT_RTOL}", found=f"{rel:.3g}"))
        else:
            chk = check_tensor(q, w, q.dtype, k=1.0, device=device)
            if not chk.passed:
                problems.append(row("quantized tensors", f"quantized: {key}: a tensor left dense differs from the "
                                    f"base's by up to {chk.max_abs:.3g} (more than a cast)",
                                    module=key.rsplit(".", 1)[0], tensor=qkey, path=quant.path,
                                    expected="the base's values", found=f"max |err| {chk.max_abs:.3g}"))
        del q, w
    bview.close()
    qview.close()
    return rows, problems
