"""OFT and BOFT from files (loratools/peft_types/oft.py, boft.py) against PEFT 0.21.2 itself.

Every adapter here is made by PEFT (get_peft_model with init_weights=False, so the rotations are far from the
identity; save_pretrained) on the tiny Llama (fp16) and the tiny GPT-2 (bf16: OFT on its embedding, BOFT on
its tied head: PEFT refuses OFT/BOFT on Conv1D). The references are PEFT's own merge and unmerge of the
model loaded in float32, rounded once to the base dtype; ours read the saved adapter file.

Unmerge round-trip bound, per variant (test_roundtrip_within_bound checks it on every element):
    |W' - W| <= (1/2 ulp(M)) @ |R^-1|^T  +  1/2 ulp(x)  +  2^-16 (|M| @ |R^-1|^T)
(M the rounded merged weight, x the float32 unmerged value, W' = round(x); for an embedding |R^-1| without the
transpose; for BOFT |R| in place of |R^-1|^T and everything divided by |s|). The first term is the merged
weight's rounding carried through the inverse rotation: its row sums are ||R^-1 row||_1, at most sqrt(b) for
an orthogonal b x b block (exact Cayley, coft) and whatever the Neumann series' inverse has (not orthogonal:
test_neumann_rotation_is_not_orthogonal). The last term is float32 arithmetic (and, for BOFT, PEFT's use of
R^T for R^-1, orthogonal to ~1e-6).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from loratools.peft_types import boft, oft
from loratools.validate.tensors import ulp

from conftest import GPT2, LLAMA

PREFIX = "base_model.model."


def _oft(**kw):
    from peft import OFTConfig
    return OFTConfig(init_weights=False, **kw)


def _boft(**kw):
    from peft import BOFTConfig
    return BOFTConfig(init_weights=False, **kw)


# name: (base, config factory, butterfly factors PEFT builds (>1 needs its CUDA extension, emulated below))
CASES = {
    "oft-neumann": (LLAMA, lambda: _oft(oft_block_size=16, target_modules=["q_proj", "down_proj", "embed_tokens"]), 1),
    "oft-cayley": (LLAMA, lambda: _oft(oft_block_size=16, use_cayley_neumann=False,
                                       target_modules=["k_proj", "up_proj", "embed_tokens"]), 1),
    "oft-coft-share": (LLAMA, lambda: _oft(r=4, oft_block_size=0, coft=True, eps=1e-2, block_share=True,
                                           use_cayley_neumann=False, target_modules=["q_proj", "up_proj"]), 1),
    "oft-coft-neumann7": (LLAMA, lambda: _oft(oft_block_size=8, coft=True, eps=0.3, num_cayley_neumann_terms=7,
                                              target_modules=["o_proj", "gate_proj"]), 1),
    "oft-gpt2-wte": (GPT2, lambda: _oft(oft_block_size=16, target_modules=["wte"]), 1),
    "boft": (LLAMA, lambda: _boft(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]), 1),
    "boft-2": (LLAMA, lambda: _boft(boft_block_size=8, boft_n_butterfly_factor=2,
                                    target_modules=["q_proj", "down_proj"]), 2),
    "boft-3": (LLAMA, lambda: _boft(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3,
                                    target_modules=["k_proj", "down_proj"]), 3),
    "boft-gpt2-head": (GPT2, lambda: _boft(boft_block_size=8, target_modules=["lm_head"]), 1),
}


class _EmulatedFbd:
    """PEFT builds more than one butterfly factor only with its CUDA block-diagonal kernel; stand in the CPU
    block_diag (what that kernel computes) so that PEFT's own code makes and merges N > 1 adapters here."""

    def __enter__(self):
        import peft.tuners.boft.layer as bl
        self.bl, self.saved = bl, (bl.get_fbd_cuda, bl.FastBlockDiag.apply)
        bl.get_fbd_cuda = lambda: True
        bl.FastBlockDiag.apply = staticmethod(
            lambda x: torch.stack([torch.block_diag(*torch.unbind(b)) for b in x]))

    def __exit__(self, *exc):
        self.bl.get_fbd_cuda, self.bl.FastBlockDiag.apply = self.saved[0], staticmethod(self.saved[1])


def _stored_key(key: str, stored) -> str:
    """Where the checkpoint stores the weight the model calls `key` (GPT-2's tied head is its wte)."""
    return key if key in stored else "transformer.wte.weight"


def _read_base(base) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(base.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tokens():
    return torch.randint(1, 384, (1, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_tokens()).logits.float()


def _make(name, tmp_path_factory) -> dict:
    """PEFT adapter on disk; PEFT's float32 merge and unmerge, rounded once, per adapted weight (by the model's
    name for it); the logits of the unmerged PEFT model and of PEFT's own (rounded) merge."""
    from peft import PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    base, make_cfg, factors = CASES[name]
    stored = _read_base(base)
    dtype = next(iter(stored.values())).dtype
    out_dir = tmp_path_factory.mktemp(name)

    def tuned(pm):
        return {n[len("base_model.model."):] + ".weight": m for n, m in pm.named_modules()
                if isinstance(m, BaseTunerLayer)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = _EmulatedFbd() if factors > 1 else None
        if ctx:
            ctx.__enter__()
        try:
            torch.manual_seed(0)
            pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), make_cfg())
            pm.save_pretrained(out_dir)
            pm.merge_adapter()  # PEFT's merge, in float32
            merged = {k: m.get_base_layer().weight.detach().to(dtype).clone() for k, m in tuned(pm).items()}
            for k, m in tuned(pm).items():
                m.get_base_layer().weight.data = merged[k].float()
            logits = name in CLI_CASES  # only the command-line cases load the output in transformers
            peft_merge_logits = _logits(pm) if logits and base == LLAMA else None
            # The unmerged model, and PEFT's unmerge (float32) of the rounded merged weight, by a model that read
            # the adapter from its files (coft projects the stored vectors in place each time R is built, so the
            # model that merged would unmerge with twice-projected vectors: a rotation no file holds).
            # (The forward projects too, so the unmerged model's logits are taken after the unmerge.)
            pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out_dir)
            base_w = {k: m.get_base_layer().weight.detach().clone() for k, m in tuned(pm).items()}
            for k, m in tuned(pm).items():
                m.get_base_layer().weight.data = merged[k].float()
                m.merged_adapters = ["default"]
            pm.unmerge_adapter()
            unmerged = {k: m.get_base_layer().weight.detach().to(dtype).clone() for k, m in tuned(pm).items()}
            for k, m in tuned(pm).items():
                m.get_base_layer().weight.data = base_w[k]
            want = _logits(pm) if logits else None
        finally:
            if ctx:
                ctx.__exit__()
    return {"dir": out_dir, "base_dir": base, "base": stored, "dtype": dtype, "merged": merged,
            "unmerged": unmerged, "want": want, "peft_merge_logits": peft_merge_logits,
            "config": json.loads((out_dir / "adapter_config.json").read_text()),
            "adapter": load_file(out_dir / "adapter_model.safetensors"), "factors": factors}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cases = {name: _make(name, tmp_path_factory) for name in CASES}
    for case in cases.values():
        case["ops"] = _ops(case)
    return cases


def _ops(case) -> list[tuple[str, object, object]]:
    """(weight name, R, embedding flag (OFT) or boft_s (BOFT)) per adapted weight, from the saved tensors."""
    cfg, ad, base = case["config"], case["adapter"], case["base"]
    ops = []
    if cfg["peft_type"] == "OFT":
        settings = oft.OftSettings.from_config(cfg)
        for k, t in ad.items():
            for leaf, emb in ((".oft_R.weight", False), (".oft_embedding_R.weight", True)):
                if k.endswith(leaf):
                    key = k[len(PREFIX):-len(leaf)] + ".weight"
                    in_f = base[_stored_key(key, base)].shape[1]
                    assert oft.check_shape(tuple(t.shape), in_f, settings.block_share) is None
                    ops.append((key, oft.rotation(t, in_f, settings), emb))
    else:
        for k, t in ad.items():
            if k.endswith(".boft_R"):
                key = k[len(PREFIX):-len(".boft_R")] + ".weight"
                s = ad[k[:-1] + "s"]
                out_f, in_f = base[_stored_key(key, base)].shape
                assert boft.check_shapes(tuple(t.shape), tuple(s.shape), in_f, out_f, cfg) is None
                assert t.shape[0] == case["factors"]
                ops.append((key, boft.rotation(t), s))
    assert ops
    return ops


def _merge(case, key, R, extra):
    acc = case["base"][_stored_key(key, case["base"])].float()
    (oft.merge(acc, R, extra) if case["config"]["peft_type"] == "OFT" else boft.merge(acc, R, extra))
    return acc


def _unmerge32(case, merged, R, extra):
    acc = merged.float()
    (oft.unmerge(acc, R, extra) if case["config"]["peft_type"] == "OFT" else boft.unmerge(acc, R, extra))
    return acc


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("name", list(CASES))
def test_merge_is_peft_bits(made, name):
    """Our merge of each weight, from the saved files, has the bits of PEFT's float32 merge rounded once, and
    the rotation is far from the identity (most elements change)."""
    case = made[name]
    for key, R, extra in case["ops"]:
        ours = _merge(case, key, R, extra).to(case["dtype"])
        ref = case["merged"][key]
        assert torch.equal(_bits(ours), _bits(ref)), (name, key, int((_bits(ours) != _bits(ref)).sum()))
        changed = (_bits(ours) != _bits(case["base"][_stored_key(key, case["base"])])).float().mean().item()
        assert changed > 0.5, (name, key, changed)


@pytest.mark.parametrize("name", list(CASES))
def test_unmerge_is_peft_bits(made, name):
    """Our unmerge of PEFT's (rounded) merged weight has the bits of PEFT's float32 unmerge rounded once
    (OFT: linalg.inv(R); BOFT: R^T and 1/s)."""
    case = made[name]
    for key, R, extra in case["ops"]:
        ours = _unmerge32(case, case["merged"][key], R, extra).to(case["dtype"])
        assert torch.equal(_bits(ours), _bits(case["unmerged"][key])), (name, key)


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_within_bound(made, name):
    """base -> merge -> (rounded) -> unmerge -> (rounded) is within the bound of the module docstring on every
    element; and it is not exact (the bound is not vacuous: something is lost to rounding)."""
    case = made[name]
    dt, is_oft = case["dtype"], case["config"]["peft_type"] == "OFT"
    for key, R, extra in case["ops"]:
        W = case["base"][_stored_key(key, case["base"])].float()
        M = _merge(case, key, R, extra).to(dt)
        x = _unmerge32(case, M, R, extra)
        err = (x.to(dt).float() - W).abs()
        e, Mabs = ulp(M.float(), dt) / 2, M.float().abs()
        if is_oft:
            A = torch.linalg.inv(R).abs()
            carry = (e @ A, Mabs @ A) if extra else (e @ A.T, Mabs @ A.T)
        else:
            s = extra.float().abs()
            carry = ((e @ R.abs()) / s, (Mabs @ R.abs()) / s)
        bound = carry[0] + ulp(x, dt) / 2 + 2.0 ** -16 * carry[1]
        assert bool((err <= bound).all()), (name, key, (err / bound).max().item())
        assert err.max().item() > 0, (name, key)


def test_neumann_rotation_is_not_orthogonal(made):
    """Why unmerge uses inv(R) for OFT: the Neumann series (PEFT's default) is not orthogonal (R^T is not its
    inverse), the exact Cayley transform (and BOFT's) is, up to float32 error."""
    neumann = [oft.orthogonality_error(R) for _, R, _ in made["oft-neumann"]["ops"]]
    cayley = [oft.orthogonality_error(R) for _, R, _ in made["oft-cayley"]["ops"]]
    butterfly = [oft.orthogonality_error(R) for _, R, _ in made["boft-3"]["ops"]]
    assert min(neumann) > 1e-2
    assert max(cayley) < 1e-5 and max(butterfly) < 1e-5


def test_block_size_from_width():
    assert [oft.block_size_of(n) for n in (1, 3, 120, 496)] == [2, 3, 16, 32]
    assert oft.block_size_of(0) is None and oft.block_size_of(7) is None


def test_bad_shapes_are_named():
    assert "not b(b-1)/2" in oft.check_shape((4, 119), 64, False)
    assert "does not divide" in oft.check_shape((4, 1128), 64, False)  # b = 48
    assert "expected 4 (one per block)" in oft.check_shape((1, 120), 64, False)
    assert "expected 1 (block_share)" in oft.check_shape((4, 120), 64, True)
    assert oft.check_shape((4, 120), 64, False) is None
    cfg = {"boft_block_size": 8, "boft_block_num": 0, "boft_n_butterfly_factor": 2}
    assert boft.check_shapes((2, 8, 8, 8), (64, 1), 64, 64, cfg) is None
    assert boft.check_shapes((1, 8, 8, 8), (64, 1), 64, 64, cfg) is None  # what PEFT saves on a CPU
    assert "3 butterfly factors" in boft.check_shapes((3, 8, 8, 8), (64, 1), 64, 64, cfg)
    assert "do not cover" in boft.check_shapes((1, 4, 8, 8), (64, 1), 64, 64, cfg)
    assert "boft_s" in boft.check_shapes((1, 8, 8, 8), (32, 1), 64, 64, cfg)
    assert "disagree" in boft.check_shapes((1, 16, 4, 4), (64, 1), 64, 64, cfg)


# -- through the command line ------------------------------------------------------------------------------

CLI_CASES = ["oft-neumann", "oft-coft-share", "boft-2", "oft-gpt2-wte", "boft-gpt2-head"]


def _expected_merge(case, out_keys) -> dict[str, torch.Tensor]:
    """Every output tensor: PEFT's merge for the adapted weights, the base for the rest; a tied head that merge
    unties (plan.py, Note: tied output embeddings) is the head as the adapter sees it."""
    base, merged = case["base"], case["merged"]
    want = dict(base)
    want.update({k: v for k, v in merged.items() if k in base})
    if "lm_head.weight" in out_keys and "lm_head.weight" not in base:
        want["lm_head.weight"] = merged.get("lm_head.weight", base["transformer.wte.weight"])
    return want


@pytest.fixture(scope="module")
def cli_merged(made, tmp_path_factory):
    """{case: (merged dir, unmerged dir)} made by `loratools merge` and `loratools unmerge`."""
    from conftest import run_cli
    out = {}
    for name in CLI_CASES:
        case, d = made[name], tmp_path_factory.mktemp(f"cli-{name}")
        run_cli("merge", case["base_dir"], case["dir"], "-o", d / "merged")
        run_cli("unmerge", d / "merged", case["dir"], "-o", d / "unmerged")
        out[name] = d / "merged", d / "unmerged"
    return out


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_merge_and_unmerge_are_peft_bits(made, cli_merged, name):
    """`loratools merge` writes PEFT's float32 merge rounded once for every adapted weight and the base's bits
    for every other tensor; `loratools unmerge` of that output writes PEFT's float32 unmerge rounded once."""
    case = made[name]
    merged_dir, unmerged_dir = cli_merged[name]
    got = _read_base(merged_dir)
    want = _expected_merge(case, got)
    assert set(got) == set(want)
    for k in got:
        assert torch.equal(_bits(got[k]), _bits(want[k])), (name, k)
    back = _read_base(unmerged_dir)
    assert set(back) == set(got)
    for k in back:
        ref = case["unmerged"][k] if k in case["unmerged"] else got[k]
        assert torch.equal(_bits(back[k]), _bits(ref)), (name, k)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_merged_model_computes_the_adapted_model(made, cli_merged, name):
    """The merged output loads in transformers and gives the unmerged PEFT model's logits within the rounding of
    its weights: no further than PEFT's own (rounded) merge, for the Llama cases. On GPT-2's tied head PEFT's
    merge writes the shared tensor for both ends (its forward rotates one), so there only the absolute bound."""
    from transformers import AutoModelForCausalLM
    case = made[name]
    ours = _logits(AutoModelForCausalLM.from_pretrained(cli_merged[name][0], dtype=torch.float32))
    want = case["want"]
    scale = float(want.abs().max())
    err_ours = float((ours - want).abs().max())
    assert err_ours <= 2e-2 * scale, (err_ours, scale)
    if case["peft_merge_logits"] is not None:
        err_peft = float((case["peft_merge_logits"] - want).abs().max())
        assert err_ours <= 1.5 * err_peft + 1e-4 * scale, (err_ours, err_peft)


def _broken_copy(case, tmp_path, key, new) -> "Path":
    from safetensors.torch import save_file
    import shutil
    d = tmp_path / "adapter"
    shutil.copytree(case["dir"], d)
    tensors = dict(case["adapter"])
    tensors[key] = new
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("name, key, make_bad, named, expect", [
    # refused while reading the adapter: the line names the adapter's tensor
    ("oft-neumann", f"{PREFIX}{Q}.oft_R.weight", lambda t: t[:, :-1].contiguous(), f"{PREFIX}{Q}.oft_R.weight",
     "expected [r, b(b-1)/2]"),
    ("boft-2", f"{PREFIX}{Q}.boft_R", lambda t: torch.cat([t, t[:1]]), f"{PREFIX}{Q}.boft_R",
     "3 butterfly factors; the config says 2"),
    # refused against the base: the line names the base tensor and the adapter's leaf
    ("boft-2", f"{PREFIX}{Q}.boft_s", lambda t: t[:-1].contiguous(), f"{Q}.weight",
     "boft_s: expected shape [64, 1]"),
])
def test_cli_malformed_adapter_is_one_line(made, tmp_path, name, key, make_bad, named, expect):
    """A malformed OFT / BOFT tensor: exit 1, one line naming the tensor, nothing written."""
    from conftest import run_cli
    case = made[name]
    bad = _broken_copy(case, tmp_path, key, make_bad(case["adapter"][key]))
    for cmd in ("merge", "unmerge"):
        out = tmp_path / f"out-{cmd}"
        r = run_cli(cmd, case["base_dir"], bad, "-o", out, expect=1)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"tensor {named}" in lines[0] and expect in lines[0], r.stderr
        assert not out.exists() and not list(tmp_path.glob(f".out-{cmd}*"))


@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    """The tiny Llama as transformers writes it in NF4, and that model dequantized by transformers (float32)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = tmp_path_factory.mktemp("nf4") / "llama-nf4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_quant_type="nf4")
        AutoModelForCausalLM.from_pretrained(LLAMA, quantization_config=cfg, dtype=torch.float16).save_pretrained(q)
        deq = AutoModelForCausalLM.from_pretrained(q).dequantize().to(torch.float16).float()
    return q, {k: v.clone() for k, v in deq.state_dict().items()}


@pytest.mark.parametrize("name", ["oft-neumann", "boft"])
def test_cli_merge_into_nf4_base_is_peft_on_dequantized(made, nf4_llama, tmp_path, name):
    """Into a bitsandbytes NF4 base (made by transformers): PEFT's float32 merge into that base dequantized by
    transformers, rounded once to float16, bit for bit."""
    from conftest import run_cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = made[name]
    q, deq_state = nf4_llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deq = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
        deq.load_state_dict(deq_state)
        ref = PeftModel.from_pretrained(deq, case["dir"]).merge_and_unload().state_dict()
    run_cli("merge", q, case["dir"], "-o", tmp_path / "out")
    got = _read_base(tmp_path / "out")
    adapted = [k for k, _, _ in case["ops"]]
    for k in adapted:
        assert torch.equal(_bits(got[k]), _bits(ref[k].to(torch.float16))), (name, k)


@pytest.mark.parametrize("name", ["oft-neumann", "boft-gpt2-head"])
def test_cli_validate_and_inspect(made, cli_merged, name):
    """validate passes our merge (tensor checks and PEFT's logits) and fails the base passed off as the merge;
    inspect shows the type and the modules with their rotation's shape."""
    from conftest import run_cli
    case = made[name]
    r = run_cli("validate", case["base_dir"], case["dir"], "--merged", cli_merged[name][0], "--json")
    doc = json.loads(r.stdout)
    assert doc["passed"] and doc["tensors"]["merged"]["checked"] >= 1 and doc["comparisons"]
    r = run_cli("validate", case["base_dir"], case["dir"], "--merged", case["base_dir"], "--json", "--static-only",
                expect=None)
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and not doc["passed"]
    if name == "oft-neumann":  # (GPT-2: the untied head the merge must store is missing, named as such)
        assert doc["tensors"]["merged"]["failed"] >= 1
    doc = json.loads(run_cli("inspect", case["dir"], "--json").stdout)
    assert doc["peft_type"] == case["config"]["peft_type"] and len(doc["modules"]) == len(case["ops"])
    if name == "oft-neumann":
        q = next(m for m in doc["modules"] if m["name"] == Q)
        assert q["r"] == 4 and q["details"]["block_size"] == 16 and q["details"]["cayley"] == "neumann(5)"
    else:
        assert doc["modules"][0]["details"] == {"butterfly_factors": 1, "blocks": 8, "block_size": 8}


def test_config_and_layout_refusals_name_the_field_or_tensor():
    """PEFT <= 0.14 OFT configs (no oft_block_size) and malformed settings are refused naming the field; a
    modules_to_save tensor beside OFT/BOFT, and a saved base layer of an unadapted module, naming the tensor."""
    from loratools.errors import FormatError, UnsupportedError
    with pytest.raises(UnsupportedError, match="no oft_block_size"):
        oft.parse({}, {}, {"peft_type": "OFT"}, "w")
    with pytest.raises(FormatError, match="eps"):
        oft.parse({}, {}, {"oft_block_size": 16, "eps": "small"}, "w")
    vec = torch.zeros(4, 120)
    with pytest.raises(UnsupportedError) as e:
        oft.parse({f"{Q}.oft_R": {"weight": vec}, "score": {"weight": torch.zeros(2, 64)}}, {},
                  {"oft_block_size": 16, "modules_to_save": ["score"]}, "w")
    assert e.value.tensor == f"{PREFIX}score.weight" and "modules_to_save" in e.value.message
    with pytest.raises(FormatError) as e:
        boft.parse({"lm_head.base_layer": {"weight": torch.zeros(384, 64)}}, {}, {"boft_block_size": 8}, "w")
    assert e.value.tensor == f"{PREFIX}lm_head.base_layer.weight"
    assert set(oft.parse({f"{Q}.oft_R": {"weight": vec}}, {}, {"oft_block_size": 16}, "w")) == {Q}
