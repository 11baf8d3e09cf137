"""`loratools merge` on a bitsandbytes 4-bit base (QLoRA), against PEFT merging into the dequantized model.

The 4-bit checkpoints are made here the way users make them: transformers loads the fixture with a
BitsAndBytesConfig and `save_pretrained` writes it. The reference is that 4-bit model dequantized by
transformers (`model.dequantize()`, bitsandbytes' own dequantization, in the quant_state dtype), with
PEFT's `merge_and_unload()` on top.
"""
from __future__ import annotations

import json
import warnings

import bitsandbytes  # noqa: F401  (a dependency: the 4-bit bases need it)
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import FIXTURES, GPT2, LLAMA, run_cli
from loratools.io import Checkpoint
from test_merge import compare, logits

warnings.filterwarnings("ignore")


def quantize(base, out, dtype, **kw):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, **kw)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, dtype=dtype)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    return quantize(LLAMA, tmp_path_factory.mktemp("q") / "llama-nf4", torch.float16, bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True)


def dequantized_peft(qbase, adapter, dtype):
    model = AutoModelForCausalLM.from_pretrained(qbase)
    model = model.dequantize().to(dtype)
    pm = PeftModel.from_pretrained(model, adapter)
    pm.eval()
    return pm


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-dora"])
def test_merge_into_nf4_matches_peft_on_dequantized(tmp_path, nf4_llama, adapter):
    out = tmp_path / "out"
    r = run_cli("merge", nf4_llama, FIXTURES / adapter, "-o", out, "--json", "--device", "cpu")
    doc = json.loads(r.stdout)
    assert doc["dequantized_base"] is True and doc["dtypes"] == ["float16"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float16"
    ck = Checkpoint(out)
    assert not ck.is_quantized and set(ck.tensors) == set(Checkpoint(LLAMA).tensors)

    pm = dequantized_peft(nf4_llama, FIXTURES / adapter, torch.float16)
    want = logits(pm.float())
    pm = dequantized_peft(nf4_llama, FIXTURES / adapter, torch.float16)
    ref = {k: v.detach().contiguous() for k, v in pm.merge_and_unload().state_dict().items()}
    same, total, worst = compare(out, ref)
    assert worst <= 1.0
    assert same == total  # in fact bit-identical: the same dequantized weights, the same float32 merge

    got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())


def test_merge_into_fp4_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D weights are quantized as [out, in] Linear weights; the merge still fits the
    fan_in_fan_out adapter to the dense [in, out] layout, and bf16 output is honoured."""
    q = quantize(GPT2, tmp_path / "gpt2-fp4", torch.bfloat16, bnb_4bit_quant_type="fp4")
    out = tmp_path / "out"
    run_cli("merge", q, FIXTURES / "gpt2-bias", "-o", out, "--dtype", "bfloat16", "--device", "cpu")
    pm = dequantized_peft(q, FIXTURES / "gpt2-bias", torch.bfloat16)
    ref = {k: v.detach().contiguous() for k, v in pm.merge_and_unload().state_dict().items()}
    # transformers' dequantize() turns the quantized Conv1D layers into nn.Linear ([out, in]); ours keep
    # the checkpoint's Conv1D layout [in, out], which GPT2LMHeadModel loads.
    shapes = {n: i.shape for n, i in Checkpoint(out).tensors.items()}
    conv1d = list(Checkpoint(q).quant_states)  # every quantized GPT-2 weight is a Conv1D one
    assert len(conv1d) == 8 and all(tuple(ref[k].shape[::-1]) == shapes[k] for k in conv1d)
    ref.update({k: ref[k].T.contiguous() for k in conv1d})
    ref.pop("lm_head.weight", None)  # tied to wte: save_pretrained (and our merge) store it once
    same, total, worst = compare(out, ref)
    assert worst <= 1.0 and same == total


def test_4bit_merge_refuses_mismatch(tmp_path, nf4_llama):
    out = tmp_path / "out"
    r = run_cli("merge", nf4_llama, FIXTURES / "gpt2-lora", "-o", out, expect=1)
    assert "transformer.h.0.attn.c_attn" in r.stderr
    assert not out.exists()
