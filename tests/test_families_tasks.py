"""Encoders, seq2seq and task types (issue 15, part 3): tiny random BERT (bare, and for sequence
classification with its head in modules_to_save), RoBERTa, T5 and BART built from their transformers
configs, float16 on disk, with PEFT adapters made the default way (target_modules="all-linear",
init_lora_weights=False so B is non-zero).

Against the real libraries: merge is bit-identical to PEFT's merge_and_unload on a float32 copy of the base,
rounded once; validate builds the class the checkpoint was saved from, passes our merge and names a
module merged at 1.5x; extract writes the base's task type, PeftModel.from_pretrained picks PEFT's class
for it and the adapter acts as the fine-tune does; validate refuses a model with weights the checkpoint
lacks and fails loudly when the adapter does not attach.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from safetensors.torch import load_file, save_file

from conftest import run_cli
from loratools import forward as fw
from loratools.io import Checkpoint
from loratools.task_types import adapter_task_type, common_task_type, model_class, task_type_of
from loratools.validate import validate

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
DTYPE = torch.float16
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
           max_position_embeddings=64)
SEQ = dict(vocab_size=128, d_model=32)

# name: (config, class saved, PEFT task type its adapters carry)
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(**ENC), "BertModel", "FEATURE_EXTRACTION"),
    "bert-cls": (lambda: transformers.BertConfig(**ENC, num_labels=3), "BertForSequenceClassification", "SEQ_CLS"),
    "roberta": (lambda: transformers.RobertaConfig(**ENC), "RobertaModel", "FEATURE_EXTRACTION"),
    "t5": (lambda: transformers.T5Config(**SEQ, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0),
           "T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    "bart": (lambda: transformers.BartConfig(**SEQ, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                             max_position_embeddings=64),
             "BartForConditionalGeneration", "SEQ_2_SEQ_LM"),
}


@dataclass
class Family:
    name: str
    arch: str
    task: str
    base: Path
    adapter: Path
    root: Path
    _merged: Path | None = None

    @property
    def cls(self):
        return getattr(transformers, self.arch)

    def load(self, path, dtype=torch.float32):
        with fw.quiet_transformers():
            return self.cls.from_pretrained(path, dtype=dtype).eval()

    @property
    def merged(self) -> Path:
        """`loratools merge` of the family's adapter (once per session)."""
        if self._merged is None:
            self._merged = self.root / "merged"
            run_cli("merge", self.base, self.adapter, "-o", self._merged, "--device", "cpu")
        return self._merged


def _build(name: str, root: Path) -> Family:
    make_config, arch, task = FAMILIES[name]
    torch.manual_seed(0)
    with fw.quiet_transformers():
        model = getattr(transformers, arch)(make_config()).to(DTYPE)
        model.save_pretrained(root / "base")
        model = getattr(transformers, arch).from_pretrained(root / "base", dtype=torch.float32)
        torch.manual_seed(1)
        pm = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False, task_type=task,
                                              r=4, lora_alpha=8))
        with torch.no_grad():  # a trained head, not the base's (PEFT copies it into modules_to_save)
            for n, p in pm.named_parameters():
                if ".modules_to_save." in n:
                    p.add_(torch.randn_like(p) * 0.2)
        pm.save_pretrained(root / "adapter")
    return Family(name, arch, task, root / "base", root / "adapter", root)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """name -> Family, built on first use and shared by the session."""
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = _build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def ids(n=16, batch=2):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(0))


# -- the task-type rule (pure) ----------------------------------------------------------------------------

@pytest.mark.parametrize("config, task", [
    ({"architectures": ["LlamaForCausalLM"]}, "CAUSAL_LM"),
    ({"architectures": ["GPT2LMHeadModel"]}, "CAUSAL_LM"),
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "SEQ_2_SEQ_LM"),
    ({"architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True}, "SEQ_2_SEQ_LM"),
    ({"architectures": ["LlavaForConditionalGeneration"]}, "CAUSAL_LM"),
    ({"architectures": ["BertForSequenceClassification"]}, "SEQ_CLS"),
    ({"architectures": ["RobertaForTokenClassification"]}, "TOKEN_CLS"),
    ({"architectures": ["BertForQuestionAnswering"]}, "QUESTION_ANS"),
    ({"architectures": ["BertModel"]}, "FEATURE_EXTRACTION"),
    ({"architectures": ["BertForMaskedLM"]}, None),
    ({}, None),
])
def test_task_type_rule(config, task):
    got, note = task_type_of(config)
    assert got == task
    assert (note is None) == (task is not None)  # an unknown task is always said, in one line
    assert got is None or got in MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    if note:
        assert "\n" not in note and "task_type left null" in note


def test_classifier_head_with_lora_and_disagreeing_adapters():
    cfg = {"architectures": ["BertForSequenceClassification"]}
    assert adapter_task_type(cfg, ["bert.encoder.layer.0.output.dense"]) == ("SEQ_CLS", None)
    task, note = adapter_task_type(cfg, ["bert.encoder.layer.0.output.dense", "classifier"])
    assert task is None and "classifier" in note
    assert common_task_type([None, "SEQ_2_SEQ_LM"]) == ("SEQ_2_SEQ_LM", None)
    task, said = common_task_type(["SEQ_CLS", "CAUSAL_LM"])
    assert task == "SEQ_CLS" and "disagree" in said


# -- merge: bit-identical to PEFT --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_merge_matches_peft(zoo, name):
    fam = zoo(name)
    assert model_class(Checkpoint(fam.base).config) is fam.cls
    pm = PeftModel.from_pretrained(fam.load(fam.base), fam.adapter)
    assert type(pm) is MODEL_TYPE_TO_PEFT_MODEL_MAPPING[fam.task]
    with fw.quiet_transformers():
        pm.merge_and_unload().save_pretrained(fam.root / "peft-merged")
    ref = {k: v.to(DTYPE) for k, v in Checkpoint(fam.root / "peft-merged").iter_tensors()}  # rounded once
    ours = dict(Checkpoint(fam.merged).iter_tensors())
    assert ours.keys() == ref.keys(), sorted(ours.keys() ^ ref.keys())
    differ = [k for k in ours if not torch.equal(ours[k], ref[k])]
    assert not differ, differ
    changed = [k for k in ours if not torch.equal(ours[k], Checkpoint(fam.base).read(k))]
    assert len(changed) >= 8


# -- validate: the saved class, natural outputs, a 1.5x module named ----------------------------------------

def _scaled_adapter(fam: Family, dst: Path) -> tuple[Path, str]:
    """A copy of the family's adapter with one module's lora_B times 1.5; (path, module)."""
    shutil.copytree(fam.adapter, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[-1]
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst, key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_validate_passes_the_merge_and_names_a_scaled_module(zoo, name, tmp_path):
    fam = zoo(name)
    good = validate(fam.base, [fam.adapter], merged=fam.merged, device="cpu", batch=2, seq_len=16)
    assert good["passed"], good["problems"]
    assert good["output"] == ("last_hidden_state" if fam.arch.endswith("Model") else "logits")
    effect = next(c for c in good["comparisons"] if c["name"] == "adapters")
    assert effect["rel_err"] > 1e-2  # the reference really carries the adapter
    scaled, module = _scaled_adapter(fam, tmp_path / "scaled")
    bad_merged = tmp_path / "bad-merged"
    run_cli("merge", fam.base, scaled, "-o", bad_merged, "--device", "cpu")
    # the tensor checks name the module (the forward passes, gated above, are skipped to save CI time)
    bad = validate(fam.base, [fam.adapter], merged=bad_merged, device="cpu", static_only=True)
    assert not bad["passed"]
    assert any(p.get("module") == module or module in p["message"] for p in bad["problems"]), bad["problems"]


# -- extract: the base's task type, loaded by PEFT, acting as the fine-tune -----------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_extract_loads_in_peft_and_acts_as_the_fine_tune(zoo, name, tmp_path):
    fam = zoo(name)
    out = tmp_path / "extracted"
    res = run_cli("extract", fam.base, fam.merged, "-o", out, "--rank", "4", "--modules-to-save", "--json")
    cfg = json.loads((out / "adapter_config.json").read_text())
    if name == "bert-cls":  # the merged head differs from the base's: a LoRA on `classifier`, which PEFT's
        assert cfg["task_type"] is None and "classifier" in res.stderr  # SEQ_CLS class cannot load
    else:
        assert cfg["task_type"] == fam.task
    base = fam.load(fam.base)
    with torch.no_grad():
        l_base = fw.run_logits(base, ids())
    pm = PeftModel.from_pretrained(base, out)
    assert type(pm) is MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(cfg["task_type"], PeftModel)
    l_peft = fw.run_logits(pm.eval(), ids())
    l_tuned = fw.run_logits(fam.load(fam.merged), ids())
    effect = float((l_tuned - l_base).norm() / l_tuned.norm())
    residual = float((l_peft - l_tuned).norm() / l_tuned.norm())
    # rank 4 reproduces the rank-4 delta up to the float16 rounding of the merged weights
    assert effect > 1e-2 and residual < 1e-2 * effect, (effect, residual)


def test_combine_and_resize_keep_the_task_type(zoo, tmp_path):
    fam = zoo("t5")
    run_cli("combine", fam.adapter, fam.adapter, "-o", tmp_path / "c", "--method", "linear")
    run_cli("resize", fam.adapter, "-o", tmp_path / "r", "--rank", "2")
    for d in ("c", "r"):
        assert json.loads((tmp_path / d / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
        assert type(PeftModel.from_pretrained(fam.load(fam.base), tmp_path / d)) is \
            MODEL_TYPE_TO_PEFT_MODEL_MAPPING["SEQ_2_SEQ_LM"]


# -- validate refuses what would compare random weights, and an adapter that did not attach -------------------

def test_validate_refuses_a_model_weight_the_checkpoint_lacks(zoo, tmp_path):
    """The issue's case: a BertModel checkpoint built as a class with a head it does not store."""
    fam = zoo("bert")
    base = tmp_path / "base"
    shutil.copytree(fam.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (base / "config.json").write_text(json.dumps(cfg))
    res = run_cli("validate", base, fam.adapter, expect=1)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "classifier." in line and "random" in line and "Traceback" not in res.stderr


def _misnamed_adapter(fam: Family, dst: Path) -> Path:
    """The adapter with every key under `bert.` (as if made on BertForSequenceClassification): loratools'
    checks accept the prefix, PEFT on a BertModel attaches nothing for those keys."""
    shutil.copytree(fam.adapter, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.", "base_model.model.bert.", 1): v for k, v in tensors.items()},
              dst / "adapter_model.safetensors")
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query", "key", "value", "dense"]
    cfg["init_lora_weights"] = True  # as a trained adapter's config says: PEFT's unloaded modules have B = 0
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_validate_fails_loudly_when_the_adapter_does_not_attach(zoo, tmp_path, monkeypatch):
    fam = zoo("bert")
    bad = _misnamed_adapter(fam, tmp_path / "misnamed")
    res = run_cli("validate", fam.base, bad, "--merged", fam.merged, expect=1)
    line = res.stderr.strip().splitlines()[-1]
    assert "did not attach" in line and "bert.encoder" in line and "adds the prefix 'bert.'" in line, line
    # the second net: without the key check, the reference equals the base and that alone fails
    monkeypatch.setattr(fw, "check_attached", lambda *a, **k: None)
    report = validate(fam.base, [bad], merged=fam.merged, device="cpu", batch=2, seq_len=16)
    assert not report["passed"]
    assert any("did not attach" in p["message"] for p in report["problems"]), report["problems"]


def test_a_causal_lm_adapter_on_a_bare_encoder_is_named(zoo, tmp_path):
    """What loratools < issue 15 wrote for every model: PEFT's CausalLM class on a BertModel fails; the line
    says which task type the model needs."""
    fam = zoo("bert")
    bad = tmp_path / "causal"
    shutil.copytree(fam.adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "CAUSAL_LM"}))
    line = run_cli("validate", fam.base, bad, expect=1).stderr.strip().splitlines()[-1]
    assert "prepare_inputs_for_generation" in line and 'set task_type to "FEATURE_EXTRACTION"' in line, line


def test_layout_hint():
    mods = ["", "bert", "bert.encoder.layer.0.output.dense", "classifier"]
    assert "lacks the prefix 'bert.'" in fw.layout_hint("encoder.layer.0.output.dense", mods)
    assert "adds the prefix 'model.'" in fw.layout_hint("model.classifier", mods)
    assert "another model" in fw.layout_hint("transformer.h.0.attn.c_attn", mods)


def test_attach_check_accepts_what_peft_converts_on_load(tmp_path):
    """No false alarm: an adapter keyed by LLaVA's original layout (`language_model.model.layers`, as on the
    Hub) is renamed by PEFT on load as transformers 5 renames the checkpoint; the check converts alike."""
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=128)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    with fw.quiet_transformers():
        model = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=127)).eval()
        get_peft_model(model, LoraConfig(target_modules=["o_proj"], init_lora_weights=False)).save_pretrained(
            tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    old = {k.replace(".model.language_model.", ".language_model.model."): v for k, v in tensors.items()}
    assert old.keys() != tensors.keys()
    save_file(old, tmp_path / "old" / "adapter_model.safetensors")
    for layout in ("new", "old"):
        model = transformers.LlavaForConditionalGeneration(model.config).eval()
        pm = fw.attach_adapters(model, [tmp_path / layout], [1.0])  # raises when it did not attach
        held = pm.base_model.model.model.language_model.layers[0].self_attn.o_proj.lora_B["adapter0"].weight
        assert torch.equal(held, tensors["base_model.model.model.language_model.layers.0.self_attn.o_proj.lora_B.weight"])


@pytest.mark.parametrize("arch, output, shape", [
    ("BertForTokenClassification", "logits", [2, 16, 2]),
    ("BertForQuestionAnswering", "start_logits+end_logits", [2, 16, 2]),
])
def test_natural_outputs_of_other_heads(tmp_path, arch, output, shape):
    torch.manual_seed(0)
    with fw.quiet_transformers():
        getattr(transformers, arch)(transformers.BertConfig(**ENC)).save_pretrained(tmp_path / "m")
    loaded = fw.load_model(tmp_path / "m", device=torch.device("cpu"), dtype=torch.float32)
    assert type(loaded.model).__name__ == arch
    t, name = fw.run_outputs(loaded.model, ids())
    assert (name, list(t.shape)) == (output, shape)
    assert validate(tmp_path / "m", device="cpu", batch=2, seq_len=16)["output"] == output


def test_validate_sees_the_base_under_the_models_names(tmp_path):
    """validate's fit check reads the base through key_layout, as merge does: a Mixtral saved per expert
    (`block_sparse_moe.experts.N.w1`) with PEFT's all-linear adapter (target_parameters on the fused
    `mlp.experts`) passes its correct merge and names each expert tensor a 1.5x B changes."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=128, num_local_experts=2, num_experts_per_tok=2,
                                     max_position_embeddings=64)
    with fw.quiet_transformers():
        transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "base")
        model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base")
        get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False, r=4)).save_pretrained(
            tmp_path / "adapter")
    assert any("block_sparse_moe.experts.0.w1" in k for k in Checkpoint(tmp_path / "base").tensors)
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--device", "cpu")
    good = validate(tmp_path / "base", [tmp_path / "adapter"], merged=tmp_path / "merged", batch=2, seq_len=16)
    assert good["passed"], good["problems"]
    shutil.copytree(tmp_path / "adapter", tmp_path / "scaled")
    tensors = load_file(tmp_path / "scaled" / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if ".mlp.experts." in k and k.endswith("lora_B.weight"))
    save_file({**tensors, key: tensors[key] * 1.5}, tmp_path / "scaled" / "adapter_model.safetensors")
    run_cli("merge", tmp_path / "base", tmp_path / "scaled", "-o", tmp_path / "bad", "--device", "cpu")
    bad = validate(tmp_path / "base", [tmp_path / "adapter"], merged=tmp_path / "bad", static_only=True)
    named = {p["tensor"] for p in bad["problems"] if "1.5x" in p["message"]}
    assert named and all(".block_sparse_moe.experts." in t for t in named), bad["problems"]
