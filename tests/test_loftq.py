"""`loratools quantize --nf4 --loftq`: PEFT's LoftQ alternation, the written base and adapter as a pair.

References: PEFT's own `loftq_init` (run on the CPU by tests/peft_loftq_cpu.py: peft 0.21 hard-codes
CUDA/XPU) and bitsandbytes' quantize_4bit / dequantize_4bit; transformers and PEFT loading the outputs.
"""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import GPT2, LLAMA, run_cli
from peft_loftq_cpu import peft_loftq_init

import bitsandbytes as bnb  # noqa: E402  (dependencies: a missing one fails, it does not skip)
from peft.utils.loftq_utils import _low_rank_decomposition  # noqa: E402

from loratools.bnb4bit import dequantize_weight, quantize_weight  # noqa: E402
from loratools.io import Checkpoint  # noqa: E402
from loratools.loftq import loftq  # noqa: E402
from loratools.quantized import read_dense  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 77, 64]])


def peft_quantizer(x):
    """PEFT's quantizer as bytes: NF4, blocksize 64, no double quant, float32 (Params4bit in loftq_init)."""
    stored, qs = quantize_weight(x, quant_type="nf4", blocksize=64, double_quant=False)
    return (stored, qs), dequantize_weight(stored, qs).float()


def weights(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.read(n) for n in ck.tensors if n.rsplit(".", 2)[-2] in PROJ}


def adapter(out) -> tuple[dict, dict[str, torch.Tensor]]:
    d = out / "loftq_init"
    return json.loads((d / "adapter_config.json").read_text()), load_file(d / "adapter_model.safetensors")


def factors(tensors, name):
    key = "base_model.model." + name.removesuffix(".weight")
    return tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]


def quantize(src, out, *args):
    res = run_cli("quantize", src, "-o", out, *args, "--json")
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("loftq")


@pytest.fixture(scope="module")
def llama32(work):
    """tiny-llama in float32: the dtype in which our format is PEFT's quantizer exactly."""
    dst = work / "llama32"
    shutil.copytree(LLAMA, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] *= 2
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    return dst


@pytest.fixture(scope="module")
def out32(work, llama32):
    out = work / "out32"
    return out, quantize(llama32, out, "--nf4", "--no-double-quant", "--loftq", "--rank", "4", "--iters", "2")


@pytest.fixture(scope="module")
def out16(work):
    """The default format (double quant, fp16 as the checkpoint), rank 8, two iterations."""
    out = work / "out16"
    return out, quantize(LLAMA, out, "--nf4", "--loftq", "--rank", "8", "--iters", "2")


@pytest.fixture(scope="module")
def targets16(work):
    """One iteration, rank 2, on q_proj and v_proj only."""
    out = work / "targets"
    return out, quantize(LLAMA, out, "--nf4", "--loftq", "--rank", "2", "--target-modules", "q_proj,v_proj")


@pytest.fixture(scope="module")
def plain16(work):
    out = work / "plain16"
    quantize(LLAMA, out, "--nf4")
    return out


# -- the alternation ------------------------------------------------------------------------------

@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("shape", [(96, 128), (128, 64)])
def test_alternation_is_peft_loftq_init(shape, iters):
    """Same A, B and dequantized base as PEFT's loftq_init, bit for bit, with PEFT's quantizer."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(iters)) * 0.02
    deq_peft, A_peft, B_peft = peft_loftq_init(w, num_bits=4, reduced_rank=5, num_iter=iters)
    res = loftq(w, 5, iters, peft_quantizer)
    assert torch.equal(res.A, A_peft) and torch.equal(res.B, B_peft)
    assert torch.equal(dequantize_weight(*res.stored).float(), deq_peft)
    assert res.after_sq < res.before_sq


def test_cli_float32_no_double_quant_is_peft(out32, llama32):
    """Per module of the written checkpoint: PEFT's loftq_init on the same weight and iterations gives the
    adapter's A and B and the base we wrote (dequantized as bitsandbytes does at load)."""
    out, summary = out32
    cfg, tensors = adapter(out)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["init_lora_weights"] is True
    ck = Checkpoint(out)
    ws = weights(llama32)
    assert len(ws) == 14 == summary["loftq"]["total"]["modules"]
    for name, w in ws.items():
        deq, A, B = peft_loftq_init(w, num_bits=4, reduced_rank=4, num_iter=2)
        ours_A, ours_B = factors(tensors, name)
        assert torch.equal(ours_A, A) and torch.equal(ours_B, B), name
        assert torch.equal(read_dense(ck, name), deq), name


def test_default_format_is_peft_loop_on_the_written_quantizer(out16):
    """Double quant, fp16: PEFT's loop with bitsandbytes quantizing in the written format (what the user's
    4-bit load dequantizes), its _low_rank_decomposition; the factors correct the base written."""
    out, summary = out16
    _, tensors = adapter(out)
    ck = Checkpoint(out)
    for name, w16 in weights(LLAMA).items():
        w = w16.float()
        res = w
        for i in range(2):
            q, state = bnb.functional.quantize_4bit(res.half(), blocksize=64, compress_statistics=True,
                                                    quant_type="nf4")
            deq = bnb.functional.dequantize_4bit(q, state).float()
            res = w - deq
            d = _low_rank_decomposition(res, reduced_rank=8)
            if i == 0:
                res = w - d["L"] @ d["R"]
        A, B = factors(tensors, name)
        assert torch.equal(read_dense(ck, name).float(), deq), name
        torch.testing.assert_close(A, d["R"], rtol=0, atol=0)
        torch.testing.assert_close(B, d["L"], rtol=0, atol=0)


def test_one_iteration_writes_plain_quantize_base(targets16, plain16):
    """--iters 1 quantizes W itself: the base is byte for byte `quantize --nf4`'s (targeted or not)."""
    out, summary = targets16
    a, b = Checkpoint(out), Checkpoint(plain16)
    assert sorted(a.tensors) == sorted(b.tensors)
    for n in a.tensors:
        x, y = a.read(n), b.read(n)
        assert x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), n
    assert json.loads((out / "config.json").read_text()) == json.loads((plain16 / "config.json").read_text())
    for r in summary["loftq"]["modules"]:
        assert r["rel_error_base"] == r["rel_error_before"] > r["rel_error_after"]


def test_reported_errors_are_measured_and_decrease(out16):
    out, summary = out16
    _, tensors = adapter(out)
    ck = Checkpoint(out)
    rows = {r["name"]: r for r in summary["loftq"]["modules"]}
    ws = weights(LLAMA)
    assert sorted(rows) == sorted(ws)
    for name, w in ws.items():
        w = w.float()
        A, B = factors(tensors, name)
        base = read_dense(ck, name).float()
        r = rows[name]
        assert r["rel_error_after"] < r["rel_error_before"], name
        assert r["rel_error_after"] == pytest.approx(float((w - base - B @ A).norm() / w.norm()), rel=1e-4)
        assert r["rel_error_base"] == pytest.approx(float((w - base).norm() / w.norm()), rel=1e-4)
    t = summary["loftq"]["total"]
    assert t["rel_error_after"] < t["rel_error_before"]


# -- loading ----------------------------------------------------------------------------------------

def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_pair_loads_and_is_closer_to_the_dense_model(out16, plain16):
    """transformers loads the base in 4 bits, PEFT loads the adapter on it with no missing or unexpected
    keys and the factors as written, and base + adapter's logits are closer to the fp model's than the
    plain NF4 base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = out16
    _, tensors = adapter(out)
    dense = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(plain16)
    base = AutoModelForCausalLM.from_pretrained(out)
    assert base.is_loaded_in_4bit and plain.is_loaded_in_4bit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, out, subfolder="loftq_init")
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    A, B = factors(tensors, "model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(layer.lora_A["default"].weight, A) and torch.equal(layer.lora_B["default"].weight, B)
    ref = _logits(dense)
    err_plain = float((_logits(plain) - ref).norm())
    err_pair = float((_logits(model) - ref).norm())
    assert err_pair < 0.9 * err_plain, (err_pair, err_plain)


def test_gpt2_conv1d(work):
    """GPT-2's Conv1D weights ([in, out]) are quantized as the [out, in] Linear transformers makes: the factors
    are of that orientation (fan_in_fan_out), correct the base, and PEFT loads them on the 4-bit model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = work / "gpt2"
    summary = quantize(GPT2, out, "--nf4", "--loftq", "--rank", "4")
    cfg, tensors = adapter(out)
    assert cfg["fan_in_fan_out"] is True and len(summary["loftq"]["modules"]) == 8
    ck, src = Checkpoint(out), Checkpoint(GPT2)
    for r in summary["loftq"]["modules"]:
        w = src.read(r["name"]).float()  # [in, out]
        A, B = factors(tensors, r["name"])
        after = float((w - read_dense(ck, r["name"]).float() - (B @ A).T).norm() / w.norm())
        assert after == pytest.approx(r["rel_error_after"], rel=1e-4) and after < r["rel_error_before"]
    ids = IDS.clamp(max=AutoModelForCausalLM.from_pretrained(GPT2).config.vocab_size - 1)
    dense = AutoModelForCausalLM.from_pretrained(GPT2, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        ref, plain = dense(ids).logits.float(), base(ids).logits.float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, out, subfolder="loftq_init")
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    with torch.no_grad():
        pair = model(ids).logits.float()
    assert float((pair - ref).norm()) < 0.9 * float((plain - ref).norm())


# -- options ----------------------------------------------------------------------------------------

def test_target_modules(targets16):
    out, summary = targets16
    cfg, tensors = adapter(out)
    assert summary["total"]["quantized_tensors"] == 14
    leaves = sorted(r["module"].rsplit(".", 1)[1] for r in summary["loftq"]["modules"])
    assert leaves == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert sorted(cfg["target_modules"]) == sorted(r["module"] for r in summary["loftq"]["modules"])
    assert len(tensors) == 8
    meta = safe_open(out / "loftq_init" / "adapter_model.safetensors", "pt").metadata()
    record = json.loads(meta["loratools"])  # the output's provenance, in the adapter's file too
    assert record["command"] == "quantize"
    assert record["options"]["loftq"] == {"rank": 2, "iters": 1, "target_modules": ["q_proj", "v_proj"]}


def test_non_finite_weight_is_named(tmp_path):
    src = tmp_path / "inf"
    shutil.copytree(LLAMA, src)
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "o"
    res = run_cli("quantize", src, "-o", out, "--nf4", "--loftq", "--rank", "2", expect=1)
    assert name in res.stderr and "non-finite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["inf"]


@pytest.mark.parametrize("args, says", [
    (["--nf4", "--loftq", "--rank", "0"], "rank"),
    (["--loftq", "--rank", "4"], "--nf4"),
    (["--fp4", "--loftq", "--rank", "4"], "--nf4"),
    (["--nf4", "--loftq"], "--rank"),
    (["--nf4", "--rank", "4"], "--loftq"),
    (["--nf4", "--loftq", "--rank", "4", "--iters", "0"], "--iters"),
    (["--nf4", "--loftq", "--rank", "33"], "k_proj"),  # k_proj is [32, 64]
    (["--nf4", "--loftq", "--rank", "4", "--target-modules", "nope"], "nope"),
])
def test_bad_options_are_usage_errors(tmp_path, args, says):
    out = tmp_path / "o"
    res = run_cli("quantize", LLAMA, "-o", out, *args, expect=2)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr
    assert not out.exists()
