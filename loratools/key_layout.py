"""A checkpoint's tensors under the names transformers 5 (and so PEFT) gives the model's parameters, and back.

On disk a checkpoint keeps the layout it was saved in: LLaVA's `language_model.model.layers...`, Mixtral's
per-expert `block_sparse_moe.experts.N.w1.weight` (what the Hub holds and what `save_pretrained` writes by
default). transformers 5 renames and fuses keys while it loads (conversion_mapping.py, core_model_loading.py),
so the loaded model has `model.language_model.layers...` and one `mlp.experts.gate_up_proj` [E, 2I, H]; PEFT
names adapters after that model. A `KeyLayout` says, for every stored tensor, which model parameter it is and
which slice of it (`Part`); every command reads through it and writes the stored names back, so the output
keeps the user's layout. Nothing is copied from transformers: its own transforms are asked, on the meta model
of config.json (hf_layout.meta_model), which key goes where.

Note: which conversions are followed.
    Renamings (any), and the expert fusions `MergeModulelist(dim=0)` (experts stacked on dim 0) optionally
    followed by `Concatenate(dim=1)` (per-expert tensors of several source patterns concatenated in the
    pattern order: Mixtral's w1 then w3 is gate then up). Expert e is the e-th key in transformers' own
    load order (dot_natural_key). A `Transpose(check_dims=True)` (Qwen3-VL-MoE's experts) leaves a tensor of
    the model's shape as it is, and so does this. A stored tensor that another kind of converter would transform
    keeps its stored name here, and `unconverted` (with `unconverted_into`, the model names it becomes) says so:
    merge and validate refuse a LoRA on it, quantize a checkpoint where it becomes a weight transformers quantizes.
    GPT-OSS stores its experts fused already ([E, in, out], `is_transposed`): there the names agree and
    `transposed` lists the parameters.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Iterable, Mapping

from . import hf_tables
from .errors import FormatError


@dataclass(frozen=True)
class Part:
    """One stored tensor as a slice of a model parameter: `param[expert][rows]`, or the whole parameter."""

    stored: str
    param: str
    expert: int | None = None  # index on the stacked dim 0 of a fused expert parameter
    rows: tuple[int, int] | None = None  # [start, stop) on the parameter's dim 1 (gate half, up half)

    @property
    def whole(self) -> bool:
        return self.expert is None

    @property
    def index(self) -> tuple:
        """The index that cuts this part out of the model parameter."""
        if self.whole:
            return ()
        return (self.expert,) if self.rows is None else (self.expert, slice(*self.rows))

    def describe(self) -> str:
        if self.whole:
            return self.param
        half = f", rows {self.rows[0]}:{self.rows[1]}" if self.rows else ""
        return f"{self.param} [expert {self.expert}{half}]"


@dataclass
class KeyLayout:
    """Stored tensor names <-> model parameter names (see the module docstring)."""

    parts: dict[str, Part]  # stored name -> its part, in stored order
    shapes: dict[str, tuple[int, ...]]  # model parameter -> shape as the model holds it
    source: str  # "transformers" (its conversions were asked) or "identity" (no config / no model class)
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stored name -> shape
    transposed: frozenset[str] = frozenset()  # fused expert parameters stored [E, in, out] (is_transposed)
    unconverted: dict[str, str] = field(default_factory=dict)  # stored name -> why it kept its name
    unconverted_into: dict[str, list[str]] = field(default_factory=dict)  # stored name -> model names it becomes
    _reverse: object = None  # stored_name() for model names with no stored tensor

    @cached_property
    def params(self) -> dict[str, list[Part]]:
        """Model parameter -> its stored parts, in order."""
        out: dict[str, list[Part]] = {}
        for p in self.parts.values():
            out.setdefault(p.param, []).append(p)
        return out

    @cached_property
    def lookup(self) -> dict[str, tuple[int, ...]]:
        """Model names, and the stored names that differ from them (each a whole stored tensor): where an
        adapter's name is looked up. An adapter trained on the layout as stored (transformers 4: LLaVA's
        `language_model.model.`, Mixtral's per-expert `w1` Linears) names stored tensors; one trained on
        transformers 5 names the model's."""
        return {**self.shapes, **{k: s for k, s in self.stored_shapes.items() if k not in self.shapes}}

    @property
    def renamed(self) -> bool:
        """True when some stored name differs from its model name."""
        return any(p.stored != p.param for p in self.parts.values())

    def stored_name(self, param: str) -> str:
        """The stored name of a whole model parameter (for a tensor the file lacks, e.g. an untied head:
        transformers' reverse renaming)."""
        parts = self.params.get(param)
        if parts and parts[0].whole:
            return parts[0].stored
        return self._reverse(param) if self._reverse is not None else param

    def renames(self) -> list[tuple[str, str]]:
        """Distinct (stored, model) differences of renamed whole tensors, common dotted prefix and suffix
        removed: ("language_model.model", "model.language_model") for LLaVA, ("block_sparse_moe", "mlp")
        for Mixtral."""
        pairs = []
        for p in self.parts.values():
            if p.whole and p.stored != p.param:
                pair = _difference(p.stored, p.param)
                if pair not in pairs:
                    pairs.append(pair)
        return pairs


def _difference(a: str, b: str) -> tuple[str, str]:
    """`a` and `b` without their longest common dotted prefix and suffix."""
    xa, xb = a.split("."), b.split(".")
    while xa and xb and xa[-1] == xb[-1]:
        xa, xb = xa[:-1], xb[:-1]
    while xa and xb and xa[0] == xb[0]:
        xa, xb = xa[1:], xb[1:]
    return ".".join(xa), ".".join(xb)


def identity_layout(shapes: Mapping[str, tuple], source: str = "identity") -> KeyLayout:
    """Every stored name taken as the model's."""
    shapes = {k: tuple(s) for k, s in shapes.items()}
    return KeyLayout({k: Part(k, k) for k in shapes}, shapes, source, shapes)


def checkpoint_layout(ck) -> KeyLayout:
    """The layout of checkpoint `ck` (io.Checkpoint), from its config.json and its dense view's shapes (a
    4-bit checkpoint's weights under their dense names): the one entry point merge, unmerge, quantize,
    extract and validate read a checkpoint's names through. Cached per (config, shapes)."""
    from .quantized import dense_shapes

    return key_layout(ck.config, dense_shapes(ck))


def key_layout(config: dict | None, shapes: Mapping[str, tuple]) -> KeyLayout:
    """The layout of a checkpoint with config.json `config` and stored (dense) tensor shapes `shapes`.

    Without a config or a model class transformers can build, names are taken as they are ("identity")."""
    if not config:
        return identity_layout(shapes)
    return _cached(json.dumps(config, sort_keys=True, default=str), tuple((k, tuple(s)) for k, s in shapes.items()))


@lru_cache(maxsize=4)
def _cached(config_json: str, shapes: tuple) -> KeyLayout:
    from .hf_layout import meta_model

    shapes = dict(shapes)
    config = json.loads(config_json)
    if not _may_convert(config, shapes) and not any(len(s) == 3 for s in shapes.values()) \
            and not _prefix_may_differ(config, shapes):
        # transformers loads these names as they are (a 3-D tensor may be fused experts: whether they are
        # stored transposed needs the model)
        return identity_layout(shapes, "transformers")
    model = meta_model(config)
    if model is None:
        return identity_layout(shapes)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)  # what from_pretrained applies, legacy renames included
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    model_sd = model.state_dict()
    prefix = model.base_model_prefix
    named: dict[str, tuple[str, object]] = {}  # stored -> (model name, converter pattern or None)
    for key in sorted(shapes, key=dot_natural_key):  # transformers' load order: it numbers the experts
        new, pattern = rename_source_key(key, renamings, converters, prefix, model_sd)
        if new not in model_sd and key in model_sd:  # as transformers: keep a name the model already has
            new, pattern = key, None
        named[key] = (new, pattern)
    pattern_owner = {pat: c for c in converters for pat in c.source_patterns}
    parts, unconverted, unconverted_into, fused = {}, {}, {}, {}
    for key, (new, pattern) in named.items():
        if pattern is None:
            parts[key] = Part(key, new if new in model_sd else key)
            continue
        conv = pattern_owner[pattern]
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
        if len(conv.operations) == 1 and getattr(conv.operations[0], "check_dims", False) and new in model_sd \
                and tuple(shapes[key]) == tuple(model_sd[new].shape):
            parts[key] = Part(key, new)  # Transpose(check_dims): transformers keeps a tensor of the model's shape
            continue
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or new not in model_sd:
            unconverted[key] = f"transformers converts it into {new} with {', '.join(n for n, _ in ops)}, " \
                               f"which loratools does not follow"
            first = conv.target_patterns[0]  # a Chunk/Split makes one tensor per target pattern
            unconverted_into[key] = [new] + [new.replace(first, t) for t in conv.target_patterns[1:] if first in new]
            parts[key] = Part(key, key)
            continue
        fused.setdefault(new, (len(conv.source_patterns), {}))[1].setdefault(
            conv.source_patterns.index(pattern), []).append(key)
    out_shapes = {p.param: tuple(shapes[p.stored]) for p in parts.values()}
    for param, (n_patterns, by_pattern) in fused.items():
        _fuse(param, n_patterns, by_pattern, shapes, tuple(model_sd[param].shape), parts, out_shapes)
    transposed = frozenset(f"{n}.{p}" for n, m in model.named_modules() if getattr(m, "is_transposed", False)
                           for p, _ in m.named_parameters(recurse=False))
    ordered = {k: parts[k] for k in shapes}  # stored order
    return KeyLayout(ordered, out_shapes, "transformers", {k: tuple(s) for k, s in shapes.items()}, transposed,
                     unconverted, unconverted_into, _reverse=_reverse_renamer(renamings, converters))


def _mapping_names() -> dict:
    """transformers' MODEL_MAPPING_NAMES: the live table once transformers is imported, else read from its
    source (hf_tables: the import costs ~0.6 s)."""
    if "transformers.models.auto.modeling_auto" not in sys.modules:
        names = hf_tables.model_mapping_names()
        if names is not None:
            return names
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return MODEL_MAPPING_NAMES


def _identities(config: dict) -> set[str]:
    """Names transformers looks conversions up by: architectures, every (sub-)config's model_type and its
    base model class."""
    mapping_names = _mapping_names()
    out = set(config.get("architectures") or [])
    stack = [config]
    while stack:
        c = stack.pop()
        if isinstance(c.get("model_type"), str):
            out.add(c["model_type"])
            cls = mapping_names.get(c["model_type"])
            out.update([cls] if isinstance(cls, str) else list(cls or ()))
        stack += [v for v in c.values() if isinstance(v, dict)]
    return out


def _may_convert(config: dict, shapes: Mapping[str, tuple]) -> bool:
    """False when transformers has no conversion for this model and its legacy renamings change no key: then
    the names are the model's as stored, and no model class needs building (seconds of imports).

    While transformers.conversion_mapping is not imported (~1.5 s), a "no" read from its source text
    (_surely_unconverted) answers; any other case asks the live mapping, which then decides."""
    if "transformers.conversion_mapping" not in sys.modules and _surely_unconverted(config, shapes):
        return False
    return _may_convert_live(config, shapes)


def _surely_unconverted(config: dict, shapes: Mapping[str, tuple]) -> bool:
    """True when transformers' conversion_mapping.py, read as text, names none of this model's identities
    and its legacy renamings match no key (hf_tables); False when that cannot be told so."""
    mentions = hf_tables.conversion_mentions()
    if mentions is None or _identities(config) & mentions:
        return False
    return hf_tables.may_rename_legacy(shapes) is False


def _may_convert_live(config: dict, shapes: Mapping[str, tuple]) -> bool:
    """_may_convert asked of transformers' live conversion mapping."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import apply_renamings

    if any(get_checkpoint_conversion_mapping(t) for t in _identities(config)):
        return True
    legacy = get_checkpoint_conversion_mapping("legacy") or []
    return any(apply_renamings(k, legacy) != k for k in shapes)


def _module_name(model_type: str) -> str:
    """transformers' model_type_to_module_name, read from its source while it is not imported (hf_tables)."""
    if "transformers.models.auto.configuration_auto" not in sys.modules:
        mod = hf_tables.module_name(model_type)
        if mod is not None:
            return mod
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


def _declared_prefixes(model_type) -> set[str]:
    """The base_model_prefix values the modeling file of `model_type` declares, read as text: importing it
    costs seconds (transformers' modeling code), reading it a millisecond. Empty when there is no such file."""
    import os
    import re

    root = hf_tables.transformers_dir()
    if not isinstance(model_type, str) or root is None:
        return set()
    mod = _module_name(model_type)
    path = os.path.join(root, "models", mod, f"modeling_{mod}.py")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return set()
    return {p for p in re.findall(r"""base_model_prefix\s*=\s*["'](\w*)["']""", text) if p}


def _prefix_may_differ(config: dict, shapes: Mapping[str, tuple]) -> bool:
    """True when transformers may add the model's base_model_prefix to the stored names on load: a head
    class (GPT2LMHeadModel) whose checkpoint holds no key under that prefix, i.e. a backbone saved alone
    (the original `gpt2`'s `h.0...`, loaded as `transformer.h.0...`; PEFT names adapters after the latter).
    Then the model is built and transformers' own rule decides; a needless True only costs that build."""
    archs = config.get("architectures") or []
    bare = _mapping_names().get(config.get("model_type"))
    if not archs or archs[0] == bare or (isinstance(bare, (list, tuple)) and archs[0] in bare):
        return False
    prefixes = _declared_prefixes(config.get("model_type"))
    return bool(prefixes) and not any(k.split(".", 1)[0] in prefixes for k in shapes)


def _fuse(param: str, n_patterns: int, by_pattern: dict[int, list[str]], shapes: Mapping[str, tuple],
          model_shape: tuple, parts: dict[str, Part], out_shapes: dict[str, tuple]) -> None:
    """Parts of one fused expert parameter: pattern j's tensors, expert by expert, concatenated on dim 1."""
    counts = {j: len(keys) for j, keys in by_pattern.items()}
    experts = model_shape[0]
    if len(by_pattern) != n_patterns or any(n != experts for n in counts.values()):
        key = next(iter(by_pattern.values()))[0]
        raise FormatError(f"transformers fuses this tensor into {param} of {experts} experts, but the checkpoint "
                          f"holds {sorted(counts.values())} tensor(s) per kind for it", tensor=key)
    start, concat = 0, n_patterns > 1
    for j in sorted(by_pattern):
        keys = by_pattern[j]
        rows = shapes[keys[0]][0]
        for e, key in enumerate(keys):
            if tuple(shapes[key]) != tuple(shapes[keys[0]]):
                raise FormatError(f"expert tensors of {param} differ in shape ({list(shapes[key])} vs "
                                  f"{list(shapes[keys[0]])})", tensor=key)
            parts[key] = Part(key, param, e, (start, start + rows) if concat else None)
        start += rows
    first = tuple(shapes[by_pattern[0][0]])
    shape = (experts, start, *first[1:]) if concat else (experts, *first)
    if shape != model_shape:
        key = by_pattern[0][0]
        raise FormatError(f"its experts make {param} of shape {list(shape)}, but config.json's model has "
                          f"{list(model_shape)}", tensor=key)
    out_shapes[param] = shape


def _reverse_renamer(renamings, converters):
    """Model name -> stored name for a whole tensor the file lacks: transformers' save-time reversal of the
    renamings the load used (as revert_weight_conversion)."""
    used = [t.reverse_transform() for t in renamings[::-1] if t.was_used()]

    def reverse(name: str) -> str:
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(name, used, [], reverse=True)[0]
    return reverse


# -- explaining a name that is not there -------------------------------------------------------------------

def explain_missing(name: str, layout: KeyLayout, min_depth: int = 3) -> str:
    """Why model name `name` has no tensor: a prefix/layout difference (which) or really another model.

    Looks for a tensor (stored or model name) that ends like `name` over at least `min_depth` dotted
    components (e.g. `layers.0.self_attn.q_proj.weight`)."""
    pieces = name.split(".")
    index_only = None  # a tensor that differs only by numbers: another layer / expert, not another prefix
    for cut in range(1, max(1, len(pieces) - min_depth + 1)):
        tail = "." + ".".join(pieces[cut:])
        for param in layout.shapes:
            if (param.endswith(tail) or param == tail[1:]) and param not in layout.unconverted:
                theirs, ours = _difference(param, name)
                if _indices(theirs) and _indices(ours):
                    index_only = index_only or (param, ours)
                    continue
                return (f"a prefix difference, not another model: the checkpoint's model names it {param} "
                        f"('{theirs}' where the adapter has '{ours}')")
        for stored, part in layout.parts.items():
            if stored.endswith(tail) and (stored != part.param or stored in layout.unconverted) \
                    and not _indices(_difference(stored, name)[0]):
                why = layout.unconverted.get(stored)
                if why:
                    return f"a layout difference: the checkpoint stores {stored}; {why}"
                return (f"a layout difference: the checkpoint stores {stored}, which transformers loads as "
                        f"{part.param}")
    if index_only is not None:
        return (f"the checkpoint has no index {index_only[1]} there (it has e.g. {index_only[0]}): is this adapter "
                f"for another model, with more layers or experts?")
    if layout.source == "identity" and any("." in k for k in layout.parts):
        return ("no tensor ends like it; without a config.json transformers can build, the checkpoint's names "
                "are taken as stored, so a layout that transformers converts on load is not followed")
    return "no tensor of the checkpoint ends like it (not a prefix or layout difference): is this adapter for " \
           "another model?"


def _indices(part: str) -> bool:
    """True for a dotted run of numbers only ('5', '0.3'): module-list indices."""
    return bool(part) and all(p.isdigit() for p in part.split("."))


def stored_names(layout: KeyLayout, params: Iterable[str]) -> list[str]:
    """The stored tensors that hold the given model parameters, in stored order."""
    want = set(params)
    return [k for k, p in layout.parts.items() if p.param in want]


__all__ = ["KeyLayout", "Part", "checkpoint_layout", "explain_missing", "identity_layout", "key_layout",
           "stored_names"]
