"""`loratools combine` against PEFT itself: deltas, forward passes, merges and merge_utils, on fixture adapters.

The reference is always PEFT: source adapters loaded side by side into one PeftModel, each layer's scaling
multiplied by the adapter's weight (so PEFT's own get_delta_weight / forward / merge give wᵢ·ΔWᵢ).
"""
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FIXTURES, base_of, run_cli, tree_digest
from loratools.adapter import adapter_tensors, load_adapter, write_adapter
from loratools.combine_methods import METHODS, Term, module_seed, task_merge

# different ranks, rsLoRA, rank/alpha patterns, overlapping and disjoint modules
LLAMA_MIX = (["llama-lora", "llama-rslora", "llama-patterns"], [0.5, -1.0, 2.0])
EMBED_MIX = (["llama-embed", "llama-lora"], [1.0, 0.75])  # embedding LoRA (+ its saved base layer)
GPT2_MIX = (["gpt2-lora", "gpt2-bias"], [1.0, -0.5])  # fan_in_fan_out, lora_bias
TOKENS = torch.arange(3, 43).reshape(2, 20)


def source_path(name, tmp_path=None):
    return tmp_path / name if tmp_path is not None and (tmp_path / name).exists() else FIXTURES / name


def make_twin(tmp_path, name: str, twin: str, seed: int = 5):
    """A second adapter with `name`'s modules, config and saved tensors and other factors (no lora_bias)."""
    src = load_adapter(FIXTURES / name)
    g = torch.Generator().manual_seed(seed)
    for m in src.modules.values():
        m.A = (m.A.flip(0) + 0.05 * torch.randn(m.A.shape, generator=g)).contiguous()
        m.B = (0.7 * m.B.roll(1, dims=1) + 0.02 * torch.randn(m.B.shape, generator=g)).contiguous()
    out = tmp_path / twin
    out.mkdir()
    write_adapter(out, src.config, adapter_tensors(src.modules, src.saved))
    return out


def make_gpt2_twin(tmp_path):
    """A second plain fan_in_fan_out adapter on the gpt2-lora modules, with other factors (no lora_bias)."""
    return make_twin(tmp_path, "gpt2-lora", "gpt2-twin")


def peft_stack(paths, weights=None, extra=()):
    """One PeftModel holding each source as a0, a1, … (scaled by its weight when given) plus `extra` paths."""
    base = AutoModelForCausalLM.from_pretrained(base_of(paths[0].name.replace("gpt2-twin", "gpt2")),
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"a{i}")
    for j, p in enumerate(extra):
        model.load_adapter(p, adapter_name=f"x{j}")
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if weights is not None:
        for layer in layers.values():
            for i, w in enumerate(weights):
                if f"a{i}" in layer.scaling:
                    layer.scaling[f"a{i}"] *= w
    model.eval()
    return model, layers


def sources_of(layer, n):
    return [f"a{i}" for i in range(n) if f"a{i}" in layer.scaling]


def combine(tmp_path, names, out_name, *args, expect=0):
    out = tmp_path / out_name
    r = run_cli("combine", *[source_path(n, tmp_path) for n in names], "-o", out, *args, "--json", expect=expect)
    return out, (json.loads(r.stdout) if expect == 0 else r)


def weight_args(weights):
    return [a for w in weights for a in ("--weight", w)]


# -- exactness: cat and lossless linear reproduce Σ wᵢ·ΔWᵢ, deltas and forward pass -------------------------

@pytest.mark.parametrize("mix", [LLAMA_MIX, EMBED_MIX, GPT2_MIX], ids=["llama-mix", "embed", "gpt2-bias"])
def test_exact_methods_reproduce_the_weighted_sum(tmp_path, mix):
    names, weights = mix
    outs = [combine(tmp_path, names, "cat", "--method", "cat", *weight_args(weights))[0],
            combine(tmp_path, names, "linear", "--method", "linear", *weight_args(weights))[0]]
    paths = [FIXTURES / n for n in names]
    model, layers = peft_stack(paths, weights, extra=outs)
    for name, layer in layers.items():
        srcs = sources_of(layer, len(names))
        ref = sum(layer.get_delta_weight(a) for a in srcs)
        for j in range(len(outs)):
            got = layer.get_delta_weight(f"x{j}")
            assert layer.scaling[f"x{j}"] == 1.0
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)
        if any(layer.lora_bias.get(a) for a in srcs):
            ref_b = sum(layer.lora_B[a].bias * layer.scaling[a] for a in srcs if layer.lora_bias[a])
            for j in range(len(outs)):
                torch.testing.assert_close(layer.lora_B[f"x{j}"].bias, ref_b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        model.base_model.set_adapter([f"a{i}" for i in range(len(names))])
        ref_logits = model(TOKENS).logits
        for j in range(len(outs)):
            model.base_model.set_adapter(f"x{j}")
            torch.testing.assert_close(model(TOKENS).logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_output_config_uses_scale_one_and_patterns(tmp_path):
    names, weights = LLAMA_MIX
    out, doc = combine(tmp_path, names, "cat", "--method", "cat", *weight_args(weights))
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = {m["name"]: m["rank"] for m in doc["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 + 4 + 8 and ranks["model.layers.1.mlp.down_proj"] == 4 + 2
    assert ranks["model.layers.0.mlp.up_proj"] == 4  # only llama-rslora adapts it
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["lora_alpha"] == cfg["r"]
    assert not cfg["use_rslora"] and cfg["base_model_name_or_path"] == "fixtures/tiny-llama"
    back = load_adapter(out)
    assert {n: m.r for n, m in back.modules.items()} == ranks
    assert all(m.scale == 1.0 for m in back.modules.values())


# -- linear below Σr: the optimal truncation ------------------------------------------------------------------

def test_linear_truncation_is_optimal(tmp_path):
    names, weights = LLAMA_MIX
    out, doc = combine(tmp_path, names, "r5", "--method", "linear", "--rank", 5, *weight_args(weights))
    reported = {m["name"]: m for m in doc["modules"]}
    _, layers = peft_stack([FIXTURES / n for n in names], weights, extra=[out])
    truncated = 0
    for name, layer in layers.items():
        exact = sum(layer.get_delta_weight(a) for a in sources_of(layer, len(names))).double()
        s = torch.linalg.svdvals(exact)
        optimal = float(s[5:].square().sum().sqrt())
        got = float(torch.linalg.matrix_norm(exact - layer.get_delta_weight("x0").double()))
        rel = optimal / float(s.square().sum().sqrt())
        assert reported[name]["rank"] == min(5, sum(reported[name]["input_ranks"]))
        if optimal > 1e-6 * float(s[0]):
            truncated += 1
            assert got == pytest.approx(optimal, rel=1e-5), name
            assert reported[name]["rel_error"] == pytest.approx(rel, rel=1e-5), name
        else:
            assert got <= 1e-5 * float(s[0])
    assert truncated >= 10


def written_products(out) -> dict[str, torch.Tensor]:
    """B·A·scale per module in float64, from adapter_model.safetensors and adapter_config.json alone."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"]
    tensors = load_file(out / "adapter_model.safetensors")
    products = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            r = cfg["rank_pattern"].get(name, cfg["r"])
            assert A.shape[0] == r
            products[name] = B.double() @ A.double() * (cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) / r)
    return products


TRUNCATION_CASES = [("linear", 5, "factored"), ("ties", 8, "full"), ("ties", 4, "randomized")]  # + the path


@pytest.mark.parametrize("method,rank,svd", TRUNCATION_CASES)
def test_truncated_output_is_the_optimal_rank_k_approximation(tmp_path, method, rank, svd):
    """Eckart–Young from the written file: the dense target the method defines (linear: Σ wᵢ·sᵢ·Bᵢ·Aᵢ in
    float64 from the sources' factors; ties: merge_utils.ties on PEFT's deltas, which is the matrix ties
    defines, promoted to float64), its float64 SVD, and ‖T − B·A·s‖_F of the factors in
    adapter_model.safetensors against √Σ_{i>k} σᵢ². Every path (factored QR, full SVD, the randomized range
    finder with 4 power iterations) reaches the optimum to float32 rounding on these matrices."""
    names, weights = LLAMA_MIX
    extra = ["--density", 0.6] if method == "ties" else []
    out, doc = combine(tmp_path, names, "out", "--method", method, "--rank", rank, *extra, *weight_args(weights))
    got = written_products(out)
    if method == "linear":
        sources = [load_adapter(FIXTURES / n) for n in names]
        targets = {name: sum(w * ad.modules[name].scale * (ad.modules[name].B.double() @ ad.modules[name].A.double())
                             for ad, w in zip(sources, weights) if name in ad.modules) for name in got}
    else:
        _, layers = peft_stack([FIXTURES / n for n in names])
        targets = {}
        for name, layer in layers.items():
            srcs = sources_of(layer, len(names))
            targets[name] = merge_utils.ties([layer.get_delta_weight(a).detach() for a in srcs],
                                             torch.tensor([weights[int(a[1:])] for a in srcs]), 0.6).double()
    assert got.keys() == targets.keys()
    paths = {m["name"]: m["svd"] for m in doc["modules"]}  # how each module was computed (not its error)
    assert sum(p == svd for p in paths.values()) >= 4
    truncated, worst = 0, 0.0
    for name, T in targets.items():
        s = torch.linalg.svdvals(T)
        k = min(rank, int((s > 1e-12 * s[0]).sum()))
        assert got[name].shape == T.shape
        err = float(torch.linalg.matrix_norm(T - got[name]))
        optimal = float(s[k:].square().sum().sqrt())
        if optimal <= 1e-6 * float(s[0]):  # the target's rank fits: nothing to lose
            assert err <= 1e-6 * float(s[0]), name
            continue
        truncated += 1
        # measured at most 3e-11 on either path; docs/extract.md bounds the randomized one by 0.01% in general
        tol = 1e-6 if paths[name] == "randomized" else 1e-8  # (modules too small for randomized take the full SVD)
        assert optimal * (1 - 1e-9) <= err <= optimal * (1 + tol), (name, paths[name], err / optimal - 1)
        worst = max(worst, err / optimal - 1)
    print(f"{method} --rank {rank}: {truncated} truncated modules, worst excess over the optimum {worst:.2e}")
    assert truncated >= 10


def test_linear_energy_picks_the_smallest_sufficient_rank(tmp_path):
    names, weights = LLAMA_MIX
    out, doc = combine(tmp_path, names, "e90", "--method", "linear", "--energy", 0.9, *weight_args(weights))
    _, layers = peft_stack([FIXTURES / n for n in names], weights)
    for m in doc["modules"]:
        layer = layers[m["name"]]
        s2 = torch.linalg.svdvals(sum(layer.get_delta_weight(a) for a in sources_of(layer, 3)).double()).square()
        cum = torch.cumsum(s2, 0) / s2.sum()
        assert m["retained_energy"] >= 0.9 - 1e-9
        assert m["rank"] == int((cum < 0.9 - 1e-9).sum()) + 1, m["name"]
        assert m["retained_energy"] == pytest.approx(float(cum[m["rank"] - 1]), rel=1e-5)


# -- combine then merge equals merging the sources one after another ------------------------------------------

@pytest.mark.parametrize("mix", [LLAMA_MIX, GPT2_MIX], ids=["llama-mix", "gpt2-bias"])
def test_combine_then_merge_equals_sequential_merge(tmp_path, mix):
    names, weights = mix
    out, _ = combine(tmp_path, names, "cat", "--method", "cat", *weight_args(weights))
    ref, _ = peft_stack([FIXTURES / n for n in names], weights)
    ref = ref.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(names))]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_of(names[0]), dtype=torch.float32)
    got = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    assert ref.keys() == got.keys()
    plain = AutoModelForCausalLM.from_pretrained(base_of(names[0]), dtype=torch.float32).state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    changed = [k for k in ref if not torch.equal(ref[k], plain[k])]
    assert len(changed) >= 8 and (any(k.endswith(".bias") for k in changed) or "gpt2" not in names[0])


def test_combine_then_loratools_merge_equals_merging_the_sources(tmp_path):
    """The same check through `loratools merge` (float32 out): BASE + combined == BASE + A1 + A2 + A3 weighted."""
    from loratools.io import Checkpoint

    names, weights = LLAMA_MIX
    out, _ = combine(tmp_path, names, "lin", "--method", "linear", *weight_args(weights))
    base = base_of(names[0])
    run_cli("merge", base, out, "-o", tmp_path / "m-combined", "--dtype", "float32")
    run_cli("merge", base, *[FIXTURES / n for n in names], *weight_args(weights), "-o", tmp_path / "m-sources",
            "--dtype", "float32")
    a, b = Checkpoint(tmp_path / "m-combined"), Checkpoint(tmp_path / "m-sources")
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        torch.testing.assert_close(a.read(name), b.read(name), rtol=1e-5, atol=1e-6, msg=name)


# -- task arithmetic: identical to peft.utils.merge_utils before truncation ---------------------------------

PEFT_FN = {"ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties,
           "magnitude_prune": merge_utils.magnitude_prune}
TASK_CASES = [("ties", "total"), ("ties", "frequency"), ("dare_linear", None), ("dare_ties", "total"),
              ("dare_ties", "frequency"), ("magnitude_prune", None)]


@pytest.fixture(scope="module")
def task_inputs(tmp_path_factory):
    """Per mix: our loaded adapters, the weights, and PEFT's unweighted get_delta_weight per module and source."""
    tmp = tmp_path_factory.mktemp("twin")
    make_gpt2_twin(tmp)
    cases = []
    for names, weights in [LLAMA_MIX, EMBED_MIX, (["gpt2-lora", "gpt2-twin"], [1.0, -0.6])]:
        paths = [source_path(n, tmp) for n in names]
        _, layers = peft_stack(paths)
        deltas = {name: [(int(a[1:]), layer.get_delta_weight(a).detach()) for a in sources_of(layer, len(names))]
                  for name, layer in layers.items()}
        cases.append(([load_adapter(p) for p in paths], weights, deltas))
    return cases


@pytest.mark.parametrize("method,sign", TASK_CASES)
def test_task_arithmetic_equals_peft_merge_utils(task_inputs, method, sign):
    checked = 0
    for ours, weights, deltas in task_inputs:
        for name, srcs in deltas.items():
            if len(srcs) < 2:
                continue
            mods = [ours[i].modules[name] for i, _ in srcs]
            terms = [Term(m.B, m.A, m.scale, weights[i]) for (i, _), m in zip(srcs, mods)]
            transposed = mods[0].fan_in_fan_out or mods[0].kind == "embedding"
            got = task_merge(terms, method, module=name, transposed=transposed, density=0.4,
                             majority_sign=sign or "total", seed=11)
            kw = {"majority_sign_method": sign} if sign else {}
            torch.manual_seed(module_seed(11, name))
            ref = PEFT_FN[method]([d for _, d in srcs], torch.tensor([weights[i] for i, _ in srcs]), 0.4, **kw)
            assert torch.equal(got, ref), name
            checked += 1
    assert checked >= 14


GPT2_TWIN_MIX = (["gpt2-lora", "gpt2-twin"], [1.0, -0.6])
EMBED_TWIN_MIX = (["llama-embed", "llama-embed-twin"], [0.8, 0.5])  # both adapt embed_tokens and q_proj
E2E_CASES = [("ties", LLAMA_MIX), ("dare_ties", EMBED_TWIN_MIX), ("dare_ties", GPT2_TWIN_MIX),
             ("magnitude_prune", LLAMA_MIX), ("dare_linear", EMBED_TWIN_MIX), ("dare_linear", GPT2_TWIN_MIX)]


@pytest.mark.parametrize("method,mix", E2E_CASES, ids=[f"{m}-{x[0][-1]}" for m, x in E2E_CASES])
def test_task_arithmetic_output_through_peft(tmp_path, method, mix):
    """Full-rank output (no truncation loss), through the CLI: the adapter PeftModel.from_pretrained loads
    carries merge_utils' result for every module (plain linears, embeddings and fan_in_fan_out layouts): its
    deltas, its merged weights and its logits are those of base + merge_utils(PEFT's deltas).

    Seeds: the DARE masks are drawn per module from a CPU generator seeded with module_seed(--seed, name),
    so PEFT's dare_* on one module's deltas right after torch.manual_seed(module_seed(...)) draws the same
    Bernoulli masks from the global generator (bit-equality in test_task_arithmetic_equals_peft_merge_utils)."""
    names, weights = mix
    make_gpt2_twin(tmp_path)
    make_twin(tmp_path, "llama-embed", "llama-embed-twin", seed=6)
    spec = METHODS[method]
    args = (["--majority-sign", "frequency"] if spec.elects_sign else []) + (["--seed", 3] if spec.random_masks else [])
    out, doc = combine(tmp_path, names, f"{method}-out", "--method", method, "--density", 0.5, "--rank", 64,
                       *weight_args(weights), *args)
    assert max(m["rel_error"] for m in doc["modules"]) < 1e-5  # lossless: the comparison below is the method's
    paths = [source_path(n, tmp_path) for n in names]
    _, layers = peft_stack(paths, extra=[out])
    kw = {"majority_sign_method": "frequency"} if spec.elects_sign else {}
    refs = {}
    for name, layer in layers.items():
        srcs = sources_of(layer, len(names))
        torch.manual_seed(module_seed(3, name))
        refs[name] = PEFT_FN[method]([layer.get_delta_weight(a).detach() for a in srcs],
                                     torch.tensor([weights[int(a[1:])] for a in srcs]), 0.5, **kw)
        torch.testing.assert_close(layer.get_delta_weight("x0"), refs[name], rtol=1e-4,
                                   atol=1e-5 * float(refs[name].abs().max()), msg=name)
    if "embed" in names[0]:
        assert "model.embed_tokens" in refs and len(sources_of(layers["model.embed_tokens"], 2)) == 2

    # PeftModel.from_pretrained on the output alone: logits, then merged weights, against base + references
    base_dir = base_of(names[0])
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    for name, ref in refs.items():
        expected[f"{name}.weight"] += ref
    plain.load_state_dict(expected)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, plain(TOKENS).logits, rtol=1e-4, atol=1e-4)
    merged = ours.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_task_arithmetic_default_rank_and_error_report(tmp_path):
    names, weights = LLAMA_MIX
    out, doc = combine(tmp_path, names, "ties", "--method", "ties", "--density", 0.3, *weight_args(weights))
    assert {m["rank"] for m in doc["modules"]} == {8}  # the largest input rank
    ours = [load_adapter(FIXTURES / n) for n in names]
    back = load_adapter(out)
    for m in doc["modules"]:
        srcs = [(i, ad.modules[m["name"]]) for i, ad in enumerate(ours) if m["name"] in ad.modules]
        merged = task_merge([Term(x.B, x.A, x.scale, weights[i]) for i, x in srcs], "ties", module=m["name"],
                            transposed=False, density=0.3, majority_sign="total")
        err = float(torch.linalg.matrix_norm(merged - back.modules[m["name"]].delta()) / torch.linalg.matrix_norm(merged))
        assert m["rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-6), m["name"]


# -- determinism -------------------------------------------------------------------------------------------

def test_same_seed_same_bytes(tmp_path):
    names = ["llama-lora", "llama-patterns"]
    args = ["--method", "dare_ties", "--density", 0.5, "--rank", 6]
    a, _ = combine(tmp_path, names, "a", *args, "--seed", 7)
    b, _ = combine(tmp_path, names, "b", *args, "--seed", 7)
    c, _ = combine(tmp_path, names, "c", *args, "--seed", 8)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a)["adapter_model.safetensors"] != tree_digest(c)["adapter_model.safetensors"]
