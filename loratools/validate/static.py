"""validate's static checks: from headers and the adapters' own (small) tensors, nothing is built.

An adapter on its own (a lenient header-level view, its values, its config), its fit to the base
(checks.py), candidate checkpoints against the base's layout, and the provenance loratools recorded.

Note: lenient, header-level adapters.
    `load_adapter` refuses an adapter at its first inconsistency. `validate` must report every problem at
    once, so `adapter_from_header` builds the per-module view from the safetensors header alone (factors
    as shape-only "meta" tensors), turning each inconsistency into a Problem and keeping every module it
    can still describe; the fit checks then run on that view. Only the NaN/Inf and all-zero checks read
    tensor values, one tensor at a time.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from ..adapter import (PREFIX, WEIGHTS_NAME, Adapter, KeyKind, classify_key, load_adapter, parse_modules,
                       read_adapter_config)
from ..key_layout import checkpoint_layout
from ..plan import mark_transposed_experts
from ..checks import HEAD_KEY, Problem, adapter_fit_problems, resolve_base_key, shape_list
from .. import init_methods
from ..dtypes import declared_dtype
from ..errors import InputError, LoratoolsError
from ..io import Checkpoint, read_provenance, verify_inputs
from ..io.safetensors_format import read_header, read_tensor
from ..quantized import dense_shapes, is_companion
from .report import problem_row, row


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), device="meta")


def _target_matches(targets, module: str) -> bool:
    """PEFT's check_target_module_exists: a regex string is full-matched, a list matches whole dotted tails."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith(f".{t}") for t in targets)


def adapter_from_header(path: str | Path) -> tuple[Adapter, list[Problem]]:
    """A shape-only Adapter read from the header, and every problem found on the way.

    Raises only for what makes the adapter unreadable as a whole (no config, not LoRA, no weights file);
    the caller turns that into a Problem too.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError("expected a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
                         path=path)
    cfg = read_adapter_config(path, typed=True)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise InputError(f"adapter has no {WEIGHTS_NAME}", path=path)
    if str(cfg.get("peft_type")).upper() != "LORA":  # a peft_types adapter: its parser checks it (refusing in one line)
        return load_adapter(path, typed=True, check_finite=False), []
    infos, _ = read_header(str(wpath))
    apath = str(path)
    problems: list[Problem] = []
    parts: dict[str, dict] = {}
    saved = {}
    for key, info in infos.items():
        kind, name, role = classify_key(key)
        if kind is KeyKind.NOT_PEFT:
            problems.append(Problem(None, key, apath, expected=f"{PREFIX}<module>...", found=key,
                                    message=f"adapter tensor {key} does not start with {PREFIX!r} (not a PEFT key)"))
        elif kind is KeyKind.UNKNOWN_LORA:
            problems.append(Problem(name, key, apath, expected="a LoRA factor", found=key,
                                    message=f"adapter tensor {key} is of a LoRA kind loratools does not know"))
        elif kind is KeyKind.FACTOR:
            parts.setdefault(name, {})[role] = info
        else:
            saved[name] = _meta(info.shape)
    modules, issues = parse_modules({name: {role: _meta(info.shape) for role, info in p.items()}
                                     for name, p in sorted(parts.items())}, cfg)
    problems += [Problem(name, PREFIX + name, apath, expected=i.expected, found=i.found,
                         message=f"module {name}: {i.message}") for name, i in issues]
    adapter = Adapter(path=path, config=cfg, modules=modules, saved=saved,
                      dtypes={i.dtype for i in infos.values()})
    return adapter, problems


def adapter_config_notes(adapter: Adapter) -> list[Problem]:
    """Things in an adapter that PEFT tolerates but that suggest a mistake (not failures)."""
    cfg, apath = adapter.config, str(adapter.path)
    notes = []
    targets = cfg.get("target_modules")
    stray = [n for n, m in adapter.modules.items() if m.param is None and not _target_matches(targets, n)]
    if stray:
        notes.append(Problem(stray[0], None, apath, expected=f"target_modules {targets}", found=stray[0],
                             message=f"{len(stray)} adapted module(s) are not matched by target_modules, e.g. "
                                     f"{stray[0]}; PEFT would not create them from this config"))
    if cfg.get("lora_bias") and adapter.modules and not any(m.bias is not None for m in adapter.modules.values()):
        notes.append(Problem(None, None, apath, expected="lora_B.bias tensors", found=None,
                             message="lora_bias is set but the adapter holds no lora_B.bias"))
    if cfg.get("modules_to_save") and not adapter.saved:
        notes.append(Problem(None, None, apath, expected=f"modules_to_save {cfg['modules_to_save']}", found=None,
                             message="modules_to_save is set but the adapter holds no saved module tensors"))
    if not adapter.modules and not adapter.saved:
        notes.append(Problem(None, None, apath, expected="LoRA factors", found=None,
                             message="the adapter holds no LoRA modules: it changes nothing"))
    init = init_methods.note(apath, cfg)  # PiSSA, LoftQ, ...: it belongs to a residual base (init_methods.py)
    if init is not None:
        notes.append(Problem(None, None, apath, expected=None, found=cfg.get("init_lora_weights"), message=init))
    return notes


def adapter_value_problems(path: str | Path) -> tuple[list[Problem], list[Problem]]:
    """(problems, notes) from the adapter's tensor values: NaN/Inf, non-float factors; all-zero lora_B and
    mixed factor dtypes are notes. Reads one tensor at a time."""
    wpath = Path(path) / WEIGHTS_NAME
    infos, _ = read_header(str(wpath))
    apath = str(path)
    problems, notes = [], []
    zero_b = []
    dtypes = Counter()
    with open(wpath, "rb", buffering=0) as fh:
        for key, info in infos.items():
            module = key[len(PREFIX):].split(".lora_")[0] if key.startswith(PREFIX) else None
            if not info.dtype.is_floating_point:
                problems.append(Problem(module, key, apath, expected="a floating-point dtype", found=info.dtype_name,
                                        message=f"adapter tensor {key} has dtype {info.dtype_name}; LoRA factors "
                                                f"and saved weights are floating point"))
                continue
            dtypes[info.dtype_name] += 1
            t = read_tensor(info, fh)
            bad = ~torch.isfinite(t)
            n_bad = int(bad.sum())
            if n_bad:
                n_nan = int(torch.isnan(t).sum())
                problems.append(Problem(module, key, apath, expected="finite values",
                                        found=f"{n_nan} NaN, {n_bad - n_nan} Inf of {t.numel()}",
                                        message=f"adapter tensor {key} holds {n_nan} NaN and {n_bad - n_nan} Inf "
                                                f"values (a diverged training run?)"))
            elif (key.endswith(".lora_B.weight") or key.endswith(".lora_embedding_B")) and not bool(t.any()):
                zero_b.append(key)
    if zero_b:
        notes.append(Problem(zero_b[0][len(PREFIX):].split(".lora_")[0], zero_b[0], apath, expected="a trained lora_B",
                             found=f"{len(zero_b)} all-zero",
                             message=f"{len(zero_b)} lora_B tensor(s) are all zeros (PEFT's initial value), e.g. "
                                     f"{zero_b[0]}: those modules change nothing; was the adapter trained?"))
    if len(dtypes) > 1:
        notes.append(Problem(None, None, apath, expected="one dtype", found=dict(sorted(dtypes.items())),
                             message=f"adapter tensors mix dtypes {dict(sorted(dtypes.items()))}"))
    return problems, notes


def checkpoint_dtype_notes(ck: Checkpoint, role: str) -> list[Problem]:
    """config.json's dtype against the dtype the floating-point weights are stored in (a note, not a failure:
    transformers casts on load, but a mismatch usually means the config was copied from elsewhere)."""
    cfg = ck.config or {}
    declared = declared_dtype(cfg)
    packed = ck.quant_states
    stored = {i.dtype_name for n, i in ck.tensors.items() if i.dtype.is_floating_point and not is_companion(n, packed)}
    notes = []
    if len(stored) > 1:
        notes.append(Problem(None, None, str(ck.path), expected="one float dtype", found=sorted(stored),
                             message=f"{role}: floating-point tensors are stored in several dtypes {sorted(stored)}"))
    if declared and stored and str(declared) not in stored and not ck.is_quantized:
        notes.append(Problem(None, None, str(ck.path), expected=f"config.json dtype {declared}", found=sorted(stored),
                             message=f"{role}: config.json says dtype {declared} but the weights are stored as "
                                     f"{', '.join(sorted(stored))}"))
    return notes


def candidate_layout_problems(base: Checkpoint, cand: Checkpoint, role: str, *,
                              allow_extra_head: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(problems, notes) comparing a candidate checkpoint's tensor names and dense shapes with the base's:
    missing tensors and shape changes are problems; leftover LoRA tensors are problems; other extra
    tensors (an untied lm_head, a merge record) are notes."""
    bshapes, cshapes = dense_shapes(base), dense_shapes(cand)
    cpath = str(cand.path)
    problems, notes = [], []
    for name, shape in bshapes.items():
        key = resolve_base_key(cshapes, name)
        if key is None:
            problems.append(Problem(name.rsplit(".", 1)[0], name, cpath, expected=shape_list(shape), found="missing",
                                    message=f"{role}: missing tensor {name} (the base has it, {shape_list(shape)})"))
        elif tuple(cshapes[key]) != tuple(shape):  # (a 4-bit Conv1D weight is [in, out] in the dense view too)
            problems.append(Problem(name.rsplit(".", 1)[0], key, cpath, expected=shape_list(shape),
                                    found=shape_list(cshapes[key]),
                                    message=f"{role}: tensor {key} has shape {shape_list(cshapes[key])}, the base's is "
                                            f"{shape_list(shape)}"))
    matched = {resolve_base_key(cshapes, n) for n in bshapes}
    extra = [n for n in cshapes if n not in matched]
    for name in extra:
        if ".lora_" in name:
            problems.append(Problem(name.split(".lora_")[0], name, cpath, expected="no LoRA tensors", found=name,
                                    message=f"{role}: holds LoRA tensor {name}: an unmerged adapter, not a dense "
                                            f"merged checkpoint"))
    others = [n for n in extra if ".lora_" not in n]
    if others and not (allow_extra_head and others == [HEAD_KEY]):
        notes.append(Problem(others[0].rsplit(".", 1)[0], others[0], cpath, expected="the base's tensors",
                             found=f"{len(others)} extra",
                             message=f"{role}: {len(others)} tensor(s) the base does not have, e.g. {others[0]}"))
    return problems, notes


def static_checks(base: Checkpoint, adapter_paths: list[Path], candidates: dict[str, Checkpoint], *,
                  given: list[Path] | None = None) -> tuple[list[dict], list[dict], list[bool]]:
    """(problems, notes, adapter_ok) from headers and the adapters' own tensors; nothing is built.
    `given`: the adapters as the user gave them, when `adapter_paths` are PEFT copies of other formats (the
    provenance a merge recorded names those)."""
    problems, notes, ok = [], [], []
    notes += [problem_row("base", n) for n in checkpoint_dtype_notes(base, "base")]
    for path in adapter_paths:
        before = len(problems)
        try:
            view, own = adapter_from_header(path)
            problems += [problem_row("adapter", p) for p in own]
            # under the model's names, as PEFT names the adapter (LLaVA's, Mixtral's stored layouts), as merge does
            layout = checkpoint_layout(base)
            mark_transposed_experts([view], layout, base.path)  # GPT-OSS stores experts [E, in, out]; the adapter cannot tell
            problems += [problem_row("adapter fit", p) for p in adapter_fit_problems(base, view, layout)]
            vals, vnotes = adapter_value_problems(path)
            problems += [problem_row("adapter values", p) for p in vals]
            notes += [problem_row("adapter", n) for n in vnotes + adapter_config_notes(view)]
        except LoratoolsError as e:
            problems.append(row("adapter", e.one_line(), tensor=e.tensor, path=e.path or path))
        ok.append(len(problems) == before)
    for role, ck in candidates.items():
        probs, cnotes = candidate_layout_problems(base, ck, role)
        problems += [problem_row(role, p) for p in probs]
        notes += [problem_row(role, n) for n in cnotes + checkpoint_dtype_notes(ck, role)]
    p_probs, p_notes = provenance_checks(base, given or adapter_paths, candidates)
    problems += p_probs
    notes += p_notes
    if "quantized" in candidates and not candidates["quantized"].is_quantized:
        problems.append(row("quantized", "quantized: this checkpoint holds no bitsandbytes 4-bit weights",
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
            problems.append(row("provenance", f"provenance: {path} was merged from {len(recorded_roles) - 1} "
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
            problems.append(row("provenance", msg, path=given.get(r["role"]), tensor=None,
                                 expected=(r["recorded"] or "")[:12] or None, found=(r["actual"] or "-")[:12]))
        if not bad and not extra:
            notes.append(row("provenance", f"provenance: the {len(rows)} input files recorded in {path} match "
                              f"the files given", path=path))
    return problems, notes
