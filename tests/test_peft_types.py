"""LoHa, LoKr, VeRA, AdaLoRA and IA3 adapters from files (loratools/peft_types/) against PEFT 0.21.2 itself.

Every adapter is made by PEFT on the fixtures (tests/typed_adapters.py: non-zero trained tensors, saved with
save_pretrained); the reference is PEFT's merge_and_unload of the adapter loaded back from its files onto the
float32 base, rounded once to the base's dtype (fp16 Llama, bf16 GPT-2 with Conv1D, bf16 Mixtral). PEFT makes
LoHa and LoKr for Linear/Conv layers only, so they have no GPT-2 (Conv1D) case (test_peft_refuses_conv1d_for_loha_lokr).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GPT2, LLAMA, run_cli
from loratools.io import Checkpoint
from typed_adapters import TOKENS, TypedCase

# PEFT's own warnings on what these tests make on purpose (Conv1D, PRNG projections, an AdaLoRA mask with a
# rank-0 module, whose rank_pattern keys it reports as unmatched while applying them)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(fan_in_fan_out|tie_word_embeddings|Unmerge result|vera_A and vera_B|rank_pattern keys|invalid shape).*")
LT = ["q_proj", "v_proj", "down_proj"]  # Llama: attention and a feed-forward projection
GT = ["c_attn", "c_fc", "mlp.c_proj"]  # GPT-2 Conv1D, two with a bias


def _adalora_mask(pm):
    """What AdaLoRA's budget allocator leaves: a mask per module (one pruned to rank 0), saved as rank_pattern."""
    pm.peft_config["default"].rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, True, False, True],
        "model.layers.1.self_attn.v_proj.lora_E.default": [False] * 6,
    }


def _configs():
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, VeraConfig

    return {
        "llama-loha": (LLAMA, LoHaConfig(r=4, alpha=8, target_modules=LT, rank_pattern={"v_proj": 2},
                                         alpha_pattern={"down_proj": 3}), None),
        # decompose_both and r=2: w1 and w2 as factor pairs; down_proj at r=8: w2 whole (lokr_w2)
        "llama-lokr": (LLAMA, LoKrConfig(r=2, alpha=6, target_modules=LT, decompose_both=True,
                                         rank_pattern={"down_proj": 8}), None),
        "llama-vera": (LLAMA, VeraConfig(r=8, target_modules=LT, save_projection=True, modules_to_save=["lm_head"]),
                       None),  # (a module saved whole beside the typed ones)
        "llama-vera-prng": (LLAMA, VeraConfig(r=8, target_modules=LT, save_projection=False,
                                              projection_prng_key=7), None),
        "llama-adalora": (LLAMA, AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=4,
                                               target_modules=LT), _adalora_mask),
        "llama-ia3": (LLAMA, IA3Config(target_modules=LT, feedforward_modules=["down_proj"]), None),
        "gpt2-vera": (GPT2, VeraConfig(r=8, target_modules=GT, fan_in_fan_out=True), None),
        "gpt2-adalora": (GPT2, AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=GT,
                                             fan_in_fan_out=True), None),
        "gpt2-ia3": (GPT2, IA3Config(target_modules=GT, feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
                     None),
    }


CASES = ["llama-loha", "llama-lokr", "llama-vera", "llama-vera-prng", "llama-adalora", "llama-ia3", "gpt2-vera",
         "gpt2-adalora", "gpt2-ia3"]  # the keys of _configs() (built lazily: PEFT's configs warn when made)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made, configs = {}, _configs()
    assert list(configs) == CASES

    def get(name: str) -> TypedCase:
        if name not in made:
            base, cfg, prepare = configs[name]
            made[name] = TypedCase(cfg, base, tmp_path_factory.mktemp(name), prepare=prepare)
        return made[name]
    return get


@pytest.fixture(scope="module")
def merged(cases, tmp_path_factory):
    """Our merge of each case, through the CLI (once per case)."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"{name}-ours") / "merged"
            run_cli("merge", cases(name).base, cases(name).adapter, "-o", out)
            done[name] = out
        return done[name]
    return get


def _tensors(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {k: ck.read(k) for k in ck.keys()}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64), subnormals included."""
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    e = torch.frexp(x.double().abs()).exponent.double()
    return torch.clamp(torch.pow(2.0, e - 1 - mant), min=2.0 ** (math.log2(torch.finfo(dtype).tiny) - mant))


# -- merge ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_merge_equals_peft_bit_for_bit(cases, merged, name):
    case = cases(name)
    ours, ref, base = _tensors(merged(name)), _tensors(case.reference), _tensors(case.base)
    assert set(ours) == set(ref)
    changed = {k for k in ref if not torch.equal(ref[k], base[k])}
    n_modules = len({k.rsplit(".", 2)[0] for k in load_file(case.adapter / "adapter_model.safetensors")
                     if k.startswith("base_model.model.")})
    assert len({k for k in changed if k.endswith(".weight")}) >= n_modules - 1  # (AdaLoRA: one module at rank 0)
    if name == "llama-vera":  # modules_to_save: the head replaced whole
        assert "lm_head.weight" in changed
    if name == "gpt2-ia3":  # the non-feed-forward layers' biases are scaled too (c_attn, c_fc; 2 layers)
        assert {k for k in changed if k.endswith(".bias")} == {f"transformer.h.{i}.{m}.bias" for i in (0, 1)
                                                                for m in ("attn.c_attn", "mlp.c_fc")}
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("name", ["llama-loha", "llama-lokr", "llama-vera-prng", "llama-adalora", "gpt2-ia3",
                                  "gpt2-vera"])
def test_merged_loads_in_transformers_with_peft_logits(cases, merged, name):
    from transformers import AutoModelForCausalLM

    case = cases(name)
    model, info = AutoModelForCausalLM.from_pretrained(merged(name), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        got = model.eval()(input_ids=TOKENS).logits
    # the unmerged PEFT model in float32 vs our 16-bit weights: the weights' rounding only
    tol = 0.02 if case.dtype == torch.float16 else 0.1
    torch.testing.assert_close(got, case.peft_logits, atol=tol, rtol=tol)


def test_peft_refuses_conv1d_for_loha_lokr():
    """Why LoHa and LoKr have no GPT-2 case: PEFT 0.21.2 makes them for Linear/Conv layers, not Conv1D."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for cfg in (LoHaConfig(r=2, target_modules=["c_attn"]), LoKrConfig(r=2, target_modules=["c_attn"])):
        with pytest.raises(TypeError, match="Conv1D"):
            get_peft_model(AutoModelForCausalLM.from_pretrained(GPT2), cfg)


# -- unmerge --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-loha", "llama-lokr", "llama-adalora", "gpt2-vera", "llama-ia3", "gpt2-ia3"])
def test_unmerge_within_rounding_bound(cases, merged, tmp_path, name):
    """Additive types: W' = round(round(W + ΔW) − ΔW) with the same ΔW bits, so
    |W' − W| ≤ (ulp(merged) + ulp(W'))/2.
    IA3 (multiplicative, ia3/layer.py): W' = round(round(W·l) / (l + 1e-8)), so |W' − W| ≤ ulp(merged)/(2|l|)
    + ulp(W')/2 + |W|·(1e-8/|l| + 2⁻²¹) (the last: PEFT's 1e-8 and the float32 product and quotient)."""
    case = cases(name)
    back = tmp_path / "back"
    run_cli("unmerge", merged(name), case.adapter, "-o", back)
    base, ours, mer = _tensors(case.base), _tensors(back), _tensors(merged(name))
    assert set(ours) == set(base)
    scale = _ia3_scales(case) if "ia3" in name else {}
    for k, w in base.items():
        err = (ours[k].double() - w.double()).abs()
        if k in scale:
            l = scale[k].abs()  # noqa: E741
            bound = (_ulp(mer[k], w.dtype) / (2 * l) + _ulp(ours[k], w.dtype) / 2
                     + w.double().abs() * (1e-8 / l + 2.0 ** -21))
        else:
            bound = (_ulp(mer[k], w.dtype) + _ulp(ours[k], w.dtype)) / 2
        assert bool((err <= bound).all()), (k, float((err - bound).max()))


def _ia3_scales(case) -> dict[str, torch.Tensor]:
    """Per base tensor, the IA3 vector broadcast to the stored layout (float64)."""
    fifo = case.adapter_config["fan_in_fan_out"]
    out = {}
    for key, l in load_file(case.adapter / "adapter_model.safetensors").items():
        module = key[len("base_model.model."):].rsplit(".", 1)[0]  # the fixtures store the model's names
        v = l.double().T if fifo else l.double()
        out[f"{module}.weight"] = v
        if l.shape[1] == 1:  # not feed-forward: the bias is scaled too
            out[f"{module}.bias"] = l.double().reshape(-1)
    return out


# -- 4-bit base -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-lokr", "llama-ia3"])
def test_merge_into_4bit_equals_peft_on_dequantized(cases, tmp_path, name):
    """As LoRA into a 4-bit base: the base is dequantized on the fly (float16 out) and the merge is PEFT's on
    that dequantized base (float32, rounded once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = cases(name)
    q, dense, out, ref = tmp_path / "q", tmp_path / "dense", tmp_path / "merged", tmp_path / "ref"
    run_cli("quantize", case.base, "-o", q, "--nf4")
    run_cli("dequantize", q, "-o", dense)
    run_cli("merge", q, case.adapter, "-o", out)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32), case.adapter)
    pm.merge_and_unload().to(torch.float16).save_pretrained(ref)
    ours, want = _tensors(out), _tensors(ref)
    assert set(ours) == set(want)
    for k in want:
        assert torch.equal(ours[k], want[k]), k


# -- MoE ------------------------------------------------------------------------------------------------

def test_mixtral_attention_lokr_and_ia3_equal_peft(tmp_path):
    """One MoE: a tiny Mixtral (bf16, experts stored per expert as w1/w2/w3), LoKr on its attention projections
    and IA3 on attention + the router-free dense path PEFT accepts; merges equal PEFT's bits and leave the
    experts as stored."""
    from peft import IA3Config, LoKrConfig
    from transformers import AutoConfig, MixtralForCausalLM

    cfg = AutoConfig.for_model("mixtral", num_local_experts=4, num_experts_per_tok=2, hidden_size=32,
                               intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    torch.manual_seed(0)
    base = tmp_path / "mixtral"
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)
    for tag, pcfg in (("lokr", LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj", "o_proj"])),
                      ("ia3", IA3Config(target_modules=["v_proj", "o_proj"], feedforward_modules=["o_proj"]))):
        case = TypedCase(pcfg, base, tmp_path / tag)
        out = tmp_path / f"{tag}-merged"
        run_cli("merge", base, case.adapter, "-o", out)
        ours, ref, orig = _tensors(out), _tensors(case.reference), _tensors(base)
        assert list(ours) == list(orig)  # the stored layout (per-expert w1/w2/w3), kept
        assert set(ours) == set(ref)
        assert sum(not torch.equal(ref[k], orig[k]) for k in ref) >= 4
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (tag, k)


# -- validate, inspect ----------------------------------------------------------------------------------

def test_validate_checks_tensors_and_peft_logits(cases, merged, tmp_path):
    case = cases("gpt2-ia3")
    r = run_cli("validate", case.base, case.adapter, "--merged", merged("gpt2-ia3"), "--json")
    doc = json.loads(r.stdout)
    assert doc["passed"] and doc["tensors"]["merged"]["checked"] >= 10 and doc["comparisons"]
    # the base itself passed off as the merge: the tensor checks fail on the adapted tensors
    r = run_cli("validate", case.base, case.adapter, "--merged", case.base, "--json", "--static-only", expect=None)
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and not doc["passed"] and doc["tensors"]["merged"]["failed"] >= 10


def test_inspect_shows_type_and_modules(cases):
    doc = json.loads(run_cli("inspect", cases("llama-loha").adapter, "--json").stdout)
    assert doc["peft_type"] == "LOHA" and len(doc["modules"]) == 6
    v = next(m for m in doc["modules"] if m["name"].endswith("layers.0.self_attn.v_proj"))
    assert (v["r"], v["alpha"], v["scale"], v["base_shape"]) == (2, 8.0, 4.0, [32, 64])
    assert v["factors"]["hada_w1_a"] == [32, 2]
    doc = json.loads(run_cli("inspect", cases("gpt2-ia3").adapter, "--json").stdout)
    assert doc["peft_type"] == "IA3" and {m["details"]["feedforward"] for m in doc["modules"]} == {True, False}


# -- refusals and bad input -----------------------------------------------------------------------------

def _one_line(r, code: int, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.exit_code, r.stderr)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_other_commands_refuse_typed_adapters_in_one_line(cases, tmp_path):
    a = cases("llama-loha").adapter
    for argv in (["combine", a, a, "--method", "linear", "-o", tmp_path / "c"],
                 ["resize", a, "--rank", "2", "-o", tmp_path / "r"],
                 ["convert", a, "-o", tmp_path / "m", "--to", "mlx"]):
        _one_line(run_cli(*argv, expect=None), 1, "LOHA", "convert ADAPTER --to lora --rank R")
    assert not any(tmp_path.iterdir())
    # a typed adapter merges alone, at weight 1
    _one_line(run_cli("merge", LLAMA, a, "fixtures/llama-lora", "-o", tmp_path / "x", expect=None), 1, "LOHA", "alone")
    _one_line(run_cli("merge", LLAMA, a, "--weight", "0.5", "-o", tmp_path / "x", expect=None), 2, "LOHA")
    assert not (tmp_path / "x").exists()


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    import shutil

    shutil.copytree(src, dst)
    if edit_tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        edit_tensors(t)
        save_file(t, dst / "adapter_model.safetensors")
    if edit_config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


M = "base_model.model.model.layers.0.self_attn.v_proj"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


BAD = [  # (case, tensor edit, config edit, the words the one line must hold)
    ("llama-loha", _set(f"{M}.hada_w2_b", torch.ones(2, 63)), None, [f"{M}.hada_w2_b", "[2, 63]", "[2, 64]"]),
    ("llama-lokr", _set(f"{M}.lokr_w2_a", torch.ones(8, 3)), None, [f"{M}.lokr_w2_a", "[8, 3]"]),
    ("llama-vera", _set(f"{M}.vera_lambda_d", torch.ones(7)), None, [f"{M}.vera_lambda_d", "[7]", "[8]"]),
    ("llama-vera", lambda t: t.pop("base_model.vera_A"), None, ["base_model.vera_A", "save_projection"]),
    ("llama-adalora", _set(f"{M}.lora_E", torch.ones(5, 1)), None, [f"{M}.lora_E", "[5, 1]", "[6, 1]"]),
    ("llama-ia3", _set(f"{M}.ia3_l", torch.ones(1, 32)), None, [f"{M}.ia3_l", "[1, 32]", "[out, 1]"]),
    ("llama-loha", None, lambda c: c.update(alpha="eight"), ["alpha", "eight"]),
    ("llama-loha", None, lambda c: c.update(peft_type="HRA"), ["HRA", "peft_type"]),
]


@pytest.mark.parametrize("i", range(len(BAD)), ids=[f"{b[0]}-{n}" for n, b in enumerate(BAD)])
def test_malformed_adapter_is_one_line_and_writes_nothing(cases, tmp_path, i):
    name, et, ec, needles = BAD[i]
    case = cases(name)
    bad = _rewrite(case.adapter, tmp_path / "bad", et, ec)
    out = tmp_path / "out"
    _one_line(run_cli("merge", case.base, bad, "-o", out, expect=None), 1, *needles)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_base_that_does_not_fit_is_named(cases, tmp_path):
    """An IA3 vector of the wrong length for its base weight (the adapter alone cannot tell): named before
    anything is written."""
    case = cases("llama-ia3")
    bad = _rewrite(case.adapter, tmp_path / "bad", _set(f"{M}.ia3_l", torch.ones(48, 1)))
    _one_line(run_cli("merge", case.base, bad, "-o", tmp_path / "out", expect=None), 1,
              "model.layers.0.self_attn.v_proj.weight", "[32, 64]", "[48, ?]")
    assert not (tmp_path / "out").exists()


# -- row blocks ---------------------------------------------------------------------------------------------

def test_row_blocks_have_the_whole_weights_bits(monkeypatch):
    """merge_weight / unmerge_weight run row_blocks types block by block (lora_math._typed_weight, threads
    included): the same bits as the whole-weight path the tests above hold against PEFT. Blocks of 64 rows
    (the fixtures' weights are one block); LoKr's w2 has 7 rows, which 64 does not divide."""
    from loratools import lora_math
    from loratools.lora_math import Step, merge_weight, unmerge_weight
    from loratools.peft_types.adalora import AdaloraModule
    from loratools.peft_types.ia3 import Ia3Module
    from loratools.peft_types.loha import LohaModule
    from loratools.peft_types.lokr import LokrModule
    from loratools.peft_types.vera import Projections, VeraModule

    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(s, generator=g) * 0.3

    n_out, n_in, r = 210, 96, 4
    vera = VeraModule("v", lambda_b=rnd(n_out), lambda_d=rnd(r), in_features=n_in,
                      projections=Projections(rnd(r, 100), rnd(230, r), 0, r, []))
    modules = [LohaModule("h", w1a=rnd(n_out, r), w1b=rnd(r, n_in), w2a=rnd(n_out, r), w2b=rnd(r, n_in), r=r,
                          alpha=8.0),
               LokrModule("k", factors={"lokr_w1_a": rnd(30, 2), "lokr_w1_b": rnd(2, 8), "lokr_w2": rnd(7, 12)}, r=2,
                          alpha=3.0),
               AdaloraModule("a", A=rnd(r, n_in), B=rnd(n_out, r), E=rnd(r, 1), scaling=4, ranknum=6.0), vera,
               Ia3Module("i", l=1 + rnd(n_out, 1)), Ia3Module("f", l=1 + rnd(1, n_in), feedforward=True)]
    w = (torch.randn(n_out, n_in, generator=g) * 0.05).to(torch.bfloat16)
    whole = {m.name: m.merge(w.float().clone()).to(torch.bfloat16) for m in modules}  # rows=None: one piece
    monkeypatch.setattr(lora_math, "BLOCK_ELEMENTS", 64 * n_in)
    assert len(lora_math._row_blocks(w)) == 3
    for m in modules:
        assert m.row_blocks, m.name
        merged, _ = merge_weight(w, [Step(m, 1.0, 0)], out_dtype=torch.bfloat16)
        assert torch.equal(merged, whole[m.name]), m.name
        back = unmerge_weight(merged, [Step(m, 1.0, 0)], [None], out_dtype=torch.bfloat16)
        assert torch.equal(back, m.unmerge(merged.float().clone()).to(torch.bfloat16)), m.name
