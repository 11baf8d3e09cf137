"""Review of the adapter formats (issue #17): cases that converted with exit 0 and a wrong result, now refused
in one line (exit 1, nothing written)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, LLAMA, run_cli

from loratools import formats
from loratools.adapter import write_adapter
from loratools.errors import UnsupportedError


def _one_line_refusal(result, out, *needles):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()


def test_kohya_input_axis_dora_scale_is_not_read_as_peft_magnitude(tmp_path):
    """LyCORIS's wd_on_out=False dora_scale is [1, in]: for a square weight (q_proj 64x64) it has as many
    numbers as PEFT's per-output-row magnitude, and was read as one (exit 0, a different DoRA)."""
    src = tmp_path / "kohya"
    src.mkdir()
    run_cli("convert", FIXTURES / "llama-dora", "-o", src / "k", "--to", "kohya")
    t = load_file(src / "k" / "lora.safetensors")
    key = "lora_te_model_layers_0_self_attn_q_proj.dora_scale"
    assert t[key].shape == (64, 1) and t[key.replace("dora_scale", "lora_down.weight")].shape[1] == 64
    t[key] = t[key].reshape(1, 64)
    save_file(t, src / "lora.safetensors")
    shutil.rmtree(src / "k")
    out = tmp_path / "peft"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--base", LLAMA, expect=None)
    _one_line_refusal(r, out, "wd_on_out=False", key)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """fixtures/tiny-llama with tied word embeddings: no lm_head.weight stored (convert_hf_to_gguf then writes
    no output tensor and llama.cpp's output is token_embd.weight itself)."""
    d = tmp_path_factory.mktemp("tied") / "tiny-llama-tied"
    d.mkdir()
    tensors = {}
    for f in sorted(LLAMA.glob("*.safetensors")):
        tensors.update(load_file(f))
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((LLAMA / "config.json").read_text()) | {"tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_gguf_refuses_an_embedding_lora_on_a_tied_base(tied_llama, tmp_path):
    """llama.cpp finds LoRAs by tensor name; a tied base's output matmul uses token_embd.weight, so an
    embedding LoRA would be applied to the head as well (PEFT applies it to the input only). It was written
    with exit 0."""
    files = formats.read(FIXTURES / "llama-embed")
    files.tensors = {k: t for k, t in files.tensors.items() if ".lora_" in k}  # the LoRA, not the saved base layer
    src = tmp_path / "embed-lora"
    src.mkdir()
    write_adapter(src, files.config, files.tensors)
    with pytest.raises(UnsupportedError, match="tied word embeddings"):
        formats.get("gguf").check(formats.read(src), tied_llama)
    formats.get("gguf").check(formats.read(src), LLAMA)  # the untied base keeps it
    out = tmp_path / "gguf"
    r = run_cli("convert", src, "-o", out, "--to", "gguf", "--base", tied_llama, expect=None)
    _one_line_refusal(r, out, "tied word embeddings", "embed_tokens")
