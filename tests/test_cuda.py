"""What the docs promise for `--device cuda`, each as a check that fails if it became false:

- quantize --device cuda writes the same bytes as --device cpu (docs/quantize.md, "Same bytes as bitsandbytes,
  on any device"): every tensor, byte for byte, including a weight of more than 32768 blocks, whose
  double-quant offset is a float32 mean taken on the CPU with torch's thread count;
- a merge made on CUDA passes `validate --device cuda` (PEFT on CUDA as the reference), and the same merge with
  one module's delta scaled by 1.5 fails it, exit 1, naming that module (tests/test_merge_cuda.py holds CUDA
  merges to 1 ulp of the CPU's).

Skipped where no CUDA device is present (the only skip); benchmarks/gpu_checks.sh runs this suite on a GPU.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES, GPT2, LLAMA, run_cli
from loratools.io import Checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA present")


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor_bytes(a, b) -> None:
    """Equal key sets, and every tensor equal in dtype, shape and bytes."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert set(ca.keys()) == set(cb.keys())
    for name in ca.keys():
        x, y = ca.read(name), cb.read(name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert raw_bytes(x) == raw_bytes(y), name


def quantize(src, out, device, *opts) -> dict:
    r = run_cli("quantize", src, "-o", out, "--device", device, "--no-sync", "--json", *opts)
    return json.loads(r.stdout)


@pytest.mark.parametrize("model,opts", [
    (LLAMA, ("--nf4",)),
    (GPT2, ("--nf4",)),
    (LLAMA, ("--fp4", "--no-double-quant", "--blocksize", "128")),
])
def test_quantize_cuda_writes_the_cpu_bytes(tmp_path, model, opts):
    gpu = quantize(model, tmp_path / "gpu", "cuda", *opts)
    cpu = quantize(model, tmp_path / "cpu", "cpu", *opts)
    assert str(gpu["device"]).startswith("cuda") and str(cpu["device"]).startswith("cpu")
    assert_same_tensor_bytes(tmp_path / "gpu", tmp_path / "cpu")
    assert json.loads((tmp_path / "gpu" / "config.json").read_text()) == \
        json.loads((tmp_path / "cpu" / "config.json").read_text())


def test_quantize_cuda_many_blocks_same_bytes(tmp_path):
    """A 2176x1024 weight at blocksize 64 has 34,816 blocks (> 32768): the double-quant mean is where CPU
    threads, and CUDA's own reductions, would change the last bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2176, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "base")
    gpu = quantize(tmp_path / "base", tmp_path / "gpu", "cuda")
    quantize(tmp_path / "base", tmp_path / "cpu", "cpu")
    assert any(t["parameters"] // 64 > 32768 for t in gpu["tensors"])
    assert_same_tensor_bytes(tmp_path / "gpu", tmp_path / "cpu")


@pytest.fixture(scope="module")
def cuda_merge(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "merged"
    run_cli("merge", LLAMA, FIXTURES / "llama-lora", "-o", out, "--device", "cuda", "--no-sync")
    return out


def test_validate_cuda_passes_a_cuda_merge(cuda_merge):
    r = run_cli("validate", LLAMA, FIXTURES / "llama-lora", "--merged", cuda_merge, "--device", "cuda", "--json")
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and str(doc["device"]).startswith("cuda"), doc["summary"]
    assert not doc["problems"]


def test_validate_cuda_fails_a_module_scaled_by_1_5(cuda_merge, tmp_path):
    """One module's merged delta (merged - base, from the files) scaled by 1.5: exit 1, one last line naming
    that tensor and the scale."""
    import shutil

    from safetensors.torch import load_file, save_file

    key = "model.layers.1.self_attn.v_proj.weight"
    bad = tmp_path / "bad"
    shutil.copytree(cuda_merge, bad)
    [shard] = [p for p in bad.glob("*.safetensors") if key in load_file(p)]
    tensors = load_file(shard)
    base = Checkpoint(LLAMA).read(key).float()
    w = tensors[key].float()
    tensors[key] = (base + 1.5 * (w - base)).to(tensors[key].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run_cli("validate", LLAMA, FIXTURES / "llama-lora", "--merged", bad, "--device", "cuda", expect=1)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{key}: wrong scale: the merged delta is 1.5x" in last, last
