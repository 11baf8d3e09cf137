"""validate's report: problem rows, the one-line summary, strict-JSON numbers, and the error to raise."""
from __future__ import annotations

import math

import torch

from ..checks import Problem
from ..errors import ValidationFailed


def problem_row(check: str, p: Problem) -> dict:
    """A fit-check Problem as a report row under `check`."""
    d = p.as_dict()
    d["check"] = check
    return d


def row(check: str, message: str, *, module=None, tensor=None, path=None, expected=None, found=None) -> dict:
    """One report row (a problem or a note): which check, what, where, expected and found."""
    return {"check": check, "module": module, "tensor": tensor, "path": None if path is None else str(path),
            "expected": expected, "found": found, "message": message}


def finite_numbers(doc: object) -> object:
    """NaN and ±Inf (from non-finite candidates) become null, so --json stays strict JSON."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite_numbers(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [finite_numbers(v) for v in doc]
    return doc


def comparison_problem(c: dict) -> dict:
    """The problem row for a failed logits comparison."""
    return row("logits", _comparison_message(c), tensor=None,
               path=c["candidate"] if c["name"] != "tuned" else c["reference"],
               expected=_comparison_expected(c), found=_comparison_found(c))


def _comparison_message(c: dict) -> str:
    if c.get("error"):
        return f"logits: {c['name']}: {c['error']}"
    if not c.get("finite", True):
        return f"logits: {c['name']}: the candidate's logits are not finite (NaN/Inf)"
    if c["name"] == "tuned":
        return (f"logits: tuned: base + adapters carries {c['carried']:.3g} of the fine-tune (residual "
                f"{c['residual']:.3g}), below --min-carried {c['min_carried']}")
    return (f"logits: {c['name']}: max |Δlogit| {c['max_abs']:.3g} (allowed {c['atol']:.3g}), relative error "
            f"{c['rel_err']:.3g} (allowed {c['rtol']:.3g}) against {c['reference']}" + _first_divergence(c))


def _first_divergence(c: dict) -> str:
    """Where a streamed comparison's hidden states first part from the reference's ('' if it did not say)."""
    d = c.get("divergence") or {}
    i = d.get("first_divergence_index")
    if i is None:
        return ""
    r = d["blocks"][i]
    err = "not finite" if not r["finite"] else f"rel err {r['rel_err']:.3g}"
    return f"; first diverging block: {r['block']} ({err}, allowed {d['allowance']:.3g})"


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


def summary(report: dict) -> str:
    """The report in one line: the first problem (and how many more), or what passed."""
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
            parts.append(f"{c['name']} {report.get('output') or 'logits'}: rel err {c['rel_err']:.2g} (<= {c['rtol']:.2g}), "
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


def environment() -> dict:
    """Versions of the libraries the forward passes ran on."""
    import importlib.metadata as md

    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env
