"""`loratools combine`: what is refused (one line, exit 1 or 2, nothing written), what is carried, the reports."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, run_cli
from loratools.adapter import adapter_tensors, load_adapter, write_adapter

LLAMA3 = [FIXTURES / "llama-lora", FIXTURES / "llama-rslora", FIXTURES / "llama-patterns"]


def assert_refused(result, code, tmp_path, *needles):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "loratools-tmp" in p.name]


def rewrite(tmp_path, name, src, edit):
    """A copy of fixture `src` with `edit(adapter)` applied to its loaded factors/config."""
    ad = load_adapter(FIXTURES / src)
    edit(ad)
    out = tmp_path / name
    out.mkdir()
    write_adapter(out, ad.config, adapter_tensors(ad.modules, ad.saved))
    return out


@pytest.mark.parametrize("args,needle", [
    (["--method", "linear", "--weight", 1, "--weight", 2], "2 --weight values for 3 adapters"),
    (["--method", "ties"], "needs --density"),
    (["--method", "ties", "--density", 0], "--density must be in (0, 1]"),
    (["--method", "dare_linear", "--density", 1.5], "--density must be in (0, 1]"),
    (["--method", "linear", "--rank", 0], "--rank must be an integer ≥ 1"),
    (["--method", "linear", "--energy", 1.5], "--energy must be in (0, 1]"),
    (["--method", "cat", "--rank", 4], "--method cat is the exact sum"),
    (["--method", "linear", "--density", 0.5], "--density applies to"),
    (["--method", "ties", "--density", 0.5, "--seed", 1], "--seed applies to"),
    (["--method", "magnitude_prune", "--density", 0.5, "--majority-sign", "total"], "--majority-sign applies to"),
    (["--method", "average"], "--method"),
])
def test_usage_errors_exit_2_before_writing(tmp_path, args, needle):
    r = run_cli("combine", *LLAMA3, "-o", tmp_path / "out", *args, expect=None)
    assert_refused(r, 2, tmp_path, needle)


def test_one_adapter_is_a_usage_error(tmp_path):
    r = run_cli("combine", FIXTURES / "llama-lora", "-o", tmp_path / "out", "--method", "cat", expect=None)
    assert_refused(r, 2, tmp_path, "at least two adapters")


def test_dora_is_refused(tmp_path):
    r = run_cli("combine", FIXTURES / "llama-lora", FIXTURES / "llama-dora", "-o", tmp_path / "out",
                "--method", "cat", expect=None)
    assert_refused(r, 1, tmp_path, "llama-dora", "DoRA")


def test_different_base_shapes_are_refused(tmp_path):
    def shrink(ad):
        m = ad.modules["model.layers.1.self_attn.v_proj"]
        m.A = m.A[:, :48].contiguous()

    odd = rewrite(tmp_path, "odd", "llama-lora", shrink)
    r = run_cli("combine", FIXTURES / "llama-rslora", odd, "-o", tmp_path / "out", "--method", "linear",
                expect=None)
    assert_refused(r, 1, tmp_path, "odd", "model.layers.1.self_attn.v_proj", "[32, 48]", "[32, 64]")


def test_different_base_models_are_refused(tmp_path):
    r = run_cli("combine", FIXTURES / "llama-lora", FIXTURES / "gpt2-lora", "-o", tmp_path / "out",
                "--method", "cat", expect=None)
    assert_refused(r, 1, tmp_path, "gpt2-lora", "fixtures/tiny-gpt2", "fixtures/tiny-llama")


def test_relocated_base_model_is_a_warning(tmp_path):
    moved = rewrite(tmp_path, "moved", "llama-patterns",
                    lambda ad: ad.config.update(base_model_name_or_path="/models/elsewhere/tiny-llama"))
    r = run_cli("combine", FIXTURES / "llama-lora", moved, "-o", tmp_path / "out", "--method", "cat", "--json")
    assert "warning:" in r.stderr and "/models/elsewhere/tiny-llama" in r.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "fixtures/tiny-llama"


def test_layout_mismatch_is_refused(tmp_path):
    def unfold(ad):
        ad.config["fan_in_fan_out"] = False
        ad.modules = {n: m for n, m in ad.modules.items() if n.endswith("attn.c_proj")}  # square: shapes agree

    flat = rewrite(tmp_path, "flat", "gpt2-lora", unfold)
    r = run_cli("combine", FIXTURES / "gpt2-lora", flat, "-o", tmp_path / "out", "--method", "cat", expect=None)
    assert_refused(r, 1, tmp_path, "flat", "transformer.h.0.attn.c_proj", "fan_in_fan_out")


def test_lora_bias_with_task_arithmetic_is_refused(tmp_path):
    r = run_cli("combine", FIXTURES / "gpt2-lora", FIXTURES / "gpt2-bias", "-o", tmp_path / "out",
                "--method", "ties", "--density", 0.5, expect=None)
    assert_refused(r, 1, tmp_path, "lora_bias", "cat or linear")


def test_identical_modules_to_save_are_carried_with_a_warning(tmp_path):
    r = run_cli("combine", FIXTURES / "llama-mts", FIXTURES / "llama-mts", FIXTURES / "llama-lora",
                "-o", tmp_path / "out", "--method", "linear", "--rank", 4, "--weight", 0.5, "--weight", 0.5,
                "--weight", 1, "--json")
    doc = json.loads(r.stdout)
    assert doc["saved_tensors"] == ["lm_head.weight"]
    assert "lm_head.weight" in r.stderr and "weight 0.5" in r.stderr
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    key = "base_model.model.lm_head.weight"
    with safe_open(FIXTURES / "llama-mts" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as b:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_conflicting_modules_to_save_are_refused(tmp_path):
    def bump(ad):
        ad.saved["lm_head.weight"] = ad.saved["lm_head.weight"] + 1e-3

    other = rewrite(tmp_path, "mts2", "llama-mts", bump)
    r = run_cli("combine", FIXTURES / "llama-mts", other, "-o", tmp_path / "out", "--method", "cat", expect=None)
    assert_refused(r, 1, tmp_path, "mts2", "lm_head.weight", "different values")


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    r = run_cli("combine", *LLAMA3, "-o", tmp_path / "out", "--method", "cat", expect=None)
    assert r.exit_code == 1 and "already exists" in r.stderr
    run_cli("combine", *LLAMA3, "-o", tmp_path / "out", "--method", "cat", "--force")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_report_file_and_json_agree(tmp_path):
    r = run_cli("combine", *LLAMA3, "-o", tmp_path / "out", "--method", "linear", "--rank", 4,
                "--report", tmp_path / "report.json", "--json")
    doc = json.loads(r.stdout)
    assert json.loads((tmp_path / "report.json").read_text()) == doc
    assert len(doc["modules"]) == 14 and all({"name", "rank", "retained_energy", "rel_error"} <= set(m)
                                             for m in doc["modules"])
    table = run_cli("combine", *LLAMA3, "-o", tmp_path / "out2", "--method", "cat")
    assert table.stdout == "" and "model.layers.0.self_attn.q_proj" in table.stderr and "20" in table.stderr
    bad = run_cli("combine", *LLAMA3, "-o", tmp_path / "out3", "--method", "cat", "--report",
                  tmp_path / "out3" / "r.json", expect=None)
    assert bad.exit_code == 1 and "--report" in bad.stderr and not (tmp_path / "out3").exists()
