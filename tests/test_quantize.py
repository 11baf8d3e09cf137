"""`loratools quantize` / `dequantize` against what transformers + bitsandbytes themselves write and read.

The reference for every check is the real library on this machine (CPU): a checkpoint written by
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` + `save_pretrained`,
and bitsandbytes' own quantize_4bit / dequantize_4bit.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import pytest
import torch

from conftest import FIXTURES, GPT2, LLAMA, run_cli, tree_digest

import bitsandbytes as bnb  # noqa: E402  (dependencies: a missing one fails, it does not skip)
import transformers  # noqa: E402

F = bnb.functional

from loratools.bnb4bit import QuantState, dequantize_weight, quantize_4bit, quantize_weight  # noqa: E402
from loratools.io import Checkpoint  # noqa: E402
from loratools.quantized import dense_specs, quant_states, read_dense  # noqa: E402


# -- helpers --------------------------------------------------------------------------------------

def transformers_quantize(src, dst, *, quant_type="nf4", double_quant=True, blocksize=64, skip=None):
    """The path a user takes today. BitsAndBytesConfig has no blocksize option (transformers always
    builds Params4bit with bitsandbytes' default, 64), so blocksize 128 is obtained by making
    Params4bit use 128 during the load: the same bitsandbytes call with blocksize=128."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    orig = bnb.nn.Params4bit.__new__

    def with_blocksize(cls, *args, **kwargs):
        kwargs["blocksize"] = blocksize
        return orig(cls, *args, **kwargs)

    bnb.nn.Params4bit.__new__ = with_blocksize
    try:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16,
                                 llm_int8_skip_modules=skip)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
        model.save_pretrained(dst)
    finally:
        bnb.nn.Params4bit.__new__ = orig
    return dst


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def bnb_dequantize(ck: Checkpoint, name: str) -> torch.Tensor:
    """bitsandbytes' own reading of one stored 4-bit weight (as transformers' loader builds it)."""
    stats = {k[len(name) + 1:]: ck.read(k) for k in ck.keys() if k.startswith(name + ".")}
    state = F.QuantState.from_dict(stats, device="cpu")
    return F.dequantize_4bit(ck.read(name), state)


def load_quiet(path):
    """from_pretrained with the transformers logger captured; returns (model, loading info, log text)."""
    from transformers import AutoModelForCausalLM

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model, info, buf.getvalue()


@contextlib.contextmanager
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU fallbacks in torch.compile (seconds per dtype); the same ops eager."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 77, 64]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers-written 4-bit checkpoints, made once per option set."""
    made = {}

    def get(model: str, **opts):
        key = (model, json.dumps(opts, sort_keys=True))
        if key not in made:
            dst = tmp_path_factory.mktemp("hf") / "q"
            made[key] = transformers_quantize(FIXTURES / model, dst, **opts)
        return made[key]

    return get


def quantize_cli(src, out, *, quant_type="nf4", double_quant=True, blocksize=64, extra=()):
    r = run_cli("quantize", src, "-o", out, f"--{quant_type}", "--blocksize", blocksize,
                "--double-quant" if double_quant else "--no-double-quant", "--json", *extra)
    return json.loads(r.stdout)


# -- the number format alone ----------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_format_bytes_equal_bitsandbytes(quant_type, dtype):
    """quantize_weight == bnb quantize_4bit (packed, absmax, maps, JSON) and our dequantization ==
    dequantize_4bit, bit for bit, over block tails, odd sizes, zero blocks and both blocksizes."""
    g = torch.Generator().manual_seed(7)
    # odd last dimensions send bitsandbytes' CPU dequantization to its torch fallback (FP4 zero sign)
    cases = [(96, 80), (33, 64 * 5 + 10), (1, 2), (300, 256), (5, 7), (3, 67)]
    for shape in cases:
        for blocksize in (64, 128):
            for double_quant in (False, True):
                w = torch.randn(shape, generator=g) * 0.05
                w.view(-1)[: w.numel() // 3] = 0  # whole zero blocks, and a double-quant block of equal absmax
                w = w.to(dtype)
                ref, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                             quant_type=quant_type)
                ours, qs = quantize_weight(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
                expected = {"": ref}
                expected.update({("." + k if not k.startswith("quant_state") else "." + k): v
                                 for k, v in state.as_dict(packed=True).items()})
                assert set(expected) == set(ours)
                for suffix, t in expected.items():
                    assert (t.dtype, tuple(t.shape)) == (ours[suffix].dtype, tuple(ours[suffix].shape)), suffix
                    assert raw_bytes(t) == raw_bytes(ours[suffix]), (shape, blocksize, double_quant, suffix)
                with eager_bitsandbytes():
                    expected_dense = F.dequantize_4bit(ref, state)
                assert raw_bytes(expected_dense) == raw_bytes(dequantize_weight(ours, qs))
                if not double_quant:
                    packed, absmax = quantize_4bit(w, blocksize, quant_type)
                    assert raw_bytes(packed) == raw_bytes(ref) and raw_bytes(absmax) == raw_bytes(state.absmax)


def test_double_quant_offset_follows_default_threads():
    """The double-quant offset is a float32 mean whose last bit depends on how many threads torch splits
    it over (> 32768 blocks). quantize runs its maths single-threaded, yet must give the bytes of a
    transformers run with torch's default threads (here: conftest's setting), which quantize passes
    down as `mean_threads`."""
    from loratools.quantize import single_threaded_torch

    g = torch.Generator().manual_seed(11)
    w = (torch.rand(2048, 1100, generator=g) ** 3 * torch.randn(2048, 1100, generator=g)).half()
    ref, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    threads = torch.get_num_threads()
    with single_threaded_torch(torch.device("cpu")):
        ours, qs = quantize_weight(w, quant_type="nf4", blocksize=64, double_quant=True, mean_threads=threads)
        assert torch.get_num_threads() == 1
    assert qs.nested_offset == state.offset.item()
    assert torch.equal(ours[".absmax"], state.absmax) and torch.equal(ours[""], ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bucket_tables_equal_bucketize_exhaustively(quant_type):
    """The top-16-bit lookup (bnb4bit._positions) == torch.bucketize(right=False) against the
    midpoints, for EVERY float32 in each interval that holds a midpoint, plus random values."""
    from loratools.bnb4bit import _bounds_cpu, _bucket_tables_cpu, _positions

    midpoints, _ = _bounds_cpu(quant_type)
    _, corr = _bucket_tables_cpu(quant_type)
    tops = torch.nonzero(torch.isfinite(corr)).flatten()
    assert len(tops) >= 14
    low = torch.arange(65536, dtype=torch.int64)
    x = ((tops.unsqueeze(1) << 16) | low).reshape(-1).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([x, torch.randn(1 << 18, generator=g), torch.randn(1 << 16, generator=g) * 1e-3,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 2.0, -2.0, 1e-45, -1e-45])])
    ref = torch.bucketize(x, midpoints, right=False)
    assert torch.equal(_positions(x, quant_type).long(), ref)


def test_shrinkable_tail_tensors(tmp_path):
    """ShardWriter(shrinkable=...): tensors planned at an upper bound and written shorter, at the end
    of the last shard, give a valid checkpoint (the quant_state JSON case)."""
    from loratools.io import ShardWriter, TensorSpec

    specs = [TensorSpec("a", torch.float32, (1000,)), TensorSpec("b", torch.float32, (1000,)),
             TensorSpec("s1", torch.uint8, (50,)), TensorSpec("s2", torch.uint8, (50,))]
    w = ShardWriter(tmp_path, specs, max_shard_size=4500, shrinkable=["s1", "s2"])
    data = {"a": torch.arange(1000.0), "b": -torch.arange(1000.0),
            "s1": torch.tensor(list(b'{"x": 1}'), dtype=torch.uint8),
            "s2": torch.tensor(list(b'{"longer": [1, 2, 3]}'), dtype=torch.uint8)}
    for name, t in data.items():
        w.write(name, t)
    files = w.close()
    assert len(files) == 3  # two shards + index
    ck = Checkpoint(tmp_path)
    for name, t in data.items():
        assert torch.equal(ck.read(name), t)
    assert ck.tensors["s1"].file == ck.tensors["s2"].file


def test_quant_state_json_roundtrip():
    qs = QuantState("nf4", 64, "float16", (64, 128), nested_offset=0.07348179817199707)
    d = json.loads(bytes(qs.to_tensor().numpy()).decode())
    assert d == {"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [64, 128],
                 "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.07348179817199707}
    assert QuantState.from_dict(d) == qs
    with pytest.raises(ValueError):
        QuantState.from_dict({**d, "blocksize": 100})


# -- whole checkpoints vs transformers ------------------------------------------------------------

PARITY = [(m, "nf4", dq, bs) for m in ("tiny-llama", "tiny-gpt2") for dq in (True, False) for bs in (64, 128)]
PARITY += [("tiny-llama", "fp4", True, 64), ("tiny-gpt2", "fp4", False, 128)]


@pytest.mark.parametrize("model,quant_type,double_quant,blocksize", PARITY)
def test_byte_parity_with_transformers(reference, tmp_path, model, quant_type, double_quant, blocksize):
    ref = Checkpoint(reference(model, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize))
    out = tmp_path / "q"
    quantize_cli(FIXTURES / model, out, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    ours = Checkpoint(out)
    assert set(ours.keys()) == set(ref.keys())
    for name in ref.keys():
        a, b = ref.info(name), ours.info(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert raw_bytes(ref.read(name)) == raw_bytes(ours.read(name)), name
    assert ours.quantization_config == ref.quantization_config
    assert {k: v for k, v in ours.config.items() if k != "quantization_config"} == \
        {k: v for k, v in ref.config.items() if k not in ("quantization_config", "transformers_version")} | \
        {k: ours.config[k] for k in ("transformers_version",) if k in ours.config}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_loads_in_transformers_with_same_logits(reference, tmp_path, model):
    out = tmp_path / "q"
    quantize_cli(FIXTURES / model, out)
    ours, info, log = load_quiet(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert "LOAD REPORT" not in log and "MISSING" not in log and "UNEXPECTED" not in log, log
    assert ours.is_loaded_in_4bit
    theirs, _, _ = load_quiet(reference(model, quant_type="nf4", double_quant=True, blocksize=64))
    assert torch.equal(logits(ours), logits(theirs))


def test_skip_modules_load_as_quantized(reference, tmp_path):
    """--skip-modules adds to transformers' defaults; the written skip list makes the load convert
    exactly the modules that were quantized (no missing/unexpected keys)."""
    out = tmp_path / "q"
    doc = quantize_cli(LLAMA, out, extra=("--skip-modules", "down_proj", "--skip-modules", "model.layers.1"))
    ck = Checkpoint(out)
    quantized = set(quant_states(ck))
    assert quantized and all("down_proj" not in n and not n.startswith("model.layers.1.") for n in quantized)
    assert ck.quantization_config["llm_int8_skip_modules"] == ["down_proj", "lm_head", "model.layers.1"]
    assert "model.layers.0.mlp.down_proj.weight" in doc["dense_weights_kept"]
    model, info, log = load_quiet(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert "LOAD REPORT" not in log
    # and it is what transformers writes for the same resulting skip list
    ref = Checkpoint(reference("tiny-llama", skip=["down_proj", "lm_head", "model.layers.1"]))
    assert set(ref.keys()) == set(ck.keys())
    assert all(raw_bytes(ref.read(n)) == raw_bytes(ck.read(n)) for n in ref.keys())


# -- reading and dequantizing ---------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_read_dense_matches_bitsandbytes(reference, model):
    """quantized.read_dense on a transformers-written checkpoint == bnb dequantize_4bit (Conv1D
    weights transposed back to the dense [in, out] layout), and dense_specs == the original layout."""
    ck = Checkpoint(reference(model, quant_type="nf4", double_quant=True, blocksize=64))
    orig = Checkpoint(FIXTURES / model)
    specs = dense_specs(ck)
    assert specs == {n: (i.dtype, i.shape) for n, i in orig.tensors.items()}
    qstates = quant_states(ck)
    assert qstates
    for name, (dtype, shape) in specs.items():
        t = read_dense(ck, name)
        assert (t.dtype, tuple(t.shape)) == (dtype, shape)
        if name in qstates:
            ref = bnb_dequantize(ck, name)
            if ref.shape != t.shape or model == "tiny-gpt2":
                ref = ref.t()
            assert raw_bytes(ref.contiguous()) == raw_bytes(t), name
        else:
            assert raw_bytes(t) == raw_bytes(orig.read(name)), name


@pytest.mark.parametrize("model,dtype", [("tiny-llama", None), ("tiny-gpt2", None), ("tiny-llama", "float32")])
def test_dequantize_matches_bitsandbytes(reference, tmp_path, model, dtype):
    src = reference(model, quant_type="nf4", double_quant=True, blocksize=64)
    out = tmp_path / "dense"
    extra = ("--dtype", dtype) if dtype else ()
    run_cli("dequantize", src, "-o", out, *extra)
    q, dense, orig = Checkpoint(src), Checkpoint(out), Checkpoint(FIXTURES / model)
    assert dense.quantization_config is None and not dense.is_quantized
    assert set(dense.keys()) == set(orig.keys())
    qstates = quant_states(q)
    for name in orig.keys():
        t = dense.read(name)
        assert tuple(t.shape) == orig.info(name).shape
        if name in qstates:
            stats = {k[len(name) + 1:]: q.read(k) for k in q.keys() if k.startswith(name + ".")}
            state = F.QuantState.from_dict(stats, device="cpu")
            if dtype:
                state.dtype = getattr(torch, dtype)
            ref = F.dequantize_4bit(q.read(name), state)
            ref = ref.t().contiguous() if model == "tiny-gpt2" else ref
            assert raw_bytes(ref) == raw_bytes(t), name
    # the dense output loads as an ordinary model, close to the 4-bit one
    model_dense, info, _ = load_quiet(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_report_numbers(tmp_path):
    out = tmp_path / "q"
    doc = quantize_cli(LLAMA, out)
    orig, ck = Checkpoint(LLAMA), Checkpoint(out)
    rows = {r["name"]: r for r in doc["tensors"]}
    assert set(rows) == set(quant_states(ck))
    err = ref = 0.0
    for name, r in rows.items():
        w = orig.read(name).double()
        d = read_dense(ck, name).double()
        e, s = float(((w - d) ** 2).sum()), float((w ** 2).sum())
        err, ref = err + e, ref + s
        assert r["rel_rms_error"] == pytest.approx(math.sqrt(e / s), rel=1e-6)
        assert 0.05 < r["rel_rms_error"] < 0.15  # NF4 on Gaussian-like weights: about 0.09
        stored = sum(ck.info(n).nbytes for n in ck.keys() if n == name or n.startswith(name + "."))
        assert r["bytes_after"] == stored and r["bytes_before"] == orig.info(name).nbytes
        assert r["bits_per_parameter"] == pytest.approx(8 * stored / r["parameters"])
    t = doc["total"]
    assert t["rel_rms_error"] == pytest.approx(math.sqrt(err / ref), rel=1e-6)
    assert t["quantized_tensors"] == 14 and t["bytes_after"] == sum(
        p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    assert t["bytes_before"] == orig.bytes_on_disk()


def test_inspect_shows_quantization(tmp_path):
    out = tmp_path / "q"
    quantize_cli(GPT2, out, quant_type="fp4", double_quant=False, blocksize=128)
    doc = json.loads(run_cli("inspect", out, "--json").stdout)
    q = doc["quantization"]
    assert q["method"] == "bitsandbytes" and q["quant_type"] == "fp4" and q["blocksize"] == 128
    assert q["double_quant"] is False and q["compute_dtype"] == "bfloat16" and q["quant_storage"] == "uint8"
    assert q["quantized_tensors"] == 8
    orig = Checkpoint(GPT2)
    assert q["quantized_parameters"] == sum(orig.info(n).numel for n in quant_states(Checkpoint(out)))
    assert doc["parameters"] == sum(i.numel for i in orig.tensors.values())


def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    quantize_cli(LLAMA, a)
    quantize_cli(LLAMA, b, extra=("--max-shard-size", "60KB"))
    quantize_cli(LLAMA, tmp_path / "c")
    assert tree_digest(a) == tree_digest(tmp_path / "c")
    # sharded output holds the same tensors, byte for byte
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert cb.layout == "sharded" and len(cb.shards) > 1
    assert all(raw_bytes(ca.read(n)) == raw_bytes(cb.read(n)) for n in ca.keys()) and set(ca.keys()) == set(cb.keys())


def test_refusals_leave_nothing(tmp_path):
    q = tmp_path / "q"
    quantize_cli(LLAMA, q)
    r = run_cli("quantize", q, "-o", tmp_path / "again", expect=1)
    assert "already a 4-bit checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("dequantize", LLAMA, "-o", tmp_path / "dense", expect=1)
    assert "not a 4-bit checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    run_cli("quantize", LLAMA, "-o", tmp_path / "x", "--blocksize", "100", expect=2)
    r = run_cli("quantize", LLAMA, "-o", tmp_path / "y", "--skip-modules", "model", expect=1)
    assert "no weight to quantize" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_pack_puts_even_elements_in_the_high_nibble():
    from loratools.bnb4bit import _pack

    q = torch.randint(0, 16, (4096,), dtype=torch.uint8)
    assert torch.equal(_pack(q), (q[::2] << 4) | q[1::2])
