"""Cases found in review of the breadth work (issues #15, #20): each failed before its fix."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, LLAMA, run_cli

EXPERTS = "model.layers.0.mlp.experts.down_proj"


def _gpt_oss(root, intermediate: int):
    """A one-layer GPT-OSS (experts stored [E, in, out], is_transposed) and a PEFT LoRA on its down_proj;
    returns (base, adapter, PEFT's merged down_proj in float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                               max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                               sliding_window=8, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(root / "base")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                          init_lora_weights=False,
                                                          target_parameters=["mlp.experts.down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(root / "lora")
    return root / "base", root / "lora", pm.merge_and_unload().state_dict()[EXPERTS]


def _without_model_class(base):
    """config.json naming a class transformers cannot build (custom code, a newer family): no is_transposed."""
    p = base / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(architectures=["MyGptOssForCausalLM"], model_type="my_gpt_oss")
    p.write_text(json.dumps(cfg))


def test_square_experts_of_unknown_orientation_are_refused(tmp_path):
    """[E, n, n] experts with no model to say is_transposed: merge once wrote each expert's delta transposed
    and exited 0; now one line, exit 1, nothing written (validate reports the same)."""
    base, lora, _ = _gpt_oss(tmp_path, intermediate=64)
    _without_model_class(base)
    out = tmp_path / "merged"
    r = run_cli("merge", base, lora, "-o", out, expect=1)
    assert "square shape [4, 64, 64]" in r.stderr and "is_transposed" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
    r = run_cli("validate", base, lora, "--static-only", expect=None)
    assert r.exit_code != 0 and "square shape [4, 64, 64]" in r.stdout + r.stderr


def test_transposed_experts_without_model_class_merge_by_shape(tmp_path):
    """Non-square GPT-OSS experts without a buildable config.json: the stored shape says [E, in, out], and the
    merge is PEFT's bit for bit (it was refused as a shape mismatch)."""
    base, lora, ref = _gpt_oss(tmp_path, intermediate=32)
    (base / "config.json").unlink()
    out = tmp_path / "merged"
    run_cli("merge", base, lora, "-o", out)
    assert torch.equal(load_file(out / "model.safetensors")[EXPERTS], ref)


def _param_only_adapter(base_dir, path, param: str, seed: int):
    """A PEFT LoRA on one expert parameter of every layer, no target_modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                        LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=[param]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(path)
    return path


def test_combine_of_adapters_on_different_parameters_of_one_module(tmp_path):
    """gate_up_proj alone in one adapter, down_proj alone in the other: each is saved unnested (`experts.lora_A`)
    by its own adapter, so the nesting must be recomputed for the union; it was not (same path, different
    parameters), and one parameter's factors overwrote the other's with exit 0."""
    from test_moe_adapter import Case, _deltas, _peft_deltas

    from loratools.adapter import load_adapter

    case = Case("mixtral", tmp_path)
    gu = _param_only_adapter(case.base_dir, tmp_path / "gu", "gate_up_proj", 5)
    down = _param_only_adapter(case.base_dir, tmp_path / "down", "down_proj", 6)
    out = tmp_path / "mix"
    run_cli("combine", gu, down, "-o", out, "--method", "cat")
    want = _deltas(load_adapter(gu), case) | _deltas(load_adapter(down), case)
    got = _peft_deltas(case, out)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("archs", [5, [["X"]], [None], "LlamaForCausalLM"])
def test_malformed_architectures_is_one_line(tmp_path, archs):
    """config.json's architectures not a list of names: merge, quantize and inspect said "internal error:
    TypeError" (key_layout, hf_layout); now one line naming config.json, exit 1, nothing written."""
    from conftest import LLAMA

    import shutil
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = archs
    (base / "config.json").write_text(json.dumps(cfg))
    for args in (["quantize", base, "-o", tmp_path / "q"], ["inspect", base]):
        r = run_cli(*args, expect=1)
        assert "config.json's architectures must be a list of class names" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr
    assert not (tmp_path / "q").exists()


def test_adapter_for_a_deeper_model_is_not_called_a_prefix_difference(tmp_path):
    """An adapter whose layer 9 the 2-layer base lacks was explained as "a prefix difference, not another
    model ('0' where the adapter has '9')"; a layer index is no prefix: now it says the index is missing."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import FIXTURES, LLAMA

    ad = tmp_path / "deep"
    shutil.copytree(FIXTURES / "llama-lora", ad)
    tensors = load_file(ad / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}, ad / "adapter_model.safetensors")
    out = tmp_path / "m"
    r = run_cli("merge", LLAMA, ad, "-o", out, expect=1)
    assert "prefix difference" not in r.stderr and "no index 9" in r.stderr and "another model" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()


def test_unconverted_tensor_is_explained_as_such():
    """A stored tensor kept under its name because transformers converts it in a way loratools does not follow
    is also a model name in the layout, so the prefix branch answered first and the `unconverted` reason was
    never given."""
    from loratools.key_layout import KeyLayout, Part, explain_missing

    name = "model.layers.0.mlp.odd.weight"
    why = "transformers converts it into model.layers.0.mlp.new.weight with Chunk, which loratools does not follow"
    layout = KeyLayout({name: Part(name, name)}, {name: (2, 2)}, "transformers", unconverted={name: why})
    assert explain_missing("base.layers.0.mlp.odd.weight", layout) == \
        f"a layout difference: the checkpoint stores {name}; {why}"


def test_adapter_tensors_refuses_two_entries_under_one_path():
    """The writer's guard behind the combine fix: two parameters saved under one wrapper path would silently
    keep only the last one's factors."""
    from loratools.adapter import LoraModule, adapter_tensors

    def param(p):
        return LoraModule(name=f"m.experts.{p}", kind="experts", A=torch.ones(4, 3), B=torch.ones(5, 4), r=2,
                          alpha=2.0, scale=1.0, param=p, experts=2, saved_path="m.experts")

    with pytest.raises(RuntimeError, match="under base_model.model.m.experts"):
        adapter_tensors({"m.experts.gate_up_proj": param("gate_up_proj"), "m.experts.down_proj": param("down_proj")})


def _qwen3_vl_moe(root):
    """A tiny Qwen3-VL-MoE (its conversion mapping transposes the experts when their stored shape is not the
    model's: Transpose(check_dims)) saved by transformers 5, and a PEFT LoRA on both expert parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    tc = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=96, num_experts=4, num_experts_per_tok=2,
              head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vc = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model("qwen3_vl_moe", text_config=tc,
                                                                         vision_config=vc)).eval()
    model.save_pretrained(root / "base")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(root / "lora")
    merged = pm.merge_and_unload().state_dict()
    return root / "base", root / "lora", {k: v for k, v in merged.items() if ".experts." in k}


def test_experts_under_a_transpose_conversion(tmp_path):
    """Qwen3-VL-MoE: stored as the model holds them (what transformers 5 saves), its experts merge as PEFT
    merges (key_layout took every Transpose as a conversion it does not follow); stored transposed (the Hub's
    layout), the adapter is refused in one line naming the conversion, instead of a bare shape mismatch (or,
    for a square parameter, no error)."""
    from safetensors.torch import save_file

    base, lora, ref = _qwen3_vl_moe(tmp_path)
    out = tmp_path / "merged"
    run_cli("merge", base, lora, "-o", out)
    got = load_file(out / "model.safetensors")
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    tensors = load_file(base / "model.safetensors")
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    tensors[key] = tensors[key].transpose(1, 2).contiguous()  # [E, H, 2I], as the original checkpoints store it
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("merge", base, lora, "-o", tmp_path / "m2", expect=1)
    assert "Transpose, which loratools does not follow" in r.stderr and key in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "m2").exists()


def test_quantize_refuses_a_weight_transformers_splits(tmp_path):
    """nomic-bert stores q/k/v as one `Wqkv` that transformers chunks into q/k/v_proj and quantizes: quantize
    kept Wqkv dense and wrote a 4-bit config, and the output failed in forward in transformers (bitsandbytes
    asserts on a dense weight in a Linear4bit); now one line, nothing written. Skipping the three modules gives
    an output transformers runs."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(
        "nomic_bert", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=96, max_position_embeddings=64)).save_pretrained(tmp_path / "base")
    out = tmp_path / "q"
    r = run_cli("quantize", tmp_path / "base", "-o", out, expect=1)
    assert "encoder.layers.0.attn.Wqkv.weight" in r.stderr and "Chunk" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
    run_cli("quantize", tmp_path / "base", "-o", out, *[a for m in ("q_proj", "k_proj", "v_proj")
                                                        for a in ("--skip-modules", m)])
    hidden = AutoModel.from_pretrained(out)(input_ids=torch.arange(3, 13)[None]).last_hidden_state
    assert hidden.shape == (1, 10, 64) and torch.isfinite(hidden).all()


def test_extract_lists_a_weight_transformers_converts_instead_of_naming_it(tmp_path):
    """nomic-bert's stored `Wqkv` is no module of the model transformers builds (it becomes q/k/v_proj):
    extract used to write it as a LoRA target that PEFT refuses to load (NoMatchingPeftModuleError). It is now
    listed as not carried, with transformers' conversion as the reason, and what is written loads in PEFT."""
    import json

    from peft import PeftModel
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("nomic_bert", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, vocab_size=96, max_position_embeddings=64)
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    tuned = AutoModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and ("attn" in name or "mlp" in name):  # in memory: self_attn.q_proj, ...
                p.add_(torch.randn_like(p) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    out, report = tmp_path / "x", tmp_path / "x.json"
    run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", "4", "--report", report)
    cfg_out = json.loads((out / "adapter_config.json").read_text())
    assert not any("Wqkv" in t for t in cfg_out["target_modules"]), cfg_out["target_modules"]
    rows = {r["name"]: r["reason"] for r in json.loads(report.read_text())["not_carried"]}
    assert "loratools does not follow that conversion" in rows["encoder.layers.0.attn.Wqkv.weight"]
    PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base"), out)  # loads: no unknown module


def test_merge_report_ratio_of_an_all_zero_base_expert_is_null():
    """An expert whose base is all zeros and that the merge changes has no relative change: null in --json
    (it was math.inf, which json.dumps writes as `Infinity`, not JSON); unchanged zero experts give 0."""
    import json

    from loratools.merge import ExpertChanges

    changes = ExpertChanges.__new__(ExpertChanges)  # the accumulated sums are all rows() reads
    changes.experts = {"m.experts.down_proj": 3}
    changes.stored = {"m.experts.down_proj": ["m.experts.down_proj"]}
    changes.sums = {"m.experts.down_proj": [[4.0, 16.0], [9.0, 0.0], [0.0, 0.0]]}
    (row,) = changes.rows()
    assert row["expert_rel_changes"] == [0.5, None, 0.0]
    json.loads(json.dumps(row, allow_nan=False))


def test_use_dora_without_magnitudes_is_refused(tmp_path):
    """An adapter whose config says use_dora but that stores no lora_magnitude_vector: PEFT applies DoRA with
    magnitudes of its own (the base's row norms), so merging it as plain LoRA (what merge did, exit 0) differs
    from PEFT. One line naming the module, exit 1, nothing written."""
    from safetensors.torch import save_file

    ad = tmp_path / "dora-no-m"
    shutil.copytree(FIXTURES / "llama-dora", ad)
    t = load_file(ad / "adapter_model.safetensors")
    save_file({k: v for k, v in t.items() if "magnitude" not in k}, ad / "adapter_model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "m"
    r = run_cli("merge", LLAMA, ad, "-o", out, expect=1)
    assert "use_dora is set but the adapter has no DoRA magnitude" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
