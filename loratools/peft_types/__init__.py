"""Non-LoRA PEFT adapter types read from files: LoHa, LoKr, VeRA, AdaLoRA, IA3 (and whatever registers here).

REGISTRY maps a peft_type to its PeftType (base.py). A new type is one module defining a TypedModule subclass
and a PeftType, plus one line below. adapter.load_adapter reads such an adapter through `read_typed` when the
caller accepts typed adapters (`load_adapter(..., typed=True)`: merge, unmerge, validate, inspect, convert
--to lora); every other command refuses it in one line (adapter.refuse_typed).
"""
from __future__ import annotations

import torch

from ..errors import FormatError, UnsupportedError, UsageError
from . import adalora, boft, ia3, loha, lokr, oft, vera
from .base import PREFIX, PeftType, TypedModule

REGISTRY: dict[str, PeftType] = {}


def register(t: PeftType) -> None:
    REGISTRY[t.name] = t


register(loha.TYPE)
register(lokr.TYPE)
register(vera.TYPE)
register(adalora.TYPE)
register(ia3.TYPE)
register(oft.TYPE)
register(boft.TYPE)


def peft_type_of(cfg: dict) -> str:
    return str(cfg.get("peft_type", "")).upper()


def read_typed(cfg: dict, tensors, where, check_finite: bool = True
               ) -> tuple[dict[str, TypedModule], dict[str, torch.Tensor], set]:
    """(modules by name, saved whole tensors (modules_to_save) by base tensor name, dtypes) of an adapter of a
    registered type, from its (saved key, tensor) pairs; `where` (the weights file) names it in errors."""
    kind = REGISTRY[peft_type_of(cfg)]
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            raise FormatError(f"{key} must be an object", path=where)
    if cfg.get("trainable_token_indices"):
        raise UnsupportedError("trainable_token_indices adapters are not supported", path=where)
    saving = cfg.get("modules_to_save") or []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    dtypes = set()
    for key, t in tensors:
        dtypes.add(t.dtype)
        if check_finite and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise FormatError(f"adapter tensor holds NaN/Inf values ({bad} of {t.numel()} elements)",
                                  path=where, tensor=key)
        if key in kind.shared:
            shared[key] = t
            continue
        if not key.startswith(PREFIX):
            raise FormatError(f"unexpected key for a {kind.name} adapter (PEFT keys start with {PREFIX!r})",
                              path=where, tensor=key)
        module, _, leaf = key[len(PREFIX):].rpartition(".")
        if leaf in kind.leaves and module:
            parts.setdefault(module, {})[leaf] = t
        elif any(f".{m}." in f".{module}." for m in saving):  # modules_to_save: the module's own tensors
            saved[key[len(PREFIX):]] = t
        elif ".lora_" in key and kind.name != "ADALORA":  # e.g. a LoRA adapter whose config says otherwise
            raise FormatError(f"a LoRA tensor (peft_type LORA) in a {kind.name} adapter: adapter_config.json says "
                              f"peft_type {kind.name}, whose modules hold {', '.join(kind.leaves)}", path=where,
                              tensor=key)
        else:
            raise FormatError(f"unexpected tensor for a {kind.name} adapter (its modules hold "
                              f"{', '.join(kind.leaves)})", path=where, tensor=key)
    modules = kind.parse(parts, shared, cfg, where)
    return dict(sorted(modules.items())), saved, dtypes


def refuse_mixed(adapters: list, weights: list[float]) -> None:
    """merge/unmerge take an adapter of a peft_types type alone and at weight 1 (PEFT's merge_and_unload of
    that one adapter); anything else is refused in one line."""
    typed = [a for a in adapters if a.peft_type != "LORA"]
    if not typed:
        return
    t = typed[0]
    if len(adapters) > 1:
        raise UnsupportedError(f"a {t.peft_type} adapter is merged or unmerged alone, not with other adapters in one "
                               f"command; run one command per adapter", path=t.path)
    if weights[0] != 1.0:
        raise UsageError(f"--weight applies to LoRA adapters; a {t.peft_type} adapter is merged as PEFT merges it "
                         f"(weight 1)")


__all__ = ["REGISTRY", "refuse_mixed", "PeftType", "TypedModule", "peft_type_of", "read_typed", "register"]
