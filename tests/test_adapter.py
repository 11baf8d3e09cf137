"""The PEFT adapter format: our per-module resolution against PEFT itself, and what we write loads in PEFT."""
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from loratools.adapter import adapter_config, adapter_tensors, load_adapter, pattern_value, write_adapter
from loratools.errors import FormatError, UnsupportedError
from conftest import ADAPTERS, FIXTURES, base_of


def peft_layers(adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_of(adapter_dir.name), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return model, {name.removeprefix("base_model.model."): mod for name, mod in model.named_modules()
                   if isinstance(mod, LoraLayer)}


@pytest.mark.parametrize("name", ADAPTERS)
def test_resolution_matches_peft(name):
    ours = load_adapter(FIXTURES / name)
    _, layers = peft_layers(FIXTURES / name)
    assert set(ours.modules) == set(layers)
    for mod_name, m in ours.modules.items():
        layer = layers[mod_name]
        assert m.r == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        if m.kind == "embedding":
            assert torch.equal(m.A, layer.lora_embedding_A["default"].data)
        else:
            assert m.fan_in_fan_out == layer.fan_in_fan_out
            assert torch.equal(m.A, layer.lora_A["default"].weight.data)
            assert torch.equal(m.B, layer.lora_B["default"].weight.data)
        if m.magnitude is None:
            torch.testing.assert_close(m.delta(), layer.get_delta_weight("default"), rtol=0, atol=0)
        else:
            assert torch.equal(m.magnitude, layer.lora_magnitude_vector["default"].weight.data)
        assert tuple(layer.get_base_layer().weight.shape) == m.base_shape


def test_pattern_semantics():
    pats = {"q_proj": 8, "layers.1.mlp.down_proj": 2}
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 4) == 8
    assert pattern_value(pats, "model.layers.1.mlp.down_proj", 4) == 2
    assert pattern_value(pats, "model.layers.11.mlp.down_proj", 4) == 4  # dot boundary
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 4) == 4


@pytest.mark.parametrize("name", ADAPTERS)
def test_written_adapter_loads_in_peft_identically(name, tmp_path):
    src = load_adapter(FIXTURES / name)
    out = tmp_path / name
    out.mkdir()
    write_adapter(out, src.config, adapter_tensors(src.modules, src.saved))
    with safe_open(FIXTURES / name / "adapter_model.safetensors", "pt") as a, \
            safe_open(out / "adapter_model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    ref, _ = peft_layers(FIXTURES / name)
    got, _ = peft_layers(out)
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    assert sd_ref.keys() == sd_got.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_got[k]), k


def test_fresh_config_with_patterns_loads_in_peft(tmp_path):
    """A config written from scratch (as extract/combine do) resolves per-module r/alpha in PEFT as in ours."""
    src = load_adapter(FIXTURES / "llama-patterns")
    mods = dict(src.modules)
    cfg = adapter_config(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                         base_model_name_or_path="fixtures/tiny-llama",
                         rank_pattern={n: m.r for n, m in mods.items() if m.r != 4},
                         alpha_pattern={n: m.alpha for n, m in mods.items() if m.alpha != 4})
    out = tmp_path / "llama-fresh"
    out.mkdir()
    write_adapter(out, cfg, adapter_tensors(mods))
    again = load_adapter(out)
    _, layers = peft_layers(out)
    for n, m in again.modules.items():
        assert m.scale == pytest.approx(layers[n].scaling["default"]) == pytest.approx(src.modules[n].scale)


def test_non_lora_adapter_is_refused(tmp_path):
    d = tmp_path / "ia3"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    with pytest.raises(UnsupportedError, match="IA3"):
        load_adapter(d)


def test_rank_disagreeing_with_config_is_refused(copy_fixture):
    d = copy_fixture("llama-lora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="r=4"):
        load_adapter(d)
