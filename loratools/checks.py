"""Does an adapter fit a base checkpoint? Header-level checks shared by merge, unmerge and validate.

Every check here reads only headers (and the adapter's small tensors) and returns a list of `Problem`s
instead of raising, so that `validate` can report all of them and `merge` can refuse on the first one
before it writes anything.

Note: resolving base tensor names.
    PEFT names an adapted module by its path in the model it wrapped (`model.layers.0.self_attn.q_proj`
    for LlamaForCausalLM, `transformer.h.0.attn.c_attn` for GPT2LMHeadModel). A checkpoint saved from
    the bare backbone (LlamaModel, GPT2Model) lacks that top-level component, and one saved from a
    wrapper can carry an extra one. `resolve_base_key` tries the exact name, then the name without its
    first component, then the name under each top-level prefix the checkpoint has; it accepts only an
    unambiguous match.

Note: tied output embeddings.
    A model with `tie_word_embeddings` (GPT-2 and many small models) stores no `lm_head.weight`: the head
    is the input embedding. An adapter that targets or saves `lm_head` then refers to a tensor the file
    does not hold; its shape is checked against the input embedding it is tied to (`tied_embedding_key`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable

import torch

from .adapter import PREFIX, WEIGHTS_NAME, Adapter, LoraModule, classify_key, lora_scale, pattern_value, \
    read_adapter_config
from .errors import InputError, MismatchError
from .io.checkpoint import QUANT_STATE_MARK, Checkpoint
from .io.safetensors_format import read_header, read_tensor

# Companion tensors bitsandbytes stores beside each packed 4-bit weight (not weights of their own).
QUANT_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
# Input-embedding tensor names of common causal-LM families, for tied heads.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "tok_embeddings.weight")
HEAD_KEY = "lm_head.weight"


@dataclass
class Problem:
    """One way an adapter does not fit a base: which module, which base tensor, what was expected."""

    module: str | None
    tensor: str | None
    path: str | None
    expected: object = None
    found: object = None
    message: str = ""

    def to_error(self) -> MismatchError:
        return MismatchError(self.message, path=self.path, tensor=self.tensor or self.module)

    def as_dict(self) -> dict:
        return {"module": self.module, "tensor": self.tensor, "path": self.path, "expected": self.expected,
                "found": self.found, "message": self.message}


# -- base tensor names --------------------------------------------------------------------------------

def resolve_base_key(base_keys: Collection[str], name: str) -> str | None:
    """The key in `base_keys` that holds tensor `name`, allowing one missing or extra top-level prefix.

    Returns None when there is no match or more than one candidate (ambiguous).
    """
    keys = base_keys if isinstance(base_keys, (set, frozenset, dict)) else set(base_keys)
    if name in keys:
        return name
    candidates = []
    if "." in name:
        stripped = name.split(".", 1)[1]
        if stripped in keys:
            candidates.append(stripped)
    for prefix in sorted({k.split(".", 1)[0] for k in keys if "." in k}):
        k = f"{prefix}.{name}"
        if k in keys:
            candidates.append(k)
    return candidates[0] if len(candidates) == 1 else None


def dense_shapes(base: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as a dense model sees it (4-bit packed weights get their dense shape, GPT-2
    Conv1D ones back in their [in, out] layout; bitsandbytes' companion tensors are left out)."""
    if base.is_quantized:
        from .quantized import dense_specs

        return {name: tuple(shape) for name, (_, shape) in dense_specs(base).items()}
    return {name: tuple(info.shape) for name, info in base.tensors.items()}


def is_tied(base: Checkpoint) -> bool:
    """True when the model ties its output head to the input embedding (transformers' default is True)."""
    cfg = base.config or {}
    return bool(cfg.get("tie_word_embeddings", True))


def tied_embedding_key(base: Checkpoint, shapes: dict[str, tuple] | None = None) -> str | None:
    """The input-embedding tensor a missing tied `lm_head.weight` stands for, or None."""
    shapes = dense_shapes(base) if shapes is None else shapes
    if not is_tied(base) or resolve_base_key(shapes, HEAD_KEY) is not None:
        return None
    vocab = (base.config or {}).get("vocab_size")
    found = [k for k, s in shapes.items() if k.endswith(EMBEDDING_SUFFIXES) and len(s) == 2
             and (vocab is None or s[0] == vocab)]
    return found[0] if len(found) == 1 else None


@dataclass
class BaseTarget:
    """Where an adapter tensor lands in the base: the base key, or a tied head that the file lacks."""

    key: str  # the tensor name in the output (the base key, or "lm_head.weight" for a tied head)
    shape: tuple[int, ...]
    tied_to: str | None = None  # the embedding a missing tied head is read from


def locate(shapes: dict[str, tuple], name: str, tied_embedding: str | None) -> BaseTarget | None:
    """Find base tensor `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) in a checkpoint."""
    key = resolve_base_key(shapes, name)
    if key is not None:
        return BaseTarget(key, shapes[key])
    if tied_embedding is not None and name == HEAD_KEY:
        return BaseTarget(HEAD_KEY, shapes[tied_embedding], tied_to=tied_embedding)
    return None


# -- the fit checks ------------------------------------------------------------------------------------

def _shape(s) -> list[int]:
    return [int(d) for d in s]


def module_problems(m: LoraModule, target: BaseTarget | None, shapes: dict[str, tuple], adapter_path: str,
                    base_path: str) -> list[Problem]:
    """Shape checks of one adapted module against its base tensor(s)."""
    where = f"module {m.name}"
    if target is None:
        return [Problem(m.name, m.base_key, adapter_path, expected=_shape(m.base_shape), found=None,
                        message=f"{where}: the base {base_path} has no tensor {m.base_key} (adapter expects "
                                f"{_shape(m.base_shape)}); is this adapter for another model?")]
    found = tuple(target.shape)
    expected = tuple(m.base_shape)
    out = []
    if found != expected:
        hint = ""
        if m.kind == "linear" and len(found) == 2 and found == expected[::-1] and found != expected:
            hint = (" (it fits transposed: fan_in_fan_out is "
                    f"{'set' if m.fan_in_fan_out else 'not set'} in the adapter config, the base says otherwise)")
        what = "embedding [num_embeddings, dim]" if m.kind == "embedding" else (
            "Conv1D weight [in, out]" if m.fan_in_fan_out else "weight [out, in]")
        out.append(Problem(m.name, target.key, adapter_path, expected=_shape(expected), found=_shape(found),
                           message=f"{where}: base tensor {target.key} has shape {_shape(found)} but the adapter's "
                                   f"factors (A {_shape(m.A.shape)}, B {_shape(m.B.shape)}) need a {what} of "
                                   f"shape {_shape(expected)}{hint}"))
        return out
    n_out = m.B.shape[0]
    if m.magnitude is not None and tuple(m.magnitude.shape) != (n_out,):
        out.append(Problem(m.name, target.key, adapter_path, expected=[n_out], found=_shape(m.magnitude.shape),
                           message=f"{where}: DoRA magnitude has shape {_shape(m.magnitude.shape)}, expected "
                                   f"[{n_out}] for base tensor {target.key} {_shape(found)}"))
    if m.bias is not None:
        bias_key = resolve_base_key(shapes, m.bias_key) if target.tied_to is None else None
        if bias_key is None:
            out.append(Problem(m.name, m.bias_key, adapter_path, expected=[n_out], found=None,
                               message=f"{where}: the adapter has lora_B.bias (lora_bias=True) but the base "
                                       f"{base_path} has no bias tensor {m.bias_key} to add it to"))
        elif tuple(shapes[bias_key]) != (n_out,) or tuple(m.bias.shape) != (n_out,):
            out.append(Problem(m.name, bias_key, adapter_path, expected=_shape(m.bias.shape),
                               found=_shape(shapes[bias_key]),
                               message=f"{where}: base bias {bias_key} has shape {_shape(shapes[bias_key])}, "
                                       f"the adapter's lora_B.bias has {_shape(m.bias.shape)}"))
    return out


def adapter_fit_problems(base: Checkpoint, adapter: Adapter) -> list[Problem]:
    """Everything that keeps `adapter` from applying to `base`, from headers only; [] when it fits."""
    shapes = dense_shapes(base)
    tied = tied_embedding_key(base, shapes)
    apath, bpath = str(adapter.path), str(base.path)
    problems: list[Problem] = []
    for m in adapter.modules.values():
        problems += module_problems(m, locate(shapes, m.base_key, tied), shapes, apath, bpath)
    for name, t in adapter.saved.items():
        target = locate(shapes, name, tied)
        if target is None:
            problems.append(Problem(name.rsplit(".", 1)[0], name, apath, expected=_shape(t.shape), found=None,
                                    message=f"saved tensor {name} (modules_to_save) {_shape(t.shape)} has no "
                                            f"counterpart in the base {bpath}"))
        elif tuple(target.shape) != tuple(t.shape):
            problems.append(Problem(name.rsplit(".", 1)[0], target.key, apath, expected=_shape(t.shape),
                                    found=_shape(target.shape),
                                    message=f"saved tensor {name} (modules_to_save) has shape {_shape(t.shape)} "
                                            f"but base tensor {target.key} has {_shape(target.shape)}"))
    return problems


def first_problem_error(problems: Iterable[Problem]) -> MismatchError | None:
    """A MismatchError for the first problem, mentioning how many more there are."""
    problems = list(problems)
    if not problems:
        return None
    err = problems[0].to_error()
    if len(problems) > 1:
        err.message += f" (and {len(problems) - 1} more mismatch{'es' if len(problems) > 2 else ''})"
        err.args = (err.message,)
    return err


__all__ = ["Problem", "BaseTarget", "adapter_fit_problems", "dense_shapes", "first_problem_error", "is_tied",
           "locate", "module_problems", "resolve_base_key", "tied_embedding_key"]


# -- validate's further static checks: an adapter on its own, and candidate checkpoints vs the base --------
#
# Note: lenient, header-level adapters.
#     `load_adapter` refuses an adapter at its first inconsistency (a rank that disagrees with the config,
#     a lone lora_A). `validate` must report every problem at once, so `adapter_from_header` builds the
#     same per-module view from the safetensors header alone (factors as shape-only "meta" tensors),
#     turning each inconsistency into a Problem and keeping every module it can still describe; the fit
#     checks above then run on that view. Only the NaN/Inf and all-zero checks read tensor values
#     (adapters are small), one tensor at a time.

def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), device="meta")


def _target_matches(targets, module: str) -> bool:
    """PEFT's check_target_module_exists: a regex string is full-matched, a list matches whole dotted tails."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith(f".{t}") for t in targets)


def adapter_from_header(path) -> tuple[Adapter, list[Problem]]:
    """A shape-only Adapter read from the header, and every problem found on the way.

    Raises only for what makes the adapter unreadable as a whole (no config, not LoRA, no weights file);
    the caller turns that into a Problem too.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError("expected a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
                         path=path)
    cfg = read_adapter_config(path)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise InputError(f"adapter has no {WEIGHTS_NAME}", path=path)
    infos, _ = read_header(str(wpath))
    apath = str(path)
    problems: list[Problem] = []
    parts: dict[str, dict] = {}
    saved = {}
    for key, info in infos.items():
        kind, name, role = classify_key(key)
        if kind == "not_peft":
            problems.append(Problem(None, key, apath, expected=f"{PREFIX}<module>...", found=key,
                                    message=f"adapter tensor {key} does not start with {PREFIX!r} (not a PEFT key)"))
        elif kind == "unknown_lora":
            problems.append(Problem(name, key, apath, expected="a LoRA factor", found=key,
                                    message=f"adapter tensor {key} is of a LoRA kind loratools does not know"))
        elif kind == "factor":
            parts.setdefault(name, {})[role] = info
        else:
            saved[name] = _meta(info.shape)
    modules: dict[str, LoraModule] = {}
    names = {"A": "lora_A.weight", "B": "lora_B.weight", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}
    for name, p in sorted(parts.items()):
        linear = "A" in p or "B" in p
        a_role, b_role = ("A", "B") if linear else ("emb_A", "emb_B")
        missing = [names[r] for r in (a_role, b_role) if r not in p]
        if missing:
            problems.append(Problem(name, PREFIX + name, apath, expected=names[a_role] + " and " + names[b_role],
                                    found="only " + ", ".join(names[r] for r in (a_role, b_role) if r in p),
                                    message=f"module {name}: the adapter has no {missing[0]} tensor"))
            continue
        A, B = p[a_role].shape, p[b_role].shape
        if len(A) != 2 or len(B) != 2:
            problems.append(Problem(name, PREFIX + name, apath, expected="2-D factors",
                                    found=f"A {list(A)}, B {list(B)}",
                                    message=f"module {name}: only 2-D LoRA factors (Linear, Conv1D, Embedding) are "
                                            f"supported; found A {list(A)}, B {list(B)}"))
            continue
        r = A[0]
        if B[1] != r:
            problems.append(Problem(name, PREFIX + name, apath, expected=f"lora_B [out, {r}]", found=list(B),
                                    message=f"module {name}: lora_A has rank {r} but lora_B is {list(B)} "
                                            f"(expected [out, {r}])"))
            continue
        cfg_r = pattern_value(cfg["rank_pattern"], name, cfg["r"])
        if int(cfg_r) != r:
            source = "rank_pattern" if cfg["rank_pattern"] and pattern_value(cfg["rank_pattern"], name, None) \
                is not None else "r"
            problems.append(Problem(name, PREFIX + name, apath, expected=f"r={cfg_r} ({source})", found=f"rank {r}",
                                    message=f"module {name}: adapter_config.json says r={cfg_r} ({source}) but its "
                                            f"factors have rank {r}"))
        alpha = float(pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
        fifo = bool(cfg.get("fan_in_fan_out")) and linear
        mag, bias = p.get("magnitude"), p.get("bias")
        modules[name] = LoraModule(name=name, kind="linear" if linear else "embedding", A=_meta(A), B=_meta(B),
                                   r=int(r), alpha=alpha, scale=lora_scale(alpha, r, bool(cfg.get("use_rslora"))),
                                   fan_in_fan_out=fifo, magnitude=None if mag is None else _meta(mag.shape),
                                   bias=None if bias is None else _meta(bias.shape))
        if cfg.get("use_dora") and mag is None and linear:
            problems.append(Problem(name, PREFIX + name, apath, expected="lora_magnitude_vector", found=None,
                                    message=f"module {name}: use_dora is set but the adapter has no DoRA magnitude "
                                            f"for it"))
    adapter = Adapter(path=path, config=cfg, modules=modules, saved=saved,
                      dtypes={i.dtype for i in infos.values()})
    return adapter, problems


def adapter_config_notes(adapter: Adapter) -> list[Problem]:
    """Things in an adapter that PEFT tolerates but that suggest a mistake (not failures)."""
    cfg, apath = adapter.config, str(adapter.path)
    notes = []
    targets = cfg.get("target_modules")
    stray = [n for n in adapter.modules if not _target_matches(targets, n)]
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
    return notes


def adapter_value_problems(path) -> tuple[list[Problem], list[Problem]]:
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
    declared = cfg.get("dtype") or cfg.get("torch_dtype")
    stored = {i.dtype_name for n, i in ck.tensors.items() if i.dtype.is_floating_point and QUANT_STATE_MARK not in n
              and not (n.endswith(QUANT_AUX_SUFFIXES) and n.rsplit(".", 1)[0] in ck.quant_states)}
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
            problems.append(Problem(name.rsplit(".", 1)[0], name, cpath, expected=_shape(shape), found="missing",
                                    message=f"{role}: missing tensor {name} (the base has it, {_shape(shape)})"))
        elif tuple(cshapes[key]) != tuple(shape) and not (
                # transformers stores a GPT-2 Conv1D weight [in, out] as a 4-bit Linear [out, in]
                key in cand.quant_states and len(shape) == 2 and tuple(cshapes[key]) == tuple(shape)[::-1]):
            problems.append(Problem(name.rsplit(".", 1)[0], key, cpath, expected=_shape(shape),
                                    found=_shape(cshapes[key]),
                                    message=f"{role}: tensor {key} has shape {_shape(cshapes[key])}, the base's is "
                                            f"{_shape(shape)}"))
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


__all__ += ["adapter_config_notes", "adapter_from_header", "adapter_value_problems", "candidate_layout_problems",
            "checkpoint_dtype_notes"]
