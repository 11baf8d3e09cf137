"""Adapters of PEFT's other types (LoHa, LoKr, VeRA, AdaLoRA, IA3, ...) made by PEFT itself on the tiny fixtures,
with every trained tensor non-zero, and PEFT's own merge of them as the reference.

    case = TypedCase(LoHaConfig(r=4, alpha=8, target_modules=[...]), LLAMA, tmp_dir)
    case.base (the fixture), case.adapter (save_pretrained), case.reference (merge_and_unload on the float32 base,
    rounded once to the base's dtype, save_pretrained), case.peft_logits (the unmerged PeftModel, float32).

Used by tests/test_peft_types.py; build one per module (module-scoped fixture): each costs well under a second.
"""
from __future__ import annotations

import copy
import json

import torch

TOKENS = torch.arange(3, 23).reshape(2, 10)


def randomize(pm, seed: int = 1, std: float = 0.2) -> None:
    """Every trainable adapter tensor non-zero (PEFT initialises some to zero, IA3's to one): N(0, std), and
    IA3's scaling vectors 1 + N(0, std) so that they scale rather than zero the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if "ia3_l" in n else noise)


class TypedCase:
    """One PEFT adapter of a given config on a fixture base, and PEFT's merge of it."""

    def __init__(self, config, base, root, seed: int = 1, std: float = 0.2, prepare=None):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        self.base, self.root = base, root
        self.base_dtype = json.loads((base / "config.json").read_text()).get("dtype")
        self.dtype = getattr(torch, self.base_dtype)
        base32 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base32), config)
        randomize(pm, seed, std)
        if prepare is not None:  # e.g. set an AdaLoRA rank_pattern before saving
            prepare(pm)
        self.adapter = root / "adapter"
        pm.save_pretrained(self.adapter)
        self.adapter_config = json.loads((self.adapter / "adapter_config.json").read_text())
        # PEFT as a user loads it back: from the files, onto the float32 base
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           self.adapter).eval()
        with torch.no_grad():
            self.peft_logits = loaded(input_ids=TOKENS).logits
        self.reference = root / "peft-merged"
        loaded.merge_and_unload().to(self.dtype).save_pretrained(self.reference)


__all__ = ["TOKENS", "TypedCase", "randomize"]
