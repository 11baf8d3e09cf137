"""What each output tensor of a merge (or unmerge) is made of: which base tensor it is read from, which
adapter steps apply to it, and which saved tensor replaces it whole. Refusals (MismatchError) happen here,
before anything is read or written.

Note: tied output embeddings.
    A model with `tie_word_embeddings` (GPT-2) stores no `lm_head.weight`; the head is the input
    embedding. When an adapter changes only one of the two (LoRA or modules_to_save on `lm_head`, or
    on the embedding), PEFT's merge either writes the shared tensor for both or loses the change on
    reload, and PEFT warns about it. We keep what the adapted model computes: the output gets an
    explicit `lm_head.weight` (the head as the adapter sees it) and `tie_word_embeddings: false`.
    An adapter made with `ensure_weight_tying` changes both the same way, so the model stays tied.

Note: model names and stored names.
    Adapters name the model transformers 5 builds; the plan is keyed by the checkpoint's stored names, so
    the output keeps the user's layout. key_layout.py maps one to the other: a renamed prefix (LLaVA's
    `language_model.model.` is the model's `model.language_model.`), or a slice of a fused expert
    parameter (Mixtral's `experts.e.w1` is `mlp.experts.gate_up_proj[e, :I]`, w3 its `[e, I:]`). A LoRA step
    on a slice is the expert's own factors cut to those rows (`expert_part`), a Linear LoRA whose product
    has the bits of those rows of PEFT's einsum (tests/test_moe_merge.py checks it against merge_and_unload).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .adapter import Adapter, LoraModule
from .checks import HEAD_KEY, BaseTarget, adapter_fit_problems, first_problem_error, locate, \
    resolve_base_key, tied_embedding_key
from .errors import MismatchError, UnsupportedError
from .io import Checkpoint
from .key_layout import KeyLayout, Part, checkpoint_layout
from .lora_math import BIAS, WEIGHT, BiasTensor, Step, WeightTensor, expert_factors
from .peft_types.base import TYPED_BIAS, TypedBias

MODULES_TO_SAVE = "modules_to_save"  # a module the adapter saves whole, trained in full
BASE_LAYER = "base_layer"  # the embedding base layer PEFT saves beside embedding LoRA (save_embedding_layers)


@dataclass
class TensorPlan:
    """What happens to one output tensor."""

    key: str  # output tensor name
    source: str  # base tensor to read (the input embedding, for an untied head)
    replacement: torch.Tensor | None = None  # a saved tensor that replaces the base's whole
    replacement_kind: str | None = None  # MODULES_TO_SAVE or BASE_LAYER
    replacement_adapter_index: int | None = None  # position of the adapter holding `replacement`
    steps: list[Step] = field(default_factory=list)
    part: WeightTensor | BiasTensor | TypedBias = WEIGHT  # how the steps apply: ΔW to a weight, lora_B.bias to a bias

    @property
    def is_bias(self) -> bool:
        return self.part.is_bias

    def replace_with(self, tensor: torch.Tensor, kind: str, adapter_index: int) -> None:
        self.replacement, self.replacement_kind, self.replacement_adapter_index = tensor, kind, adapter_index


@dataclass
class MergePlan:
    """Every output tensor the adapters change, by name."""

    tensors: dict[str, TensorPlan]
    untied_head_source: str | None  # the embedding a new explicit lm_head.weight is read from
    dora_steps: int
    untied_head_key: str = HEAD_KEY  # the stored name of that new head (the checkpoint's layout)


def _saved_kind(adapter: Adapter, name: str) -> str:
    # A LoRA-wrapped module saved whole is the embedding base layer PEFT saves beside embedding LoRA.
    return BASE_LAYER if name.rsplit(".", 1)[0] in adapter.modules else MODULES_TO_SAVE


def mark_transposed_experts(adapters: list[Adapter], layout: KeyLayout, base_path=None) -> None:
    """Tell expert modules whose base stores [E, in, out] (GPT-OSS) so: their adapter cannot know it.

    The model transformers builds from config.json says (is_transposed). Without one (layout "identity": no
    config.json, or a class transformers cannot build) the stored shape decides; a square [E, n, n] fits
    both ways, and guessing would merge each expert's delta transposed without a word, so it is refused."""
    for ad in adapters:
        for m in ad.modules.values():
            if m.kind != "experts":
                continue
            m.experts_transposed = m.base_key in layout.transposed
            shape = layout.shapes.get(m.base_key)
            if layout.source == "transformers" or shape is None:
                continue
            if len(shape) == 3 and shape[1] == shape[2] and tuple(shape) == m.base_shape:  # fits both ways
                raise UnsupportedError(
                    f"expert parameter of square shape {list(shape)}: whether its experts are stored [E, out, in] or "
                    f"[E, in, out] (transformers' is_transposed) is known only from the model class, and "
                    f"config.json names none transformers can build", path=base_path, tensor=m.base_key)
            m.orient_experts(shape)


def build_plan(base: Checkpoint, adapters: list[Adapter], weights: list[float], *, untie: bool = True) -> MergePlan:
    """Map every adapter tensor onto the base; refuse (MismatchError) before anything is written.

    `untie=False` (unmerge) keeps a tied head tied: its steps apply to the shared embedding."""
    layout = checkpoint_layout(base)
    mark_transposed_experts(adapters, layout, base.path)
    for ad in adapters:
        err = first_problem_error(adapter_fit_problems(base, ad, layout))
        if err is not None:
            raise err
    tied = tied_embedding_key(base, layout.shapes)
    shapes = layout.lookup  # an adapter names the model's parameters, or (trained on transformers 4) the stored ones
    plans: dict[str, TensorPlan] = {}
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        _plan_adapter(plans, shapes, layout, tied, adapters, i, w)
    _refuse_replaced_and_adapted(plans, adapters)
    head = layout.stored_name(HEAD_KEY)
    untied_from = _plan_tied_head(plans, layout.stored_name(tied), head, adapters, untie) if tied is not None else None
    dora_steps = sum(1 for p in plans.values() if not p.is_bias for s in p.steps if s.dora)
    return MergePlan(dict(sorted(plans.items())), untied_from, dora_steps, head)


def _plan_for(plans: dict[str, TensorPlan], key: str, source: str) -> TensorPlan:
    return plans.setdefault(key, TensorPlan(key, source))


def _stored(layout: KeyLayout, target: BaseTarget) -> list[tuple[str, str, Part | None]]:
    """(stored key, stored source, part of a fused parameter or None) for each stored tensor of a target."""
    if target.tied_to is not None:
        return [(layout.stored_name(target.key), layout.stored_name(target.tied_to), None)]
    if target.key not in layout.params:  # a stored name (see KeyLayout.lookup)
        return [(target.key, target.key, None)]
    return [(p.stored, p.stored, None if p.whole else p) for p in layout.params[target.key]]


def expert_part(m: LoraModule, part: Part) -> LoraModule:
    """The LoRA of one stored slice of a fused expert parameter: expert e's factors (lora_math.expert_factors),
    B cut to the slice's rows; a Linear LoRA on the stored [rows, in] tensor."""
    if m.kind != "experts" or m.experts_transposed:
        raise UnsupportedError(f"{m.name} is stored as slices ({part.stored} is {part.describe()}); LoRA on such "
                               f"a slice is supported for [E, out, in] expert parameters only", tensor=part.stored)
    A_e, B_e = expert_factors(m.A, m.B, m.experts)
    B = B_e[part.expert] if part.rows is None else B_e[part.expert][slice(*part.rows)]
    return replace(m, name=part.stored.removesuffix(".weight"), kind="linear", A=A_e[part.expert], B=B,
                   param=None, experts=1)


def _plan_adapter(plans: dict[str, TensorPlan], shapes: dict, layout: KeyLayout, tied: str | None,
                  adapters: list[Adapter], i: int, weight: float) -> None:
    """Add adapter i's saved tensors (replacements) and LoRA steps (weights and lora_bias) to the plans."""
    ad = adapters[i]
    for name, t in ad.saved.items():
        for key, source, part in _stored(layout, locate(shapes, name, tied)):
            t_part = t if part is None else t[part.index]
            p = _plan_for(plans, key, source)
            if p.replacement is not None and not torch.equal(p.replacement, t_part.to(p.replacement.dtype)):
                raise MismatchError(f"adapters {adapters[p.replacement_adapter_index].path} and {ad.path} both "
                                    f"replace this tensor whole (modules_to_save) with different values; merge them "
                                    f"one at a time", path=ad.path, tensor=key)
            if p.replacement is None:
                p.replace_with(t_part, _saved_kind(ad, name), i)
    for m in ad.modules.values():
        for key, source, part in _stored(layout, locate(shapes, m.base_key, tied)):
            _plan_for(plans, key, source).steps.append(Step(m if part is None else expert_part(m, part), weight, i))
        if m.bias is not None or getattr(m, "scales_bias", False):  # IA3 (peft_types) scales a bias
            bias_key = resolve_base_key(shapes, m.bias_key)
            if bias_key is None and m.bias is None:  # IA3 on a layer without a bias: nothing to scale
                continue
            bias_key = layout.stored_name(bias_key) if bias_key in layout.params else bias_key
            bp = _plan_for(plans, bias_key, bias_key)
            bp.part = BIAS if m.bias is not None else TYPED_BIAS  # lora_bias, or a peft_types module's own
            bp.steps.append(Step(m, weight, i))


def _refuse_replaced_and_adapted(plans: dict[str, TensorPlan], adapters: list[Adapter]) -> None:
    """One adapter's modules_to_save tensor and another's LoRA on the same tensor do not compose."""
    for p in plans.values():
        owner = p.replacement_adapter_index
        if p.replacement_kind == MODULES_TO_SAVE and any(s.adapter_index != owner for s in p.steps):
            other = next(s.adapter_index for s in p.steps if s.adapter_index != owner)
            raise MismatchError(f"adapter {adapters[owner].path} replaces this tensor whole (modules_to_save) while "
                                f"{adapters[other].path} adapts it with LoRA; merge them one at a time",
                                path=adapters[owner].path, tensor=p.key)


def _plan_tied_head(plans: dict[str, TensorPlan], tied: str, head_key: str, adapters: list[Adapter],
                    untie: bool) -> str | None:
    """Untie a head the adapters change apart from its embedding (see the module note), or send the head's
    changes to the shared embedding. Returns the embedding an untied head is read from, or None.
    `tied` and `head_key` are stored names."""
    head, emb = plans.get(head_key), plans.get(tied)
    keeps_tying = not untie or all(ad.config.get("ensure_weight_tying") for ad in adapters)
    if (head is not None or (emb is not None and (emb.steps or emb.replacement_kind == MODULES_TO_SAVE))) \
            and not keeps_tying:
        if head is None:
            head = _plan_for(plans, head_key, tied)
        if emb is not None and emb.replacement_kind == BASE_LAYER and head.replacement is None:
            # PEFT loads a saved embedding base layer into the parameter the head shares.
            head.replace_with(emb.replacement, BASE_LAYER, emb.replacement_adapter_index)
        return tied
    if head is not None:  # kept tied: the head's changes go to the shared embedding
        plans.pop(head_key)
        target = _plan_for(plans, tied, tied)
        # With ensure_weight_tying PEFT saves the head's LoRA as a transposed copy of the embedding's
        # (lora_A = B_embᵀ, lora_B = A_embᵀ): the same ΔW, which the shared tensor must get once.
        on_embedding = {s.adapter_index for s in target.steps}
        target.steps += [s for s in head.steps if not (s.adapter_index in on_embedding and
                                                       adapters[s.adapter_index].config.get("ensure_weight_tying"))]
        if head.replacement is not None and target.replacement is None:
            target.replace_with(head.replacement, head.replacement_kind, head.replacement_adapter_index)
    return None


__all__ = ["BASE_LAYER", "MODULES_TO_SAVE", "MergePlan", "Step", "TensorPlan", "build_plan",
           "expert_part", "mark_transposed_experts"]
