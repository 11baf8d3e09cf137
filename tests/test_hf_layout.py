"""hf_layout's known-architecture layouts (config.json alone) against the meta model transformers builds."""
from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from loratools.hf_layout import FAMILIES, _family_layout, layout_for, model_class_layout

TINY = {
    "LlamaForCausalLM": {"model_type": "llama"},
    "MistralForCausalLM": {"model_type": "mistral"},
    "Qwen2ForCausalLM": {"model_type": "qwen2"},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "head_dim": 16},
}
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 100, "n_positions": 64}


def configs():
    for arch in FAMILIES:
        base = {"architectures": [arch], **(GPT2 if arch == "GPT2LMHeadModel" else {**DECODER, **TINY[arch]})}
        for tie in (None, True, False):
            for dtype in (None, "bfloat16"):
                cfg = dict(base)
                if tie is not None:
                    cfg["tie_word_embeddings"] = tie
                if dtype:
                    cfg["dtype"] = dtype
                yield pytest.param(cfg, id=f"{arch}-tie{tie}-{dtype}")


@pytest.mark.parametrize("config", configs())
def test_family_layout_equals_meta_model(config):
    fam = _family_layout(config)
    meta = model_class_layout(config)
    assert fam is not None and meta.source == "transformers"
    assert fam.kinds == meta.kinds
    assert fam.default_skips == meta.default_skips
    assert fam.keep_in_fp32 == meta.keep_in_fp32
    assert fam.dtype == meta.dtype


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-gpt2"])
def test_fixtures_take_the_family_path(fixture):
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    assert _family_layout(config) is not None
    assert layout_for(config) == model_class_layout(config)


def test_configs_that_add_modules_use_the_meta_model():
    cfg = {"architectures": ["GPT2LMHeadModel"], **GPT2, "add_cross_attention": True}
    assert _family_layout(cfg) is None
    meta = layout_for(cfg)
    assert any("crossattention" in m for m in meta.kinds)  # modules the family table does not know
    assert _family_layout({"architectures": ["PhiForCausalLM"], "num_hidden_layers": 2}) is None
    assert _family_layout({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) is None  # no layer count


@pytest.mark.parametrize("change", [
    {"model_type": "DROP"}, {"model_type": "mistral"}, {"tie_word_embeddings": None},
    {"tie_word_embeddings": "false"}, {"num_hidden_layers": 3.0}, {"architectures": ["LlamaForCausalLM", "X"]},
], ids=str)
def test_unusual_llama_configs_use_the_meta_model(change):
    cfg = {k: v for k, v in {"architectures": ["LlamaForCausalLM"], **DECODER, **TINY["LlamaForCausalLM"],
                             **change}.items() if v != "DROP"}
    assert _family_layout(cfg) is None


def test_gpt2_layer_count_spelled_twice_uses_the_meta_model():
    cfg = {"architectures": ["GPT2LMHeadModel"], **GPT2, "num_hidden_layers": 5}
    assert _family_layout(cfg) is None
    assert _family_layout({**cfg, "num_hidden_layers": GPT2["n_layer"]}) is not None
