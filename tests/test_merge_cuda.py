"""`--device cuda`: the same merges as on CPU to within 1 ulp (cuBLAS and CUDA reductions may round the
float32 intermediates differently), DoRA records made on the GPU undo on the GPU, and a 4-bit base is
dequantized on the GPU. Skipped where no CUDA device is present."""
from __future__ import annotations

import pytest
import torch

from conftest import ADAPTERS, FIXTURES, LLAMA, base_of, run_cli
from loratools.io import Checkpoint
from test_merge import merge, round_trip_stats, ulp_distance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA present")


def assert_within_one_ulp(a, b):
    """Equal key sets (a tensor missing from either side fails), each tensor within 1 ulp."""
    ref = dict(Checkpoint(b).iter_tensors())
    ours = dict(Checkpoint(a).iter_tensors())
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
        assert float(ulp_distance(t, ref[name]).max()) <= 1.0, name


@pytest.mark.parametrize("name", ADAPTERS)
def test_cuda_merge_matches_cpu(tmp_path, name):
    base = base_of(name)
    gpu = merge(tmp_path, base, name, name="gpu", device="cuda")
    cpu = merge(tmp_path, base, name, name="cpu", device="cpu")
    assert_within_one_ulp(gpu, cpu)


def test_cuda_multi_and_dora_round_trip(tmp_path):
    names = ["llama-lora", "llama-dora", "llama-rslora"]
    extra = ["--weight", "0.7", "--weight", "1", "--weight", "-0.3"]
    gpu = merge(tmp_path, LLAMA, *names, name="gpu", extra=extra, device="cuda")
    cpu = merge(tmp_path, LLAMA, *names, name="cpu", extra=extra, device="cpu")
    assert_within_one_ulp(gpu, cpu)
    back = tmp_path / "back"
    run_cli("unmerge", gpu, *[FIXTURES / n for n in names], "-o", back, "--device", "cuda", *extra)
    s = round_trip_stats(LLAMA, gpu, back)
    assert s["bound"] == s["total"]


def test_cuda_4bit_base(tmp_path):
    from test_merge_4bit import quantize

    q = quantize(LLAMA, tmp_path / "nf4", torch.float16, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    gpu = tmp_path / "gpu"
    cpu = tmp_path / "cpu"
    run_cli("merge", q, FIXTURES / "llama-dora", "-o", gpu, "--device", "cuda")
    run_cli("merge", q, FIXTURES / "llama-dora", "-o", cpu, "--device", "cpu")
    assert_within_one_ulp(gpu, cpu)
