"""The role of every tensor of a checkpoint (Linear, Conv1D, embedding, head, experts, router, other), from the
model class transformers builds for its config.json (on the meta device) or, failing that, from names.

extract chooses its LoRA targets with it; the adapter formats use it to tell embeddings from Linears.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hf_layout import meta_model
from .io import Checkpoint
from .key_layout import KeyLayout, Part, checkpoint_layout

# transformers models whose projections are pytorch_utils.Conv1D ([in, out] weights); names-only fallback.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "gpt2_bigcode_legacy"}
EMBEDDING_LEAVES = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                    "embed_positions", "tok_embeddings", "embed_in", "shared"}
HEAD_LEAVES = {"lm_head", "embed_out"}
INPUT_EMBEDDING_LEAVES = {"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"}
# Leaf names that are nn.Linear (or Conv1D, by model_type) in every transformers model that uses them: when all
# 2-D weights are named so, no model class is built (see model_layout).
LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                 "gate_up_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
                 "dense_4h_to_h", "fc1", "fc2", "out_proj", "query", "key", "value", "wq", "wk", "wv", "wo",
                 "w1", "w2", "w3", "fc_in", "fc_out", "Wqkv", "out_proj", "in_proj", "x_proj", "dt_proj"}

@dataclass
class TensorRole:
    key: str  # tensor name in the checkpoints
    module: str  # module name as PEFT sees it (in the model class of config.json)
    param: str  # "weight", "bias", ...
    kind: str  # "linear" | "conv1d" | "embedding" | "head" | "experts" | "router" | "other"
    module_type: str  # class name, or "?" when guessed from names
    part: Part | None = None  # "experts": where this stored tensor sits in the fused parameter

    @property
    def param_name(self) -> str:
        """`<module>.<param>`: the model's name of the parameter (PEFT's target_parameters entry)."""
        return f"{self.module}.{self.param}"


@dataclass
class CheckpointRoles:
    """The role of every tensor of a checkpoint, for extract (not hf_layout.ModelLayout, quantize's view)."""

    roles: dict[str, TensorRole]
    source: str  # "model class X" or "names"
    tied_head: bool  # lm head tied to the input embedding (and absent from the files)
    input_embedding: str | None
    model_type: str | None
    head: str | None = None  # output head module name (tied or not)
    keys: KeyLayout | None = None  # stored names <-> the model's (key_layout.py)


# Note: what can be a LoRA target, and in which layout.
#     The kind of each weight comes from the model class itself: config.json is turned into the model on
#     PyTorch's meta device (no memory, no weights), and each tensor's module is looked up there:
#     nn.Linear → LoRA Linear; transformers' Conv1D (GPT-2 family, weights stored [in, out]) → LoRA
#     Linear with fan_in_fan_out, whose factors are those of ΔWᵀ; nn.Embedding → LoRA Embedding, whose
#     factors are lora_embedding_B [dim, r] · lora_embedding_A [r, num_embeddings] = ΔWᵀ; the output head
#     (get_output_embeddings(), a Linear) stays a LoRA Linear, which is what PEFT makes of `lm_head`.
#     Without a config or a model class (custom code), names decide: embedding-like leaf names
#     (embed_tokens, wte, ...), head-like ones (lm_head, ...), and Conv1D by model_type.


def _module_kind(module) -> str:
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__.endswith("Router"):
        # transformers 5's MoE routers (MixtralTopKRouter, ...) hold a plain [experts, hidden] weight; PEFT
        # adapts it as a target_parameters entry (`mlp.gate.weight`), as all-linear does
        return "router"
    return "other"


def _kind_from_names(module: str, model_type: str | None) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if leaf in EMBEDDING_LEAVES:
        return "embedding"
    if leaf in HEAD_LEAVES:
        return "head"
    return "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"


def _names_suffice(ck: Checkpoint) -> bool:
    """True when every 2-D weight has a standard Linear, embedding or head name (no model class needed)."""
    for key, info in ck.tensors.items():
        module, _, param = key.rpartition(".")
        if param == "weight" and len(info.shape) == 2:
            leaf = module.rsplit(".", 1)[-1]
            if leaf not in LINEAR_LEAVES and leaf not in EMBEDDING_LEAVES and leaf not in HEAD_LEAVES:
                return False
    return True


def _config_tie_default(config: dict) -> bool | None:
    """tie_word_embeddings of the model's config class when config.json does not say (cheap: no modeling code)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return bool(getattr(CONFIG_MAPPING[config["model_type"]](), "tie_word_embeddings", None))
    except Exception:
        return None


def model_layout(ck: Checkpoint, *, use_model_class: bool | None = None) -> CheckpointRoles:
    """Role of every tensor of a checkpoint (see the module note).

    use_model_class: None = only when some 2-D weight has a non-standard name (building the model class
    imports transformers' modeling code, seconds of fixed cost); True/False force it on/off.
    """
    config = ck.config or {}
    model_type = config.get("model_type")
    keys = checkpoint_layout(ck)
    if use_model_class is None:  # a layout transformers converts (renamed prefixes, fused experts) needs the model
        use_model_class = keys.renamed or not _names_suffice(ck)
    model = meta_model(config) if config and use_model_class else None
    roles: dict[str, TensorRole] = {}
    mods: dict[str, object] = {}
    head = emb = None
    if model is not None:
        mods = dict(model.named_modules())
        by_id = {id(m): n for n, m in mods.items()}
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = by_id.get(id(out)) if out is not None else None
        emb = by_id.get(id(inp)) if inp is not None else None
    for key, info in ck.tensors.items():
        part = keys.parts[key]
        module, _, param = part.param.rpartition(".")
        if not part.whole:  # a slice of a fused expert parameter (Mixtral's experts.e.w1)
            m = mods.get(module)
            roles[key] = TensorRole(key, module, param, "experts" if m is not None else "other",
                                    type(m).__name__ if m is not None else "?", part)
            continue
        name = module  # key_layout already gave a backbone-only checkpoint (gpt2's h.0...) the model's prefix
        if name in mods:
            m = mods[name]
            kind = "head" if name == head else _module_kind(m)
            mtype = type(m).__name__
        else:
            w = ck.tensors.get(f"{module}.weight")
            kind = _kind_from_names(module, model_type) if w is not None and len(w.shape) == 2 else "other"
            mtype = "?"
        if key in keys.unconverted:  # transformers converts it (e.g. splits nomic-bert's Wqkv): no module of
            kind = "other"  # the model has this name, so a LoRA on it would not load; listed, with the reason
        elif name in mods and _experts_param(mods[name], param, info.shape):
            kind = "experts"
        elif param != "weight" or len(info.shape) != 2:
            kind = "other" if kind not in ("linear", "conv1d", "head") or param != "bias" else "bias"
        roles[key] = TensorRole(key, name, param, kind, mtype, part if kind == "experts" else None)
    if emb is None:
        emb = next((r.module for r in roles.values() if r.kind == "embedding"
                    and r.module.rsplit(".", 1)[-1] in INPUT_EMBEDDING_LEAVES), None)
    if head is None:
        head = next((r.module for r in roles.values() if r.kind == "head"), None)
    tie = config.get("tie_word_embeddings")
    if model is not None:  # the config class knows the model's default when config.json is silent
        tie = getattr(model.config, "tie_word_embeddings", tie)
    elif tie is None and model_type:
        tie = _config_tie_default(config)
    tie = bool(tie) if tie is not None else model_type in CONV1D_MODEL_TYPES
    has_head = any(r.kind == "head" and r.param == "weight" for r in roles.values())
    if model is not None:
        source = f"model class {type(model).__name__}"
    elif use_model_class:
        source = "names (no model class could be built for this config)"
    else:
        source = "names (every 2-D weight has a standard Linear/embedding name)"
    if head is None and tie:
        head = "lm_head"
    return CheckpointRoles(roles, source, tie and not has_head, emb, model_type, head, keys)


def _experts_param(module, param: str, shape) -> bool:
    """A 3-D parameter of a transformers 5 experts module stored whole (GPT-OSS, or a checkpoint saved in the
    fused layout): PEFT's target_parameters, truncated per expert."""
    return len(shape) == 3 and type(module).__name__.endswith("Experts") and param in dict(
        module.named_parameters(recurse=False))


# -- checks before any tensor is read -----------------------------------------------------------------------
