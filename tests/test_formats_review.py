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


def test_convert_of_an_invalid_adapter_leaves_no_output(tmp_path):
    """A kohya file whose alpha is 0 reads as lora_alpha 0, which no PEFT adapter has: convert --to peft said so
    (exit 1) only after writing the output."""
    src = tmp_path / "k"
    run_cli("convert", FIXTURES / "llama-lora", "-o", src, "--to", "kohya")
    t = load_file(src / "lora.safetensors")
    save_file({k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in t.items()}, src / "lora.safetensors")
    out = tmp_path / "peft"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--base", LLAMA, expect=None)
    _one_line_refusal(r, out, "lora_alpha must be a positive number")


def _gguf_of(name, tmp_path, alpha=None, keep_config=True):
    from loratools.formats.gguf_lora import read_gguf, write_gguf

    ours = tmp_path / f"{name}-ours"
    run_cli("convert", FIXTURES / name, "-o", ours, "--to", "gguf", "--base", LLAMA)
    tensors, kv = read_gguf(ours / "adapter.gguf")
    kv = {k: v for k, v in kv.items() if keep_config or k == "alpha"} | ({} if alpha is None else {"alpha": alpha})
    path = tmp_path / f"{name}-{alpha}.gguf"
    write_gguf(path, "llama", tensors, kv)
    return path, kv


def test_gguf_alpha_zero_is_llama_cpps_scale_one(tmp_path):
    """llama.cpp's get_scale: alpha 0 applies lora_b @ lora_a with scale 1 (any rank). It was refused."""
    path, _ = _gguf_of("llama-patterns", tmp_path, alpha=0.0, keep_config=False)
    ref = formats.parse(formats.read(FIXTURES / "llama-patterns")).modules
    got = formats.parse(formats.read(path, base=LLAMA)).modules
    assert {m.r for m in ref.values()} == {2, 4, 8}
    for n, m in ref.items():
        # our lora_b holds B · s / (8 / r); with scale 1 llama.cpp applies B·A · s · r / 8
        assert got[n].scale == 1.0
        torch.testing.assert_close(got[n].delta(), m.delta() * m.r / 8, rtol=1e-5, atol=1e-7)


def test_gguf_whose_alpha_changed_since_we_wrote_it_reads_as_llama_cpp_applies_it(tmp_path):
    """Our stored config no longer matches (adapter.lora.alpha 8 -> 4): the lora_b were divided by our fold
    factors anyway and the config came from the file, a delta neither PEFT's nor llama.cpp's."""
    path, kv = _gguf_of("llama-rslora", tmp_path, alpha=4.0)
    assert "loratools.peft_config" in kv
    ref = formats.parse(formats.read(FIXTURES / "llama-rslora")).modules
    got = formats.parse(formats.read(path, base=LLAMA)).modules
    for n, m in ref.items():  # llama.cpp: lora_b (= B · s / (8 / r)) @ lora_a · 4 / r = PEFT's delta / 2
        torch.testing.assert_close(got[n].delta(), m.delta() / 2, rtol=1e-5, atol=1e-7)


def test_a_truncated_kohya_file_is_named_as_truncated(tmp_path):
    """Detection read the whole header check, so a kohya file cut short was 'not an adapter in a known
    format' (exit 2) in convert, not what is wrong with it."""
    src = tmp_path / "k"
    run_cli("convert", FIXTURES / "llama-lora", "-o", src, "--to", "kohya")
    data = (src / "lora.safetensors").read_bytes()
    (src / "lora.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "peft"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--base", LLAMA, expect=None)
    _one_line_refusal(r, out, "lora.safetensors", "truncated")


def test_kohya_module_on_an_embedding_is_refused(tmp_path):
    """kohya keys on the base's nn.Embedding became lora_A/lora_B of embed_tokens: exit 0, and PEFT, which keys
    an embedding's LoRA lora_embedding_A/B, loaded the output as no change at all (a warning), while merge
    applied it."""
    src = tmp_path / "k"
    src.mkdir()
    key = "lora_te_model_embed_tokens"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 64), f"{key}.lora_up.weight": torch.randn(384, 4),
               f"{key}.alpha": torch.tensor(4.0)}, src / "lora.safetensors")
    out = tmp_path / "peft"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--base", LLAMA, expect=None)
    _one_line_refusal(r, out, key, "embedding model.embed_tokens")
    r = run_cli("merge", LLAMA, src, "-o", tmp_path / "merged", expect=None)
    _one_line_refusal(r, tmp_path / "merged", "embedding model.embed_tokens")


def test_kohya_file_whose_dora_scale_was_removed_is_plain_lora(tmp_path):
    """Our stored config (use_dora) was restored for a file without dora_scale: PEFT then applies DoRA with
    magnitudes of its own to what the file says is plain LoRA (exit 0, no magnitudes, use_dora true)."""
    from safetensors import safe_open

    run_cli("convert", FIXTURES / "llama-dora", "-o", tmp_path / "k", "--to", "kohya")
    with safe_open(tmp_path / "k" / "lora.safetensors", "pt") as f:
        metadata = f.metadata()
    assert "loratools.peft_config" in metadata
    t = load_file(tmp_path / "k" / "lora.safetensors")
    (tmp_path / "plain").mkdir()
    save_file({k: v for k, v in t.items() if not k.endswith(".dora_scale")}, tmp_path / "plain" / "lora.safetensors",
              metadata=metadata)
    run_cli("convert", tmp_path / "plain", "-o", tmp_path / "peft", "--to", "peft", "--base", LLAMA)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False
    ref = formats.parse(formats.read(FIXTURES / "llama-dora")).modules
    got = formats.parse(formats.read(tmp_path / "peft")).modules
    for n, m in ref.items():  # the plain LoRA the file holds: the same factors and scale, no magnitude
        assert got[n].magnitude is None and got[n].scale == m.scale
        assert torch.equal(got[n].A, m.A) and torch.equal(got[n].B, m.B)


@pytest.mark.parametrize("to,base,needle", [
    ("mlx", "tiny-gpt2", "has no tensor model.layers.0"),  # was written (exit 0), the base read only for ties
    ("kohya", "missing-dir", "no such file or directory"),  # --base was ignored (exit 0)
])
def test_convert_checks_the_base_it_is_given(tmp_path, to, base, needle):
    out = tmp_path / "out"
    r = run_cli("convert", FIXTURES / "llama-lora", "-o", out, "--to", to, "--base", FIXTURES / base, expect=None)
    _one_line_refusal(r, out, needle)


def test_mlx_refuses_an_embedding_lora_on_a_base_tied_by_default(tied_llama, tmp_path):
    """mlx_lm ties a Llama's head when config.json leaves tie_word_embeddings out (transformers' default too):
    the MLX writer decided by the config key alone, so such a base slipped through; it now uses the rule the
    GGUF writer uses (no lm_head stored)."""
    base = tmp_path / "tied-by-default"
    shutil.copytree(tied_llama, base)
    cfg = json.loads((base / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "mlx"
    r = run_cli("convert", FIXTURES / "llama-embed", "-o", out, "--to", "mlx", "--base", base, expect=1)
    assert "ties its word embeddings" in r.stderr and r.stderr.count("\n") == 1 and not out.exists()
