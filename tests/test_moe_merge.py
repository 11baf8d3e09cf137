"""Checkpoint-touching commands on layouts transformers 5 converts at load: Mixtral (per-expert `w1/w2/w3` and
`block_sparse_moe.gate` on disk; fused `mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate` in the model PEFT
wraps) and LLaVA (`language_model.model.` on disk, `model.language_model.` in the model).

Tiny models are built from configs and saved with `save_pretrained` (the original layout), once per session, in
bfloat16 so that rounding is exercised; adapters are made the default way (`target_modules="all-linear"`, which on
Mixtral makes PEFT 0.21 add target_parameters for the experts and the router) with every factor non-zero.
References are the libraries' own: PEFT's merge_and_unload on the float32 base, saved by transformers (which writes
the original layout back) after one rounding; transformers' own 4-bit load + save; PeftModel.from_pretrained.
"""
import copy
import json

import pytest
import torch

from conftest import run_cli
from loratools.io import Checkpoint

TOKENS = torch.arange(3, 23).reshape(2, 10)
DTYPE = torch.bfloat16
# PEFT 0.21.2 warns that the rank/alpha patterns it writes for target_parameters "did not match"; they apply.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")


def _config(family: str):
    from transformers import AutoConfig, LlavaConfig

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    if family == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=4, num_experts_per_tok=2, **text)
    if family == "gpt_oss":  # experts stored fused and transposed, [E, in, out]; attention with its own sinks
        return AutoConfig.for_model("gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                    layer_types=["sliding_attention", "full_attention"], sliding_window=8, **text)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
    return LlavaConfig(text_config=dict(model_type="llama", **text), vision_config=vision, image_token_index=63)


def _model_class(family: str):
    import transformers

    return {"mixtral": transformers.MixtralForCausalLM, "gpt_oss": transformers.GptOssForCausalLM,
            "llava": transformers.LlavaForConditionalGeneration}[family]


class Case:
    """A tiny base saved in bfloat16 (original layout), a default PEFT adapter on it, PEFT's merge of it."""

    def __init__(self, family: str, root):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = _model_class(family)(_config(family)).to(DTYPE).eval()
        self.family, self.base = family, root / "base"
        model.save_pretrained(self.base)
        base32 = self.load(self.base)
        torch.manual_seed(1)
        pm = get_peft_model(copy.deepcopy(base32), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # B is zero at init
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        self.adapter = root / "adapter"
        pm.save_pretrained(self.adapter)
        self.adapter_config = json.loads((self.adapter / "adapter_config.json").read_text())
        with torch.no_grad():
            self.peft_logits = pm.eval()(input_ids=TOKENS).logits
        # PEFT's merge in float32, rounded once, written by transformers (its original layout)
        self.reference = root / "peft-merged"
        pm.merge_and_unload().to(DTYPE).save_pretrained(self.reference)

    def load(self, path, **kw):
        return _model_class(self.family).from_pretrained(path, dtype=torch.float32, **kw)


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    made = {}

    def get(family: str) -> Case:
        if family not in made:
            made[family] = Case(family, tmp_path_factory.mktemp(family))
        return made[family]
    return get


def _tensors(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {k: ck.read(k) for k in ck.keys()}


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_merge_equals_peft_and_loads(cases, tmp_path, family):
    case = cases(family)
    if family == "mixtral":  # PEFT's default: target_parameters on the experts and the router
        assert set(case.adapter_config["target_parameters"]) == {"gate_up_proj", "down_proj", "gate.weight"}
    out = tmp_path / "merged"
    run_cli("merge", case.base, case.adapter, "-o", out)
    ours, ref, base = _tensors(out), _tensors(case.reference), _tensors(case.base)
    assert list(ours) == list(base)  # the stored layout, kept
    assert set(ours) == set(ref)
    changed = [k for k in ref if not torch.equal(ref[k], base[k])]
    assert len(changed) > 0.5 * sum(1 for k in ref if k.endswith(".weight") and ref[k].dim() == 2)
    if family == "mixtral":  # every expert's w1, w2, w3 and the router moved
        assert {k.rsplit(".", 2)[-2] for k in changed if ".experts." in k} == {"w1", "w2", "w3"}
        assert any("block_sparse_moe.gate" in k for k in changed)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    model, info = case.load(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        got = model.eval()(input_ids=TOKENS).logits
    torch.testing.assert_close(got, case.peft_logits, atol=0.05, rtol=0.05)  # bf16 rounding of the weights


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_unmerge_within_rounding(cases, tmp_path, family):
    case = cases(family)
    merged, back = tmp_path / "merged", tmp_path / "back"
    run_cli("merge", case.base, case.adapter, "-o", merged)
    run_cli("unmerge", merged, case.adapter, "-o", back)
    base, ours, mer = _tensors(case.base), _tensors(back), _tensors(merged)
    assert list(ours) == list(base)
    for k, w in base.items():
        # |W' - W| <= ulp(merged) + ulp(W') (design.md, Rounding): bf16 spacing is 2^-7 of the magnitude
        bound = (mer[k].float().abs() + ours[k].float().abs()) * 2.0 ** -7 + 1e-30
        assert bool(((ours[k].float() - w.float()).abs() <= bound).all()), k


def test_wrong_prefix_is_named(cases, tmp_path):
    """An adapter whose names differ from the model's by a prefix is refused with that said, not as another
    model; a module really absent says so."""
    from safetensors.torch import load_file, save_file

    case = cases("llava")
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(case.adapter_config))
    t = load_file(case.adapter / "adapter_model.safetensors")
    save_file({k.replace("model.language_model.", "model.text.", 1): v for k, v in t.items()},
              bad / "adapter_model.safetensors")
    r = run_cli("merge", case.base, bad, "-o", tmp_path / "o", expect=1)
    assert "prefix difference" in r.stderr and "'language_model' where the adapter has 'text'" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in t.items()}, bad / "adapter_model.safetensors")
    r = run_cli("merge", case.base, bad, "-o", tmp_path / "o", expect=1)
    assert "for another model" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- 4 bits ---------------------------------------------------------------------------------------------

def _transformers_4bit(case: Case, dst):
    """What a user gets from transformers + bitsandbytes: load_in_4bit (nf4, double quant), save_pretrained."""
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    _model_class(case.family).from_pretrained(case.base, quantization_config=cfg).save_pretrained(dst)
    return dst


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_quantize_equals_transformers_4bit_save(cases, tmp_path, family):
    """Byte for byte what transformers writes: LLaVA's language model, projector and vision tower Linears in
    4 bits under their stored names; Mixtral's experts and router dense, per expert, as transformers leaves them."""
    case = cases(family)
    ref = Checkpoint(_transformers_4bit(case, tmp_path / "ref"))
    out = tmp_path / "q"
    run_cli("quantize", case.base, "-o", out, "--nf4")
    ours = Checkpoint(out)
    assert set(ours.keys()) == set(ref.keys())
    packed = {k for k in ref.keys() if k.endswith(".absmax")}
    assert len(packed) == (8 if family == "mixtral" else 22)
    for k in ref.keys():
        a, b = ref.read(k), ours.read(k)
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and _raw(a) == _raw(b), k
    assert ours.quantization_config == ref.quantization_config


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_merge_into_4bit_equals_peft_on_dequantized(cases, tmp_path, family):
    """QLoRA: merge into the 4-bit base = PEFT's merge_and_unload (float32, rounded once) on the base
    bitsandbytes dequantizes; Mixtral's dense experts and router take their slices of the expert/router LoRA,
    LLaVA's 4-bit language model, projector and vision tower their modules' LoRA under the stored names."""
    from peft import PeftModel

    case = cases(family)
    q, dense, out = tmp_path / "q", tmp_path / "dense", tmp_path / "merged"
    run_cli("quantize", case.base, "-o", q, "--nf4")
    run_cli("dequantize", q, "-o", dense)
    run_cli("merge", q, case.adapter, "-o", out, "--dtype", "bfloat16")
    pm = PeftModel.from_pretrained(case.load(dense), case.adapter)
    pm.merge_and_unload().to(DTYPE).save_pretrained(tmp_path / "ref")
    ours, ref = _tensors(out), _tensors(tmp_path / "ref")
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


# -- extract --------------------------------------------------------------------------------------------

def _tuned(case: Case, root, every: bool = False):
    """A full fine-tune of the base: every weight moved (experts, router, attention, vision tower; with `every`
    also norms, biases and GPT-OSS's attention sinks), saved by transformers in the original layout."""
    model = case.load(case.base)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if (every or p.dim() >= 2) and "embed" not in n and "lm_head" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    path = root / "tuned"
    model.to(DTYPE).save_pretrained(path)
    return path


@pytest.mark.parametrize("family,ranks", [("mixtral", ["--rank", "32"]), ("llava", ["--rank", "32"]),
                                          ("mixtral", ["--energy", "0.7"])])
def test_extract_loads_in_peft_and_acts_as_the_delta(cases, tmp_path, family, ranks):
    """PEFT loads every saved tensor (its own saved view of the loaded model equals the file), under the names
    of the model transformers builds (Mixtral: target_parameters on the fused experts and the router; per-
    parameter ranks in rank_pattern under those names); at full rank the PEFT model's weights are TUNED's."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    case = cases(family)
    tuned, out = _tuned(case, tmp_path), tmp_path / "extracted"
    report = run_cli("extract", case.base, tuned, "-o", out, *ranks, "--json")
    rows = {r["name"]: r for r in json.loads(report.stdout)["modules"]}
    cfg = json.loads((out / "adapter_config.json").read_text())
    saved = load_file(out / "adapter_model.safetensors")
    if family == "mixtral":
        assert sorted(p.rsplit(".", 1)[-1] if "experts" in p else p.split("mlp.")[-1]
                      for p in cfg["target_parameters"])[:3] == ["down_proj", "down_proj", "gate.weight"]
        assert not any("block_sparse_moe" in k or ".w1" in k for k in [*saved, *cfg["target_modules"]])
    else:
        assert all(k.startswith("base_model.model.model.") for k in saved)
    if family == "mixtral":  # per-expert numbers in the report
        gu = rows["model.layers.0.mlp.experts.gate_up_proj"]
        assert gu["experts"] == 4 and len(gu["expert_rel_errors"]) == 4
    said = [x for x in report.stderr.splitlines() if x.startswith("experts:")]
    assert len(said) == (family == "mixtral"), report.stderr  # the per-expert spread, for MoE only
    if ranks[0] == "--energy":
        assert cfg["rank_pattern"] and all(".mlp." in k or "self_attn" in k for k in cfg["rank_pattern"])
    pm = PeftModel.from_pretrained(case.load(case.base), out)
    view = get_peft_model_state_dict(pm)
    assert set(view) == set(saved) and all(torch.equal(view[k], saved[k]) for k in saved)
    if ranks[0] == "--energy":
        return
    merged = pm.merge_and_unload().state_dict()
    want = case.load(tuned).state_dict()
    for k, w in want.items():
        torch.testing.assert_close(merged[k], w, atol=2e-5, rtol=0, msg=k)


def test_adapter_named_after_the_stored_layout_merges_as_peft_loads_it(cases, tmp_path):
    """An adapter trained on transformers 4 names Mixtral's per-expert Linears (`block_sparse_moe.experts.e.w1`),
    as the checkpoint stores them; PEFT 0.21 converts it onto transformers 5's fused experts at load. merge
    finds those stored names too and equals PEFT's merge of it."""
    from peft import PeftModel
    from safetensors.torch import save_file

    case = cases("mixtral")
    base = Checkpoint(case.base)
    torch.manual_seed(3)
    factors = {}
    for k, info in base.tensors.items():
        if any(x in k for x in (".w1.", ".w2.", ".w3.", "q_proj")):
            module, (n_out, n_in) = k.removesuffix(".weight"), info.shape
            factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, n_in) * 0.3
            factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, 4) * 0.3
    adapter = tmp_path / "v4"
    adapter.mkdir()
    save_file(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["w1", "w2", "w3", "q_proj"],
         "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    run_cli("merge", case.base, adapter, "-o", tmp_path / "merged")
    PeftModel.from_pretrained(case.load(case.base), adapter).merge_and_unload().to(DTYPE).save_pretrained(
        tmp_path / "ref")
    ours, ref = _tensors(tmp_path / "merged"), _tensors(tmp_path / "ref")
    assert set(ours) == set(ref)
    assert sum(not torch.equal(ref[k], v) for k, v in _tensors(case.base).items()) == 2 * (4 * 3 + 1)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_extract_holds_one_expert_at_a_time(cases, tmp_path):
    """extract never forms a fused expert parameter's float32 delta: the largest float32 tensor any torch op
    makes while it runs is one expert's gate_up delta ([2I, H]), not the parameter's [E, 2I, H]. Streamed one
    expert at a time, the factors are bit-equal to truncating each expert of the whole delta at the parameter's
    one rank (lowrank.truncate_experts), here with --energy where the experts' own ranks differ (so some are
    read again at the end)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from safetensors.torch import load_file

    from loratools.adapter import load_adapter
    from loratools.extract import extract_checkpoint
    from loratools.lora_math import pack_expert_factors
    from loratools.lowrank import truncate, truncate_experts

    case = cases("mixtral")
    tuned, out = _tuned(case, tmp_path), tmp_path / "extracted"
    largest = [0]

    class LargestFloat32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                    largest[0] = max(largest[0], t.numel())
            return result

    with LargestFloat32():
        extract_checkpoint(case.base, tuned, out, energy=0.7)
    cfg = _config("mixtral")
    E, one = cfg.num_local_experts, 2 * cfg.intermediate_size * cfg.hidden_size
    # one expert's delta, or a packed factor being written (B is [2I, R·E], large here only because R is near H)
    factors = max(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    assert one <= largest[0] <= max(one, factors) < E * one, (largest[0], one, factors)

    base, want = case.load(case.base).state_dict(), case.load(tuned).state_dict()
    experts = {n: m for n, m in load_adapter(out).modules.items() if m.kind == "experts"}
    assert len(experts) == 2 * cfg.num_hidden_layers
    reread = False
    for name, m in experts.items():
        D = want[name] - base[name]
        own = [truncate(D[e], energy=0.7).rank for e in range(E)]
        tr = truncate_experts(lambda e, c: truncate(D[e], **{k: v for k, v in c.items() if v is not None}),
                              E, {"energy": 0.7, "rank": None, "sv_ratio": None, "max_rank": None})
        assert m.r == max(own) == tr.rank
        A, B = pack_expert_factors(*reversed(tr.factors(1.0)))  # alpha = r: scale 1
        assert torch.equal(m.A, A) and torch.equal(m.B, B), name
        reread |= len(set(own)) > 1
    assert reread  # some expert's own rank was below its parameter's


def test_extract_gpt_oss_loads_in_peft_and_acts_as_the_fine_tune(cases, tmp_path):
    """GPT-OSS stores its experts fused and transposed ([E, in, out]) and its attention holds its own `sinks`
    beside q_proj...: with --modules-to-save, extract writes target_parameters for the experts and the router,
    carries the changed norms whole, and lists (does not save whole) what LoRA cannot carry: the attention's
    sinks (saving self_attn whole would replace its LoRA-targeted projections) and the biases. PEFT loads it
    (its saved view equals the file), and the model it builds is TUNED's except exactly the listed tensors,
    which stay BASE's."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    case = cases("gpt_oss")
    c = _config("gpt_oss")  # stored [E, in, out]: gate_up_proj [E, H, 2I]
    assert tuple(Checkpoint(case.base).info("model.layers.0.mlp.experts.gate_up_proj").shape) == \
        (c.num_local_experts, c.hidden_size, 2 * c.intermediate_size)
    tuned, out = _tuned(case, tmp_path, every=True), tmp_path / "extracted"
    doc = json.loads(run_cli("extract", case.base, tuned, "-o", out, "--rank", "32", "--modules-to-save",
                             "--json").stdout)
    cfg = json.loads((out / "adapter_config.json").read_text())
    saved = load_file(out / "adapter_model.safetensors")
    assert {p.rsplit(".", 1)[-1] for p in cfg["target_parameters"]} == {"gate_up_proj", "down_proj", "weight"}
    assert all(p.endswith("mlp.router.weight") for p in cfg["target_parameters"] if p.endswith(".weight"))
    listed = {n["name"]: n["reason"] for n in doc["not_carried"]}
    sinks = [k for k in listed if k.endswith("self_attn.sinks")]
    assert len(sinks) == 2 and all("holds LoRA-targeted modules" in listed[k] for k in sinks), listed
    assert cfg["modules_to_save"] and not any("self_attn" in m or "mlp" in m for m in cfg["modules_to_save"])
    gu = {r["name"]: r for r in doc["modules"]}["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu["experts"] == 4 and gu["rel_error"] < 1e-5  # full rank

    pm = PeftModel.from_pretrained(case.load(case.base), out).eval()
    view = get_peft_model_state_dict(pm)
    assert set(view) == set(saved) and all(torch.equal(view[k], saved[k]) for k in saved)
    base, want = case.load(case.base).state_dict(), case.load(tuned).state_dict()
    for k in listed:
        assert not torch.equal(want[k], base[k]), k  # listed because it changed
        want[k] = base[k]
    with torch.no_grad():
        expected = case.load(case.base)
        expected.load_state_dict(want)
        torch.testing.assert_close(pm(input_ids=TOKENS).logits, expected.eval()(input_ids=TOKENS).logits,
                                   atol=1e-4, rtol=1e-4)
    merged = pm.merge_and_unload().state_dict()
    for k, w in want.items():
        torch.testing.assert_close(merged[k], w, atol=2e-5, rtol=0, msg=k)


def test_merge_report_has_per_expert_numbers(cases, tmp_path):
    """merge's --json lists each changed expert parameter (the model's name) with ‖W'_e − W_e‖ and ‖W_e‖ per
    expert, equal to those of PEFT's merge (which ours equals bit for bit) against the base, over the stored
    slices (Mixtral: w1 and w3 for gate_up, w2 for down); the text report says the spread in one line; unmerge
    reports the same changes taken back. A model without experts gets an empty list and no such line."""
    import math

    case = cases("mixtral")
    c = _config("mixtral")
    out = tmp_path / "merged"
    doc = json.loads(run_cli("merge", case.base, case.adapter, "-o", out, "--json").stdout)
    ref, base = _tensors(case.reference), _tensors(case.base)
    rows = {r["name"]: r for r in doc["experts"]}
    assert set(rows) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(c.num_hidden_layers)
                         for p in ("gate_up_proj", "down_proj")}
    for name, r in rows.items():
        layer, leaves = name.split(".")[2], ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
        assert r["experts"] == c.num_local_experts
        for e in range(c.num_local_experts):
            keys = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for w in leaves]
            d = math.sqrt(sum(float((ref[k].double() - base[k].double()).norm()) ** 2 for k in keys))
            w = math.sqrt(sum(float(base[k].double().norm()) ** 2 for k in keys))
            assert r["expert_delta_norms"][e] == pytest.approx(d, rel=1e-6), (name, e)
            assert r["expert_base_norms"][e] == pytest.approx(w, rel=1e-6), (name, e)
            assert r["expert_rel_changes"][e] == pytest.approx(d / w, rel=1e-6), (name, e)
        assert all(k in r["stored"] for k in keys)
    text = run_cli("merge", case.base, case.adapter, "-o", tmp_path / "again")
    lines = [x for x in (text.stdout + text.stderr).splitlines() if x.startswith("experts:")]
    assert len(lines) == 1 and f"{len(rows)} expert parameters ({c.num_local_experts} experts each)" in lines[0]
    back = json.loads(run_cli("unmerge", out, case.adapter, "-o", tmp_path / "back", "--json").stdout)
    assert {r["name"] for r in back["experts"]} == set(rows)
    for r in back["experts"]:  # the same changes taken back, up to bf16 rounding of the merged weights
        assert r["expert_delta_norms"] == pytest.approx(rows[r["name"]]["expert_delta_norms"], rel=0.02)
    plain = cases("llava")
    assert json.loads(run_cli("merge", plain.base, plain.adapter, "-o", tmp_path / "llava", "--json").stdout)[
        "experts"] == []
    text = run_cli("merge", plain.base, plain.adapter, "-o", tmp_path / "llava2")
    assert "experts:" not in text.stdout + text.stderr


def test_extract_unchanged_expert_does_not_set_the_rank(cases, tmp_path):
    """An expert the fine-tune never changed (never routed to) is zeros in the adapter and does not take part in
    choosing its parameter's rank: under --sv-ratio a zero matrix would select every component, and one such
    expert would make the whole parameter full-rank."""
    from safetensors.torch import load_file, save_file

    from loratools.adapter import load_adapter
    from loratools.lora_math import expert_delta
    from loratools.lowrank import truncate

    case = cases("mixtral")
    tuned = _tuned(case, tmp_path)
    stored = load_file(tuned / "model.safetensors")
    base_sd = load_file(case.base / "model.safetensors")
    for w in ("w1", "w3"):
        k = f"model.layers.0.block_sparse_moe.experts.1.{w}.weight"
        stored[k] = base_sd[k]
    save_file(stored, tuned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "extracted"
    doc = json.loads(run_cli("extract", case.base, tuned, "-o", out, "--sv-ratio", "2", "--json").stdout)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    m = load_adapter(out).modules[name]
    D = case.load(tuned).state_dict()[name] - case.load(case.base).state_dict()[name]
    own = [truncate(D[e], sv_ratio=2).rank for e in (0, 2, 3)]
    assert not D[1].any() and max(own) < min(D.shape[1:])  # else the test could not tell
    assert m.r == max(own)
    assert not expert_delta(m.B, m.A, m.scale, m.experts)[1].any()
    row = {r["name"]: r for r in doc["modules"]}[name]
    assert row["expert_delta_norms"][1] == 0 and row["expert_rel_errors"][1] == 0
