"""hf_tables (transformers' tables read from its source text) against the live tables of the installed
transformers, and key_layout's light "no conversion" answer against the one the live conversion mapping gives,
for every family of the zoo: the light path only ever skips the import, never changes a layout."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import GPT2, LLAMA, ROOT
from loratools import hf_tables, key_layout as kl
from loratools.hf_layout import meta_model
from loratools.io import Checkpoint
from zoo import FAMILIES, _class_name


def test_model_mapping_names_is_transformers_table():
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    assert hf_tables.model_mapping_names() == dict(MODEL_MAPPING_NAMES)


def test_conversion_mentions_cover_every_mapped_name():
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping

    mapped = set(_build_checkpoint_conversion_mapping())
    assert mapped and mapped <= hf_tables.conversion_mentions()


def test_legacy_patterns_are_transformers_legacy_renamings():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import apply_renamings

    legacy = get_checkpoint_conversion_mapping("legacy")
    assert len(hf_tables.legacy_patterns()) == sum(len(r.source_patterns) for r in legacy)
    keys = ["bert.encoder.LayerNorm.gamma", "encoder.LayerNorm.beta", "conv.weight_g", "conv.weight_v",
            "model.language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "transformer.h.0.ln_1.weight", "lm_head.weight"]
    for k in keys:
        renamed = apply_renamings(k, legacy) != k
        assert hf_tables.may_rename_legacy([k]) is not False or not renamed, k  # a rename is never missed
    assert hf_tables.may_rename_legacy(["conv.weight_g"]) is True
    assert hf_tables.may_rename_legacy(["model.layers.0.mlp.up_proj.weight"]) is False


def test_module_name_is_transformers_or_unknown():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    for t in CONFIG_MAPPING_NAMES:
        assert hf_tables.module_name(t) in (None, model_type_to_module_name(t)), t
    assert [hf_tables.module_name(t) for t in ("llama", "gpt2", "mixtral")] == ["llama", "gpt2", "mixtral"]


def _fields(layout):
    return (layout.parts, layout.shapes, layout.source, layout.stored_shapes, layout.transposed,
            layout.unconverted, layout.unconverted_into)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_light_answer_agrees_with_the_live_mapping(family, monkeypatch):
    f = FAMILIES[family]
    config = {**f.make_config().to_dict(), "architectures": [_class_name(f)]}
    shapes = {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}
    light = kl._surely_unconverted(config, shapes)
    assert not (light and kl._may_convert_live(config, shapes)), family  # never "no" where transformers converts
    if family in ("llama", "gpt2", "mistral", "qwen2"):
        assert light, f"{family}: the light path should answer without importing the conversion mapping"
    kl._cached.cache_clear()
    got = _fields(kl.key_layout(config, shapes))
    kl._cached.cache_clear()
    monkeypatch.setattr(kl, "_surely_unconverted", lambda *a: False)
    assert got == _fields(kl.key_layout(config, shapes)), family
    kl._cached.cache_clear()


_FRESH = """
import json, sys
from loratools.io import Checkpoint
from loratools.key_layout import checkpoint_layout
out = {}
for path in sys.argv[1:]:
    l = checkpoint_layout(Checkpoint(path))
    out[path] = [l.source, {k: [p.param, p.expert, p.rows] for k, p in l.parts.items()}, sorted(l.shapes)]
out["imported"] = sorted(m for m in ("transformers", "transformers.conversion_mapping") if m in sys.modules)
print(json.dumps(out))
"""


def test_fresh_process_takes_the_light_path_with_the_same_layout():
    """What the CLI does: no transformers import for the fixtures' Llama and GPT-2, and the layout the live
    mapping gives in this (transformers-importing) process."""
    run = subprocess.run([sys.executable, "-c", _FRESH, str(LLAMA), str(GPT2)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    fresh = json.loads(run.stdout)
    assert fresh.pop("imported") == []
    kl._cached.cache_clear()
    for path in (LLAMA, GPT2):
        layout = kl.checkpoint_layout(Checkpoint(path))
        assert fresh[str(path)] == json.loads(json.dumps(
            [layout.source, {k: [p.param, p.expert, p.rows] for k, p in layout.parts.items()}, sorted(layout.shapes)]))
    assert torch is not None
