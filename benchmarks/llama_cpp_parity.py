"""llama.cpp's runtime applies our GGUF LoRA as PEFT applies the adapter (heavy: needs llama-cpp-python built).

For each tiny base (Llama: fixtures/tiny-llama; Mistral and Qwen2: built here from transformers configs) and
each adapter (plain, rsLoRA, rank/alpha patterns, an embedding LoRA), this script

  1. converts the base with llama.cpp's own `convert_hf_to_gguf.py --outtype f32` (no quantization anywhere);
  2. converts the adapter with `loratools convert --to gguf` (ours) and with llama.cpp's own
     `convert_lora_to_gguf.py --outtype f32` (theirs);
  3. runs `llama_cpp.Llama(base.gguf, lora_path=..., logits_all=True)` on a fixed token sequence, KV cache in
     float32, flash attention off, and compares every logit with PEFT's (`PeftModel.from_pretrained`, float32).

It prints, per base and adapter: max |Δ| of llama.cpp's base logits vs transformers' (the runtime's own floor),
how far the adapter moves PEFT's logits (max |effect|), and for ours and theirs max |Δ| and the relative error
‖Δ‖ / ‖effect‖ (Frobenius over tokens × vocab). Exit 1 with FAIL when ours (or the base) exceeds TOL_ABS, or
when an adapter moves the logits too little to tell (< MIN_EFFECT). The converter's numbers are shown, not
gated: it ignores rsLoRA and alpha_pattern (docs/formats.md), so it is expected to be far off there.

Tokenizer: convert_hf_to_gguf needs one it recognises. A byte-level BPE tokenizer.json (the fixtures') is
refused ("BPE pre-tokenizer was not recognized": its pre-tokenizer hash is in no table), so each base gets a
sentencepiece `tokenizer.model` trained offline on fixtures/text.txt (the path Llama, Mistral and Qwen2's
converters try first). Token ids are fed directly, so the tokenizer does not affect the logits.

Setup (a venv of its own, not the project's; building llama.cpp took 12 min on 2 shared cores, the script
1.5 min, so it is not in CI). Measured with llama-cpp-python 0.3.36, torch 2.13.0, transformers 5.24.0,
peft 0.21.2, sentencepiece 0.2.3:

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
    python3 -m venv /tmp/lcpvenv && /tmp/lcpvenv/bin/pip install /tmp/lcp/llama_cpp_python-*.tar.gz
    /tmp/lcpvenv/bin/pip install torch transformers peft safetensors numpy gguf sentencepiece -e .
    /tmp/lcpvenv/bin/python benchmarks/llama_cpp_parity.py --llama-cpp /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

TOL_ABS = 1e-4      # max |Δ| of ours vs PEFT: float32 forwards that differ only in summation order
MIN_EFFECT = 0.05   # an adapter must move PEFT's logits at least this much, or the comparison proves nothing
N_TOKENS = 16
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATTERNS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                alpha_pattern={"v_proj": 32, "model.layers.0.mlp.gate_proj": 2})
# adapters made here: name -> LoraConfig kwargs
MADE = {
    "plain": dict(r=4, lora_alpha=8, target_modules=PROJ),
    "rslora": dict(r=4, lora_alpha=8, target_modules=PROJ, use_rslora=True),
    "patterns": PATTERNS,
    "embed": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
             tie_word_embeddings=False)


def run(cmd: list, what: str):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"FAIL: {what} exited {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return p


def sentencepiece_model(dest: Path, vocab: int) -> int:
    """Train tokenizer.model on fixtures/text.txt into dest; returns its vocabulary size (<= vocab)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(FIXTURES / "text.txt"), model_prefix=str(dest / "tokenizer"),
                                   vocab_size=vocab, model_type="bpe", hard_vocab_limit=False,
                                   character_coverage=1.0, minloglevel=2)
    (dest / "tokenizer.vocab").unlink()
    return spm_size(dest)


def spm_size(d: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).vocab_size()


def llama_base(work: Path) -> Path:
    """fixtures/tiny-llama's config and weights (float16 on disk, exact in float32) with a sentencepiece
    tokenizer instead of its byte-level BPE one."""
    d = work / "llama"
    d.mkdir()
    for f in FIXTURES.glob("tiny-llama/*"):
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, d / f.name)
    n = sentencepiece_model(d, 300)
    assert n <= json.loads((d / "config.json").read_text())["vocab_size"]
    return d


def made_base(work: Path, family: str, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    d = work / family
    d.mkdir()
    vocab = sentencepiece_model(d, 300)
    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    extra = {"sliding_window": None} if family == "mistral" else {"use_sliding_window": False}
    cfg = cls(vocab_size=vocab, bos_token_id=1, eos_token_id=2, initializer_range=0.1, **SMALL, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a misplaced tensor would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d)
    return d


def make_adapter(base: Path, out: Path, kwargs: dict, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts B (embeddings: A) at zero; both factors random, so every module moves
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out, save_embedding_layers=False)  # no base embedding saved whole: neither GGUF holds one
    return out


def peft_logits(base: Path, adapter: Path | None, tokens: list[int]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_cpp_logits(model: Path, lora: Path | None, tokens: list[int]):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, flash_attn=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def compare(got, want, ref):
    import numpy as np

    d = got - want
    effect = np.linalg.norm(want - ref)
    return float(np.abs(d).max()), float(np.linalg.norm(d) / effect) if effect else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("LORATOOLS_LLAMA_CPP"),
                    help="llama.cpp source dir holding convert_hf_to_gguf.py and convert_lora_to_gguf.py "
                         "(the llama-cpp-python sdist's vendor/llama.cpp); default $LORATOOLS_LLAMA_CPP")
    ap.add_argument("--work", type=Path, help="keep the bases, adapters and GGUFs here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.llama_cpp is None or not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        ap.error("--llama-cpp DIR (with convert_hf_to_gguf.py) is required")
    import llama_cpp
    import numpy as np
    import torch

    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="lcp-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"llama-cpp-python {llama_cpp.__version__}; work dir {work}")

    cases = []  # (family, base dir, [(adapter name, adapter dir)])
    base = llama_base(work)
    cases.append(("llama", base, [(n, FIXTURES / n) for n in ("llama-lora", "llama-rslora", "llama-patterns")]
                  + [("embed", make_adapter(base, work / "llama-embed", MADE["embed"], 1))]))
    for i, family in enumerate(("mistral", "qwen2")):
        base = made_base(work, family, 10 + i)
        cases.append((family, base, [(n, make_adapter(base, work / f"{family}-{n}", kw, 20 + j))
                                     for j, (n, kw) in enumerate(MADE.items())]))

    lc = args.llama_cpp
    failures = []
    head = (f"{'base':8} {'adapter':15} {'base |Δ|':>9} {'effect':>7} | {'ours |Δ|':>9} {'ours rel':>9} | "
            f"{'converter |Δ|':>13} {'conv. rel':>9}")
    print(head)
    print("-" * len(head))
    for family, base, adapters in cases:
        base_gguf = work / f"{family}-base-f32.gguf"
        run([sys.executable, lc / "convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile", base_gguf],
            f"convert_hf_to_gguf.py on {family}")
        pieces = spm_size(base)  # ids past the tokenizer's are [PAD] entries in the GGUF vocab: not used
        tokens = torch.randint(3, pieces, (N_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        ref = peft_logits(base, None, tokens)
        base_err = float(np.abs(llama_cpp_logits(base_gguf, None, tokens) - ref).max())
        if not base_err <= TOL_ABS:
            failures.append(f"{family}: llama.cpp's base logits differ from transformers' by {base_err:.2e}")
        for name, adapter in adapters:
            ours_dir = work / f"{family}-{name}-ours"
            shutil.rmtree(ours_dir, ignore_errors=True)
            run([sys.executable, "-m", "loratools", "convert", adapter, "-o", ours_dir, "--to", "gguf",
                 "--base", base], f"loratools convert {name}")
            theirs = work / f"{family}-{name}-converter.gguf"
            run([sys.executable, lc / "convert_lora_to_gguf.py", adapter, "--base", base, "--outtype", "f32",
                 "--outfile", theirs], f"convert_lora_to_gguf.py on {name}")
            want = peft_logits(base, adapter, tokens)
            effect = float(np.abs(want - ref).max())
            ours = compare(llama_cpp_logits(base_gguf, ours_dir / "adapter.gguf", tokens), want, ref)
            conv = compare(llama_cpp_logits(base_gguf, theirs, tokens), want, ref)
            print(f"{family:8} {name:15} {base_err:9.2e} {effect:7.3f} | {ours[0]:9.2e} {ours[1]:9.2e} | "
                  f"{conv[0]:13.2e} {conv[1]:9.2e}", flush=True)
            if not ours[0] <= TOL_ABS:
                failures.append(f"{family}/{name}: ours max |Δ| {ours[0]:.2e} > {TOL_ABS:g}")
            if not effect >= MIN_EFFECT:
                failures.append(f"{family}/{name}: the adapter moves the logits by only {effect:.2e}")
    print(f"{N_TOKENS} tokens x vocab logits per case (Llama 384, others 300 at most); "
          f"tolerance: ours max |Δ| <= {TOL_ABS:g}")
    for f in failures:
        print(f"FAIL: {f}")
    print("FAIL" if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
