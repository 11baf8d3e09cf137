"""What transformers builds from a checkpoint's config.json: module classes, tied and output weights.

The 4-bit commands need two facts that the tensors alone do not carry: which weights belong to an
`nn.Linear` or a GPT-2 style `Conv1D` (and so are quantized, and in which orientation), and which ones
transformers leaves dense (tied weights, the output embedding, the last parameter). Both come from
instantiating the model class named in config.json on the meta device: no memory, no weights read,
and exactly the module tree that `from_pretrained` would build.

Note: why not a list of names.
    A rule such as "2-D `.weight` tensors, minus embeddings" disagrees with transformers for tied
    heads, for Linear subclasses it does not quantize, and for Conv1D (stored [in, out], quantized
    transposed). The meta model is the same source transformers itself uses, so the selection cannot
    drift from it. When transformers cannot build the class (no config, custom code), the fallback
    rule below is used and reported as such.

Note: known architectures.
    Importing a model class costs ~3 s of transformers imports (more than the rest of quantizing a
    small model). For a few common architectures (FAMILIES) the same facts follow from config.json
    alone: their module tree is fixed by the layer count, and transformers' skips are the output
    embedding, the tied pair and the last parameter. tests/test_hf_layout.py builds every family's
    meta model (tied and untied, with and without the keys that have defaults) and asserts that the
    two layouts are equal, so a transformers release that changes one of these classes fails the
    tests instead of changing our selection. Configs with options that add modules (GPT-2 cross
    attention) or any other architecture use the meta model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable

from .dtypes import declared_float_dtype

if TYPE_CHECKING:
    import torch

LINEAR = "linear"
CONV1D = "conv1d"


@dataclass(frozen=True)
class ModelLayout:
    """Module facts for one config; module names are dotted paths as in the state dict."""

    source: str  # "transformers" (meta model) or "fallback" (name rule)
    kinds: dict[str, str] = field(default_factory=dict)  # module -> "linear" | "conv1d" (quantizable ones)
    default_skips: tuple[str, ...] = ()  # transformers' get_keys_to_not_convert (tied, last, output embedding)
    keep_in_fp32: tuple[str, ...] = ()  # model._keep_in_fp32_modules: never quantized
    dtype: str | None = None  # the dtype transformers loads the weights in (config dtype), if known

    def is_conv1d(self, module: str) -> bool:
        """True when the module is a GPT-2 style Conv1D (its weight stored [in, out])."""
        return self.kinds.get(module) == CONV1D


def should_convert(module: str, patterns: Iterable[str] | None) -> bool:
    """transformers' should_convert_module: skip when a pattern matches from the start on a dot
    boundary, as a regex with that boundary, or as a suffix."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)


@dataclass(frozen=True)
class Family:
    """The module tree of a model class, as far as quantization cares (see Note: known architectures)."""

    model_type: str  # config.json's model_type for this class
    layer: str  # prefix of decoder layer i, with {i}
    layers_key: str  # config key holding the layer count
    linear: tuple[str, ...] = ()  # nn.Linear leaves under each layer
    conv1d: tuple[str, ...] = ()  # transformers Conv1D leaves under each layer
    embed: str = ""  # input embedding module (tied to the head when tie_word_embeddings)
    last_tied: str = ""  # key of the last parameter when the head is tied (suffix ".weight" removed)
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    adds_modules: tuple[str, ...] = ()  # config flags that add modules: use the meta model when set


def _llama_like(model_type: str) -> Family:
    return Family(model_type, "model.layers.{i}", "num_hidden_layers",
                  linear=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
                  embed="model.embed_tokens", last_tied="model.norm")


FAMILIES = {
    "LlamaForCausalLM": _llama_like("llama"),
    "MistralForCausalLM": _llama_like("mistral"),
    "Qwen2ForCausalLM": _llama_like("qwen2"),
    "Qwen3ForCausalLM": _llama_like("qwen3"),
    "GPT2LMHeadModel": Family("gpt2", "transformer.h.{i}", "n_layer", conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                               "mlp.c_proj"),
                              embed="transformer.wte", last_tied="transformer.ln_f.bias", tie_default=True,
                              adds_modules=("add_cross_attention",)),
}


def _family_layout(config: dict) -> ModelLayout | None:
    """The layout of a FAMILIES architecture from config.json alone; None for anything else."""
    archs = config.get("architectures") or []
    fam = FAMILIES.get(archs[0]) if len(archs) == 1 else None
    if fam is None or config.get("model_type") != fam.model_type:
        return None
    layers = config.get(fam.layers_key)
    # anything unusual goes to the meta model, which validates the config as transformers does: a layer
    # count under another spelling (num_hidden_layers is GPT-2's alias of n_layer), a tie flag that is not
    # a bool, options that add modules
    aliases = {config.get(k) for k in ("num_hidden_layers", fam.layers_key) if k in config}
    tie = config.get("tie_word_embeddings", fam.tie_default)
    if type(layers) is not int or len(aliases) != 1 or not isinstance(tie, bool) or \
            any(config.get(k) for k in fam.adds_modules):
        return None
    kinds = {}
    for i in range(layers):
        prefix = fam.layer.format(i=i)
        kinds.update({f"{prefix}.{leaf}": LINEAR for leaf in fam.linear})
        kinds.update({f"{prefix}.{leaf}": CONV1D for leaf in fam.conv1d})
    kinds["lm_head"] = LINEAR
    # transformers' get_keys_to_not_convert: the output embedding, both ends of a tied pair, and the
    # module of the last parameter (the head, or when tied the final norm, since the head is not a
    # parameter of its own then)
    skips = {"lm_head", fam.embed, fam.last_tied} if tie else {"lm_head"}
    return ModelLayout("transformers", kinds, tuple(sorted(skips)), (), declared_float_dtype(config))


def layout_for(config: dict | None) -> ModelLayout:
    """The layout of the model a config describes (cached per config)."""
    if not config:
        return ModelLayout("fallback")
    return _family_layout(config) or model_class_layout(config)


def model_class_layout(config: dict) -> ModelLayout:
    """The layout read off the meta model, never from FAMILIES (what the family layouts are tested against)."""
    return _layout_cached(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=8)
def _layout_cached(config_json: str) -> ModelLayout:
    config = json.loads(config_json)
    dtype = declared_float_dtype(config)
    model = meta_model(config)
    if model is None:  # unknown architecture, custom code, a config transformers rejects
        return ModelLayout("fallback", dtype=dtype)
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    kinds = {}
    for name, module in model.named_modules():
        # Note: exact class test, as transformers' replace_with_bnb_linear does: subclasses of
        # nn.Linear (e.g. NonDynamicallyQuantizableLinear inside nn.MultiheadAttention) stay dense.
        if isinstance(module, Conv1D):
            kinds[name] = CONV1D
        elif type(module) is nn.Linear:
            kinds[name] = LINEAR
    keep = tuple(sorted(getattr(model, "_keep_in_fp32_modules", None) or ()))
    return ModelLayout("transformers", kinds, tuple(sorted(get_keys_to_not_convert(model))), keep, dtype)


def meta_model(config: dict | None) -> torch.nn.Module | None:
    """The model class config.json names, built on the meta device (no memory, no weights), or None when
    transformers cannot build it. Shared by quantize, extract and validate; cached per config."""
    if not config:
        return None
    return _meta_model_cached(json.dumps(config, sort_keys=True, default=str))


@lru_cache(maxsize=4)
def _meta_model_cached(config_json: str):
    config = json.loads(config_json)
    try:
        import torch
        import transformers
        from transformers import AutoConfig

        cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
        hf_config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
        archs = config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                if cls is not None:
                    return cls(hf_config)
                try:
                    return transformers.AutoModelForCausalLM.from_config(hf_config)
                except ValueError:  # not a causal LM: the bare model still names every module
                    return transformers.AutoModel.from_config(hf_config)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:  # unknown architecture, custom code, a config transformers rejects
        return None
