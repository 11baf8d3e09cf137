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

from dataclasses import dataclass
from typing import Collection, Iterable

from .adapter import Adapter, LoraModule
from .errors import MismatchError
from .io.checkpoint import Checkpoint
from .key_layout import KeyLayout, explain_missing
from .quantized import dense_shapes

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

def shape_list(s) -> list[int]:
    """A shape as a JSON-friendly list of ints."""
    return [int(d) for d in s]


def module_problems(m: LoraModule, target: BaseTarget | None, shapes: dict[str, tuple], adapter_path: str,
                    base_path: str, why_missing: str | None = None) -> list[Problem]:
    """Shape checks of one adapted module against its base tensor(s); `why_missing` explains a missing one."""
    where = f"module {m.name}"
    if target is None:
        why = why_missing or "is this adapter for another model?"
        return [Problem(m.name, m.base_key, adapter_path, expected=shape_list(m.base_shape), found=None,
                        message=f"{where}: the base {base_path} has no tensor {m.base_key} (adapter expects "
                                f"{shape_list(m.base_shape)}); {why}")]
    found = tuple(target.shape)
    expected = tuple(m.base_shape)
    fit = getattr(m, "fit", None)  # a peft_types module checks (and takes open dimensions from) the base itself
    if fit is not None:
        problem = fit(found)
        return [] if problem is None else [Problem(
            m.name, target.key, adapter_path, expected=shape_list(expected), found=shape_list(found),
            message=f"{where}: base tensor {target.key} has shape {shape_list(found)} but {problem}")]
    out = []
    if found != expected:
        hint = ""
        if m.kind == "linear" and len(found) == 2 and found == expected[::-1]:
            hint = (" (it fits transposed: fan_in_fan_out is "
                    f"{'set' if m.fan_in_fan_out else 'not set'} in the adapter config, the base says otherwise)")
        what = "embedding [num_embeddings, dim]" if m.kind == "embedding" else (
            "Conv1D weight [in, out]" if m.fan_in_fan_out else "weight [out, in]")
        out.append(Problem(m.name, target.key, adapter_path, expected=shape_list(expected), found=shape_list(found),
                           message=f"{where}: base tensor {target.key} has shape {shape_list(found)} but the adapter's "
                                   f"factors (A {shape_list(m.A.shape)}, B {shape_list(m.B.shape)}) need a {what} of "
                                   f"shape {shape_list(expected)}{hint}"))
        return out
    n_out = m.B.shape[0]
    if m.magnitude is not None and tuple(m.magnitude.shape) != (n_out,):
        out.append(Problem(m.name, target.key, adapter_path, expected=[n_out], found=shape_list(m.magnitude.shape),
                           message=f"{where}: DoRA magnitude has shape {shape_list(m.magnitude.shape)}, expected "
                                   f"[{n_out}] for base tensor {target.key} {shape_list(found)}"))
    if m.bias is not None:
        bias_key = resolve_base_key(shapes, m.bias_key) if target.tied_to is None else None
        if bias_key is None:
            out.append(Problem(m.name, m.bias_key, adapter_path, expected=[n_out], found=None,
                               message=f"{where}: the adapter has lora_B.bias (lora_bias=True) but the base "
                                       f"{base_path} has no bias tensor {m.bias_key} to add it to"))
        elif tuple(shapes[bias_key]) != (n_out,) or tuple(m.bias.shape) != (n_out,):
            out.append(Problem(m.name, bias_key, adapter_path, expected=shape_list(m.bias.shape),
                               found=shape_list(shapes[bias_key]),
                               message=f"{where}: base bias {bias_key} has shape {shape_list(shapes[bias_key])}, "
                                       f"the adapter's lora_B.bias has {shape_list(m.bias.shape)}"))
    return out


def _unfollowed(module: str, key: str, layout: KeyLayout, apath: str, expected) -> Problem:
    """A base tensor transformers converts in a way key_layout does not follow (Qwen3-VL-MoE's experts,
    stored transposed under the model's own name): what the adapter means for it cannot be placed."""
    return Problem(module, key, apath, expected=expected, found=None,
                   message=f"module {module}: the base stores {key} in a layout loratools does not follow "
                           f"({layout.unconverted[key]}); refusing to apply the adapter to it as stored")


def adapter_fit_problems(base: Checkpoint, adapter: Adapter, layout: KeyLayout | None = None) -> list[Problem]:
    """Everything that keeps `adapter` from applying to `base`, from headers only; [] when it fits.

    With `layout` (key_layout.py) the base is seen under the model's names (as PEFT names the adapter) and
    a missing tensor is explained (a prefix/layout difference, or another model)."""
    shapes = dense_shapes(base) if layout is None else layout.shapes
    tied = tied_embedding_key(base, shapes)
    lookup = shapes if layout is None else layout.lookup  # model names, then stored ones
    apath, bpath = str(adapter.path), str(base.path)
    problems: list[Problem] = []
    for m in adapter.modules.values():
        target = locate(lookup, m.base_key, tied)
        why = explain_missing(m.base_key, layout) if target is None and layout is not None else None
        if target is not None and layout is not None and target.key in layout.unconverted:
            problems.append(_unfollowed(m.name, target.key, layout, apath, shape_list(m.base_shape)))
            continue
        problems += module_problems(m, target, lookup, apath, bpath, why)
    for name, t in adapter.saved.items():
        target = locate(lookup, name, tied)
        if target is not None and layout is not None and target.key in layout.unconverted:
            problems.append(_unfollowed(name.rsplit(".", 1)[0], target.key, layout, apath, shape_list(t.shape)))
        elif target is None:
            problems.append(Problem(name.rsplit(".", 1)[0], name, apath, expected=shape_list(t.shape), found=None,
                                    message=f"saved tensor {name} (modules_to_save) {shape_list(t.shape)} has no "
                                            f"counterpart in the base {bpath}"
                                            + (f"; {explain_missing(name, layout)}" if layout is not None else "")))
        elif tuple(target.shape) != tuple(t.shape):
            problems.append(Problem(name.rsplit(".", 1)[0], target.key, apath, expected=shape_list(t.shape),
                                    found=shape_list(target.shape),
                                    message=f"saved tensor {name} (modules_to_save) has shape {shape_list(t.shape)} "
                                            f"but base tensor {target.key} has {shape_list(target.shape)}"))
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


__all__ = ["BaseTarget", "HEAD_KEY", "Problem", "adapter_fit_problems", "dense_shapes", "first_problem_error",
           "is_tied", "locate", "module_problems", "resolve_base_key", "shape_list", "tied_embedding_key"]


def refuse_unless_fits(ad, base) -> None:
    """MismatchError (one line) when adapter `ad` does not fit the checkpoint at `base` (what merge would
    refuse): convert --base and convert --to lora assume the base they are given is the adapter's."""
    from .io import Checkpoint
    from .key_layout import checkpoint_layout
    from .plan import mark_transposed_experts

    ck = Checkpoint(base)
    try:
        layout = checkpoint_layout(ck)
        mark_transposed_experts([ad], layout, ck.path)
        err = first_problem_error(adapter_fit_problems(ck, ad, layout))
    finally:
        ck.close()
    if err is not None:
        raise err
