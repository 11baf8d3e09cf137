"""`validate --stream`: the layer-streamed forward passes give the whole-model path's verdict and logits numbers
(decoder, encoder, seq2seq, MoE), name the first block where a corrupted merge parts from the reference,
hold one block at a time, and refuse bad checkpoints in one line.

The references are the libraries' own: PEFT's merge_and_unload (tests/test_validate.peft_merge, the zoo's
peft_merged) as the candidate and the whole-model path (transformers + PEFT) as the numbers to match.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, LLAMA, run_cli
from loratools.io import Checkpoint
from loratools.validate import validate
from loratools.validate.logits import forward_checks
from loratools.validate.streamed import choose_stream, streamed_forward_checks
from test_validate import SIDE_FILES, peft_merge, rewrite

ADAPTER = FIXTURES / "llama-lora"
METRICS = ("max_abs", "rel_err", "cosine", "top1", "passed")
SMALL = dict(device="cpu", batch=2, seq_len=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return peft_merge(LLAMA, [ADAPTER], tmp_path_factory.mktemp("streamed") / "merged")


def same_numbers(a: dict, b: dict) -> None:
    """Two comparisons agree: the same verdict, the metrics equal up to float32 summation noise."""
    assert a["name"] == b["name"]
    for k in METRICS:
        if isinstance(a[k], bool):
            assert a[k] == b[k], (a["name"], k)
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["name"], k, a[k], b[k])


def rewrite_sharded(src: Path, dst: Path, edit) -> Path:
    """`rewrite` for a checkpoint of any layout (the fixture base is sharded): one file out."""
    dst.mkdir(parents=True)
    ck = Checkpoint(src)
    tensors = {k: ck.read(k) for k in ck.keys()}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def corrupt_block(src: Path, dst: Path, k: int) -> Path:
    """The merge with block k's down_proj moved by 30% of its norm (noise): a wrong merge of that block only."""
    key = f"model.layers.{k}.mlp.down_proj.weight"

    def edit(t):
        w = t[key].float()
        g = torch.Generator().manual_seed(k)
        t[key] = (w + 0.3 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g)).to(t[key].dtype)

    return rewrite(src, dst, edit)


# -- the two paths agree ------------------------------------------------------------------------------------------

def test_streamed_and_whole_agree_on_llama(merged):
    """Same verdict and logits numbers, for the merged and the tuned comparison and the adapters' effect; the
    streamed report says it streamed and never held two blocks."""
    # (llama-lora is not an extract of tiny-llama-tuned: it carries ~0 of it; the gate is moved below that)
    kw = dict(merged=merged, tuned=FIXTURES / "tiny-llama-tuned", min_carried=-1.0, **SMALL)
    s = validate(LLAMA, [ADAPTER], stream=True, **kw)
    w = validate(LLAMA, [ADAPTER], stream=False, **kw)
    assert s["passed"] and w["passed"], (s["summary"], w["summary"])
    assert s["stream"]["streamed"] and not w["stream"]["streamed"]
    assert s["stream"]["max_resident_blocks"] == 1
    assert [c["name"] for c in s["comparisons"]] == [c["name"] for c in w["comparisons"]] == \
        ["adapters", "merged", "tuned"]
    for a, b in zip(s["comparisons"], w["comparisons"]):
        same_numbers(a, b)
    sm = {c["name"]: c for c in s["comparisons"]}
    assert sm["tuned"]["carried"] == pytest.approx(w["comparisons"][2]["carried"], rel=1e-4)
    d = sm["merged"]["divergence"]
    assert [r["block"] for r in d["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert d["first_divergence"] is None and all(r["rel_err"] < d["allowance"] for r in d["blocks"])
    assert d["logits"]["kl"] < 1e-6 and d["logits"]["topk"] == 1.0 and d["logits"]["top1"] == sm["merged"]["top1"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from zoo import Zoo

    cache = os.environ.get("LORATOOLS_ZOO_CACHE")
    return Zoo(Path(cache) if cache else tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def all_lazy(monkeypatch):
    """Every non-block weight loaded only while its module runs (as the embeddings and head of a big model)."""
    from loratools.validate import streamed

    monkeypatch.setattr(streamed, "LAZY_BYTES", 0)


@pytest.mark.parametrize("family", ["bert", "t5", "mixtral"])
def test_streamed_and_whole_agree_on_the_zoo(family, zoo, tmp_path, all_lazy):
    """An encoder (bare BERT: last hidden states), a seq2seq (T5: encoder then decoder blocks, cross-attention,
    tied embeddings) and an MoE (Mixtral: PEFT target_parameters on the fused experts, stored per expert): the
    same numbers as the whole-model path, every block reported."""
    case = zoo.get(family)
    out = tmp_path / "merged"
    out.mkdir()
    save_file(case.peft_merged(case.adapter), out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(case.base / "config.json", out / "config.json")
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, batch=2, seq_len=12, seed=0, atol=None, rtol=None,
              min_carried=0.0)
    args = (Checkpoint(case.base), [case.adapter], [1.0], {"merged": Checkpoint(out)})
    s = streamed_forward_checks(*args, **kw)
    w = forward_checks(*args, **kw)
    assert (s["output"], s["seq_len"], s["batch_source"]) == (w["output"], w["seq_len"], w["batch_source"])
    for a, b in zip(s["comparisons"], w["comparisons"], strict=True):
        same_numbers(a, b)
    merged_cmp = s["comparisons"][-1]
    assert merged_cmp["passed"]
    blocks = [r["block"] for r in merged_cmp["divergence"]["blocks"]]
    expect = {"bert": ["encoder.layer.0", "encoder.layer.1"],
              "t5": ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
              "mixtral": ["model.layers.0", "model.layers.1"]}[family]
    assert blocks == expect
    assert s["max_resident_blocks"] == 1


@pytest.mark.parametrize("name", ["llama-embed", "llama-mts", "llama-dora"])
def test_lazy_embeddings_and_head_agree(name, all_lazy, tmp_path):
    """An embedding LoRA, a modules_to_save head and DoRA with the embeddings and head loaded lazily: PEFT's
    wrappers call the base modules, so the numbers are the whole-model path's."""
    merged = peft_merge(LLAMA, [FIXTURES / name], tmp_path / "merged")
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, batch=2, seq_len=16, seed=0, atol=None, rtol=None,
              min_carried=0.0)
    args = (Checkpoint(LLAMA), [FIXTURES / name], [1.0], {"merged": Checkpoint(merged)})
    s, w = streamed_forward_checks(*args, **kw), forward_checks(*args, **kw)
    for a, b in zip(s["comparisons"], w["comparisons"], strict=True):
        same_numbers(a, b)
    assert s["comparisons"][-1]["passed"]


def test_4bit_base_is_read_dequantized(tmp_path):
    """A QLoRA merge against a bitsandbytes NF4 base: the streamed passes read the base through loratools'
    dequantization (bit-identical to bitsandbytes') and give the whole-model verdict. Their numbers are closer
    than the whole path's, which runs bitsandbytes' Linear4bit in its compute dtype."""
    q, m = tmp_path / "nf4", tmp_path / "merged"
    run_cli("quantize", LLAMA, "-o", q, "--nf4", "--no-sync")
    run_cli("merge", q, ADAPTER, "-o", m, "--no-sync")
    s = validate(q, [ADAPTER], merged=m, stream=True, **SMALL)
    w = validate(q, [ADAPTER], merged=m, stream=False, **SMALL)
    assert s["passed"] and w["passed"] and s["stream"]["streamed"], (s["summary"], w["summary"])
    sm, wm = ({c["name"]: c for c in r["comparisons"]} for r in (s, w))
    assert sm["merged"]["rel_err"] <= wm["merged"]["rel_err"]
    assert sm["adapters"]["rel_err"] == pytest.approx(wm["adapters"]["rel_err"], rel=0.05)
    bad = corrupt_block(m, tmp_path / "bad", 1)
    s = validate(q, [ADAPTER], merged=bad, stream=True, **SMALL)
    assert not s["passed"] and {c["name"]: c for c in s["comparisons"]}["merged"]["divergence"][
        "first_divergence"] == "model.layers.1"


# -- a wrong merge is caught, and where --------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1])
def test_corrupted_block_is_the_first_divergence(k, merged, tmp_path):
    bad = corrupt_block(merged, tmp_path / "bad", k)
    r = run_cli("validate", LLAMA, ADAPTER, "--merged", bad, "--stream", "--json", "--batch", "2", "--seq-len", "16",
                expect=1)
    doc = json.loads(r.stdout)
    cmp = {c["name"]: c for c in doc["comparisons"]}["merged"]
    d = cmp["divergence"]
    assert d["first_divergence"] == f"model.layers.{k}" and d["first_divergence_index"] == k
    assert all(row["rel_err"] <= d["allowance"] for row in d["blocks"][:k])
    assert d["blocks"][k]["rel_err"] > d["allowance"]
    assert not cmp["passed"]
    assert any(f"first diverging block: model.layers.{k}" in p["message"] for p in doc["problems"]
               if p["check"] == "logits"), doc["problems"]


def test_a_wrong_merge_fails_against_the_unmerged_reference(tmp_path):
    """The reference is PEFT's unmerged forward, not a merge: the base itself (the delta never added) and the
    base with every delta doubled both fail as merges, diverging from block 0 on."""
    from loratools.adapter import load_adapter
    from loratools.lora_math import lora_delta

    mods = load_adapter(ADAPTER).modules

    def double(t):
        for m in mods.values():
            key = f"{m.name}.weight"
            t[key] = (t[key].float() + 2 * lora_delta(m).float()).to(t[key].dtype)

    kw = dict(device=torch.device("cpu"), dtype=torch.float32, batch=2, seq_len=16, seed=0, atol=None, rtol=None,
              min_carried=0.0)
    for bad in (LLAMA, rewrite_sharded(LLAMA, tmp_path / "double", double)):
        s = streamed_forward_checks(Checkpoint(LLAMA), [ADAPTER], [1.0], {"merged": Checkpoint(bad)}, **kw)
        cmp = s["comparisons"][-1]
        assert cmp["name"] == "merged" and not cmp["passed"], bad
        assert cmp["divergence"]["first_divergence_index"] == 0, cmp["divergence"]


# -- bad input: one line, exit 1 ------------------------------------------------------------------------------------

def _cli_error(*args) -> tuple[str, dict]:
    r = run_cli("validate", LLAMA, ADAPTER, *args, "--stream", "--json", "--batch", "2", "--seq-len", "16", expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0], json.loads(r.stdout)


def test_missing_block_tensor_is_named(merged, tmp_path):
    key = "model.layers.1.mlp.down_proj.weight"
    bad = rewrite(merged, tmp_path / "bad", lambda t: t.pop(key))
    line, doc = _cli_error("--merged", bad)
    assert key in line
    cmp = {c["name"]: c for c in doc["comparisons"]}["merged"]
    assert not cmp["passed"] and f"missing tensor {key}" in cmp["error"]


def test_mismatched_config_is_named(merged, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(merged, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(cfg))
    line, doc = _cli_error("--merged", bad)
    cmp = {c["name"]: c for c in doc["comparisons"]}["merged"]
    assert "model.layers.0.mlp.gate_proj.weight" in cmp["error"] and "does not fit" in cmp["error"], cmp["error"]
    assert "error: " in line


def test_truncated_shard_is_named(merged, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(merged, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 4096])
    line, _ = _cli_error("--merged", bad)
    assert "model.safetensors" in line, line


# -- the choice of path, and the picture -------------------------------------------------------------------------

def test_choose_stream_rule(monkeypatch):
    from loratools.errors import UsageError
    from loratools.validate import streamed

    ck = [Checkpoint(LLAMA)]
    cpu = torch.device("cpu")
    need = streamed.model_bytes(ck[0], torch.float32) * streamed.WHOLE_PEAK_FACTOR["cpu"]
    monkeypatch.setattr(streamed, "available_bytes", lambda dev: int(need * 2))
    assert choose_stream(None, ck, cpu, torch.float32)[0] is False
    monkeypatch.setattr(streamed, "available_bytes", lambda dev: int(need / 2))
    use, why = choose_stream(None, ck, cpu, torch.float32)
    assert use and "available" in why
    assert choose_stream(False, ck, cpu, torch.float32) == (False, "--no-stream")
    assert choose_stream(None, ck, cpu, torch.float32, quantized=True)[0] is False
    monkeypatch.setattr(streamed, "available_bytes", lambda dev: int(need * 2))
    assert choose_stream(None, ck, cpu, torch.float32, plot=True)[0] is True
    with pytest.raises(UsageError, match="--no-stream"):
        choose_stream(False, ck, cpu, torch.float32, plot=True)
    with pytest.raises(UsageError, match="--quantized"):
        choose_stream(True, ck, cpu, torch.float32, quantized=True)


def test_plot(merged, tmp_path):
    """--plot writes a PNG (matplotlib installed) or says in one line how to install it, before any work."""
    out = tmp_path / "div.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = run_cli("validate", LLAMA, ADAPTER, "--merged", merged, "--plot", out, expect=2)
        assert "pip install 'loratools[plot]'" in r.stderr and not out.exists()
        return
    r = run_cli("validate", LLAMA, ADAPTER, "--merged", merged, "--plot", out, "--batch", "2", "--seq-len", "16")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model.layers.1" in r.stderr  # the per-block table
    r = run_cli("validate", LLAMA, ADAPTER, "--merged", merged, "--plot", out, "--static-only", expect=2)
    assert "drop --static-only" in r.stderr
    r = run_cli("validate", LLAMA, "--plot", tmp_path / "none.png", "--batch", "2", "--seq-len", "16", "--json")
    assert json.loads(r.stdout)["plot_skipped"] and not (tmp_path / "none.png").exists()


# -- CUDA (skipped where there is none; benchmarks/gpu_checks.sh runs it on a GPU) ---------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA present")
def test_cuda_holds_one_block_at_a_time(merged):
    """On the GPU, each block's weights are freed before the next block loads: the memory allocated as a block
    starts loading never grows by a block's size (it would, by one block per layer, if blocks were kept), and
    the streamed verdict and numbers are the whole-model path's on the same device."""
    from loratools import forward as fw
    from loratools.validate.streamed import Streamed, TensorSource, skeleton

    dev = torch.device("cuda")
    s = Streamed(skeleton(LLAMA, torch.float32), dev)
    s.lazy = False
    block_bytes = min(sum(g.nbytes for g in s.groups if any(m in set(b.modules()) for m, _ in g.holders))
                      for _, b in s.blocks)
    ids = torch.randint(3, 90, (2, 16))
    with s.run(TensorSource(Checkpoint(LLAMA), "base", dev)):
        out, _ = fw.run_outputs(s.model, ids)
    assert torch.isfinite(out).all() and s.max_resident == 1
    at = s.allocated_at_load
    assert len(at) == len(s.blocks) and max(at) - at[0] < block_bytes / 2, (at, block_bytes)
    st = validate(LLAMA, [ADAPTER], merged=merged, device="cuda", batch=2, seq_len=16, stream=True)
    wh = validate(LLAMA, [ADAPTER], merged=merged, device="cuda", batch=2, seq_len=16, stream=False)
    assert st["passed"] and wh["passed"] and st["stream"]["max_resident_blocks"] == 1
    for a, b in zip(st["comparisons"], wh["comparisons"], strict=True):
        assert a["passed"] == b["passed"]
        assert a["rel_err"] == pytest.approx(b["rel_err"], rel=0.05, abs=1e-5)  # GPU kernels differ in order
