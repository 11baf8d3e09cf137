"""`loratools convert ... --to lora` (docs/convert_lora.md).

PiSSA / OLoRA (and the CorDA file pair) -> plain LoRA against PEFT's own save-time conversion
(`save_pretrained(..., path_initial_model_for_weight_conversion=)`): the same tensors bit for bit, the same
config, merged onto the ORIGINAL base equal to the trained model on its residual base; the rsLoRA + pattern
case PEFT refuses against the dense definition; truncation against torch.linalg.svd's optimum.
"""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA, run_cli

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_pair(root, init, **cfg_kw):
    """PEFT's own files for a PiSSA/OLoRA adapter: init/ (as initialised), trained/ (factors perturbed), and,
    where PEFT converts, converted/; plus the trained model merged on its residual base (float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    with warnings.catch_warnings():  # PEFT warns that it will not convert rsLoRA with patterns (the point here)
        warnings.simplefilter("ignore")
        cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS, **cfg_kw)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(root / "init")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": every factor moves
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "trained")
    refused = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pm.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "init"))
        except ValueError as e:
            refused = str(e)
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return {"root": root, "merged": merged, "refused": refused}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pissa")
    out = {}
    for init in ("pissa", "olora"):
        (root / init).mkdir()
        out[init] = _peft_pair(root / init, init)
    (root / "rs").mkdir()
    out["rs"] = _peft_pair(root / "rs", "pissa", use_rslora=True, rank_pattern={"q_proj": 2},
                           alpha_pattern={"v_proj": 3})
    return out


def convert(adapter, out, *args, expect=0):
    r = run_cli("convert", adapter, "--to", "lora", "-o", out, *args, "--json", expect=expect)
    return json.loads(r.stdout) if r.stdout.strip() else None, r


def _merged_on_original(adapter) -> dict:
    """PEFT: the adapter loaded on the original base (float32), merge_and_unload, state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter)
    return pm.merge_and_unload().state_dict()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_equals_peft_converted_adapter(pairs, tmp_path, init):
    root = pairs[init]["root"]
    assert pairs[init]["refused"] is None
    rep, _ = convert(root / "trained", tmp_path / "out", "--initial", root / "init")
    ours = load_file(tmp_path / "out/adapter_model.safetensors")
    peft = load_file(root / "converted/adapter_model.safetensors")
    assert ours.keys() == peft.keys()
    for k in peft:
        assert ours[k].dtype == peft[k].dtype and torch.equal(ours[k], peft[k]), k
    c_ours = json.loads((tmp_path / "out/adapter_config.json").read_text())
    c_peft = json.loads((root / "converted/adapter_config.json").read_text())
    for c in (c_ours, c_peft):  # PEFT holds target_modules as a set: its saved order follows the hash seed
        c["target_modules"] = sorted(c["target_modules"])
    assert c_ours == c_peft  # every field: r and alpha doubled, init_lora_weights true, the rest the trained one's
    assert json.dumps(c_ours, sort_keys=True) == json.dumps(c_peft, sort_keys=True)  # ints stay ints
    assert rep["r"] == 8 and all(r["rank"] == 8 and r["svd"] == "exact" for r in rep["modules"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_on_original_base_is_the_trained_model(pairs, tmp_path, init):
    """Ours merged on the original base: PEFT's converted adapter merged there (same bits), and the trained
    adapter on its residual base (float32 rounding of a different sum)."""
    root = pairs[init]["root"]
    convert(root / "trained", tmp_path / "out", "--initial", root / "init")
    ours, peft = _merged_on_original(tmp_path / "out"), _merged_on_original(root / "converted")
    trained = pairs[init]["merged"]
    for k, w in trained.items():
        assert torch.equal(ours[k], peft[k]), k
        assert torch.allclose(ours[k], w, rtol=0, atol=1e-6 * (1 + float(w.abs().max()))), k


def test_merge_command_on_original_base(pairs, tmp_path):
    """`loratools merge` of ours into the fp16 fixture base equals merging PEFT's converted adapter."""
    root = pairs["pissa"]["root"]
    convert(root / "trained", tmp_path / "ours", "--initial", root / "init")
    for name in ("ours", "peft"):
        adapter = tmp_path / "ours" if name == "ours" else root / "converted"
        run_cli("merge", LLAMA, adapter, "-o", tmp_path / f"m-{name}", "--no-sync")
    from loratools.io import Checkpoint

    a, b = Checkpoint(tmp_path / "m-ours"), Checkpoint(tmp_path / "m-peft")
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.tensors)


def test_rslora_with_patterns_peft_refuses(pairs, tmp_path):
    """PEFT refuses rsLoRA with rank_pattern / alpha_pattern; ours keeps every module's scale (alpha × √2 with
    r × 2) and reproduces the trained model on the original base."""
    rs = pairs["rs"]
    assert rs["refused"] is not None and "rank_pattern" in rs["refused"]
    root = rs["root"]
    rep, _ = convert(root / "trained", tmp_path / "out", "--initial", root / "init")
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["r"] == 8 and cfg["rank_pattern"] == {"q_proj": 4}
    assert cfg["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    assert cfg["alpha_pattern"]["v_proj"] == pytest.approx(3 * 2 ** 0.5)
    ours, trained = _merged_on_original(tmp_path / "out"), rs["merged"]
    from loratools.adapter import load_adapter

    t, i, new = load_adapter(root / "trained"), load_adapter(root / "init"), load_adapter(tmp_path / "out")
    assert {r["module"] for r in rep["modules"]} == set(t.modules) == set(new.modules)
    for name, m in t.modules.items():
        n = new.modules[name]
        assert n.r == 2 * m.r and n.scale == pytest.approx(m.scale, rel=1e-6)
        dense = m.delta() - i.modules[name].delta()  # the definition: s·(B·A − B₀·A₀)
        assert torch.allclose(n.delta(), dense, rtol=0, atol=1e-6 * float(dense.abs().max())), name
        key, w = f"{name}.weight", trained[f"{name}.weight"]
        assert torch.allclose(ours[key], w, rtol=0, atol=1e-6 * (1 + float(w.abs().max()))), key


def test_truncated_is_the_optimal_truncation(pairs, tmp_path):
    from loratools.adapter import load_adapter

    root = pairs["pissa"]["root"]
    rep, _ = convert(root / "trained", tmp_path / "out", "--initial", root / "init", "--rank", "3")
    t, i, new = load_adapter(root / "trained"), load_adapter(root / "init"), load_adapter(tmp_path / "out")
    rows = {r["module"]: r for r in rep["modules"]}
    for name, m in t.modules.items():
        dense = (m.delta() - i.modules[name].delta()).double()
        S = torch.linalg.svdvals(dense)
        optimal = float(S[3:].norm() / S.norm())
        err = float((new.modules[name].delta().double() - dense).norm() / dense.norm())
        assert new.modules[name].r == 3 and optimal > 0.05  # a real truncation
        assert err <= 1.01 * optimal, name
        assert rows[name]["rel_error"] == pytest.approx(err, rel=1e-4)
        assert rows[name]["optimal_error"] == pytest.approx(optimal, rel=1e-4)
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["init_lora_weights"] is True and not cfg["use_rslora"]
    rep_e, _ = convert(root / "trained", tmp_path / "e", "--initial", root / "init", "--energy", "0.9")
    for r in rep_e["modules"]:
        assert r["rel_error"] ** 2 <= 0.1 + 1e-6 and r["rank"] <= 8


def test_corda_pair(pairs, tmp_path):
    """CorDA: PEFT 0.21.2's CorDA initialisation cannot run here (peft/tuners/lora/corda.py imports `attr`, which
    the test environment does not install, and it needs calibration forward passes), so it is tested as the file
    pair it produces: the same adapter_config.json + factors as PiSSA's, init_lora_weights "corda"."""
    root = pairs["pissa"]["root"]
    for sub in ("init", "trained"):
        d = tmp_path / sub
        d.mkdir()
        cfg = json.loads((root / sub / "adapter_config.json").read_text())
        cfg["init_lora_weights"] = "corda" if sub == "trained" else True
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes((root / sub / "adapter_model.safetensors").read_bytes())
    _, r = convert(tmp_path / "trained", tmp_path / "none", expect=2)
    assert "corda" in r.stderr and "--initial" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
    convert(tmp_path / "trained", tmp_path / "out", "--initial", tmp_path / "init")
    ours = load_file(tmp_path / "out/adapter_model.safetensors")
    peft = load_file(root / "converted/adapter_model.safetensors")
    assert ours.keys() == peft.keys() and all(torch.equal(ours[k], peft[k]) for k in peft)


@pytest.mark.parametrize("initial, what", [("llama-lora", "has no module"),
                                           ("rs", "in the initial adapter, 2 (r=4, alpha=8) in the trained one")])
def test_mismatched_initial_refused(pairs, tmp_path, initial, what):
    from conftest import FIXTURES

    root = pairs["pissa"]["root"]
    init = FIXTURES / initial if initial.startswith("llama") else pairs[initial]["root"] / "init"
    _, r = convert(root / "trained", tmp_path / "out", "--initial", init, expect=1)
    line = r.stderr.strip()
    assert what in line and str(init) in line and "tensor base_model.model." in line and len(line.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_base_that_does_not_fit_refused(pairs, tmp_path):
    from conftest import GPT2

    root = pairs["pissa"]["root"]
    _, r = convert(root / "trained", tmp_path / "out", "--initial", root / "init", "--base", GPT2, expect=1)
    assert "has no tensor" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_stack_initial_bias_and_experts_are_the_definition():
    """What PEFT's conversion cannot take (a lora_B.bias: PEFT allows none with PiSSA/OLoRA; expert
    parameters, whose packed rows interleave experts) is still s·(B·A − B₀·A₀) (+ s·(b − b₀))."""
    from loratools.adapter import LoraModule
    from loratools.lora_convert import stack_initial

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for kind, E in (("linear", 1), ("experts", 3)):
        mk = lambda: LoraModule(name="m", kind=kind, A=rnd(2 * E, 5), B=rnd(7, 2 * E), r=2, alpha=3.0,  # noqa: E731
                                scale=1.5, experts=E, bias=rnd(7) if kind == "linear" else None)
        m, m0 = mk(), mk()
        s = stack_initial(m, m0, use_rslora=False)
        assert s.r == 4 and s.scale == pytest.approx(1.5)
        assert torch.allclose(s.delta(), m.delta() - m0.delta(), atol=1e-5)
        if m.bias is not None:
            assert torch.equal(s.bias, m.bias - m0.bias)


# -- other PEFT types (loratools/peft_types) -> LoRA at a rank ----------------------------------------------

def _typed_cases():
    from peft import AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig, VeraConfig

    from conftest import GPT2

    return {
        "loha": (LoHaConfig(r=4, alpha=8, target_modules=TARGETS), LLAMA),
        "lokr": (LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), LLAMA),
        "vera": (VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), LLAMA),  # in_features from --base
        "adalora": (AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "v_proj"]), LLAMA),
        # multiplicative rotations: ΔW = R·W − W from --base; OFT on an embedding too
        "oft": (OFTConfig(init_weights=False, oft_block_size=16,
                          target_modules=["q_proj", "down_proj", "embed_tokens"]), LLAMA),
        "boft": (BOFTConfig(init_weights=False, boft_block_size=8, target_modules=["q_proj", "v_proj"]), LLAMA),
        "ia3": (IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]), LLAMA),
        # GPT-2: Conv1D layers, and c_attn's bias scaled by IA3 (a lora_B.bias in the LoRA)
        "ia3-gpt2": (IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True),
                     GPT2),
    }


class _Typed:
    """A PEFT adapter of another type on a fixture base, every tensor non-zero (typed_adapters.randomize), and
    PEFT's merge_and_unload of it and the base alone, in float32 (state dicts)."""

    def __init__(self, config, base, root):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from typed_adapters import randomize

        self.base, self.adapter = base, root / "adapter"
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.base_state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BOFT: no CUDA extension
            pm = get_peft_model(model, config)
        randomize(pm)
        pm.save_pretrained(self.adapter)
        self.merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    out = {}
    for name, (cfg, base) in _typed_cases().items():
        case = _Typed(cfg, base, tmp_path_factory.mktemp(name))
        out[name] = (case, case.merged, case.base_state)
    return out


def _peft_state(base, adapter, typed=False, lora=False) -> dict:
    """PEFT on the float32 base: the adapter merged (merge_and_unload), or the base alone; for a LoRA adapter,
    loaded through set_peft_model_state_dict so that missing / unexpected keys are seen."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is None:
        return {k: v.clone() for k, v in model.state_dict().items()}
    if lora:
        pm = get_peft_model(model, LoraConfig.from_pretrained(adapter))
        res = set_peft_model_state_dict(pm, load_peft_weights(str(adapter)))
        assert not res.unexpected_keys, res.unexpected_keys
        assert not [k for k in res.missing_keys if "lora_" in k], res.missing_keys
    else:
        pm = PeftModel.from_pretrained(model, adapter)
    return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("name", list(_typed_cases()))
def test_typed_full_rank_is_peft_merge(typed, tmp_path, name):
    case, merged, base = typed[name]
    rep, _ = convert(case.adapter, tmp_path / "out", "--rank", "256", "--base", case.base)
    ours = _peft_state(case.base, tmp_path / "out", lora=True)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) >= len(rep["modules"])
    for k in changed:  # float32 SVD reconstruction: a few ulp of ΔW's own scale (measured ≤ 1.9e-6 of max|ΔW|)
        tol = 1e-5 * float((merged[k] - base[k]).abs().max()) + 1e-6 * float(merged[k].abs().max())
        assert torch.allclose(ours[k], merged[k], rtol=0, atol=tol), (k, float((ours[k] - merged[k]).abs().max()))
    assert all(r["rel_error"] < 1e-5 and r["svd"] == "full" for r in rep["modules"])
    if name == "ia3-gpt2":
        assert any(k.endswith("attn.c_attn.bias") for k in changed)


@pytest.mark.parametrize("name", ["loha", "ia3", "oft"])
def test_typed_low_rank_within_optimal(typed, tmp_path, name):
    case, merged, base = typed[name]
    rep, _ = convert(case.adapter, tmp_path / "out", "--rank", "3", "--base", case.base)
    ours = _peft_state(case.base, tmp_path / "out", lora=True)
    rows = {r["module"]: r for r in rep["modules"]}
    assert set(rows) == {k[: -len(".weight")] for k in merged if not torch.equal(merged[k], base[k])}
    for name_, row in rows.items():
        k = f"{name_}.weight"
        dense = (merged[k] - base[k]).double()
        S = torch.linalg.svdvals(dense)
        optimal = float(S[3:].norm() / S.norm())
        err = float(((ours[k] - base[k]).double() - dense).norm() / dense.norm())
        assert row["rank"] == 3 and optimal > 0.05
        assert err <= 1.01 * optimal, (name_, err, optimal)
        assert row["rel_error"] == pytest.approx(err, rel=1e-3)
        assert row["optimal_error"] == pytest.approx(optimal, rel=1e-3)


def test_typed_refusals(typed, tmp_path):
    case, _, _ = typed["ia3"]
    _, r = convert(case.adapter, tmp_path / "out", "--rank", "3", expect=2)
    assert "multiplicative" in r.stderr and "--base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    _, r = convert(typed["loha"][0].adapter, tmp_path / "out", expect=2)
    assert "--rank" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    _, r = convert(typed["loha"][0].adapter, tmp_path / "out", "--initial", typed["loha"][0].adapter, expect=1)
    assert "LOHA" in r.stderr and "no --initial" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    rep, _ = convert(typed["loha"][0].adapter, tmp_path / "nobase", "--rank", "2")  # additive: no base needed
    assert rep["peft_type"] == "LOHA" and rep["r"] == 2
