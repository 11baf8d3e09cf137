import json

import pytest

from conftest import ADAPTERS, CHECKPOINTS, FIXTURES, run_cli

CHECKPOINT_KEYS = {"kind", "path", "layout", "architecture", "model_type", "tensors", "parameters", "dtypes", "shards",
                   "bytes_on_disk", "quantization", "provenance"}
ADAPTER_KEYS = {"kind", "path", "peft_type", "task_type", "base_model", "target_modules", "use_rslora", "use_dora",
                "lora_bias", "fan_in_fan_out", "modules_to_save", "trainable_parameters", "dtypes", "bytes_on_disk",
                "modules", "saved_tensors", "provenance", "target_parameters", "format", "format_notes"}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_inspect_checkpoint_json(name):
    from safetensors import safe_open

    doc = json.loads(run_cli("inspect", FIXTURES / name, "--json").stdout)
    assert set(doc) == CHECKPOINT_KEYS and doc["kind"] == "checkpoint"
    n = 0
    for f in (FIXTURES / name).glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            n += sum(h.get_tensor(k).numel() for k in h.keys())
    assert doc["parameters"] == n and doc["quantization"] is None
    assert doc["layout"] == ("sharded" if name == "tiny-llama" else "directory")


@pytest.mark.parametrize("name", ADAPTERS)
def test_inspect_adapter_json_matches_peft(name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from conftest import base_of

    doc = json.loads(run_cli("inspect", FIXTURES / name, "--json").stdout)
    assert set(doc) == ADAPTER_KEYS and doc["kind"] == "adapter" and doc["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_of(name)), FIXTURES / name)
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if "lora_" in n or "modules_to_save" in n)
    # PEFT loads an embedding saved whole into the (frozen) base layer: count it as a saved tensor instead
    saved_base = sum(s["shape"][0] * s["shape"][1] for s in doc["saved_tensors"]) if name == "llama-embed" else 0
    assert doc["trainable_parameters"] == trainable + saved_base
    assert doc["use_dora"] == (name == "llama-dora") and doc["use_rslora"] == (name == "llama-rslora")
    # each module's r, alpha and scale as PEFT resolves them (rank_pattern/alpha_pattern, rsLoRA)
    from peft.tuners.lora import LoraLayer

    peft_modules = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
                    if isinstance(m, LoraLayer)}
    ours = {m["name"]: m for m in doc["modules"]}
    assert ours.keys() == peft_modules.keys()
    for n, m in peft_modules.items():
        got = (ours[n]["r"], ours[n]["alpha"], ours[n]["scale"])
        assert got == pytest.approx((m.r["default"], m.lora_alpha["default"], m.scaling["default"]), rel=1e-12), n


def test_inspect_table_groups_modules():
    r = run_cli("inspect", FIXTURES / "llama-lora")
    assert "q_proj" in r.stderr and r.stdout == ""
