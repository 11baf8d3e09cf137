"""parallel.py: the per-element work spread over threads gives the serial bytes, for any thread count.

Each case computes the same thing with 1, 2 and 3 worker threads (torch itself single-threaded, as the
drivers run it) and asserts equal bytes; the serial result is also checked against the reference it
has always matched (PEFT's one-rounding expression, bitsandbytes' quantize_4bit / dequantize_4bit), so
"equal to each other" cannot hide "equally wrong". Small tensors with small block and chunk sizes
(monkeypatched) give many pieces per tensor at little cost.
"""
from __future__ import annotations

import gc

import bitsandbytes.functional as F
import pytest
import torch

from conftest import FIXTURES, GPT2, LLAMA, run_cli, tree_digest
from loratools import lora_math, parallel
from loratools import bnb4bit
from loratools.adapter import LoraModule
from loratools.device import torch_threads

THREADS = (1, 2, 3)


@pytest.fixture
def small_pieces(monkeypatch):
    """Many row blocks and 4-bit chunks on small tensors (the bytes do not depend on either size)."""
    monkeypatch.setattr(lora_math, "BLOCK_ELEMENTS", 1 << 13)
    monkeypatch.setattr(bnb4bit, "CHUNK", 1 << 12)


def with_threads(n, monkeypatch, fn):
    """fn() with n workers (LORATOOLS_THREADS) and torch single-threaded, as the drivers run it."""
    monkeypatch.setenv(parallel.ENV_THREADS, str(n))
    with torch_threads(1, torch.device("cpu")):
        assert parallel.cpu_workers("cpu") == n
        return fn()


def module(kind, out_f, in_f, r=8, seed=0, fan_in_fan_out=False, magnitude=False):
    g = torch.Generator().manual_seed(seed)
    # stored layout: Linear [out, in]; Conv1D [in, out]; embedding [num, dim] with A [r, num], B [dim, r]
    m = LoraModule(name=f"{kind}{seed}", kind=kind, A=torch.randn(r, in_f, generator=g) / in_f ** 0.5,
                   B=torch.randn(out_f, r, generator=g) * 0.05, r=r, alpha=2 * r, scale=2.0,
                   fan_in_fan_out=fan_in_fan_out)
    if magnitude:
        m.magnitude = torch.rand(out_f, generator=g) + 0.5
    return m


CASES = {
    # name: (stored weight shape, modules); the weight is float16
    "linear": ((1100, 96), lambda: [module("linear", 1100, 96)]),
    "conv1d": ((1100, 96), lambda: [module("linear", 96, 1100, fan_in_fan_out=True)]),
    "embedding": ((1100, 96), lambda: [module("embedding", 96, 1100)]),
    "two-adapters": ((1100, 96), lambda: [module("linear", 1100, 96, seed=1), module("linear", 1100, 96, seed=2)]),
    "dora": ((1100, 96), lambda: [module("linear", 1100, 96, magnitude=True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unmerge_are_the_same_bytes_on_any_thread_count(case, small_pieces, monkeypatch):
    shape, make = CASES[case]
    mods = make()
    steps = [lora_math.Step(m, w, i) for i, (m, w) in enumerate(zip(mods, (1.0, 0.6)))]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.1).half()
    assert len(lora_math._row_blocks(w)) > 4
    results = {}
    for n in THREADS:
        merged, norms = with_threads(n, monkeypatch, lambda: lora_math.merge_weight(w, steps, out_dtype=torch.float16))
        back = with_threads(n, monkeypatch, lambda: lora_math.unmerge_weight(merged, steps, norms,
                                                                            out_dtype=torch.float16))
        results[n] = (merged, back)
    for n in THREADS[1:]:
        assert torch.equal(results[n][0].view(torch.int16), results[1][0].view(torch.int16)), n
        assert torch.equal(results[n][1].view(torch.int16), results[1][1].view(torch.int16)), n
    if case in ("linear", "conv1d", "embedding", "two-adapters"):
        # PEFT's expression: W + Σ w·(B @ A)·scale in float32 (in the stored layout), rounded once
        acc = w.float()
        for s in steps:
            d = (s.module.B @ s.module.A) * (s.module.scale * s.weight)
            acc = acc + (d.T if lora_math.stored_transposed(s.module.kind, s.module.fan_in_fan_out) else d)
        assert torch.equal(results[1][0], acc.half())


def quantize_inputs():
    g = torch.Generator().manual_seed(11)
    # 2^12-element chunks: ~27 of them; a partial last block (odd count) exercises the tail path
    return [(torch.rand(300, 370, generator=g) ** 3 * torch.randn(300, 370, generator=g)).half(),
            torch.randn(257, 131, generator=g).to(torch.bfloat16)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_and_dequantize_are_the_same_bytes_on_any_thread_count(quant_type, small_pieces, monkeypatch):
    for w in quantize_inputs():
        runs = {}
        for n in THREADS:
            def work():
                stored, qs, sums = bnb4bit.quantize_weight_measured(
                    w, quant_type=quant_type, blocksize=64, double_quant=True, workers=parallel.cpu_workers("cpu"),
                    mean_threads=1)
                dense = bnb4bit.dequantize_weight(stored, qs)
                return {k: v.clone() for k, v in stored.items()}, qs, sums, dense.clone()
            runs[n] = with_threads(n, monkeypatch, work)
        stored1, qs1, sums1, dense1 = runs[1]
        for n in THREADS[1:]:
            stored, qs, sums, dense = runs[n]
            assert qs == qs1 and sums == sums1
            assert stored.keys() == stored1.keys()
            assert all(torch.equal(stored[k], stored1[k]) for k in stored), n
            assert torch.equal(dense.view(torch.int16), dense1.view(torch.int16)), n
        # the serial result is bitsandbytes' (codes and absmax; the offset is taken with one thread here)
        with torch_threads(1, torch.device("cpu")):
            ref, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
            assert torch.equal(stored1[""], ref) and torch.equal(stored1[".absmax"], state.absmax)
            assert qs1.nested_offset == state.offset.item()
            if quant_type == "nf4":  # (FP4's sign of zero differs by kernel: test_quantize.py covers it)
                assert torch.equal(dense1.view(torch.int16), F.dequantize_4bit(ref, state).view(torch.int16))


def test_cli_outputs_do_not_depend_on_the_thread_count(tmp_path, small_pieces, monkeypatch):
    """merge (Linear, Conv1D, embedding, DoRA adapters), unmerge, quantize and dequantize through the
    command line with 1 and 3 workers: the same files, byte for byte."""
    cases = [
        ("merge-llama", ["merge", LLAMA, FIXTURES / "llama-lora"]),
        ("merge-embed", ["merge", LLAMA, FIXTURES / "llama-embed"]),
        ("merge-dora", ["merge", LLAMA, FIXTURES / "llama-dora"]),
        ("merge-gpt2", ["merge", GPT2, FIXTURES / "gpt2-lora"]),
        ("unmerge", ["unmerge", "{merge-llama}", FIXTURES / "llama-lora"]),
        ("quantize", ["quantize", LLAMA, "--nf4"]),
        ("quantize-fp4", ["quantize", GPT2, "--fp4"]),
        ("dequantize", ["dequantize", "{quantize}"]),
    ]
    digests = {}
    for n in (1, 3):
        monkeypatch.setenv(parallel.ENV_THREADS, str(n))
        outs = {}
        for name, argv in cases:
            out = tmp_path / f"threads{n}" / name  # the same input names: provenance records them
            out.parent.mkdir(exist_ok=True)
            args = [str(a).format(**{k: str(v) for k, v in outs.items()}) for a in argv]
            run_cli(*args, "-o", out, "--no-sync", "--device", "cpu")
            outs[name] = out
            digests[(name, n)] = tree_digest(out)
    for name, _ in cases:
        assert digests[(name, 3)] == digests[(name, 1)], name


def test_pool_reuses_a_buffer_only_once_it_is_free():
    pool = parallel.BufferPool(keep_bytes=1 << 30, min_bytes=1024)
    a = pool.empty((1024,), torch.float32)
    a.fill_(1.0)
    view = a[10:20]
    del a
    b = pool.empty((1024,), torch.float32)  # the first buffer is still referenced (by `view`)
    b.fill_(2.0)
    assert pool.allocated == 2 and pool.reused == 0 and float(view.sum()) == 10.0
    del view, b
    gc.collect()
    c = pool.empty((64, 16), torch.int32)  # same byte size, any dtype and shape
    assert pool.reused == 1 and c.shape == (64, 16) and c.dtype == torch.int32
    arr = c.numpy()  # a numpy array (what the writer hands to pwrite) holds the buffer too
    del c
    d = pool.empty((4096,), torch.uint8)
    assert pool.reused == 2  # the other free buffer, not the one `arr` holds
    d.fill_(7)
    arr[:] = 5
    assert int(d.min()) == 7
    small = pool.empty((10,), torch.float32)  # under min_bytes: not pooled
    assert pool.allocated == 2 and small.numel() == 10


def test_pool_keeps_at_most_keep_bytes_of_free_buffers():
    pool = parallel.BufferPool(keep_bytes=3 * 4096, min_bytes=1024)
    bufs = [pool.empty((4096,), torch.uint8) for _ in range(6)]
    del bufs
    pool.empty((100_000,), torch.uint8)  # nothing of this size: frees are trimmed to keep_bytes
    assert sum(b.numel() for b, _ in pool._free.values()) <= 3 * 4096


def test_pool_gives_back_a_buffer_not_lent_again_within_max_idle_requests():
    pool = parallel.BufferPool(keep_bytes=1 << 30, min_bytes=1024, max_idle=3)
    big = pool.empty((50_000,), torch.uint8)
    del big
    for _ in range(5):
        pool.empty((2048,), torch.uint8)  # freed at once (not kept), then lent again
    held = [b.numel() for b, _ in pool._free.values()] + [b.numel() for b in pool._lent]
    assert held == [2048] and pool.allocated == 2 and pool.reused == 4


def test_map_ordered_keeps_order_and_runs_nested_calls_serially():
    def inner(x):
        return parallel.map_ordered(lambda y: y * x, range(3), 3)

    assert parallel.map_ordered(inner, range(5), 2) == [[0, x, 2 * x] for x in range(5)]


def test_prefetch_yields_in_order_and_raises_at_the_failing_item():
    def fn(x):
        if x == 3:
            raise ValueError("three")
        return x * x

    got = []
    with pytest.raises(ValueError, match="three"):
        for item, value in parallel.prefetch(fn, range(6)):
            got.append((item, value))
    assert got == [(0, 0), (1, 1), (2, 4)]


def test_workers_follow_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.ENV_THREADS, "3")
    with torch_threads(1, torch.device("cpu")):
        assert parallel.cpu_workers("cpu") == 3 and parallel.cpu_workers("cpu", threads=2) == 2
        assert parallel.cpu_workers("meta") == 1
    with torch_threads(2, torch.device("cpu")):  # torch's own threads at work: no second level
        assert parallel.cpu_workers("cpu") == 1
    monkeypatch.setenv(parallel.ENV_THREADS, "zero")
    assert parallel.workers() == max(1, parallel._TORCH_THREADS)
