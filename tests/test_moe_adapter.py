"""MoE adapters (PEFT target_parameters: LoRA on the 3-D expert tensors and the router) against PEFT itself.

Tiny Mixtral, Qwen3-MoE, OLMoE and GPT-OSS models are built from their transformers configs (no downloads),
once per session; adapters are made the default way (`target_modules="all-linear"`, which on these MoE
models makes PEFT add target_parameters), except GPT-OSS, whose experts all-linear does not reach: there
the experts and router are named in target_parameters, as its users do. GPT-OSS stores its experts
transposed ([E, in, out], `is_transposed`). Every reference is PEFT's own: merge_and_unload in float32,
its wrappers' r / alpha / scaling, PeftModel.from_pretrained on what loratools writes.
"""
import copy
import json

import pytest
import torch

from conftest import run_cli
from loratools.adapter import load_adapter

FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
}
TOKENS = torch.arange(3, 23).reshape(2, 10)
# PEFT 0.21.2 warns that every rank/alpha pattern on a target_parameters entry "did not match any targeted
# module" (its check looks at module names only, even for the patterns it writes itself); they are applied.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")


def _lora_config(family: str, seed: int):
    from peft import LoraConfig

    kw = {}
    if family == "gpt_oss":
        kw["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"]
    if family == "mixtral" and seed == 1:  # per-parameter patterns, resolved on `<module>.<param>` by PEFT
        kw.update(rank_pattern={"layers.1.mlp.experts.down_proj": 2}, alpha_pattern={"down_proj": 5})
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


class Case:
    """A tiny MoE base (saved), PEFT adapters on it (saved), and what PEFT makes of them."""

    def __init__(self, family: str, root):
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = dict(FAMILIES[family])
        cfg = AutoConfig.for_model(spec.pop("model_type"), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=64, eos_token_id=1, pad_token_id=0, bos_token_id=2, **spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
        self.family, self.base_dir = family, root / "base"
        model.save_pretrained(self.base_dir)
        self.base = {k: v.clone() for k, v in model.state_dict().items()}
        self.adapters, self.merged, self.wrappers = [], [], []
        for seed in (0, 1):
            torch.manual_seed(seed + 10)
            pm = get_peft_model(copy.deepcopy(model), _lora_config(family, seed))
            with torch.no_grad():  # B is zero at init: give every factor values
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.normal_(0, 0.3)
            path = root / f"adapter{seed}"
            pm.save_pretrained(path)
            self.adapters.append(path)
            self.wrappers.append(_param_wrappers(pm))
            self.merged.append(pm.merge_and_unload().state_dict())

    def peft_model(self, adapter):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).eval()


def _param_wrappers(pm) -> dict:
    """PEFT's ParamWrappers by `<module>.<param>`: (r, alpha, scaling, num_experts)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for n, mod in pm.named_modules():
        if isinstance(mod, ParamWrapper):
            module = n.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{module}.{mod.parameter_name}"] = (mod.r["default"], mod.lora_alpha["default"],
                                                     mod.scaling["default"], mod.num_experts)
    return out


@pytest.fixture(scope="session")
def moe(tmp_path_factory):
    cache = {}

    def get(family: str) -> Case:
        if family not in cache:
            cache[family] = Case(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _deltas(ad, case) -> dict:
    """Each adapted tensor's ΔW in the base's layout (float32), by base key."""
    out = {}
    for m in ad.modules.values():
        # GPT-OSS stores the experts [E, in, out]; the adapter alone cannot tell, the base tensor can
        assert m.orient_experts(case.base[m.base_key].shape), m.name
        assert m.experts_transposed == (case.family == "gpt_oss" and m.kind == "experts")
        out[m.base_key] = m.delta()
    return out


def test_expert_layout_of_the_packed_factors():
    """Expert e owns A[e·r:(e+1)·r] and B[:, e::E]; pack_expert_factors inverts expert_factors."""
    from loratools.lora_math import expert_delta, expert_factors, pack_expert_factors

    g = torch.Generator().manual_seed(0)
    E, r, n_out, n_in = 3, 2, 5, 7
    A, B = torch.randn(r * E, n_in, generator=g), torch.randn(n_out, r * E, generator=g)
    d = expert_delta(B, A, 0.5, E)
    dt = expert_delta(B, A, 0.5, E, transposed=True)
    for e in range(E):
        want = B[:, e::E] @ A[e * r:(e + 1) * r] * 0.5
        torch.testing.assert_close(d[e], want)
        torch.testing.assert_close(dt[e], want.T)
    A_e, B_e = expert_factors(A, B, E)
    A2, B2 = pack_expert_factors(A_e, B_e)
    assert torch.equal(A2, A) and torch.equal(B2, B)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_is_peft_merge_bit_for_bit(moe, family):
    case = moe(family)
    for path, merged in zip(case.adapters, case.merged):
        ad = load_adapter(path)
        kinds = {m.kind for m in ad.modules.values() if m.param}
        assert kinds == {"experts", "linear"}  # the expert tensors and the router
        deltas = _deltas(ad, case)
        for key, d in deltas.items():
            assert torch.equal(case.base[key] + d, merged[key]), key
        changed = {k for k in case.base if not torch.equal(case.base[k], merged[k])}
        assert changed == set(deltas)
        m = next(m for m in ad.modules.values() if m.kind == "experts")
        assert not copy.copy(m).orient_experts((m.experts, m.base_shape[1] + 1, m.base_shape[2]))


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_resolves_each_parameter_as_peft(moe, family):
    case = moe(family)
    for path, wrappers in zip(case.adapters, case.wrappers):
        doc = json.loads(run_cli("inspect", path, "--json").stdout)
        ours = {m["name"]: m for m in doc["modules"] if m["parameter"]}
        assert ours.keys() == wrappers.keys() and doc["target_parameters"]
        ad = load_adapter(path)
        for name, (r, alpha, scaling, experts) in wrappers.items():
            m = ours[name]
            assert (m["r"], m["alpha"], m["experts"]) == (r, alpha, experts), name
            assert m["scale"] == pytest.approx(scaling, rel=1e-12), name
            assert m["kind"] == ("experts" if experts > 1 else "linear")
            base = tuple(case.base[name].shape)
            assert tuple(m["base_shape"]) in (base, (base[0], base[2], base[1]) if len(base) == 3 else base)
            if experts > 1:
                d = ad.modules[name].delta()
                want = [float(x) for x in d.flatten(1).norm(dim=1)]
                assert m["expert_delta_norms"] == pytest.approx(want, rel=1e-4), name
            else:
                assert m["expert_delta_norms"] is None
    if family == "mixtral":  # rank_pattern / alpha_pattern on one parameter of one layer
        rs = {n: w[:2] for n, w in case.wrappers[1].items()}
        assert rs["model.layers.1.mlp.experts.down_proj"] == (2, 5)
        assert rs["model.layers.0.mlp.experts.down_proj"] == (4, 5)
    table = run_cli("inspect", case.adapters[0], "--all-modules").stderr
    assert "experts" in table and "gate_up_proj" in table


def _peft_deltas(case, path) -> dict:
    """PEFT's merged tensors minus the base, for an adapter loaded with PeftModel.from_pretrained."""
    merged = case.peft_model(path).merge_and_unload().state_dict()
    return {k: merged[k] - case.base[k] for k in case.base if not torch.equal(merged[k], case.base[k])}


@pytest.mark.parametrize("family,method", [("mixtral", "cat"), ("gpt_oss", "linear")])
def test_exact_combine_loads_in_peft_as_the_weighted_sum(moe, tmp_path, family, method):
    case = moe(family)
    w = [0.5, -1.5]
    out = tmp_path / "mix"
    doc = json.loads(run_cli("combine", *case.adapters, "-o", out, "--method", method,
                             "--weight", w[0], "--weight", w[1], "--json").stdout)
    want = {}
    for wi, path in zip(w, case.adapters):
        for k, d in _deltas(load_adapter(path), case).items():
            want[k] = want.get(k, 0) + wi * d
    got = _peft_deltas(case, out)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = {r["name"]: r for r in doc["modules"]}
    gu = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu["experts"] == 4 and len(gu["expert_rel_errors"]) == 4 and max(gu["expert_rel_errors"]) < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and not any("experts" in t for t in cfg["target_modules"])
    # and it acts as the combination: PEFT's logits with the combined adapter vs the base plus Σ wᵢ·ΔWᵢ
    with torch.no_grad():
        got_logits = case.peft_model(out)(TOKENS).logits
        dense = _dense_model(case, want)(TOKENS).logits
    torch.testing.assert_close(got_logits, dense, rtol=1e-4, atol=1e-4)


def _dense_model(case, deltas):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float32).eval()
    sd = model.state_dict()
    with torch.no_grad():
        for k, d in deltas.items():
            sd[k].add_(d)
    return model


def test_task_method_combines_per_expert(moe, tmp_path):
    """ties on experts: each expert's delta is combined as a module of its own (the method's own function
    applied to that expert's deltas), then truncated to the output rank; PEFT loads the result."""
    from loratools.combine_methods import Term, task_merge
    from loratools.lowrank import truncate

    case = moe("olmoe")
    out = tmp_path / "ties"
    run_cli("combine", *case.adapters, "-o", out, "--method", "ties", "--density", "0.5", "--rank", "8")
    ads = [load_adapter(p) for p in case.adapters]
    name = "model.layers.1.mlp.experts.down_proj"
    got = _peft_deltas(case, out)[name]
    for e in range(4):
        terms = []
        for ad in ads:
            A_e, B_e = ad.modules[name].expert_factors()
            terms.append(Term(B_e[e], A_e[e], ad.modules[name].scale, 1.0))
        dense = task_merge(terms, "ties", module=f"{name}.{e}", transposed=False, density=0.5)
        t = truncate(dense, rank=8)
        torch.testing.assert_close(got[e], (t.U * t.S) @ t.Vh, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_resize_per_expert_optimal_and_loads(moe, tmp_path, family):
    case = moe(family)
    out = tmp_path / "r2"
    doc = json.loads(run_cli("resize", case.adapters[0], "-o", out, "--rank", "2", "--json").stdout)
    src = _deltas(load_adapter(case.adapters[0]), case)
    got = _peft_deltas(case, out)
    assert got.keys() == src.keys()
    rows = {r["name"]: r for r in doc["modules"]}
    for k, d in src.items():
        mats = d if d.dim() == 3 else d[None]
        best = []
        for M in mats:  # Eckart–Young per expert, from a dense SVD
            U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
            best.append(((U[:, :2] * S[:2]) @ Vh[:2]).float())
        want = torch.stack(best) if d.dim() == 3 else best[0]
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-5, msg=k)
        if d.dim() == 3:
            errs = [float(((M.double() - b.double()).norm() / M.double().norm())) for M, b in zip(mats, best)]
            assert rows[k]["expert_rel_errors"] == pytest.approx(errs, rel=1e-3, abs=1e-6)
            assert rows[k]["rank"] == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_parameters"]


def test_resize_energy_gives_one_rank_per_parameter(moe, tmp_path):
    case = moe("mixtral")
    out = tmp_path / "e"
    doc = json.loads(run_cli("resize", case.adapters[0], "-o", out, "--energy", "0.6", "--json").stdout)
    ad = load_adapter(out)
    for row in doc["modules"]:
        m = ad.modules[row["name"]]
        assert m.r == row["rank"] and m.A.shape[0] == m.r * m.experts
        if m.kind == "experts":  # each expert keeps R components; each meets the energy criterion
            assert all(1 - e ** 2 >= 0.6 - 1e-6 for e in row["expert_rel_errors"])
    _peft_deltas(case, out)  # PEFT loads it


def test_wrong_rank_in_config_is_one_line(moe, tmp_path):
    import shutil

    case = moe("mixtral")
    bad = tmp_path / "bad"
    shutil.copytree(case.adapters[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}  # gate_up_proj was saved at r=8: its A has 8·4 rows, with r=4 that is 8 experts
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_cli("inspect", bad, expect=1)
    line = r.stderr.strip()
    assert "\n" not in line and "gate_up_proj" in line and "expert" in line
    r = run_cli("resize", bad, "-o", tmp_path / "out", "--rank", "2", expect=1)
    assert not (tmp_path / "out").exists()


def test_tables_show_per_expert_numbers(moe, tmp_path):
    case = moe("mixtral")
    r = run_cli("resize", case.adapters[0], "-o", tmp_path / "r", "--rank", "2")
    assert "per expert" in r.stderr and "4 experts, worst #" in r.stderr
    r = run_cli("combine", *case.adapters, "-o", tmp_path / "c", "--method", "linear", "--rank", "4")
    assert "4 experts, worst #" in r.stderr


def test_combine_adapters_targeting_different_parameters(moe, tmp_path):
    """One adapter on down_proj only (no target_modules), one on everything: the output nests the union of
    the targeted parameters as PEFT does, and PEFT loads it as the sum."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    case = moe("mixtral")
    torch.manual_seed(3)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float32),
                        LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    only_down = tmp_path / "down"
    pm.save_pretrained(only_down)
    doc = json.loads(run_cli("inspect", only_down, "--json").stdout)
    assert {m["name"].rsplit(".", 1)[1] for m in doc["modules"]} == {"down_proj"}
    out = tmp_path / "mix"
    run_cli("combine", only_down, case.adapters[0], "-o", out, "--method", "cat")
    want = _deltas(load_adapter(case.adapters[0]), case)
    for k, d in _deltas(load_adapter(only_down), case).items():
        want[k] = want[k] + d
    got = _peft_deltas(case, out)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_combine_refuses_router_as_parameter_and_as_module(moe, tmp_path):
    """The router as a target_parameters entry in one adapter, as a target_modules module in the other (as
    PEFT saves a LoRA on an nn.Linear router, e.g. Qwen2-MoE's; on Mixtral PEFT itself turns target_modules
    "gate" into target_parameters "gate.weight", so the config is edited here): PEFT cannot load both in one
    adapter, so combine says so in one line and writes nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    case = moe("mixtral")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float32),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["gate"]))
    router = tmp_path / "router"
    pm.save_pretrained(router)
    cfg = json.loads((router / "adapter_config.json").read_text())
    cfg.update(target_modules=["gate"], target_parameters=None)
    (router / "adapter_config.json").write_text(json.dumps(cfg))
    assert load_adapter(router).modules.keys() == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    out = tmp_path / "mix"
    r = run_cli("combine", case.adapters[0], router, "-o", out, "--method", "cat", expect=1)
    assert "mlp.gate.weight" in r.stderr and "target_modules" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
