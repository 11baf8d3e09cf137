"""transformers' own name tables, read from its source text while transformers is not imported yet.

Why: importing `transformers.conversion_mapping` (which pulls in torch.distributed and transformers' lazy
init) costs ~1.5 CPU-seconds and `transformers.models.auto.modeling_auto` ~0.6 s, on every command; for a
plain Llama or GPT-2 the answer they give is "no conversion", which the text of the same files already says
(parsing them takes ~25 ms). Nothing here is a copy: every table is read from the installed transformers,
and once transformers is imported (by a test, a library user, or the model build) its live tables are
used instead. Each function answers None where the text is not in the shape expected; the caller then asks
transformers itself. tests/test_key_layout.py checks these against the live tables.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from functools import lru_cache
from typing import Iterable


def transformers_dir() -> str | None:
    mod = sys.modules.get("transformers")
    if mod is not None and getattr(mod, "__file__", None):
        return os.path.dirname(mod.__file__)
    spec = importlib.util.find_spec("transformers")  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@lru_cache(maxsize=None)
def _tree(relpath: str) -> ast.Module | None:
    root = transformers_dir()
    if root is None:
        return None
    try:
        with open(os.path.join(root, relpath), encoding="utf-8") as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


@lru_cache(maxsize=None)
def model_mapping_names() -> dict | None:
    """transformers' MODEL_MAPPING_NAMES (model_type -> base model class name or names)."""
    tree = _tree("models/auto/modeling_auto.py")
    for node in tree.body if tree else ():
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["MODEL_MAPPING_NAMES"]:
            call = node.value
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "OrderedDict" and len(call.args) == 1 \
                    and not call.keywords:
                try:
                    return dict(ast.literal_eval(call.args[0]))
                except (ValueError, TypeError, SyntaxError):
                    return None
    return None


@lru_cache(maxsize=None)
def conversion_mentions() -> frozenset[str] | None:
    """Every string constant in transformers' conversion_mapping.py: a superset of the model types and class
    names it has a conversion for, as long as those names are written out there (checked by a test for the
    installed transformers)."""
    tree = _tree("conversion_mapping.py")
    if tree is None:
        return None
    return frozenset(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _is_legacy(node) -> bool:
    """`mapping["legacy"]`."""
    return isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "mapping" \
        and isinstance(node.slice, ast.Constant) and node.slice.value == "legacy"


def _renaming_sources(items) -> list[str] | None:
    """The source patterns of a list literal of `WeightRenaming(...)` calls with constant patterns."""
    if not isinstance(items, ast.List):
        return None
    out = []
    for call in items.elts:
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WeightRenaming"):
            return None
        src = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "source_patterns"), None)
        try:
            value = ast.literal_eval(src) if src is not None else None
        except ValueError:
            return None
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            return None
        out += patterns
    return out


@lru_cache(maxsize=None)
def legacy_patterns() -> tuple[str, ...] | None:
    """The source patterns of transformers' "legacy" renamings (applied to every model), as written: the
    `"legacy": [...]` entry of `_build_checkpoint_conversion_mapping` and its `mapping["legacy"] += [...]`."""
    tree = _tree("conversion_mapping.py")
    build = next((n for n in (tree.body if tree else ()) if isinstance(n, ast.FunctionDef)
                  and n.name == "_build_checkpoint_conversion_mapping"), None)
    if build is None:
        return None
    found, patterns = False, []
    for node in ast.walk(build):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "legacy":
                    more = _renaming_sources(v)
                    if more is None:
                        return None
                    found, patterns = True, patterns + more
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_legacy(t) for t in targets):
                more = _renaming_sources(node.value) if isinstance(node, ast.AugAssign) else None
                if more is None:  # replaced, or extended by something else than renamings: not read here
                    return None
                patterns += more
            elif any(isinstance(t, ast.Subscript) and getattr(t.value, "id", None) == "mapping"
                     and not isinstance(t.slice, ast.Constant) for t in targets) \
                    and not _the_alias_loop(build, node):
                return None  # a computed key might be "legacy"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_legacy(node.func.value) \
                and node.func.attr not in ("copy",):
            return None  # mapping["legacy"].append/extend(...)
    return tuple(patterns) if found else None


def _the_alias_loop(build: ast.FunctionDef, node) -> bool:
    """True for `mapping[model_type] = mapping[base_pattern].copy()` inside the loop over
    _MODEL_TO_CONVERSION_PATTERN guarded by `if model_type in mapping: continue` (it never replaces a key)."""
    for loop in ast.walk(build):
        if isinstance(loop, ast.For) and "_MODEL_TO_CONVERSION_PATTERN" in ast.unparse(loop.iter) \
                and node in loop.body and any(isinstance(s, ast.If) and "in mapping" in ast.unparse(s.test)
                                              and isinstance(s.body[0], ast.Continue) for s in loop.body):
            return True
    return False


def may_rename_legacy(keys: Iterable[str]) -> bool | None:
    """False when no legacy renaming of transformers can change any of these keys; None when unknown.

    A pattern as written, searched plainly, matches every key transformers' compiled form of it does (that
    form only adds a `^` or a name-boundary guard), unless it uses the `*.` or `\\1` shorthands."""
    patterns = legacy_patterns()
    if patterns is None or any("*" in p or "\\1" in p for p in patterns):
        return None
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error:
        return None
    return any(c.search(k) for c in compiled for k in keys)


@lru_cache(maxsize=None)
def module_name(model_type: str) -> str | None:
    """The models/ subfolder of `model_type` when it is plain (`-` read as `_`, neither deprecated nor one of
    the special names auto_mappings.py and configuration_auto.py map); None otherwise (ask transformers)."""
    trees = [_tree("models/auto/auto_mappings.py"), _tree("models/auto/configuration_auto.py")]
    if None in trees or not isinstance(model_type, str):
        return None
    if any(model_type in _special_or_deprecated(t) for t in trees):
        return None
    mod = model_type.replace("-", "_")
    root = transformers_dir()
    return mod if root and os.path.isdir(os.path.join(root, "models", mod)) else None


@lru_cache(maxsize=None)
def _special_or_deprecated(tree: ast.Module) -> frozenset[str]:
    """Names in the statements that touch SPECIAL_MODEL_TYPE_TO_MODULE_NAME or DEPRECATED_MODELS."""
    out: set[str] = set()
    for node in tree.body:
        text = ast.unparse(node) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr, ast.AugAssign)) else ""
        if "SPECIAL_MODEL_TYPE_TO_MODULE_NAME" in text or "DEPRECATED_MODELS" in text:
            out |= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return frozenset(out)
