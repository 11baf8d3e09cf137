"""Which base did the adapter see? QLoRA detection, merge's report and --into-dequantized, validate's two gaps.

The 4-bit base is the fixture quantized by `loratools quantize` (byte-identical to transformers', tested in
test_quantize.py); the QLoRA adapter is fixtures/llama-lora with its base_model_name_or_path pointing at it.
The parity reference for --into-dequantized is transformers' own: the 16-bit fixture loaded with a
BitsAndBytesConfig, `model.dequantize()`, PEFT's merge_and_unload in float32, rounded once.
"""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from conftest import FIXTURES, LLAMA, run_cli
from loratools.io import Checkpoint
from loratools.qlora_base import resolve

warnings.filterwarnings("ignore")
ADAPTER = FIXTURES / "llama-lora"
FAST = dict(batch=2, seq_len=32, device="cpu")


def one_line(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines at its width


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained-on")
    run_cli("quantize", LLAMA, "-o", d / "nf4", "--nf4", "--device", "cpu")
    qlora = d / "qlora"  # the same adapter, as trained on the 4-bit checkpoint
    shutil.copytree(ADAPTER, qlora)
    cfg = json.loads((qlora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(d / "nf4")
    (qlora / "adapter_config.json").write_text(json.dumps(cfg))
    fp = run_cli("merge", LLAMA, qlora, "-o", d / "m-fp", "--json", "--device", "cpu")
    dq = run_cli("merge", LLAMA, qlora, "-o", d / "m-dq", "--into-dequantized", "nf4", "--json", "--device", "cpu")
    run_cli("merge", d / "nf4", ADAPTER, "-o", d / "m-q4", "--device", "cpu")  # into the 4-bit checkpoint
    return {"dir": d, "nf4": d / "nf4", "qlora": qlora, "fp": json.loads(fp.stdout), "dq": json.loads(dq.stdout)}


def test_detected_from_an_adapter_naming_a_4bit_checkpoint(work):
    t = resolve("auto", [work["qlora"]], Checkpoint(LLAMA))
    assert (t.kind, t.source, t.fmt.blocksize, t.fmt.double_quant) == ("nf4", "adapter", 64, True)
    assert t.dtype == torch.float16 and len(t.targets) == 14  # 2 layers x 7 Linear weights, read from the checkpoint
    assert any("quantized from the BASE given" in n for n in t.notes)  # loratools quantize's provenance
    plain = resolve("auto", [ADAPTER], Checkpoint(LLAMA))
    assert (plain.kind, plain.source) == ("fp", "none")


def test_detected_from_a_config_alone(tmp_path):
    """A named directory with only config.json (bitsandbytes 4-bit, FP4 without double quantization): the format
    comes from the config, the weights from transformers' selection for BASE, and a note says so."""
    q = tmp_path / "q"
    q.mkdir()
    cfg = json.loads((LLAMA / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                  "bnb_4bit_use_double_quant": False}
    (q / "config.json").write_text(json.dumps(cfg))
    ad = shutil.copytree(ADAPTER, tmp_path / "ad")
    acfg = json.loads((ad / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "../q"  # relative to the adapter, as written by a user's script
    (ad / "adapter_config.json").write_text(json.dumps(acfg))
    t = resolve("auto", [ad], Checkpoint(LLAMA))
    assert (t.kind, t.fmt.double_quant, t.targets) == ("fp4", False, None)
    assert any("holds only its config" in n for n in t.notes)


def test_hub_name_that_looks_4bit_is_only_a_hint(tmp_path):
    ad = shutil.copytree(ADAPTER, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    t = resolve("auto", [ad], Checkpoint(LLAMA))
    assert t.kind == "fp" and any("looks like a 4-bit checkpoint" in n for n in t.notes)


def test_merge_says_which_base_and_what_the_other_costs(work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    q = work["fp"]["qlora"]
    assert q["folded_into"] == "16-bit" and q["trained_on"]["source"] == "adapter"
    assert "folded into the 16-bit weights" in q["line"] and "--into-dequantized nf4" in q["line"]
    cost = q["other_choice"]
    assert cost["tensors"] == 8 and 0 < cost["median"] <= cost["max"]
    # one row against PEFT's own delta and the 4-bit checkpoint's dequantization (not our arithmetic)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32), ADAPTER)
    row = next(r for r in cost["rows"] if r["tensor"] == cost["max_tensor"])
    module = pm.get_submodule("base_model.model." + row["tensor"].removesuffix(".weight"))
    delta = module.get_delta_weight("default")
    w16 = Checkpoint(LLAMA).read(row["tensor"]).float()
    from loratools.quantized import read_dense
    deq = read_dense(Checkpoint(work["nf4"]), row["tensor"]).float()
    assert row["ratio"] == pytest.approx(float((w16 - deq).norm()) / float(delta.norm()), rel=1e-4)
    assert work["dq"]["qlora"]["folded_into"] == "dequantized"
    assert work["dq"]["qlora"]["other_choice"]["median"] == pytest.approx(cost["median"], rel=1e-3)


def test_merge_line_on_stderr_and_silent_for_plain_adapters(work, tmp_path):
    r = run_cli("merge", LLAMA, work["qlora"], "-o", tmp_path / "a", "--device", "cpu")
    assert work["fp"]["qlora"]["line"] in one_line(r.stderr)
    r = run_cli("merge", LLAMA, ADAPTER, "-o", tmp_path / "b", "--json", "--device", "cpu")
    assert json.loads(r.stdout)["qlora"] is None and "QLoRA" not in r.stderr
    r = run_cli("merge", work["nf4"], ADAPTER, "-o", tmp_path / "c", "--device", "cpu")
    assert "folded into the 4-bit BASE's dequantized weights" in one_line(r.stderr)


@pytest.fixture(scope="module")
def peft_dq(work):
    """transformers loads the 16-bit fixture in 4 bits (bitsandbytes quantizes), dequantize(), PEFT merges in
    float32, rounded once to float16: the state dict, also saved (no loratools provenance) for validate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(LLAMA, quantization_config=cfg, dtype=torch.float16)
    model = model.dequantize().to(torch.float32)
    merged = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload().half()
    merged.save_pretrained(work["dir"] / "peft-dq")
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def whole(work, peft_dq):
    """validate's whole-model reports (trained_on detected from the adapter) for the three merges."""
    from loratools.validate import validate

    return {name: validate(LLAMA, [work["qlora"]], merged=work["dir"] / name, stream=False, **FAST)
            for name in ("m-fp", "m-dq", "peft-dq")}


def test_into_dequantized_is_peft_on_transformers_dequantization(work, peft_dq):
    """deq(Q(W)) + ΔW rounded once: transformers quantizes (bitsandbytes), dequantize(), PEFT merges in float32."""
    ref = peft_dq
    ours = Checkpoint(work["dir"] / "m-dq")
    base = Checkpoint(LLAMA)
    assert set(ours.tensors) == set(ref)
    changed = 0
    for name in ours.tensors:
        assert torch.equal(ours.read(name), ref[name]), name
        changed += not torch.equal(ours.read(name), base.read(name))
    assert changed == 14  # every 4-bit weight, touched by the adapter or not
    # and the same bytes as a merge into the 4-bit checkpoint itself
    q4 = Checkpoint(work["dir"] / "m-q4")
    assert all(torch.equal(q4.read(n), ours.read(n)) for n in ours.tensors)


def test_validate_shows_both_gaps_in_the_right_order(whole):
    gaps = {}
    for name, rep in whole.items():
        assert rep["passed"], rep["problems"]
        t = rep["trained_on"]
        gaps[name] = (t["merged_into"], t["known_from"], t["gap_to_16bit"]["rel_err"], t["gap_to_dequantized"]["rel_err"])
        assert t["references_gap"]["rel_err"] > 0 and t["source"] == "adapter"
    into, known, to_fp, to_dq = gaps["m-fp"]
    assert (into, known) == ("16-bit", "the merge's provenance record") and 0 < 50 * to_fp < to_dq
    into, known, to_fp, to_dq = gaps["m-dq"]
    assert (into, known) == ("dequantized", "the merge's provenance record") and 0 < 50 * to_dq < to_fp
    into, known, to_fp, to_dq = gaps["peft-dq"]
    assert (into, known) == ("dequantized", "the closer reference") and 0 < 50 * to_dq < to_fp


def test_validate_gates_the_base_it_was_merged_into(work):
    """A merge into another 4-bit format's dequantization (FP4) than the adapter was trained on (NF4) fails
    the gate, by logits and by tensors; with a 4-bit BASE the report says the reference is already its
    dequantization."""
    from loratools.validate import validate

    out = work["dir"] / "m-fp4"
    run_cli("merge", LLAMA, ADAPTER, "-o", out, "--into-dequantized", "fp4", "--device", "cpu")
    rep = validate(LLAMA, [ADAPTER], merged=out, trained_on="nf4", **FAST)
    assert not rep["passed"]
    gated = next(c for c in rep["comparisons"] if c["name"] == "merged")
    assert gated["merged_into"] == "dequantized" and not gated["passed"]
    assert rep["tensors"]["merged"]["failed"] == 14  # every 4-bit weight differs from its NF4 requantization + ΔW
    rep = validate(work["nf4"], [ADAPTER], merged=work["dir"] / "m-q4", **FAST)
    assert rep["passed"] and rep["trained_on"]["merged_into"] == "4-bit base"
    assert "reference computes with its dequantized weights" in rep["trained_on"]["line"]


def test_streamed_and_whole_model_agree_on_both_gaps(work, whole):
    """The layer-streamed passes (validate/streamed.py) read the NF4-dequantized base through the same
    RequantizedView: same verdicts and numbers as the whole-model path, and per-block divergence against
    the reference the candidate is gated on."""
    from loratools.validate import validate

    for name, into in (("m-fp", "16-bit"), ("m-dq", "dequantized")):
        docs = [whole[name], validate(LLAMA, [work["qlora"]], merged=work["dir"] / name, stream=True, **FAST)]
        w, st = (d["trained_on"] for d in docs)
        assert all(d["passed"] for d in docs) and w["merged_into"] == st["merged_into"] == into
        for key in ("gap_to_16bit", "gap_to_dequantized", "references_gap"):
            assert st[key]["rel_err"] == pytest.approx(w[key]["rel_err"], rel=1e-3), key
            assert st[key]["max_abs"] == pytest.approx(w[key]["max_abs"], rel=1e-2, abs=1e-5), key
        gated = next(c for c in docs[1]["comparisons"] if c["name"] == "merged")
        blocks = gated["divergence"]["blocks"]
        assert gated["streamed"] and len(blocks) == 2 and gated["divergence"]["first_divergence"] is None
        assert max(b["rel_err"] for b in blocks) < 1e-3  # against its own base: rounding only


def test_bad_options_are_usage_errors(work, tmp_path):
    r = run_cli("merge", work["nf4"], ADAPTER, "-o", tmp_path / "x", "--into-dequantized", "nf4", expect=2)
    assert "already a 4-bit checkpoint" in r.stderr and not (tmp_path / "x").exists()
    r = run_cli("merge", LLAMA, ADAPTER, "-o", tmp_path / "y", "--into-dequantized", "nf4", "--trained-on", "fp",
                expect=2)
    assert "contradicts" in r.stderr and len(r.stderr.strip().splitlines()) == 1
