"""`loratools merge` / `unmerge` against PEFT's merge_and_unload() and the unmerged PEFT model.

Reference choices (reasoned, not guessed):
  - one adapter: PEFT's own merge on the base as stored (fp16 Llama, bf16 GPT-2) is the reference. For
    linear layers it computes W + ΔW in float32 and rounds once, as we do; for embedding LoRA it casts
    ΔW to the base dtype before the add (two roundings), so there the exact reference is PEFT on a
    float32 copy of the base, rounded once, and the fp16 PEFT result differs from it by at most the
    rounding of ΔW (see test_embedding_merge_is_the_single_rounding_of_peft_in_fp32).
  - several adapters: PEFT merges them one after another (DoRA steps rescale what came before), which
    is also what its forward pass with all of them active computes. `add_weighted_adapter` is not a
    reference (its "linear" mode concatenates factors, it is not Σ w·ΔW). The reference is PEFT's
    sequential merge on a float32 base with each adapter's scaling multiplied by its weight
    (`set_scale`), rounded once at the end.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from conftest import ADAPTERS, FIXTURES, GPT2, LLAMA, base_of, run_cli, tree_digest
from loratools.adapter import load_adapter
from loratools.io import Checkpoint

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
MANT = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
STATS: dict[str, str] = {}  # printed at the end of the session for the issue note (pytest -s)


# -- helpers ------------------------------------------------------------------------------------------

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64), subnormals included."""
    x = x.double().abs()
    e = torch.frexp(x).exponent.double()
    floor = 2.0 ** (math.log2(torch.finfo(dtype).tiny) - MANT[dtype])
    return torch.clamp(torch.pow(2.0, e - 1 - MANT[dtype]), min=floor)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of the larger of the two (in a's dtype)."""
    big = torch.maximum(a.double().abs(), b.double().abs())
    return (a.double() - b.double()).abs() / ulp(big, a.dtype)


def dtype_of(base) -> torch.dtype:
    return torch.float16 if base == LLAMA else torch.bfloat16


def peft_model(base, adapters, dtype, weights=None):
    """PeftModel with adapters loaded as a0, a1, ... (scaling multiplied by weights)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = None
    for i, a in enumerate(adapters):
        if pm is None:
            pm = PeftModel.from_pretrained(model, a, adapter_name=f"a{i}")
        else:
            pm.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    pm.base_model.set_adapter(names)
    if weights:
        for mod in pm.modules():
            if isinstance(mod, LoraLayer):
                for n, w in zip(names, weights):
                    mod.set_scale(n, w)
    pm.eval()
    return pm, names


def peft_merged(base, adapters, dtype, weights=None) -> dict[str, torch.Tensor]:
    """What a PEFT user ships: merge_and_unload() + save_pretrained, read back (so tied aliases such as
    GPT-2's lm_head are dropped exactly as transformers drops them, and the key set is comparable)."""
    pm, names = peft_model(base, adapters, dtype, weights)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as d:
        warnings.simplefilter("ignore")
        pm.merge_and_unload(adapter_names=names).save_pretrained(d)
        return {k: v.clone() for k, v in Checkpoint(d).iter_tensors()}


def tokens(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 384, (2, n), generator=g)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits.float()


def compare(ours_dir, ref: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(bit-identical elements, elements, worst ulp distance) over every tensor; our output and the
    reference must hold the same tensor names (a tensor missing on either side fails)."""
    ours = dict(Checkpoint(ours_dir).iter_tensors())
    assert ours.keys() == ref.keys(), sorted(ours.keys() ^ ref.keys())
    same = total = 0
    worst = 0.0
    for name, t in ours.items():
        r = ref[name]
        assert r.dtype == t.dtype and r.shape == t.shape, name
        d = ulp_distance(t, r)
        same += int((t == r).sum() + (torch.isnan(t) & torch.isnan(r)).sum())
        total += t.numel()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return same, total, worst


def merge(tmp_path, base, *adapters, name="out", extra=(), device="cpu"):
    """Merge on CPU by default: the bit-for-bit claims against PEFT (which runs on CPU here) are CPU
    facts; tests/test_merge_cuda.py holds CUDA to 1 ulp of these results."""
    out = tmp_path / name
    run_cli("merge", base, *[FIXTURES / a if isinstance(a, str) else a for a in adapters], "-o", out,
            "--device", device, *extra)
    return out


@pytest.fixture(scope="module", autouse=True)
def _report_stats():
    yield
    if STATS:
        print("\n== merge/unmerge measurements")
        for k, v in STATS.items():
            print(f"  {k}: {v}")


# -- parity with PEFT, one adapter ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ADAPTERS)
def test_merge_matches_peft(tmp_path, name):
    base = base_of(name)
    dtype = dtype_of(base)
    out = merge(tmp_path, base, name)
    peft_own = peft_merged(base, [FIXTURES / name], dtype)
    embedding_lora = {m.base_key for m in load_adapter(FIXTURES / name).modules.values() if m.kind == "embedding"}
    ref = dict(peft_own)
    note = ""
    if embedding_lora:
        # PEFT rounds the embedding delta to the base dtype before adding it (two roundings); the exact
        # reference there is PEFT on a float32 base, rounded once (docs/merge.md, "Parity, measured").
        ref32 = peft_merged(base, [FIXTURES / name], torch.float32)
        ref.update({k: ref32[k].to(dtype) for k in embedding_lora})
        note = f" ({len(embedding_lora)} embedding tensor(s) against PEFT in float32 rounded once)"
    same, total, worst = compare(out, ref)
    assert same == total, f"{name}: {total - same} of {total} elements differ from PEFT (worst {worst:g} ulp)"
    STATS[f"parity {name}"] = f"{same}/{total} elements bit-identical to PEFT{note}"

    # The merged model computes what the unmerged PEFT model computes (float32 forward on both, so the
    # only difference is the rounding of the merged weights, the same as for PEFT's own merge).
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    pm, _ = peft_model(base, [FIXTURES / name], torch.float32)
    want = logits(pm)
    peft_fp = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_fp.load_state_dict(peft_own, strict=False)
    err_ours = float((logits(ours) - want).abs().max())
    err_peft = float((logits(peft_fp.float()) - want).abs().max())
    scale = float(want.abs().max())
    assert err_ours <= 1.5 * err_peft + 1e-4 * scale, (err_ours, err_peft)
    assert err_ours <= 2e-2 * scale, (err_ours, scale)
    STATS[f"logits {name}"] = f"max |ours - unmerged PEFT| {err_ours:.2e}, PEFT's own merge {err_peft:.2e}"


def test_embedding_merge_is_the_single_rounding_of_peft_in_fp32(tmp_path):
    """Where PEFT (fp16) and we differ on the embedding, we are the correctly rounded W + ΔW and PEFT
    is off by the rounding of ΔW to fp16; the difference is bounded by that."""
    out = merge(tmp_path, LLAMA, "llama-embed")
    ours = Checkpoint(out).read("model.embed_tokens.weight")
    peft16 = peft_merged(LLAMA, [FIXTURES / "llama-embed"], torch.float16)["model.embed_tokens.weight"]
    m = load_adapter(FIXTURES / "llama-embed").modules["model.embed_tokens"]
    delta = ((m.B @ m.A).T * m.scale)
    w = Checkpoint(LLAMA).read("model.embed_tokens.weight")
    exact = w.double() + delta.double()
    assert torch.equal(ours, (w.float() + delta).half())
    bound = ulp(delta, torch.float16) / 2 + ulp(ours, torch.float16) / 2 + ulp(peft16, torch.float16) / 2
    assert bool(((ours.double() - peft16.double()).abs() <= bound).all())
    # ours is never further from the exact sum than PEFT's
    assert bool(((ours.double() - exact).abs() <= (peft16.double() - exact).abs() + 1e-12).all())
    over = int((ulp_distance(ours, peft16) > 1).sum())
    STATS["llama-embed vs PEFT fp16"] = f"{over} of {ours.numel()} elements > 1 ulp apart (cancellation, PEFT's ΔW rounding)"


# -- several adapters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("names,weights", [
    (["llama-lora", "llama-dora", "llama-rslora"], [0.7, 1.0, -0.3]),
    (["llama-dora", "llama-dora"], [0.5, 0.8]),
])
def test_multi_adapter_matches_sequential_peft(tmp_path, names, weights):
    """docs/merge.md: several adapters are PEFT's sequential merge, computed in float32 and rounded once.
    Our float32 ops are not PEFT's op for op once a DoRA step rescales a sum (measured: float32 results
    within 3.4e-7 of each row's largest value), so the promise checked is: the float16 output is our
    float32 output rounded once, bit for bit; that float32 output is PEFT's float32 sequential merge up
    to float32 rounding noise; hence the float16 output can differ from PEFT-in-float32-rounded-once only
    by one ulp, where PEFT's float32 value sits on an fp16 rounding midpoint (1 of 123,200 elements here)."""
    extra = [x for w in weights for x in ("--weight", w)]
    out = merge(tmp_path, LLAMA, *names, extra=extra)
    out32 = merge(tmp_path, LLAMA, *names, name="out32", extra=[*extra, "--dtype", "float32"])
    paths = [FIXTURES / n for n in names]
    ref32 = peft_merged(LLAMA, paths, torch.float32, weights)
    ours32 = dict(Checkpoint(out32).iter_tensors())
    assert ours32.keys() == ref32.keys()
    ours16 = dict(Checkpoint(out).iter_tensors())
    for k, r in ref32.items():
        rowmax = r.abs().amax(dim=-1, keepdim=True) if r.dim() == 2 else r.abs().max()
        noise = (8 * torch.finfo(torch.float32).eps * rowmax).double().expand_as(r)
        assert bool(((ours32[k] - r).abs() <= noise).all()), k
        assert torch.equal(ours16[k], ours32[k].to(torch.float16)), k  # one rounding of the float32 result
        off = ours16[k] != r.to(torch.float16)
        midpoint = (ours16[k][off].double() + r.to(torch.float16)[off].double()) / 2
        assert bool(((r[off].double() - midpoint).abs() <= noise[off]).all()), k
    same, total, worst = compare(out, {k: v.to(torch.float16) for k, v in ref32.items()})
    assert worst <= 1.0, (same, total, worst)
    ref16 = peft_merged(LLAMA, paths, torch.float16, weights)
    same16, _, worst16 = compare(out, ref16)
    STATS[f"multi {'+'.join(names)} {weights}"] = (f"{same}/{total} bit-identical to sequential PEFT on fp32 rounded "
                                                   f"once (worst {worst:g} ulp); {same16} vs PEFT in fp16 "
                                                   f"(rounds after each adapter; worst {worst16:g} ulp)")
    # and the merged model computes what PEFT computes with all adapters active, in that order
    pm, _ = peft_model(LLAMA, paths, torch.float32, weights)
    want = logits(pm)
    got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())


def test_weights_scale_linearly(tmp_path):
    """--weight 2 on one plain adapter equals the adapter listed twice, up to float32 summation: the
    two-adapter path adds ΔW to W twice in float32, (W + ΔW) + ΔW, not W + 2ΔW; so within 1 ulp."""
    a = merge(tmp_path, LLAMA, "llama-lora", name="a", extra=["--weight", "2"])
    b = merge(tmp_path, LLAMA, "llama-lora", "llama-lora", name="b")
    ra = dict(Checkpoint(a).iter_tensors())
    rb = dict(Checkpoint(b).iter_tensors())
    assert ra.keys() == rb.keys()
    changed = 0
    for n, t in rb.items():
        assert float(ulp_distance(ra[n], t).max()) <= 1.0, n
        changed += not torch.equal(t, Checkpoint(LLAMA).read(n))
    assert changed == len(load_adapter(FIXTURES / "llama-lora").modules)  # and the weight did act


# -- round trip ----------------------------------------------------------------------------------------

def round_trip_stats(base, merged, back) -> dict:
    B, M, U = Checkpoint(base), Checkpoint(merged), Checkpoint(back)
    stats = dict(total=0, exact=0, one_ulp=0, bound=0, fine=0, fine_one_ulp=0)
    for n, w in B.iter_tensors():
        m, u = M.read(n), U.read(n)
        if torch.equal(m, w):
            assert torch.equal(u, w), n  # untouched tensors come back bit for bit
            continue
        d = (u.double() - w.double()).abs()
        fine = ulp(m, w.dtype) <= ulp(w, w.dtype)  # merged no coarser than W: 1 ulp is achievable
        within1 = ulp_distance(u, w) <= 1
        stats["total"] += d.numel()
        stats["exact"] += int((d == 0).sum())
        stats["one_ulp"] += int(within1.sum())
        stats["bound"] += int((d <= ulp(m, w.dtype) + ulp(u, w.dtype)).sum())
        stats["fine"] += int(fine.sum())
        stats["fine_one_ulp"] += int((within1 & fine).sum())
    return stats


@pytest.mark.parametrize("name", [a for a in ADAPTERS if a != "llama-mts"])
def test_round_trip(tmp_path, name):
    base = base_of(name)
    merged = merge(tmp_path, base, name)
    back = tmp_path / "back"
    run_cli("unmerge", merged, FIXTURES / name, "-o", back)
    s = round_trip_stats(base, merged, back)
    assert s["total"] > 0
    assert s["bound"] == s["total"]  # |W' - W| <= ulp(merged) + ulp(W') everywhere
    assert s["fine_one_ulp"] == s["fine"]  # 1 ulp of W wherever the merged value is no coarser than W
    # the measured shares docs/merge.md quotes (76-85% bit-exact, 93-96% within 1 ulp, 61-77% "fine")
    assert 0.755 <= s["exact"] / s["total"] <= 0.855, s
    assert 0.925 <= s["one_ulp"] / s["total"] <= 0.965, s
    assert 0.605 <= s["fine"] / s["total"] <= 0.775, s
    STATS[f"round trip {name}"] = (
        f"{s['exact']}/{s['total']} changed elements bit-exact ({s['exact'] / s['total']:.1%}), "
        f"{s['one_ulp'] / s['total']:.1%} within 1 ulp of W, 100% within ulp(merged)+ulp(W'); "
        f"where ulp(merged) <= ulp(W) ({s['fine'] / s['total']:.1%} of them): 100% within 1 ulp")
    assert json.loads((back / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert not (back / "loratools-dora").exists()


def test_round_trip_multi_with_dora(tmp_path):
    names = ["llama-lora", "llama-dora", "llama-rslora"]
    extra = ["--weight", "0.7", "--weight", "1", "--weight", "-0.3"]
    merged = merge(tmp_path, LLAMA, *names, extra=extra)
    back = tmp_path / "back"
    run_cli("unmerge", merged, *[FIXTURES / n for n in names], "-o", back, *extra)
    s = round_trip_stats(LLAMA, merged, back)
    assert s["bound"] == s["total"]
    STATS["round trip lora+dora+rslora"] = f"{s['exact']}/{s['total']} bit-exact, bound holds everywhere"
    # Leaving one out, or another order, is refused: DoRA steps are undone only in one go.
    r = run_cli("unmerge", merged, FIXTURES / "llama-dora", "-o", tmp_path / "x", expect=1)
    assert "DoRA" in r.stderr and "same order" in r.stderr
    r = run_cli("unmerge", merged, *[FIXTURES / n for n in reversed(names)], "-o", tmp_path / "x",
                "--weight", "-0.3", "--weight", "1", "--weight", "0.7", expect=1)
    assert not (tmp_path / "x").exists()


def test_unmerge_dora_without_record_is_refused(tmp_path):
    merged = merge(tmp_path, LLAMA, "llama-dora")
    assert (merged / "loratools-dora" / "norms.safetensors").is_file()
    shutil.rmtree(merged / "loratools-dora")
    r = run_cli("unmerge", merged, FIXTURES / "llama-dora", "-o", tmp_path / "back", expect=1)
    assert "cannot be undone" in r.stderr and "llama-dora" in r.stderr
    assert not (tmp_path / "back").exists()


def test_unmerge_modules_to_save_is_refused(tmp_path):
    merged = merge(tmp_path, LLAMA, "llama-mts")
    r = run_cli("unmerge", merged, FIXTURES / "llama-mts", "-o", tmp_path / "back", expect=1)
    assert "lm_head.weight" in r.stderr and "modules_to_save" in r.stderr
    assert not (tmp_path / "back").exists()


# -- refusals leave nothing behind ---------------------------------------------------------------------

def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".loratools-tmp-" in p.name]


def test_module_missing_from_base(tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", GPT2, FIXTURES / "llama-lora", "-o", out, expect=1)
    line = r.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "model.layers.0.self_attn.k_proj" in line and "[32, 64]" in line and "more mismatches" in line
    assert_nothing_written(tmp_path, out)


def test_wrong_shape(tmp_path):
    """A Llama adapter on a Llama-named base with a narrower q_proj: module and both shapes named."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    ck = Checkpoint(base)
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = ck.info(key).file
    tensors = {n: ck.read(n) for n, i in ck.tensors.items() if i.file == shard}
    tensors[key] = tensors[key][:48].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_cli("merge", base, FIXTURES / "llama-lora", "-o", out, expect=1)
    assert "model.layers.0.self_attn.q_proj" in r.stderr and "[48, 64]" in r.stderr and "[64, 64]" in r.stderr
    assert_nothing_written(tmp_path, out)


def test_conv1d_adapter_on_transposed_base(tmp_path):
    """fan_in_fan_out that disagrees with the base layout is named as such."""
    from loratools.checks import adapter_fit_problems

    ad = load_adapter(FIXTURES / "gpt2-lora")
    for m in ad.modules.values():
        m.fan_in_fan_out = False
    problems = adapter_fit_problems(Checkpoint(GPT2), ad)
    assert problems and all(p.expected == p.found[::-1] for p in problems if p.found)
    assert "fits transposed" in problems[0].message


def test_weight_count_mismatch_is_a_usage_error(tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", LLAMA, FIXTURES / "llama-lora", FIXTURES / "llama-rslora", "--weight", "0.5", "-o", out,
                expect=2)
    assert "--weight" in r.stderr
    assert_nothing_written(tmp_path, out)
    r = run_cli("unmerge", LLAMA, FIXTURES / "llama-lora", "--weight", "1", "--weight", "2", "-o", out, expect=2)
    assert_nothing_written(tmp_path, out)


def test_conflicting_modules_to_save(tmp_path):
    from loratools.adapter import adapter_tensors, write_adapter

    ad = load_adapter(FIXTURES / "llama-mts")
    other = tmp_path / "other-mts"
    other.mkdir()
    saved = {k: v + 1 for k, v in ad.saved.items()}
    write_adapter(other, ad.config, adapter_tensors(ad.modules, saved))
    out = tmp_path / "out"
    r = run_cli("merge", LLAMA, FIXTURES / "llama-mts", other, "-o", out, expect=1)
    assert "lm_head.weight" in r.stderr and "both replace" in r.stderr
    assert_nothing_written(tmp_path, out)


# -- output form ---------------------------------------------------------------------------------------

def test_output_form_dtype_json_and_determinism(tmp_path):
    a = tmp_path / "a"
    r = run_cli("merge", GPT2, FIXTURES / "gpt2-bias", "-o", a, "--dtype", "float32", "--json")
    doc = json.loads(r.stdout)
    assert doc["dtypes"] == ["float32"] and doc["changed_tensors"] == 8 and doc["dora_record"] is None
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    assert {p.name for p in a.iterdir()} == {p.name for p in GPT2.iterdir()}
    b = tmp_path / "b"
    run_cli("merge", GPT2, FIXTURES / "gpt2-bias", "-o", b, "--dtype", "float32", "--json")
    assert tree_digest(a) == tree_digest(b)
    # float32 output of a bf16 base equals PEFT on the float32-loaded base
    ref = peft_merged(GPT2, [FIXTURES / "gpt2-bias"], torch.float32)
    same, total, worst = compare(a, ref)
    assert same == total, (same, total, worst)


def test_base_without_top_level_prefix(tmp_path):
    """A GPT2Model-style checkpoint (no `transformer.` prefix) takes a GPT2LMHeadModel adapter."""
    from safetensors.torch import save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({n.removeprefix("transformer."): t for n, t in Checkpoint(GPT2).iter_tensors()},
              bare / "model.safetensors", metadata={"format": "pt"})
    full = merge(tmp_path, GPT2, "gpt2-bias", name="full")
    out = merge(tmp_path, bare, "gpt2-bias", name="out")
    ref = dict(Checkpoint(full).iter_tensors())
    for n, t in Checkpoint(out).iter_tensors():
        assert torch.equal(t, ref["transformer." + n]), n


# -- tied output embeddings ----------------------------------------------------------------------------

def tied_adapter(tmp_path, **lora_kw):
    """A GPT-2 (tied head) adapter made by PEFT, and the logits of the PEFT model that made it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(GPT2, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kw))
        if lora_kw.get("modules_to_save"):
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "modules_to_save" in n:
                        p.add_(torch.randn_like(p) * 0.05)
        out = tmp_path / "tied-adapter"
        pm.save_pretrained(out)
        pm.eval()
        return out, logits(pm)


@pytest.mark.parametrize("kw", [dict(target_modules=["wte"]),
                                dict(target_modules=["c_attn"], modules_to_save=["lm_head"])],
                         ids=["embedding-lora", "lm_head-modules_to_save"])
def test_tied_head_is_untied_to_keep_what_the_adapter_computes(tmp_path, kw):
    adapter, want = tied_adapter(tmp_path, **kw)
    out = tmp_path / "out"
    r = run_cli("merge", GPT2, adapter, "-o", out, "--json")
    assert json.loads(r.stdout)["untied_head"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in Checkpoint(out).tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, _ = peft_model(GPT2, [adapter], torch.float32)
        assert torch.allclose(logits(pm), want, atol=1e-5)  # PEFT loads it back as it was trained
        got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())


def test_overflow_is_refused(tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", GPT2, FIXTURES / "gpt2-lora", "--weight", "1e6", "--dtype", "float16", "-o", out,
                expect=1)
    assert "float16 range" in r.stderr and "bfloat16" in r.stderr
    assert_nothing_written(tmp_path, out)


def test_ensure_weight_tying_adapter_stays_tied(tmp_path):
    """PEFT ties the head's LoRA to the embedding's (and saves both): the shared tensor gets ΔW once, and
    the merged model computes what the PEFT model that was trained computes. (peft 0.21's from_pretrained
    does not re-wrap the head of such an adapter, so the reloaded PEFT model is not the reference.)"""
    adapter, want = tied_adapter(tmp_path, target_modules=["wte", "lm_head"], ensure_weight_tying=True)
    assert load_adapter(adapter).modules.keys() >= {"lm_head", "transformer.wte"}
    out = tmp_path / "out"
    r = run_cli("merge", GPT2, adapter, "-o", out, "--json")
    assert json.loads(r.stdout)["untied_head"] is False
    assert "lm_head.weight" not in Checkpoint(out).tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())



def test_untouched_tensors_copied_file_to_file_same_bytes(tmp_path, monkeypatch):
    """Tensors no adapter touches are copied by the kernel (copy_file_range) or, where it is missing,
    by pread/pwrite chunks; either way the output is byte-identical."""
    import errno
    import os

    import loratools.io.writer as writer_mod

    a = merge(tmp_path, LLAMA, "llama-lora", name="a")

    def no_kernel_copy(*args, **kw):
        raise OSError(errno.ENOSYS, "not here")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    monkeypatch.setattr(writer_mod, "COPY_CHUNK", 1000)
    b = merge(tmp_path, LLAMA, "llama-lora", name="b")
    assert tree_digest(a) == tree_digest(b)
    base = dict(Checkpoint(LLAMA).iter_tensors())
    for name, t in Checkpoint(a).iter_tensors():
        if "self_attn" not in name:
            assert torch.equal(t, base[name]), name


def test_row_blocks_change_no_bit(tmp_path, monkeypatch):
    """The elementwise part of a plain merge runs in row blocks on CPU; forced to tiny blocks it still
    gives PEFT's bits for [out, in], Conv1D [in, out] and embedding layouts."""
    import loratools.lora_math as merge_mod

    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 300)
    for name in ("llama-patterns", "gpt2-lora", "llama-embed"):
        base = base_of(name)
        out = merge(tmp_path, base, name, name=name)
        dtype = torch.float32 if name == "llama-embed" else dtype_of(base)
        ref = {k: v.to(dtype_of(base)) for k, v in peft_merged(base, [FIXTURES / name], dtype).items()}
        same, total, _ = compare(out, ref)
        assert same == total, name


@pytest.mark.parametrize("shape,rank", [((1003, 517), 16), ((2048, 300), 8), ((131, 4096), 64), ((200, 33), 4)])
def test_row_blocked_product_has_the_whole_products_bits(monkeypatch, shape, rank):
    """merge_weight computes B @ A in row blocks (never fewer than 4 rows per call); the result must
    equal W + (B @ A) · scale computed from one whole-matrix product, as PEFT does, bit for bit."""
    import loratools.lora_math as merge_mod
    from loratools.adapter import LoraModule

    g = torch.Generator().manual_seed(sum(shape) + rank)
    out_f, in_f = shape
    mod = LoraModule(name="m", kind="linear", A=torch.randn(rank, in_f, generator=g),
                     B=torch.randn(out_f, rank, generator=g), r=rank, alpha=0.37 * rank, scale=0.37)
    w = torch.randn(shape, generator=g).half()
    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 7 * in_f)  # many blocks, a short remainder
    blocks = merge_mod._row_blocks(w)
    assert len(blocks) > 1 and all(b.stop - b.start >= merge_mod.BLOCK_ROWS for b in blocks)
    got, _ = merge_mod.merge_weight(w, [merge_mod.Step(mod, 1.0, 0)], out_dtype=torch.float16)
    want = (w.float() + (mod.B @ mod.A) * 0.37).half()
    assert torch.equal(got, want)


def test_peft_merge_adds_the_tied_delta_twice_and_we_add_it_once(tmp_path):
    """The claim in docs/merge.md: with `ensure_weight_tying`, PEFT's merge_and_unload() of the model it
    trained adds ΔW to the shared embedding/head tensor twice (once through each wrapper); `merge` adds it
    once, which is what that model computes (test_ensure_weight_tying_adapter_stays_tied)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(GPT2, dtype=torch.float32)
    w = model.transformer.wte.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["wte", "lm_head"], ensure_weight_tying=True))
        delta = pm.base_model.model.transformer.wte.get_delta_weight("default").detach().clone()
        adapter = tmp_path / "tied-adapter"
        pm.save_pretrained(adapter)
        peft_w = pm.merge_and_unload().transformer.wte.weight.detach()
    assert float(delta.abs().max()) > 0.1
    assert torch.allclose(peft_w, w + 2 * delta, rtol=0, atol=1e-5)  # PEFT: twice
    out = tmp_path / "out"
    run_cli("merge", GPT2, adapter, "-o", out, "--dtype", "float32")
    ours = Checkpoint(out).read("transformer.wte.weight")
    assert torch.allclose(ours, w + delta, rtol=0, atol=1e-5)  # loratools: once
