"""An adapter whose initialisation changed its base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) is said in one line by
every command that applies it to a base (loratools/init_methods.py); a default or converted one gets nothing.

Which initialisations change the base is checked against PEFT itself: each one PEFT can run on the CPU
initialises a tiny Linear, and the base weight either moved or not.
"""
from __future__ import annotations

import inspect
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, LLAMA, run_cli
from loratools.init_methods import base_changing_init, note

INITS = ["pissa", "pissa_niter_16", "olora", "corda", "lora_ga", "loftq"]


# -- the fact, against PEFT -------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica", "pissa", "pissa_niter_2",
                                  "olora", "lora_ga", "loftq"])
def test_base_changing_init_is_what_peft_does(init):
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    sys.path.insert(0, str(Path(__file__).parent))
    from peft_loftq_cpu import patch_peft_lora_layers

    patch_peft_lora_layers()  # PEFT's LoftQ hard-codes CUDA; the shim runs PEFT's own code on the CPU
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(64, 64, bias=False)
    before = model.proj.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    cfg.init_lora_weights = init  # set after __post_init__: "loftq" there needs scipy, which LoftQ no longer uses
    if init == "loftq":
        cfg.loftq_config = {"loftq_bits": 4, "loftq_iter": 1}
    if init == "lora_ga":  # what peft's preprocess_loraga attaches; without it PEFT falls back to the default init
        cfg.lora_ga_config = LoraGAConfig()
        model.proj._peft_loraga_grad = torch.randn(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    moved = not torch.equal(pm.base_model.model.proj.base_layer.weight.detach(), before)
    assert moved == (base_changing_init({"init_lora_weights": init}) is not None)


def test_corda_changes_the_base_in_peft_source():
    """CorDA cannot run here (calibration passes, the `attrs` package): PEFT's corda_init assigns the base weight."""
    from peft.tuners.lora.layer import LoraLayer

    assert "self.get_base_layer().weight.data = weight" in inspect.getsource(LoraLayer.corda_init)
    assert base_changing_init({"init_lora_weights": "corda"}) == "corda"


def test_note_names_the_method_and_the_command():
    line = note(Path("/a b/pissa"), {"init_lora_weights": "pissa_niter_16"})
    assert "\n" not in line and "PiSSA" in line and "residual base" in line
    assert "`loratools convert '/a b/pissa' --to lora --initial INIT -o OUT`" in line
    assert "4-bit" in note("x", {"init_lora_weights": "loftq"})
    for quiet in ({}, {"init_lora_weights": True}, {"init_lora_weights": False}, {"init_lora_weights": "eva"}):
        assert note("x", quiet) is None


# -- the commands ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """llama-lora copies whose config says each init; `converted`: convert --initial's output (init true)."""
    root = tmp_path_factory.mktemp("inits")
    out = {}
    for init in INITS:
        d = root / init
        shutil.copytree(FIXTURES / "llama-lora", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["init_lora_weights"] = init
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        out[init] = d
    run_cli("convert", out["pissa"], "--to", "lora", "--initial", FIXTURES / "llama-lora", "-o", root / "converted")
    out["converted"] = root / "converted"
    out["plain"] = FIXTURES / "llama-lora"
    out["root"] = root
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "init_lora_weights" in line]


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_merge_says_it_once_and_merges_as_before(work, init):
    ad = work[init]
    res = run_cli("merge", LLAMA, ad, "-o", work["root"] / f"m-{init}", "--json")
    line = note(ad, json.loads((ad / "adapter_config.json").read_text()))
    assert json.loads(res.stdout)["notes"] == [line]
    assert _said(res.stderr) == [f"warning: {line}"]
    plain = work["root"] / "m-plain"
    if not plain.exists():
        run_cli("merge", LLAMA, work["plain"], "-o", plain)
    a, b = _tensors(work["root"] / f"m-{init}"), _tensors(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a line, nothing else changes


@pytest.mark.parametrize("which", ["plain", "converted"])
def test_merge_says_nothing_for_default_or_converted(work, which):
    assert json.loads((work[which] / "adapter_config.json").read_text())["init_lora_weights"] is True
    res = run_cli("merge", LLAMA, work[which], "-o", work["root"] / f"m2-{which}", "--json")
    assert json.loads(res.stdout)["notes"] == [] and _said(res.stderr) == []
    res = run_cli("validate", LLAMA, work[which], "--static-only", "--json")
    assert not [n for n in json.loads(res.stdout)["notes"] if "init_lora_weights" in n["message"]]


def test_unmerge_says_it(work):
    merged = work["root"] / "m-unmerge"
    run_cli("merge", LLAMA, work["olora"], "-o", merged)
    res = run_cli("unmerge", merged, work["olora"], "-o", work["root"] / "u-olora")
    assert _said(res.stderr) == [f"warning: {note(work['olora'], {'init_lora_weights': 'olora'})}"]


@pytest.mark.parametrize("init", INITS)
def test_validate_notes_it(work, init):
    ad = work[init]
    res = run_cli("validate", LLAMA, ad, "--static-only", "--json")  # exit 0: a note, not a failure
    doc = json.loads(res.stdout)
    rows = [n for n in doc["notes"] if "init_lora_weights" in n["message"]]
    assert doc["passed"] and rows == [{"check": "adapter", "module": None, "tensor": None, "path": str(ad),
                                       "expected": None, "found": init,
                                       "message": note(ad, {"init_lora_weights": init})}]
    res = run_cli("validate", LLAMA, ad, "--static-only")
    assert "initialised with" in res.stderr  # the notes table on stderr


def test_combine_warns_that_the_output_forgets_it(work):
    res = run_cli("combine", work["corda"], work["plain"], "-o", work["root"] / "c", "--method", "cat", "--json")
    line = f"{note(work['corda'], {'init_lora_weights': 'corda'})}; the combined adapter no longer records it"
    assert json.loads(res.stdout)["warnings"] == [line]
    assert _said(res.stderr) == [f"warning: {line}"]


def test_convert_without_initial_refuses_loftq_too(work):
    res = run_cli("convert", work["loftq"], "--to", "lora", "-o", work["root"] / "x", "--rank", "4", expect=2)
    assert "--initial" in res.stderr and "'loftq'" in res.stderr


def test_the_line_is_true_peft_applies_it_to_the_residual_base(tmp_path):
    """What the line says, against PEFT: a PiSSA adapter merged into the residual base PEFT's workflow saves is
    PEFT's own model (from_pretrained on the original base re-runs PiSSA, then merge_and_unload); merged into
    the original base it is not."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                               target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # "training": move every factor away from its PiSSA initialisation
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        pm.save_pretrained(tmp_path / "trained")  # init_lora_weights "pissa", as saved without conversion
        pm.unload().save_pretrained(tmp_path / "residual")  # the residual base W − s·B₀A₀
        ref = PeftModel.from_pretrained(load(), str(tmp_path / "trained")).merge_and_unload().state_dict()
    res = run_cli("merge", tmp_path / "residual", tmp_path / "trained", "-o", tmp_path / "on-residual")
    assert len(_said(res.stderr)) == 1
    run_cli("merge", LLAMA, tmp_path / "trained", "-o", tmp_path / "on-original", "--dtype", "float32")
    on_res, on_orig = _tensors(tmp_path / "on-residual"), _tensors(tmp_path / "on-original")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(on_res[key], ref[key])
    assert all(torch.equal(on_res[k], ref[k]) for k in on_res if k in ref)
    assert (on_orig[key] - ref[key]).norm() > 0.1 * ref[key].norm()  # merged into W: a model nobody trained
