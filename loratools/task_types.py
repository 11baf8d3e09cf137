"""Which PEFT task type and which transformers class a checkpoint's config.json stands for.

PEFT picks the PeftModel class from `adapter_config.json`'s `task_type` (peft.auto's
MODEL_TYPE_TO_PEFT_MODEL_MAPPING; None or an unknown value: the plain PeftModel), and those classes need
what their task needs: PeftModelForCausalLM reads `prepare_inputs_for_generation` (a bare BertModel has
none), PeftModelForSeq2SeqLM the encoder-decoder generation hooks, PeftModelForSequenceClassification adds
`classifier`/`score` to `modules_to_save`. So an adapter we write carries the task type of the model it
was made on: its input adapters' (combine, resize), else the base checkpoint's class (extract). Pure
functions of config.json; transformers is imported only to build a class.
"""
from __future__ import annotations

# Note: the rule, by the class name transformers saved in `architectures`.
#     ...ForCausalLM / ...LMHeadModel (GPT-2, BertLMHeadModel): CAUSAL_LM.
#     ...ForConditionalGeneration: SEQ_2_SEQ_LM when config.json says is_encoder_decoder (T5, BART,
#     Whisper), else CAUSAL_LM: vision-language models (LLaVA, Qwen-VL, Gemma 3) generate text from a
#     decoder, and PEFT's examples and users train them as CAUSAL_LM.
#     ...ForSequenceClassification / ...ForTokenClassification / ...ForQuestionAnswering: their PEFT tasks.
#     ...Model (BertModel, T5Model): FEATURE_EXTRACTION (PeftModelForFeatureExtraction passes the inputs on).
#     Anything else (...ForMaskedLM, ...ForPreTraining, no architectures): None, the plain PeftModel,
#     with a note: PEFT has no task for it and the plain class loads and runs any model.
_BY_SUFFIX = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def architecture(config: dict | None) -> str | None:
    """config.json's architectures[0] (the class `save_pretrained` was called on), or None."""
    archs = (config or {}).get("architectures") or []
    return archs[0] if archs and isinstance(archs[0], str) else None


def task_type_of(config: dict | None) -> tuple[str | None, str | None]:
    """(PEFT task type, note) for a checkpoint's config.json; the note says why the type is None.

    Example:
        >>> task_type_of({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True})
        ('SEQ_2_SEQ_LM', None)
        >>> task_type_of({"architectures": ["BertModel"]})
        ('FEATURE_EXTRACTION', None)
    """
    arch = architecture(config)
    if arch is None:
        return None, "config.json names no architecture: task_type left null (PEFT's plain PeftModel)"
    for suffix, task in _BY_SUFFIX:
        if arch.endswith(suffix):
            return task, None
    if arch.endswith("ForConditionalGeneration"):
        return ("SEQ_2_SEQ_LM" if (config or {}).get("is_encoder_decoder") else "CAUSAL_LM"), None
    if arch.endswith("Model") and not arch.endswith("PreTrainedModel"):
        return "FEATURE_EXTRACTION", None
    return None, f"PEFT has no task type for {arch}: task_type left null (PEFT's plain PeftModel)"


# PEFT's task classes add these heads to modules_to_save (peft_model.py: classifier_module_names,
# qa_module_names) and then cannot load a LoRA on them.
_HEADS_SAVED_WHOLE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                      "QUESTION_ANS": ("qa_outputs",)}


def adapter_task_type(config: dict | None, lora_modules) -> tuple[str | None, str | None]:
    """`task_type_of` for an adapter with LoRA on `lora_modules`: a classifier task whose head carries a
    LoRA (extract of a full fine-tune moves the head too) is left null, since PEFT's class for the task
    would replace that head by a copy saved whole and refuse the LoRA; the plain PeftModel loads it."""
    task, note = task_type_of(config)
    heads = sorted(m for m in lora_modules if m.rsplit(".", 1)[-1] in _HEADS_SAVED_WHOLE.get(task, ()))
    if heads:
        return None, (f"{task} left out of task_type: PEFT's {task} class saves {heads[0]} whole and cannot load "
                      f"the LoRA on it; PeftModel.from_pretrained loads this adapter as a plain PeftModel")
    return task, note


def common_task_type(values: list[str | None]) -> tuple[str | None, str | None]:
    """(task type, disagreement) of several adapters combined: the one they share; adapters without one
    do not count. With two different ones the first is taken and `disagreement` says so in one line."""
    known = [v for v in values if v]
    if len(set(known)) > 1:
        return known[0], (f"adapters disagree on task_type ({', '.join(repr(v) for v in values)}); "
                          f"taking {known[0]!r}")
    return (known[0] if known else None), None


def model_class(config: dict | None):
    """The transformers class to build a checkpoint as: the one it was saved from (architectures[0]),
    else AutoModelForCausalLM (the only class a config without architectures was ever built as here)."""
    import transformers

    arch = architecture(config)
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None and hasattr(cls, "from_pretrained"):
        return cls
    return transformers.AutoModelForCausalLM


__all__ = ["adapter_task_type", "architecture", "common_task_type", "model_class", "task_type_of"]
