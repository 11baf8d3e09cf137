"""`convert --as-lora --rank R`: a DoRA adapter written as plain LoRA (formats/lossy.py).

Checked against float64 recomputation from the files written: each module's error is the Eckart–Young
optimum of its DoRA effective delta (W' − W₀, W' = m/‖W₀+ΔW‖·(W₀+ΔW)), and PEFT's merge of the result
differs from PEFT's merge of the DoRA adapter by exactly that error."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, LLAMA, run_cli, tree_digest

from loratools import formats
from loratools.adapter import load_adapter

DORA = FIXTURES / "llama-dora"


def _base_weights() -> dict[str, torch.Tensor]:
    from loratools.io import Checkpoint

    ck = Checkpoint(LLAMA)
    return {k: ck.read(k) for k in ck.keys()}


def _dora_effective_deltas() -> dict[str, torch.Tensor]:
    """W' − W₀ per module in float64, from the definition (not from loratools.lora_math)."""
    base, ad = _base_weights(), load_adapter(DORA)
    out = {}
    for name, m in ad.modules.items():
        w0 = base[f"{name}.weight"].double()
        w = w0 + (m.B.double() @ m.A.double()) * m.scale
        out[name] = m.magnitude.double()[:, None] / torch.linalg.norm(w, dim=1, keepdim=True) * w - w0
    return out


def _written_deltas(out, base=None) -> dict[str, torch.Tensor]:
    ad = formats.parse(formats.read(out, base))
    return {n: (m.B.double() @ m.A.double()) * m.scale for n, m in ad.modules.items()}


def _optimum(M: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(M)
    return float(s[k:].pow(2).sum().sqrt() / M.norm())


@pytest.fixture(scope="module")
def effective():
    return _dora_effective_deltas()


def test_without_as_lora_gguf_refuses_dora_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    r = run_cli("convert", DORA, "-o", out, "--to", "gguf", "--base", LLAMA, expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "DoRA" in lines[0] and "--as-lora --rank R" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("to,rank", [("mlx", 4), ("gguf", 3)])
def test_as_lora_error_is_the_svd_optimum(to, rank, tmp_path, effective):
    if to == "gguf":
        pytest.importorskip("gguf")
    out = tmp_path / "out"
    before = tree_digest(DORA)
    r = run_cli("convert", DORA, "-o", out, "--to", to, "--base", LLAMA, "--as-lora", "--rank", rank, "--json")
    summary = json.loads(r.stdout)
    assert tree_digest(DORA) == before
    rows = {row["module"]: row for row in summary["lossy"]}
    assert sorted(rows) == sorted(effective)
    if to == "mlx":  # plain LoRA now: no magnitude in the file
        assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
        assert not any(k.endswith(".m") for k in load_file(out / "adapters.safetensors"))
    got = _written_deltas(out, LLAMA)
    for name, M in effective.items():
        err = float((M - got[name]).norm() / M.norm())
        opt = _optimum(M, rank)
        assert opt > 0.05  # a DoRA delta is not low-rank: the test is not vacuous
        assert err == pytest.approx(opt, rel=1e-4), name  # no worse than the optimum (float32 factors)
        assert rows[name]["rel_error"] == pytest.approx(err, rel=1e-4)
        assert rows[name]["optimal_error"] == pytest.approx(opt, rel=1e-4)
        assert rows[name]["rank"] == rank


def test_peft_merge_of_result_is_the_dora_merge_within_the_reported_error(tmp_path, effective):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "plain"
    summary = json.loads(run_cli("convert", DORA, "-o", out, "--to", "peft", "--base", LLAMA, "--as-lora",
                                 "--rank", 6, "--json").stdout)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and cfg["r"] == 6
    assert not any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))

    def merged(adapter):
        model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()

    dora, plain = merged(DORA), merged(out)
    rows = {row["module"]: row for row in summary["lossy"]}
    for name, M in effective.items():
        key = f"{name}.weight"
        diff = float((plain[key].double() - dora[key].double()).norm() / M.norm())
        # the two merges differ by ΔW_eff − B·A (float32 merges: rounding ~1e-7 of ‖W‖)
        assert diff == pytest.approx(rows[name]["rel_error"], rel=2e-3, abs=1e-4), name


def test_as_lora_keeps_a_plain_adapter_bit_for_bit(tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", FIXTURES / "llama-patterns", "-o", out, "--to", "peft", "--base", LLAMA, "--as-lora",
                "--rank", 2, "--json")
    assert json.loads(r.stdout)["lossy"] == []
    src, got = load_file(FIXTURES / "llama-patterns" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == \
        json.loads((FIXTURES / "llama-patterns" / "adapter_config.json").read_text())["rank_pattern"]


@pytest.mark.parametrize("args,needle", [
    (["--as-lora"], "--rank"),
    (["--rank", "4"], "--as-lora"),
    (["--as-lora", "--rank", "0"], "--rank"),
])
def test_usage_errors(tmp_path, args, needle):
    out = tmp_path / "out"
    r = run_cli("convert", DORA, "-o", out, "--to", "peft", "--base", LLAMA, *args, expect=2)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_as_lora_needs_the_base(tmp_path):
    r = run_cli("convert", DORA, "-o", tmp_path / "out", "--to", "peft", "--as-lora", "--rank", "4", expect=2)
    assert "--base" in r.stderr


# -- modules saved whole (modules_to_save): their delta against the base, as LoRA ------------------------------

def test_modules_to_save_become_lora_at_the_optimum_and_peft_merges_them(tmp_path):
    """llama-mts saves lm_head whole: GGUF/MLX/kohya cannot hold it; --as-lora writes LoRA on lm_head of rank R
    whose error is the optimum of (saved − base), and PEFT's merge of the result equals PEFT's merge of the
    original everywhere else bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = FIXTURES / "llama-mts"
    for to in ("gguf", "mlx", "kohya"):  # each refuses it in one line naming the way out
        r = run_cli("convert", src, "-o", tmp_path / "refused", "--to", to, "--base", LLAMA, expect=1)
        assert "--as-lora --rank R" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "plain"
    summary = json.loads(run_cli("convert", src, "-o", out, "--to", "peft", "--base", LLAMA, "--as-lora", "--rank", 5,
                                 "--json").stdout)
    (row,) = summary["lossy"]
    assert (row["module"], row["from"], row["rank"]) == ("lm_head", "modules_to_save", 5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and "lm_head" in cfg["target_modules"]
    saved = load_file(src / "adapter_model.safetensors")["base_model.model.lm_head.weight"].double()
    M = saved - _base_weights()["lm_head.weight"].double()
    got = _written_deltas(out)["lm_head"]
    err, opt = float((M - got).norm() / M.norm()), _optimum(M, 5)
    assert opt > 0.05 and err == pytest.approx(opt, rel=1e-4) and row["rel_error"] == pytest.approx(err, rel=1e-4)

    def merged(adapter):
        model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()

    ref, plain = merged(src), merged(out)
    assert sorted(ref) == sorted(plain)
    for k in ref:
        if k != "lm_head.weight":
            assert torch.equal(ref[k], plain[k]), k  # the plain LoRA modules: same r and scale, same bits
    diff = float((plain["lm_head.weight"].double() - ref["lm_head.weight"].double()).norm() / M.norm())
    assert diff == pytest.approx(row["rel_error"], rel=1e-3)
    run_cli("convert", src, "-o", tmp_path / "g", "--to", "gguf", "--base", LLAMA, "--as-lora", "--rank", 5)


def test_embedding_base_layer_equal_to_the_base_is_left_out(tmp_path):
    pytest.importorskip("gguf")
    r = run_cli("convert", FIXTURES / "llama-embed", "-o", tmp_path / "g", "--to", "gguf", "--base", LLAMA,
                "--as-lora", "--rank", 4, "--json")
    summary = json.loads(r.stdout)
    assert summary["lossy"] == [] and any("equals the base's own bit for bit" in n for n in summary["notes"])
    back = formats.parse(formats.read(tmp_path / "g", LLAMA))
    ref = load_adapter(FIXTURES / "llama-embed")
    for n, m in ref.modules.items():  # nothing lossy: llama.cpp's factors give PEFT's deltas
        torch.testing.assert_close(back.modules[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_tail_energy_is_the_svd_tail(shape):
    from loratools.formats.lossy import tail_energy

    g = torch.Generator().manual_seed(0)
    M = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -3, shape[1]))  # a decaying spectrum
    s = torch.linalg.svdvals(M.double())
    for k in (0, 3, 20, 40):
        assert tail_energy(M, k) == pytest.approx(float(s[k:].pow(2).sum()), rel=1e-9, abs=1e-12)
