"""`loratools resize`: lossless at ≥ rank, dense-SVD optimal below it, PEFT parity, refusals."""
import json

import pytest
import torch

from conftest import FIXTURES, base_of, run_cli, tree_digest
from loratools.adapter import load_adapter

PLAIN = ["llama-lora", "llama-rslora", "llama-patterns", "llama-embed", "llama-mts", "gpt2-lora", "gpt2-bias"]


def resize(tmp_path, adapter, *args, name="out", expect=0):
    out = tmp_path / name
    r = run_cli("resize", FIXTURES / adapter, "-o", out, *args, "--json", expect=expect)
    return out, (json.loads(r.stdout) if r.stdout.strip() else None), r


@pytest.mark.parametrize("adapter", PLAIN)
def test_resize_at_or_above_rank_is_lossless(tmp_path, adapter):
    out, rep, _ = resize(tmp_path, adapter, "--rank", "64")
    old, new = load_adapter(FIXTURES / adapter), load_adapter(out)
    assert set(new.modules) == set(old.modules)
    for name, m in old.modules.items():
        n = new.modules[name]
        assert n.r <= m.r and n.scale == 1.0 and n.alpha == n.r and n.kind == m.kind
        assert n.fan_in_fan_out == m.fan_in_fan_out
        d = m.delta()
        assert float(torch.linalg.matrix_norm(n.delta() - d) / torch.linalg.matrix_norm(d)) < 1e-5
        if m.bias is not None:  # lora_bias: bias · scale is what PEFT adds
            assert torch.allclose(n.bias * n.scale, m.bias * m.scale, atol=1e-6)
    assert set(new.saved) == set(old.saved) and all(torch.equal(new.saved[k], old.saved[k]) for k in old.saved)
    assert all(r["rel_error"] < 1e-5 for r in rep["modules"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and cfg["lora_alpha"] == cfg["r"]


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-rslora", "llama-patterns", "llama-embed", "gpt2-lora"])
def test_lower_rank_equals_dense_svd_truncation(tmp_path, adapter):
    out, rep, _ = resize(tmp_path, adapter, "--rank", "2")
    old, new = load_adapter(FIXTURES / adapter), load_adapter(out)
    rows = {r["name"]: r for r in rep["modules"]}
    for name, m in old.modules.items():
        d = m.delta().double()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        got = new.modules[name].delta().double()
        assert new.modules[name].r == 2
        err = float(torch.linalg.matrix_norm(d - got) / torch.linalg.matrix_norm(d))
        optimal = float((S[2:] ** 2).sum().sqrt() / S.norm())
        assert err == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        assert rows[name]["rel_error"] == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        if S[1] - S[2] > 1e-3 * S[0]:  # a spectral gap makes the best rank-2 matrix unique
            assert float(torch.linalg.matrix_norm(got - best) / torch.linalg.matrix_norm(d)) < 1e-4


def test_energy_picks_the_minimal_rank_per_module(tmp_path):
    out, rep, _ = resize(tmp_path, "llama-rslora", "--energy", "0.9")
    old = load_adapter(FIXTURES / "llama-rslora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    for row in rep["modules"]:
        S = torch.linalg.svdvals(old.modules[row["name"]].delta().double())
        cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        assert row["rank"] == int((cum < 0.9 - 1e-12).sum()) + 1
        from loratools.adapter import pattern_value
        assert pattern_value(cfg["rank_pattern"], row["name"], cfg["r"]) == row["rank"]
        assert pattern_value(cfg["alpha_pattern"], row["name"], cfg["lora_alpha"]) == row["rank"]


@pytest.mark.parametrize("adapter", ["llama-patterns", "gpt2-bias", "llama-embed"])
def test_peft_forward_matches_original(tmp_path, adapter):
    """Lossless resize through PEFT itself: patterns, lora_bias, embedding base layers all survive."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, _ = resize(tmp_path, adapter, "--rank", "64")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = []
    for a in (FIXTURES / adapter, out):
        model = AutoModelForCausalLM.from_pretrained(base_of(adapter), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(model, a).eval()
        with torch.no_grad():
            logits.append(pm(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_deterministic(tmp_path):
    a, _, _ = resize(tmp_path, "llama-lora", "--rank", "3", name="a")
    b, _, _ = resize(tmp_path, "llama-lora", "--rank", "3", name="b")
    assert tree_digest(a) == tree_digest(b)


def test_dora_is_refused(tmp_path):
    out, rep, r = resize(tmp_path, "llama-dora", "--rank", "2", expect=1)
    assert "DoRA" in r.stderr and "magnitude" in r.stderr and not out.exists()
    assert rep["error"]["type"] == "unsupported"


@pytest.mark.parametrize("args", [["--rank", "0"], ["--rank", "-1"], [], ["--rank", "2", "--energy", "0.9"],
                                  ["--energy", "2"], ["--sv-ratio", "0.1"]])
def test_usage_errors_exit_2(tmp_path, args):
    out, _, _ = resize(tmp_path, "llama-lora", *args, expect=2)
    assert not out.exists()
