"""`loratools validate`: is a merged, extracted or quantized checkpoint what it claims to be?

Three layers of evidence, cheapest first, all reported together:

1. Static checks (headers, plus the adapters' small tensors): every adapter module exists in the base and
   its factors fit (checks.adapter_fit_problems), ranks agree with the config and its patterns, no NaN/Inf,
   sane dtypes; a candidate checkpoint has the base's tensors with the base's shapes.
2. Tensor checks, streamed one tensor at a time: a `--merged` checkpoint against base + Σ wᵢ·ΔWᵢ computed
   here (merge.build_plan / merge_weight: PEFT's merge arithmetic in float32), element by element within
   rounding of the merged dtype. A failing tensor gets a diagnosis (wrong scale, transposed factor, delta
   missing or subtracted, DoRA magnitude not applied, the weights of another module). `--tuned` gets a
   per-module account of how much of the weight change the adapters carry; `--quantized` a per-tensor
   dequantization error.
3. Reference forward passes (forward.py): the base built by transformers from its own config.json, the
   adapters attached unmerged through PEFT (the reference), one deterministic batch, logits compared.

Note: why the tensor checks.
    Logits say *whether* a merged model is wrong, not *where*; and in bfloat16 a wrong scale on a single
    module can hide under the rounding allowance of the logits. Comparing each merged tensor with what
    it should be costs one streamed pass and names the module.

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
    modules_to_save / an embedding base layer) is tested against hypotheses, each fitted by least squares
    (c = ⟨R, H⟩ / ⟨H, H⟩) and accepted when start + c·H passes the same per-element allowance:
    H = ΔW (c ≈ 0: delta missing; c ≈ −1: subtracted; else wrong scale c×), H = ΔW in the transposed
    layout (`(B @ A)` laid into the Conv1D shape: fan_in_fan_out ignored), H = the plain LoRA delta
    for a DoRA module (magnitude not applied). Failing tensors are also matched against every other
    tensor's expected value (first 256 elements and norm), which finds swapped modules.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import forward as fw
from .adapter import Adapter, load_adapter
from .checks import (Problem, adapter_config_notes, adapter_fit_problems, adapter_from_header, adapter_value_problems,
                     candidate_layout_problems, checkpoint_dtype_notes, dense_shapes, resolve_base_key)
from .errors import FormatError, LoratoolsError, UsageError, ValidationFailed
from .io import Checkpoint, read_provenance, verify_inputs
from .io.safetensors_format import read_header

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
                 slack: float = 0.0, device="cpu") -> TensorCheck:
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
    return t.reshape(-1)[:HEAD].detach().to("cpu", torch.float32).clone()


def nice(c: float) -> str:
    return f"{c:.3g}"


# -- reading checkpoints as dense tensors -----------------------------------------------------------------

class DenseReader:
    """A checkpoint's tensors as a dense model sees them: a bitsandbytes 4-bit weight is dequantized
    (bnb4bit, in the dtype its quant_state records) when read; everything else is read as stored."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.shapes = dense_shapes(ck)
        self.qstates = ck.quant_states

    def read(self, name: str) -> torch.Tensor:
        if name not in self.qstates:
            return self.ck.read(name)
        from .bnb4bit import QuantState, dequantize_weight

        try:
            qs = QuantState.from_dict(self.qstates[name])
        except ValueError as e:
            raise FormatError(str(e), path=self.ck.path, tensor=name) from None
        parts = {sfx: self.ck.read(name + sfx) for sfx in qs.aux_specs() if name + sfx in self.ck}
        return dequantize_weight(parts, qs)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.qstates:
            return fw.DTYPES.get(str(self.qstates[name].get("dtype")), torch.float16)
        return self.ck.tensors[name].dtype

    def close(self):
        self.ck.close()


# -- report rows ------------------------------------------------------------------------------------------

def _problem(check: str, p: Problem) -> dict:
    d = p.as_dict()
    d["check"] = check
    return d


def _row(check: str, message: str, *, module=None, tensor=None, path=None, expected=None, found=None) -> dict:
    return {"check": check, "module": module, "tensor": tensor, "path": None if path is None else str(path),
            "expected": expected, "found": found, "message": message}


# -- merged: tensor by tensor ----------------------------------------------------------------------------

def _step_slack(steps, dtype: torch.dtype, is_bias: bool) -> float:
    """Scalar part of the allowance for one tensor: each delta's own rounding and matmul error."""
    slack = 0.0
    for s in steps:
        m = s.module
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
    from .merge import lora_delta

    c = cand.to(device=device, dtype=torch.float32)
    s = start.to(device=device, dtype=torch.float32)
    r = c - s
    d = expected - s

    def fits(h: torch.Tensor) -> float | None:
        coef = lsq_scale(r, h)
        return coef if check_tensor(c, s + coef * h, dtype, k=k, slack=slack, device=device).passed else None

    if plan is not None and plan.replace is not None and not plan.steps:
        if check_tensor(c, base_src, dtype, k=1, device=device).passed:
            return f"still the base's tensor: the adapter's {plan.replace_kind} replacement was not applied"
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
                    f"the delta of adapter {adapter_names[st.adapter]} is {nice(c_i)}x the expected one"
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
                         device) -> tuple[list[dict], list[dict]]:
    """(rows, problems): every tensor the adapters touch, plus every failing one, with a diagnosis."""
    from .merge import bias_delta, build_plan, merge_weight

    plan = build_plan(base, adapters, weights)
    breader, creader = DenseReader(base), DenseReader(merged)
    cnames = creader.shapes
    keys = list(breader.shapes) + [k for k in plan.tensors if k not in breader.shapes]
    expected_fp: dict[str, tuple] = {}
    rows, problems, failing = [], [], []
    for key in keys:
        ckey = resolve_base_key(cnames, key)
        p = plan.tensors.get(key)
        if ckey is None:
            if key not in breader.shapes:  # a tensor the merge adds (an untied head): not a layout problem
                problems.append(_row("merged", f"merged: missing tensor {key} (the adapters change the tied head "
                                     f"{p.source} on its own, so the merge must store it)",
                                     module=key.rsplit(".", 1)[0],
                                     tensor=key, path=merged.path, expected="present", found="missing"))
            continue
        if tuple(cnames[ckey]) != tuple(breader.shapes.get(key, cnames[ckey])):
            continue  # reported by the layout check
        src = breader.read(p.source if p is not None else key)
        start = p.replace if p is not None and p.replace is not None else src
        dtype = creader.dtype(ckey)
        if p is not None and p.steps:
            if p.is_bias:
                e = start.to(device=device, dtype=torch.float32) + bias_delta(p.steps, device)
            else:
                e, _ = merge_weight(start.to(device), p.steps, device)
            n_dora = sum(1 for st in p.steps if st.module.magnitude is not None and not p.is_bias)
            k = 1 + len(p.steps) + 2 * n_dora
            slack = _step_slack(p.steps, dtype, p.is_bias)
            if n_dora:
                slack += 4 * math.sqrt(e.shape[-1]) * EPS32 * float(e.abs().max())
        else:
            e = start.to(device)
            k, slack = 1.0, 0.0
        cand = creader.read(ckey)
        chk = check_tensor(cand, e, dtype, k=k, slack=slack, device=device)
        expected_fp[key] = (tuple(e.shape), fingerprint(e), dtype, k, slack, chk.ref_norm)
        adapted = p is not None and (bool(p.steps) or p.replace is not None)
        row = {"tensor": key, "module": key.rsplit(".", 1)[0], "adapted": adapted, "dtype": str(dtype).removeprefix(
            "torch."), "max_abs_err": chk.max_abs, "max_err_over_allowance": chk.max_ratio, "bad_elements": chk.n_bad,
            "rel_err": chk.err_norm / chk.ref_norm if chk.ref_norm else chk.err_norm, "passed": chk.passed,
            "diagnosis": None}
        if not chk.passed:
            row["diagnosis"] = _diagnose(cand, start, e, p, src, dtype, k, slack, device,
                                         [Path(a.path).name for a in adapters])
            failing.append((key, row, fingerprint(cand), float(cand.float().norm())))
        if adapted or not chk.passed:
            rows.append(row)
        del src, start, e, cand
    breader.close()
    creader.close()
    # swapped modules: a failing tensor that holds what another tensor should hold
    for key, row, fp, norm in failing:
        shape = expected_fp[key][0]
        for other, (oshape, ofp, odtype, ok, oslack, onorm) in expected_fp.items():
            if other == key or oshape != shape:
                continue
            same_norm = abs(norm - onorm) <= 1e-2 * max(onorm, 1e-30)
            if same_norm and check_tensor(fp, ofp, odtype, k=ok, slack=oslack).passed:
                row["diagnosis"] = f"holds the weights meant for {other} (modules swapped?)"
                row["swapped_with"] = other
                break
    for key, row, _, _ in failing:
        what = row["diagnosis"] or (f"differs from base + adapter delta by up to {row['max_abs_err']:.3g} "
                                    f"({row['max_err_over_allowance']:.3g}x the rounding allowance, "
                                    f"{row['bad_elements']} elements beyond it)")
        problems.append(_row("merged tensors", f"merged: {key}: {what}", module=row["module"], tensor=key,
                             path=merged.path, expected="base + Σ w·ΔW within rounding",
                             found=f"max |err| {row['max_abs_err']:.3g} ({row['max_err_over_allowance']:.3g}x)"))
    return rows, problems


# -- tuned: how much of the fine-tune's weight change the adapters carry ---------------------------------------

def tuned_tensor_report(base: Checkpoint, tuned: Checkpoint, adapters: list[Adapter], weights: list[float],
                        device) -> dict:
    """Per adapted tensor: carried = 1 − ‖(T − W) − ΔW‖ / ‖T − W‖; overall, over every tensor (an
    untouched tensor carries none of its change), and the share of the weight change inside adapted
    tensors."""
    from .merge import build_plan, merge_weight

    plan = build_plan(base, adapters, weights)
    breader, treader = DenseReader(base), DenseReader(tuned)
    total_sq = resid_sq = covered_sq = 0.0
    rows = []
    for key in breader.shapes:
        tkey = resolve_base_key(treader.shapes, key)
        if tkey is None or tuple(treader.shapes[tkey]) != tuple(breader.shapes[key]):
            continue
        w = breader.read(key).to(device=device, dtype=torch.float32)
        change = treader.read(tkey).to(device=device, dtype=torch.float32) - w
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
    breader.close()
    treader.close()
    return {"weights_carried": 1 - math.sqrt(resid_sq / total_sq) if total_sq > 0 else 0.0,
            "covered_share": covered_sq / total_sq if total_sq > 0 else 0.0, "tensors": rows}


# -- quantized: per-tensor dequantization error -------------------------------------------------------------

def quantized_tensor_checks(base: Checkpoint, quant: Checkpoint, device) -> tuple[list[dict], list[dict]]:
    """Each 4-bit weight dequantized against the base (‖Q − W‖/‖W‖ ≤ QUANT_WEIGHT_RTOL); each tensor left
    dense must equal the base's up to a cast."""
    breader, qreader = DenseReader(base), DenseReader(quant)
    # transformers quantizes a Conv1D weight [in, out] as a Linear4bit [out, in]
    conv1d = fw.conv1d_weights(base.path) if base.config is not None else set()
    rows, problems = [], []
    for key, shape in breader.shapes.items():
        qkey = resolve_base_key(qreader.shapes, key)
        if qkey is None:
            continue
        q = qreader.read(qkey).to(device)
        w = breader.read(key).to(device)
        if qkey in qreader.qstates and q.dim() == 2 and (key in conv1d or tuple(q.shape) != tuple(w.shape)) \
                and tuple(q.shape) == tuple(w.shape)[::-1]:
            q = q.T  # a Conv1D weight stored as a 4-bit Linear
        if tuple(q.shape) != tuple(w.shape):
            continue
        if qkey in qreader.qstates:
            wf = w.float()
            rel = float((q.float() - wf).norm() / wf.norm().clamp_min(1e-30))
            ok = math.isfinite(rel) and rel <= QUANT_WEIGHT_RTOL
            qt = qreader.qstates[qkey].get("quant_type")
            rows.append({"tensor": key, "quant_type": qt, "rel_err": rel, "passed": ok})
            if not ok:
                problems.append(_row("quantized tensors", f"quantized: {key}: dequantized weight is {rel:.3g} away "
                                     f"from the base's (relative; {QUANT_WEIGHT_RTOL} allowed for {qt})",
                                     module=key.rsplit(".", 1)[0], tensor=qkey, path=quant.path,
                                     expected=f"rel err <= {QUANT_WEIGHT_RTOL}", found=f"{rel:.3g}"))
        else:
            chk = check_tensor(q, w, q.dtype, k=1.0, device=device)
            if not chk.passed:
                problems.append(_row("quantized tensors", f"quantized: {key}: a tensor left dense differs from the "
                                     f"base's by up to {chk.max_abs:.3g} (more than a cast)",
                                     module=key.rsplit(".", 1)[0], tensor=qkey, path=quant.path,
                                     expected="the base's values", found=f"max |err| {chk.max_abs:.3g}"))
        del q, w
    breader.close()
    qreader.close()
    return rows, problems


# -- static checks ---------------------------------------------------------------------------------------------

def static_checks(base: Checkpoint, adapter_paths: list[Path], candidates: dict[str, Checkpoint]
                  ) -> tuple[list[dict], list[dict], list[bool]]:
    """(problems, notes, adapter_ok) from headers and the adapters' own tensors; nothing is built."""
    problems, notes, ok = [], [], []
    notes += [_problem("base", n) for n in checkpoint_dtype_notes(base, "base")]
    for path in adapter_paths:
        before = len(problems)
        try:
            view, own = adapter_from_header(path)
            problems += [_problem("adapter", p) for p in own]
            problems += [_problem("adapter fit", p) for p in adapter_fit_problems(base, view)]
            vals, vnotes = adapter_value_problems(path)
            problems += [_problem("adapter values", p) for p in vals]
            notes += [_problem("adapter", n) for n in vnotes + adapter_config_notes(view)]
        except LoratoolsError as e:
            problems.append(_row("adapter", e.one_line(), tensor=e.tensor, path=e.path or path))
        ok.append(len(problems) == before)
    for role, ck in candidates.items():
        probs, cnotes = candidate_layout_problems(base, ck, role)
        problems += [_problem(role, p) for p in probs]
        notes += [_problem(role, n) for n in cnotes + checkpoint_dtype_notes(ck, role)]
    p_probs, p_notes = provenance_checks(base, adapter_paths, candidates)
    problems += p_probs
    notes += p_notes
    if "quantized" in candidates and not candidates["quantized"].is_quantized:
        problems.append(_row("quantized", "quantized: this checkpoint holds no bitsandbytes 4-bit weights",
                             path=candidates["quantized"].path, expected="4-bit weights", found="dense"))
    return problems, notes, ok


def _recorded(path: Path, ck: Checkpoint | None = None) -> dict | None:
    """The provenance loratools wrote into a checkpoint's or an adapter's safetensors metadata."""
    if ck is not None:
        return read_provenance(next(iter(ck.metadata.values()), {}))
    f = Path(path) / "adapter_model.safetensors"
    return read_provenance(read_header(str(f))[1]) if f.is_file() else None


def provenance_checks(base: Checkpoint, adapter_paths: list[Path], candidates: dict[str, Checkpoint]
                      ) -> tuple[list[dict], list[dict]]:
    """Outputs written by loratools record the SHA-256 of their inputs: check them against the files given.

    A merged checkpoint must come from BASE and the ADAPTERs (in order), a quantized one from BASE, an
    extracted adapter from BASE (and --tuned when given). Outputs without a record are not judged.
    """
    expect: list[tuple[str, Path, dict, dict]] = []
    for role, ck in candidates.items():
        rec = _recorded(ck.path, ck)
        if rec and role == "merged" and rec.get("command") == "merge":
            given = {"base": base.path, **{f"adapters[{i}]": p for i, p in enumerate(adapter_paths)}}
            expect.append((role, ck.path, rec, given))
        elif rec and role == "quantized" and rec.get("command") == "quantize":
            expect.append((role, ck.path, rec, {"checkpoint": base.path}))
    for path in adapter_paths:
        rec = _recorded(path)
        if rec and rec.get("command") == "extract":
            given = {"base": base.path}
            if "tuned" in candidates:
                given["tuned"] = candidates["tuned"].path
            expect.append(("adapter", path, rec, given))
    problems, notes = [], []
    for role, path, rec, given in expect:
        recorded_roles = set(rec.get("inputs", {}))
        extra = sorted(recorded_roles - set(given)) if role == "merged" else []
        if extra:
            problems.append(_row("provenance", f"provenance: {path} was merged from {len(recorded_roles) - 1} "
                                 f"adapters, {len(adapter_paths)} given", path=path,
                                 expected=f"{len(recorded_roles) - 1} adapters", found=f"{len(adapter_paths)}"))
        rows = verify_inputs(rec, given)
        bad = [r for r in rows if not r["ok"]]
        for r in bad:
            if r["file"] is None:
                msg = f"provenance: {path} records no input '{r['role']}'"
            else:
                msg = (f"provenance: {path} was written from a different {r['role']}: {r['file']} recorded "
                       f"sha256 {r['recorded'][:12]}…, the file given has "
                       f"{(r['actual'] or 'no such file')[:12]}")
            problems.append(_row("provenance", msg, path=given.get(r["role"]), tensor=None,
                                 expected=(r["recorded"] or "")[:12] or None, found=(r["actual"] or "-")[:12]))
        if not bad and not extra:
            notes.append(_row("provenance", f"provenance: the {len(rows)} input files recorded in {path} match "
                              f"the files given", path=path))
    return problems, notes


# -- forward passes --------------------------------------------------------------------------------------------

def _comparison(name: str, reference: str, candidate: str, metrics: dict | None, tol: fw.Tolerance | None,
                **extra) -> dict:
    out = {"name": name, "reference": reference, "candidate": candidate}
    if metrics is not None:
        out.update(fw.judge(metrics, tol) if tol is not None else {**metrics, "passed": metrics["finite"]})
    out.update(extra)
    return out


def forward_checks(base: Checkpoint, adapter_paths: list[Path], weights: list[float],
                   candidates: dict[str, Checkpoint], *, device: torch.device, dtype: torch.dtype, batch: int,
                   seq_len: int, seed: int, atol, rtol, min_carried: float, log=None) -> dict:
    """Logits of base, base + adapters (PEFT, unmerged) and each candidate on one batch, compared.

    Holds one model at a time (plus logits): the base (with the adapters attached) is dropped before
    any candidate is loaded."""
    say = log or (lambda _m: None)
    timings = {}
    say("forward: loading the base with transformers")
    loaded = fw.load_model(base.path, device=device, dtype=dtype, seed=seed)
    timings["load_base"] = loaded.seconds
    model = loaded.model
    vocab = model.get_input_embeddings().num_embeddings
    limit = fw.max_positions(base.config)
    used_len = min(seq_len, limit) if limit else seq_len
    ids, source = fw.make_batch(fw.model_dir(base.path), vocab, batch, used_len, seed)
    t0 = time.perf_counter()
    l_base = fw.run_logits(model, ids)
    timings["forward_base"] = time.perf_counter() - t0
    comparisons = []
    l_ref = None
    if adapter_paths:
        say("forward: attaching the adapters through PEFT (unmerged)")
        t0 = time.perf_counter()
        model = fw.attach_adapters(model, adapter_paths, weights)
        l_ref = fw.run_logits(model, ids)
        timings["forward_adapters"] = time.perf_counter() - t0
        comparisons.append(_comparison("adapters", "base", "base + adapters (PEFT, unmerged)",
                                       fw.logit_metrics(l_base, l_ref), None, gated=False,
                                       note="the adapters' effect on the logits (informational)"))
    del model, loaded
    fw.free_memory()
    l_qref, qref_error = None, None
    quant = candidates.get("quantized")
    if quant is not None and quant.is_quantized and base.is_quantized:
        l_qref = l_base  # a 4-bit BASE is its own quantized reference
    elif quant is not None and quant.is_quantized:
        # Note: the quantized reference.
        #     How far a 4-bit model's logits move from its base depends on the model (a correct NF4 copy
        #     of the generated random 0.1B Llama moves 42%, the fixtures 3-8%), so no threshold against
        #     the base tells a correct quantization from a broken one. The gate compares the candidate
        #     with BASE itself quantized by bitsandbytes' rule (bnb4bit, the same bytes) and
        #     dequantized: what a correct 4-bit copy computes, up to the 4-bit layers' compute dtype.
        say("forward: the base quantized as the candidate records (bitsandbytes' rule, dequantized)")
        loaded = fw.load_model(base.path, device=device, dtype=dtype, seed=seed)
        t0 = time.perf_counter()
        missing = fw.fake_quantize_(loaded.model, base, quant)
        if missing:
            qref_error = (f"cannot rebuild the quantized reference: {len(missing)} 4-bit weight(s) have no "
                          f"counterpart in the base model (first: {missing[0]})")
        else:
            l_qref = fw.run_logits(loaded.model, ids)
        timings["forward_quantized_reference"] = time.perf_counter() - t0
        del loaded
        fw.free_memory()
    for role, ck in candidates.items():
        say(f"forward: loading the {role} checkpoint")
        try:
            cl = fw.load_model(ck.path, device=device, dtype=dtype, seed=seed)
        except LoratoolsError as e:
            comparisons.append(_comparison(role, "", str(ck.path), None, None, passed=False, error=e.one_line()))
            continue
        t0 = time.perf_counter()
        l_cand = fw.run_logits(cl.model, ids)
        timings[f"forward_{role}"] = time.perf_counter() - t0
        timings[f"load_{role}"] = cl.seconds
        load_notes = {k: v for k, v in (("missing", cl.missing), ("unexpected", cl.unexpected),
                                        ("mismatched", cl.mismatched)) if v}
        storage = [i.dtype for n, i in ck.tensors.items() if i.dtype.is_floating_point and n not in ck.quant_states]
        del cl
        fw.free_memory()
        if role == "merged":
            tol = fw.quantized_tolerance(atol=atol, rtol=rtol) if ck.is_quantized else \
                fw.exact_tolerance(dtype, fw.coarsest(set(storage)), atol=atol, rtol=rtol)
            comparisons.append(_comparison("merged", "base + adapters (PEFT, unmerged)", str(ck.path),
                                           fw.logit_metrics(l_ref, l_cand), tol, loading=load_notes or None))
        elif role == "tuned":
            metrics = fw.logit_metrics(l_cand, l_ref)
            carried = fw.carried_fraction(l_base, l_ref, l_cand)
            passed = metrics["finite"] and carried["carried"] >= min_carried
            comparisons.append(_comparison("tuned", str(ck.path), "base + adapters (PEFT, unmerged)", None, None,
                                           **metrics, **carried, min_carried=min_carried, passed=passed,
                                           loading=load_notes or None))
        elif role == "quantized":
            comparisons.append(_comparison("quantization", "base", str(ck.path), fw.logit_metrics(l_base, l_cand),
                                           None, gated=False, note="the 4-bit quantization's effect on the logits "
                                                                   "(informational)"))
            reference = "base quantized by bitsandbytes' rule (dequantized)"
            if qref_error is not None:
                comparisons.append(_comparison("quantized", reference, str(ck.path), None, None, passed=False,
                                               error=qref_error))
            elif l_qref is not None:  # (a dense candidate is a static problem already)
                tol = fw.exact_tolerance(dtype, _compute_dtype_4bit(ck), atol=atol, rtol=rtol)
                comparisons.append(_comparison("quantized", "base (4-bit)" if base.is_quantized else reference,
                                               str(ck.path), fw.logit_metrics(l_qref, l_cand), tol,
                                               loading=load_notes or None))
    return {"comparisons": comparisons, "batch_source": source, "seq_len": used_len, "timings": timings,
            "peak_gpu_bytes": fw.peak_memory(device)}


# -- the driver ------------------------------------------------------------------------------------------------

def _compute_dtype_4bit(ck: Checkpoint) -> torch.dtype:
    """The coarsest dtype bitsandbytes' 4-bit layers round to: their compute dtype (quantization_config's
    bnb_4bit_compute_dtype) or the dtype the weights are dequantized to (the quant_states')."""
    from .quantized import quant_states

    qc = (ck.config or {}).get("quantization_config") or {}
    compute = fw.DTYPES.get(str(qc.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."), torch.float32)
    return fw.coarsest({compute, *(qs.torch_dtype for qs in quant_states(ck).values())})


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


def validate(base, adapters=(), *, merged=None, tuned=None, quantized=None, weights=None, device: str = "auto",
             dtype: str = "auto", batch: int = 4, seq_len: int = 128, seed: int = 0, atol: float | None = None,
             rtol: float | None = None, min_carried: float = 0.0, static_only: bool = False, log=None) -> dict:
    """Run every check and return the report (a dict, the --json document). Never raises for a failed
    check: call `failure(report)` for the ValidationFailed to raise."""
    adapter_paths = [Path(a) for a in adapters]
    weights = _check_options(adapter_paths, weights, merged, tuned, batch, seq_len, atol, rtol)
    dev = fw.resolve_device(device)
    base_ck = Checkpoint(base)
    compute = fw.resolve_compute_dtype(dtype, dev, base_ck.config)
    candidates = {role: Checkpoint(p) for role, p in (("merged", merged), ("tuned", tuned), ("quantized", quantized))
                  if p is not None}
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    say("static checks: headers and adapter tensors")
    problems, notes, adapter_ok = static_checks(base_ck, adapter_paths, candidates)
    adapters_ok = all(adapter_ok)
    loaded = [load_adapter(p) for p in adapter_paths] if adapters_ok else []
    layout_ok = {role: not any(p["check"] == role for p in problems) for role in candidates}
    # Note: order of work. The forward passes run before the tensor checks: the tensor checks' many
    # chunk-sized temporaries can stay in the allocator's heap afterwards, and should not add to the
    # peak of the model loads. The problems are listed static, tensor, logits whatever the order.
    fwd, skipped, logit_problems = None, None, []
    if static_only:
        skipped = "--static-only"
    elif not adapters_ok:
        skipped = "the adapters have static problems (PEFT could not load them)"
    else:
        try:
            fw.model_dir(base_ck.path)
        except LoratoolsError as e:
            skipped = e.message
            problems.append(_row("base", e.one_line(), path=base_ck.path))
    if skipped is None:
        fwd = forward_checks(base_ck, adapter_paths, weights, candidates, device=dev, dtype=compute, batch=batch,
                             seq_len=seq_len, seed=seed, atol=atol, rtol=rtol, min_carried=min_carried, log=say)
        for c in fwd["comparisons"]:
            if not c["passed"]:
                logit_problems.append(_row("logits", _comparison_message(c), tensor=None, path=c["candidate"]
                                           if c["name"] != "tuned" else c["reference"],
                                           expected=_comparison_expected(c), found=_comparison_found(c)))
    tensors: dict = {}
    if "merged" in candidates and adapters_ok:
        if candidates["merged"].is_quantized:
            notes.append(_row("merged", "merged: a 4-bit merged checkpoint is compared by logits only",
                              path=merged))
        else:
            say("tensor checks: merged against base + adapter deltas")
            rows, probs = merged_tensor_checks(base_ck, candidates["merged"], loaded, weights, dev)
            tensors["merged"] = {"checked": len(rows), "failed": sum(not r["passed"] for r in rows), "rows": rows}
            problems += probs
    if "tuned" in candidates and adapters_ok and layout_ok["tuned"]:
        say("tensor checks: tuned against base + adapter deltas")
        tensors["tuned"] = tuned_tensor_report(base_ck, candidates["tuned"], loaded, weights, dev)
    if "quantized" in candidates and layout_ok["quantized"] and candidates["quantized"].is_quantized:
        say("tensor checks: quantized against the base")
        rows, probs = quantized_tensor_checks(base_ck, candidates["quantized"], dev)
        tensors["quantized"] = {"checked": len(rows), "failed": sum(not r["passed"] for r in rows), "rows": rows}
        problems += probs
    problems += logit_problems
    report = {
        "kind": "validate",
        "passed": not problems,
        "summary": None,
        "base": str(base),
        "adapters": [{"path": str(p), "weight": w} for p, w in zip(adapter_paths, weights)],
        "merged": None if merged is None else str(merged),
        "tuned": None if tuned is None else str(tuned),
        "quantized": None if quantized is None else str(quantized),
        "device": fw.device_description(dev),
        "dtype": str(compute).removeprefix("torch."),
        "batch": batch,
        "seq_len": fwd["seq_len"] if fwd else seq_len,
        "seed": seed,
        "batch_source": fwd["batch_source"] if fwd else None,
        "forward_skipped": skipped,
        "problems": problems,
        "notes": notes,
        "tensors": tensors,
        "comparisons": fwd["comparisons"] if fwd else [],
        "timings": {**(fwd["timings"] if fwd else {}), "total": time.perf_counter() - t_start},
        "peak_gpu_bytes": fwd["peak_gpu_bytes"] if fwd else None,
        "environment": _environment(),
    }
    report["summary"] = _summary(report)
    return _finite_numbers(report)


def _finite_numbers(doc):
    """NaN and ±Inf (from non-finite candidates) become null, so --json stays strict JSON."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite_numbers(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_finite_numbers(v) for v in doc]
    return doc


def _comparison_message(c: dict) -> str:
    if c.get("error"):
        return f"logits: {c['name']}: {c['error']}"
    if not c.get("finite", True):
        return f"logits: {c['name']}: the candidate's logits are not finite (NaN/Inf)"
    if c["name"] == "tuned":
        return (f"logits: tuned: base + adapters carries {c['carried']:.3g} of the fine-tune (residual "
                f"{c['residual']:.3g}), below --min-carried {c['min_carried']}")
    return (f"logits: {c['name']}: max |Δlogit| {c['max_abs']:.3g} (allowed {c['atol']:.3g}), relative error "
            f"{c['rel_err']:.3g} (allowed {c['rtol']:.3g}) against {c['reference']}")


def _comparison_expected(c: dict):
    if c["name"] == "tuned":
        return f"carried >= {c.get('min_carried')}"
    if "atol" in c:
        return f"max|Δ| <= {c['atol']:.3g}, rel <= {c['rtol']:.3g}"
    return "loads"


def _comparison_found(c: dict):
    if c.get("error"):
        return "error"
    if c["name"] == "tuned":
        return f"carried {c.get('carried', float('nan')):.3g}"
    return f"max|Δ| {c['max_abs']:.3g}, rel {c['rel_err']:.3g}"


def _summary(report: dict) -> str:
    probs = report["problems"]
    if probs:
        more = len(probs) - 1
        return probs[0]["message"] + (f" (and {more} more problem{'s' if more > 1 else ''}; see the table)"
                                      if more else "")
    parts = []
    if report["adapters"]:
        n = len(report["adapters"])
        parts.append(f"{n} adapter{'s fit' if n > 1 else ' fits'} the base")
    for role, v in report["tensors"].items():
        if "checked" in v:
            parts.append(f"{v['checked']} {role} tensors within allowance")
        elif role == "tuned":
            parts.append(f"the adapters carry {v['weights_carried']:.3g} of the tuned weight change")
    for c in report["comparisons"]:
        if c["name"] == "tuned":
            parts.append(f"tuned logits: carried {c['carried']:.3g} (>= {c['min_carried']:g})")
        elif "rtol" in c:
            parts.append(f"{c['name']} logits: rel err {c['rel_err']:.2g} (<= {c['rtol']:.2g}), "
                         f"max |Δ| {c['max_abs']:.2g} (<= {c['atol']:.2g})")
    if report["forward_skipped"]:
        parts.append(f"forward passes skipped ({report['forward_skipped']})")
    elif not any("rtol" in c or c["name"] == "tuned" for c in report["comparisons"]):
        parts.append("the model" + (" with its adapters" if report["adapters"] else "") + " runs, logits finite")
    return "all checks passed: " + "; ".join(parts)


def failure(report: dict) -> ValidationFailed | None:
    """The ValidationFailed to raise for a failed report (None when it passed): the one-line summary, the
    first problem's file and tensor."""
    if report["passed"]:
        return None
    first = report["problems"][0]
    msg = report["summary"]
    # name the file and tensor once: problem messages often mention them already
    path = first.get("path") if first.get("path") and first["path"] not in msg else None
    tensor = first.get("tensor") if first.get("tensor") and first["tensor"] not in msg else None
    return ValidationFailed(msg, path=path, tensor=tensor)


def _environment() -> dict:
    import importlib.metadata as md

    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


__all__ = ["DenseReader", "TensorCheck", "check_tensor", "failure", "forward_checks", "lsq_coefficients", "lsq_scale",
           "merged_tensor_checks", "quantized_tensor_checks", "static_checks", "tuned_tensor_report", "ulp",
           "validate", "wrong_layout"]
